"""The ``normlab`` command line: norms, train (with --set and --resume), quickstart."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import normlab
from normlab.cli import main
from normlab.experiments import run_quickstart
from normlab.experiments.quickstart import METHODS
from normlab.train import load_config, read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert normlab.__version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("norms", "train", "quickstart"):
        assert cmd in out
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("norms", "train", "quickstart", "run", "report"):
        assert cmd in out


def test_norms_lists_the_registry(capsys):
    assert main(["norms"]) == 0
    out = capsys.readouterr().out
    for name in normlab.available_norms():
        assert name in out


def test_shipped_experiment_configs_are_valid():
    # plain training configs (the paper experiment files with an [experiment] table have their
    # own runner and schema)
    files = [
        f
        for f in sorted((ROOT / "experiments").glob("*.toml"))
        if "experiment" not in tomllib.loads(f.read_text())
    ]
    assert {f.stem for f in files} >= {"digits_bn", "digits_std_loss", "digits_bcn_micro"}
    for f in files:
        cfg = load_config(f)
        assert cfg.run.name == f.stem


def _write_cfg(tmp_path: Path) -> Path:
    text = (ROOT / "experiments" / "digits_bn.toml").read_text()
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return p


def test_train_writes_a_run_and_resume_continues(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    common = [
        str(cfg),
        "--set",
        f"run.dir={json.dumps(str(tmp_path / 'runs'))}",
        "--set",
        "train.steps=6",
        "--set",
        "train.eval_every_steps=3",
        "--set",
        "model.kwargs.width=0.5",
        "--set",
        "run.progress=off",
    ]
    assert main(["train", *common]) == 0
    out = capsys.readouterr()
    run = tmp_path / "runs" / "tiny"
    assert "final test acc" in out.out
    assert str(run) in out.err
    assert [r["step"] for r in read_metrics(run)] == [3, 6]
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["train"]["steps"] == 6 and saved["model"]["kwargs"] == {"width": 0.5}
    # the same command again refuses to clobber the run ...
    assert main(["train", *common]) == 2
    assert "--resume" in capsys.readouterr().err
    # ... --resume of a finished run is a no-op that keeps the metrics
    assert main(["train", *common, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [3, 6]


@pytest.mark.parametrize(
    ("override", "needle"),
    [("optim.lrr=0.1", "optim.lrr"), ("train.epochs=zero", "train.epochs"), ("nokey", "nokey")],
)
def test_train_bad_override_names_the_key(tmp_path, capsys, override, needle):
    cfg = _write_cfg(tmp_path)
    assert main(["train", str(cfg), "--set", override]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_train_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_missing_imagenet_folder_is_one_line(capsys, tmp_path):
    cfg = _write_cfg(tmp_path)
    missing = tmp_path / "no_imagenet"
    rc = main(["train", str(cfg), "--set", "data.name=imagenet", "--set", f"data.root={missing}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ImageNet not found" in err and str(missing) in err
    assert "Traceback" not in err


def test_quickstart_reduced_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(
        [
            "quickstart",
            "--out",
            str(out),
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--jobs",
            "1",
            "--set",
            "model.kwargs.width=0.25",
            "--set",
            "train.eval_every_steps=11",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    # the table: one row per method with the columns
    for col in ("final test acc", "best test acc", "steps to BN best", "time/step vs BN"):
        assert col in captured.out
    for m in METHODS:
        assert f"| {m} " in captured.out
    assert "training bn seed 1" in captured.err  # says what it is doing
    png = out / "test_error.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(METHODS)
    assert all(r["seeds"] == 2 and r["failed"] == 0 for r in rows.values())
    # BN reaches its own best by definition, at a step that was evaluated
    bn_curve = res["curves"]["bn"]
    assert rows["bn"]["steps_to_bn_best"] in bn_curve["steps"]
    assert rows["bn"]["time_vs_bn"] == pytest.approx(1.0)
    # the reported numbers are the per-run summaries'
    for m in ("bn", "none"):
        finals = [
            json.loads((out / "runs" / m / f"seed{s}" / "summary.json").read_text())[
                "final_test_acc"
            ]
            for s in range(2)
        ]
        assert rows[m]["final_acc_mean"] == pytest.approx(sum(finals) / 2)
    assert (out / "results.md").read_text().count("|") > 10


def test_quickstart_rejects_unknown_method(capsys, tmp_path):
    assert main(["quickstart", "--methods", "bn,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and normlab.__version__ in r.stdout


def test_quickstart_parallel_workers_match_in_process(tmp_path):
    # The default path uses spawned worker processes; the numbers must not depend on it.
    kw = dict(
        seeds=1,
        epochs=1,
        methods=["bn", "none"],
        overrides=["model.kwargs.width=0.25"],
        log=lambda s: None,
    )
    par = run_quickstart(out=tmp_path / "par", jobs=2, **kw)
    seq = run_quickstart(out=tmp_path / "seq", jobs=1, **kw)
    for a, b in zip(par.rows, seq.rows):
        assert a["method"] == b["method"]
        assert a["final_acc_mean"] == b["final_acc_mean"]
        assert a["best_acc_mean"] == b["best_acc_mean"]
        assert a["steps_to_bn_best"] == b["steps_to_bn_best"]
