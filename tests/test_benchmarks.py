"""The benchmark scripts and the GPU check's machinery, at tiny sizes (timings are not checked).

Oracles: hand-written call logs and ratios for the timing helpers; hand-built rows for the target
summary; a module with a known graph break for the compile fallback; real subprocesses that
sleep or fail for the stage runner; and the benchmark scripts' own argument parsers and
``normlab``'s config loader for every command line the GPU check would run, so that the check
cannot drift away from the scripts it calls.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab.train import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _timing  # noqa: E402
import gpu_check  # noqa: E402
import layers  # noqa: E402
import network  # noqa: E402

CPU = torch.device("cpu")


def test_steps_run_in_rotating_order_and_ratios_are_per_round() -> None:
    log: list[str] = []
    steps = [lambda n=n: log.append(n) for n in "abc"]
    times = _timing.interleaved_times(steps, CPU, rounds=3, warmup=1)
    assert "".join(log) == "abc" + "abc" + "bca" + "cab"
    assert [len(t) for t in times] == [3, 3, 3]
    log.clear()
    _timing.paired_ratio(steps[0], steps[1], CPU, pairs=4, warmup=0)
    assert "".join(log) == "abbaabba"
    hand = [[2.0, 3.0, 10.0], [1.0, 1.0, 2.0]]  # per-round ratios 2, 3, 5
    assert _timing.median_ratio(hand, 0, 1) == 3.0


def test_budget() -> None:
    assert not _timing.Budget(None).spent() and _timing.Budget(None).remaining() == math.inf
    assert _timing.Budget(1e-9).spent()
    with pytest.raises(ValueError, match="positive"):
        _timing.Budget(0)
    with pytest.raises(ValueError, match="--dtype"):
        _timing.parse_dtype("float16")


class _Breaks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


def test_compile_falls_back_to_graph_breaks_and_says_why() -> None:
    x = torch.randn(3, requires_grad=True)

    def trial(m: nn.Module) -> None:
        m(x).sum().backward()

    try:
        _, how = _timing.compile_module(nn.Linear(3, 2), trial, backend="aot_eager")
        assert how == "fullgraph"
        broken, how = _timing.compile_module(_Breaks(), trial, backend="aot_eager")
        assert how.startswith("breaks: ") and len(how) <= 170
        assert torch.equal(broken(x), x * 2 + 1)
    finally:
        torch._dynamo.reset()


def test_rows_cover_every_layer_with_the_right_baselines() -> None:
    rows = dict(layers.rows_to_run(None))
    assert set(normlab.available_norms()) <= set(rows)
    assert rows["sn"] == rows["brn"] == rows["mixture"] == "bn"
    assert rows["mgn(k=2)"] == rows["gn"] == "gn"
    assert list(rows)[-1] == layers.WS_ROW and rows[layers.WS_ROW] == "conv"
    # repeated globs: rows in the order of the first glob they match, no row twice
    ordered = [s for s, _ in layers.rows_to_run(["mode(k=2)", "bn", "*"])]
    assert ordered[:2] == ["mode(k=2)", "bn"] and len(ordered) == len(set(ordered)) == len(rows)
    assert [s for s, _ in layers.rows_to_run("mgn*")] == ["mgn", "mgn(k=2)"]


def test_row_plan_orders_by_row_or_by_shape() -> None:
    rows = [("bn", "bn"), ("WSConv2d", "conv"), ("gn", "gn")]
    shapes = [(2, 4), (2, 4, 3, 3)]
    by_row = layers.row_plan(rows, shapes, by_shape=False)
    assert [(s, sh) for s, _, sh in by_row] == [
        ("bn", (2, 4)),
        ("bn", (2, 4, 3, 3)),
        ("WSConv2d", (2, 4, 3, 3)),
        ("gn", (2, 4)),
        ("gn", (2, 4, 3, 3)),
    ]
    by_shape = layers.row_plan(rows, shapes, by_shape=True)
    assert [(s, sh) for s, _, sh in by_shape] == [
        ("bn", (2, 4)),
        ("gn", (2, 4)),
        ("bn", (2, 4, 3, 3)),
        ("WSConv2d", (2, 4, 3, 3)),
        ("gn", (2, 4, 3, 3)),
    ]


def test_target_summary_counts_and_names_the_misses() -> None:
    s4 = (8, 16, 4, 4)
    rows = [
        layers.Row("mode(k=2)", s4, "BatchNorm2d", ratio=2.0, vs_eager=1.2),  # met, missed
        layers.Row("mode(k=2)", (8, 16), "BatchNorm1d", ratio=9.0, vs_eager=0.5),  # 2-D: no target
        layers.Row("mixture(k=3, em_iters=2)", s4, "BatchNorm2d", ratio=3.5, vs_eager=1.0),
        layers.Row("iternorm", s4, "BatchNorm2d", error="compile failed: boom"),
    ]
    eager = layers.target_summary(rows, compiled=False)
    assert eager.startswith("targets: 1 met, 1 missed")
    assert "mixture(k=3, em_iters=2) 8x16x4x4 3.50x > 3" in eager
    assert "1 failed: iternorm 8x16x4x4" in eager
    compiled = layers.target_summary(rows, compiled=True, skipped=2)
    assert compiled.startswith("targets: 3 met, 2 missed")
    assert "mode(k=2) 8x16x4x4 vs eager 1.20x > 1.05" in compiled
    assert "2 rows skipped" in compiled
    assert "FAILED  compile failed: boom" in layers.format_row(rows[3], compiled=True)
    assert "vs eager" in layers.header(compiled=True)
    assert "vs eager" not in layers.header(compiled=False)


def test_shape_argument() -> None:
    assert layers._shape("64,128,32,32") == (64, 128, 32, 32)
    assert layers._shape("256x512") == (256, 512)
    for bad in ("64,128,32", "a,b", "0,4"):
        with pytest.raises(Exception, match="--shape"):
            layers._shape(bad)


def _run_main(main, argv: list[str], capsys) -> str:
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return capsys.readouterr().out


def test_layer_benchmark_eager_and_compiled(capsys) -> None:
    tiny = ["--device", "cpu", "--shape", "4,8,3,3", "--pairs", "1", "--only", "bn"]
    out = _run_main(layers.main, [*tiny, "--only", "WSConv2d", "--dtype", "bfloat16"], capsys)
    lines = out.splitlines()
    assert "eager, bfloat16" in lines[0]
    assert any(line.startswith("bn ") and "4x8x3x3" in line for line in lines)
    assert any(line.startswith("WSConv2d ") and "Conv2d" in line for line in lines)
    assert lines[-1].startswith("targets: ")
    out = _run_main(layers.main, [*tiny, "--compile", "--compile-backend", "aot_eager"], capsys)
    row = next(line for line in out.splitlines() if line.startswith("bn "))
    assert row.endswith("fullgraph") and "≤1.05" in row, row
    assert "eager ms" in out and "per-call cost of a compiled layer: " in out
    us = re.search(r"x·w on a 4x8 input: (\d+) µs compiled, (\d+) µs eager", out)
    assert us and float(us.group(1)) > 0 and float(us.group(2)) > 0, out


def test_network_benchmark(capsys) -> None:
    argv = ["--device", "cpu", "--batch", "4", "--size", "8", "--pairs", "1"]
    out = _run_main(network.main, argv, capsys)
    assert "['conv3.norm'] vs all-BN" in out and "step time ratio" in out


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_gpu_check_command_is_valid(device: str, quick: bool, tmp_path) -> None:
    plan = gpu_check.stages(device, quick, tmp_path)
    assert len(plan) == 9
    if not quick:  # the stages' budgets fit in the 8 minutes
        assert sum(s.budget for s in plan) <= gpu_check.TOTAL_BUDGET[False] <= 480
    registered = [s for s, _ in layers.rows_to_run(None)]
    for stage in plan:
        argv = stage.argv
        assert argv[0] == sys.executable
        if argv[1:3] == ["-m", "pytest"]:
            files = [a for a in argv if a.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), files
            assert argv[argv.index("--device") + 1] == device
        elif argv[1] in ("benchmarks/layers.py", "benchmarks/network.py"):
            script = layers if argv[1].endswith("layers.py") else network
            extra = ["--budget", "10"] if stage.bench else []
            args = script.build_parser().parse_args([*argv[2:], *extra])
            assert args.device == device
            for pattern in getattr(args, "only", None) or []:  # no glob that matches nothing
                assert any(layers._matches(r, [pattern]) == 0 for r in registered), pattern
        else:
            assert argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=1" in argv
            cfg_file = ROOT / argv[argv.index("train") + 1]
            sets = [a.removeprefix("--set=") for a in argv if a.startswith("--set=")]
            cfg = load_config(cfg_file, sets)
            assert cfg.run.sync_stats and cfg.run.device == device and cfg.train.steps > 0


def test_stage_runner_keeps_output_of_a_stage_it_stops(tmp_path) -> None:
    py = sys.executable
    sleeper = gpu_check.Stage(
        "sleeps",
        [py, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        1.0,
        gpu_check._last_match("started"),
    )
    res = gpu_check.run_stage(sleeper, timeout=3.0, echo=False)
    assert res.status.startswith("TIMEOUT") and res.lines == ["started"]
    assert res.seconds < 30
    failing = gpu_check.Stage(
        "fails", [py, "-c", "import sys; print('x'); sys.exit(3)"], 10.0, lambda lines: []
    )
    res = gpu_check.run_stage(failing, timeout=20.0, echo=False)
    assert res.status == "FAILED (rc 3)" and res.lines == ["x"]


def test_check_skips_stages_once_the_total_budget_is_spent(tmp_path, monkeypatch, capsys) -> None:
    py = sys.executable
    fake = [
        gpu_check.Stage("first", [py, "-c", "print('one')"], 30.0, gpu_check._last_match("one")),
        gpu_check.Stage("slow", [py, "-c", "import time; time.sleep(60)"], 60.0, lambda ls: []),
        gpu_check.Stage("never", [py, "-c", "print('no')"], 30.0, lambda ls: []),
    ]
    monkeypatch.setattr(gpu_check, "stages", lambda device, quick, run_dir: fake)
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 2.0)
    out = tmp_path / "results.txt"
    rc = gpu_check.main(["--device", "cpu", "--quiet", "--budget", "6", "--out", str(out)])
    assert rc == 1
    text = out.read_text()
    assert "device: CPU" in text and "torch: " in text and "git commit: " in text
    assert "== first: ok" in text and "\none\n" in text
    assert "== slow: TIMEOUT" in text
    assert "== never: skipped (total time budget spent)" in text
    assert "1/3 stages ok" in text and "1/3 stages ok" in capsys.readouterr().out


def test_results_name_no_machine_directories() -> None:
    root, home = str(gpu_check.ROOT), str(Path.home())
    text = f"File {root}/src/normlab/cli.py, line 3\nin {home}/.venv/lib\n{root}"
    clean = gpu_check.machine_paths_removed(text)
    assert clean.splitlines()[0] == "File src/normlab/cli.py, line 3"
    assert root not in clean and (home == "/" or home not in clean)


def test_layer_benchmark_channels_last(capsys) -> None:
    opts = layers.Options(torch.device("cpu"), torch.float32, 1, False, channels_last=True)
    x4, x2 = opts.memory(torch.randn(2, 3, 4, 5)), opts.memory(torch.randn(4, 3))
    assert x4.is_contiguous(memory_format=torch.channels_last) and not x4.is_contiguous()
    assert x2.is_contiguous()
    tiny = ["--device", "cpu", "--shape", "4,8,3,3", "--pairs", "1", "--only", "mode"]
    out = _run_main(layers.main, [*tiny, "--channels-last"], capsys)
    lines = out.splitlines()
    assert lines[0].endswith("eager, float32, channels last")
    assert any(line.startswith("mode ") and "4x8x3x3" in line for line in lines)
