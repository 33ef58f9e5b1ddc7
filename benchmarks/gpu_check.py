"""The one-command GPU check: tests on the device, benchmarks and a torchrun run, in minutes.

    bash benchmarks/gpu_check.sh                          # on a CUDA machine: ≤ 8 minutes
    bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/check.txt   # ≤ 3 minutes

Stages, each a subprocess with its own time budget (a stage past its budget is stopped and
reported as a timeout, keeping what it printed; once the total budget is spent the remaining
stages are skipped): the device-relevant tests (``pytest --device``), the sync-debug test, the
layer benchmark eager and compiled in float32 and bfloat16 at (64, 128, 32, 32) and (256, 512)
(peak memory in its rows) and eager in bfloat16 on channels-last input (the memory format of
mixed-precision convolutions), the CIFAR-CNN step (MixtureNorm at conv3 vs all-BN, batch 256) eager
and compiled, and ``normlab train`` on the digits config under ``torchrun --nproc_per_node=1``
with ``run.sync_stats=true``. The results file (default ``benchmarks/results_gpu.txt`` on CUDA;
on the CPU only where ``--out`` says) gets the device, torch version, git commit, every stage's
output and a summary; the summary is also printed. The file is rewritten after every stage, so
an interrupted check keeps what it has done.

``--quick`` runs the same stages at tiny sizes, on a few layers, with few pairs; on the CPU it
compiles with ``aot_eager`` (forward and backward traced into one graph, no kernel generation),
so it checks the pipeline, not inductor. Exit status: 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import MMAP_ENV, Budget

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results_gpu.txt"
TOTAL_BUDGET = {False: 470.0, True: 175.0}  # seconds, full / --quick
MIN_STAGE_S = 8.0  # a stage is not started with less time than this left
# a benchmark stops starting rows this long before its stage's budget (at most half of it)
BENCH_MARGIN_S = 20.0
DEVICE_TESTS = ["tests/test_device.py", "tests/test_kernels.py", "tests/test_fold.py"]
# compiled rows in order of interest, then the rest (as the budget allows)
COMPILE_ORDER = [
    "bn",
    "mixture(k=3, em_iters=2)",
    "mode(k=2)",
    "mgn(k=2)",
    "iternorm(group_size=64, iters=5)",
    "bcn",
    "sn",
    "brn",
    "dbn(group_size=16)",
    "WSConv2d",
    "*",
]
QUICK_ROWS = ["mode(k=2)", "mixture(k=3, em_iters=2)"]


@dataclass
class Stage:
    name: str
    argv: list[str]
    budget: float  # seconds
    summary: Callable[[list[str]], list[str]]
    bench: bool = False  # takes --budget


@dataclass
class Outcome:
    stage: Stage
    status: str  # ok, FAILED (rc N), TIMEOUT, skipped (...)
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _last_match(pattern: str) -> Callable[[list[str]], list[str]]:
    rx = re.compile(pattern)
    return lambda lines: [line for line in lines if rx.search(line)][-1:]


def _all_matches(pattern: str) -> Callable[[list[str]], list[str]]:
    rx = re.compile(pattern)
    return lambda lines: [line for line in lines if rx.search(line)]


ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception)\b")
PYTEST_RESULT = r"\d+ (passed|failed|skipped|errors?|deselected)\b"


def stages(device: str, quick: bool, run_dir: Path) -> list[Stage]:
    """The stages of the check, in order, for ``device`` (``cuda``/``cpu``)."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", device, "-rfEs"]
    if quick:
        tests = [*pytest, "tests/test_device.py", "-k", "matches_cpu and mode"]
        tiny = ["--shape", "8,16,4,4"]
        eager = [*tiny, "--shape", "16,32", *(f"--only={r}" for r in QUICK_ROWS), "--pairs", "2"]
        # on a CPU, trace only: inductor's C++ builds take minutes on a small machine
        backend = ["--compile-backend", "aot_eager"] if device == "cpu" else []
        compiled = [*tiny, "--only=mode(k=2)", "--pairs", "2", *backend]
        net = ["--batch", "8", "--size", "8", "--pairs", "1", *backend]
        steps = 4
    else:
        tests = [*pytest, "-m", "not slow", *DEVICE_TESTS]
        eager = ["--shape", "64,128,32,32", "--shape", "256,512", "--pairs", "20"]
        compiled = [*eager, "--by-shape", *(f"--only={r}" for r in COMPILE_ORDER)]
        net = ["--pairs", "10"]
        steps = 30
    layers = [py, "benchmarks/layers.py", "--device", device, *eager]
    compiled = [py, "benchmarks/layers.py", "--device", device, "--compile", *compiled]
    targets = _last_match(r"^targets:")
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    train = [
        *torchrun,
        "-m",
        "normlab.cli",
        "train",
        "experiments/digits_bn.toml",
        *(
            f"--set={s}"
            for s in (
                "run.sync_stats=true",
                f"train.steps={steps}",
                f"run.device={device}",
                f"run.dir={run_dir}",
                "run.name=ddp1",
                "run.progress=off",
            )
        ),
    ]
    q = quick
    return [
        Stage("device tests", tests, 30 if q else 100, _last_match(PYTEST_RESULT)),
        Stage(
            "sync-debug test",
            [*pytest, "tests/test_cuda.py"],
            15 if q else 35,
            _last_match(PYTEST_RESULT),
        ),
        *(
            Stage(f"layers {kind} {dtype}", [*argv, "--dtype", dtype], budget, targets, True)
            for kind, argv, dtype, budget in (
                ("eager", layers, "float32", 15 if q else 30),
                ("eager", layers, "bfloat16", 15 if q else 30),
                ("eager channels-last", [*layers, "--channels-last"], "bfloat16", 10 if q else 20),
                ("compiled", compiled, "float32", 25 if q else 85),
                ("compiled", compiled, "bfloat16", 25 if q else 65),
            )
        ),
        Stage(
            "network step (cifar_cnn, MixtureNorm at conv3 vs all-BN)",
            [py, "benchmarks/network.py", "--device", device, "--compile", *net],
            45 if q else 70,
            _all_matches(r"step time ratio|compiled/eager|FAILED"),
        ),
        Stage(
            "torchrun --nproc_per_node=1 normlab train, sync_stats",
            train,
            35,
            _last_match(r"final test acc"),
        ),
    ]


def _env(argv: list[str]) -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    env = {
        **os.environ,
        "PYTHONPATH": src + (os.pathsep + path if path else ""),
        "CI": "1",  # no progress bars
        "PYTHONUNBUFFERED": "1",
    }
    if argv[1].startswith("benchmarks/"):  # set here, the benchmarks need not restart for it
        env.setdefault(MMAP_ENV, "65536")
    return env


def run_stage(stage: Stage, timeout: float, echo: bool = True) -> Outcome:
    """Run one stage as a subprocess (its own process group), stopping it after ``timeout``."""
    argv = list(stage.argv)
    if stage.bench:
        argv += ["--budget", f"{max(timeout / 2, timeout - BENCH_MARGIN_S):.0f}"]
    t0 = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=_env(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo:
                print(f"  | {lines[-1]}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"FAILED (rc {rc})"
    except subprocess.TimeoutExpired:
        _stop(proc)
        status = f"TIMEOUT (stopped after {timeout:.0f} s)"
    reader.join(timeout=10)
    return Outcome(stage, status, time.monotonic() - t0, lines)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (torchrun's workers included), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_hash() -> str:
    """sha256 (first 12 hex digits) of every ``src/`` and ``benchmarks/`` Python file."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("src/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment(device: str) -> list[str]:
    """Lines describing the machine, torch and the code."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        commit += " (with uncommitted changes)" if dirty else ""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev = (
            f"{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
            f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return [
        f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"device: {dev}",
        f"torch: {torch.__version__}, python {platform.python_version()}",
        f"git commit: {commit or 'unknown (no git repository here)'}",
        f"source hash: {source_hash()}",
    ]


def summary(outcomes: list[Outcome]) -> list[str]:
    lines = ["summary:"]
    for o in outcomes:
        lines.append(f"  {o.stage.name}: {o.status} ({o.seconds:.0f} s)")
        picked = o.stage.summary(o.lines) if o.lines else []
        if not o.ok and not picked:  # the first exception line (the root cause) and the end
            errors = [line for line in o.lines if ERROR_LINE.match(line)]
            picked = [*errors[:1], *o.lines[-3:]]
        lines += [f"      {line.strip()}" for line in picked]
    passed = sum(o.ok for o in outcomes)
    lines.append(f"  {passed}/{len(outcomes)} stages ok")
    return lines


def machine_paths_removed(text: str) -> str:
    """``text`` with this checkout's path made relative and the home directory written ``~``
    (the results file may be committed: it should not name the machine's directories)."""
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


def write_results(path: Path, env: list[str], outcomes: list[Outcome], total: float) -> None:
    parts = [*env, f"total time: {total:.0f} s", ""]
    for o in outcomes:
        parts += [f"== {o.stage.name}: {o.status} ({o.seconds:.0f} s) ==", *o.lines, ""]
    parts += summary(outcomes)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(machine_paths_removed("\n".join(parts) + "\n"))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few layers (≤ 3 minutes)")
    p.add_argument("--out", type=Path, help="results file (default on CUDA: " + str(DEFAULT_OUT))
    p.add_argument("--budget", type=float, help="total seconds (default 470; 175 with --quick)")
    p.add_argument("--quiet", action="store_true", help="do not echo the stages' output")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (use --device cpu --quick)")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    out = args.out or (DEFAULT_OUT if device == "cuda" else None)
    total = Budget(args.budget or TOTAL_BUDGET[args.quick])
    env = environment(device)
    print("\n".join(env), flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="normlab_gpu_check_"))
    outcomes: list[Outcome] = []
    try:
        for stage in stages(device, args.quick, run_dir):
            left = total.remaining()
            if left < MIN_STAGE_S:
                outcomes.append(Outcome(stage, "skipped (total time budget spent)"))
                continue
            print(f"== {stage.name} (budget {min(stage.budget, left):.0f} s)", flush=True)
            outcomes.append(run_stage(stage, min(stage.budget, left), echo=not args.quiet))
            print(f"== {stage.name}: {outcomes[-1].status}", flush=True)
            if out is not None:
                write_results(out, env, outcomes, total.elapsed())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if out is not None:
        write_results(out, env, outcomes, total.elapsed())
    print("\n".join(summary(outcomes)))
    if out is not None:
        print(f"results: {out}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
