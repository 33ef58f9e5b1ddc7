"""``bash benchmarks/gpu_check.sh --device cpu --quick``: the whole GPU check at tiny sizes.

It runs every stage (tests, sync-debug test, layer benchmarks eager and compiled in float32 and
bfloat16, eager on channels-last input, the network step, a torchrun run) as the GPU check would, so the script cannot rot.
Marked ``slow``: on this project's shared 2-core machine it takes two to three minutes (the
stages' Python start-ups alone take a minute); ``tests/test_benchmarks.py`` checks every command
line of the check against the scripts' parsers in the default run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "device tests",
    "sync-debug test",
    "layers eager float32",
    "layers eager bfloat16",
    "layers eager channels-last bfloat16",
    "layers compiled float32",
    "layers compiled bfloat16",
    "network step",
    "torchrun --nproc_per_node=1 normlab train, sync_stats",
]


@pytest.mark.slow
def test_quick_cpu_check_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    cmd = ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "--quiet"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    text = out.read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for head in ("device: CPU", "torch: ", "git commit: ", "source hash: "):
        assert head in text, head
    for name in STAGES:
        assert f"== {name}" in text and f"  {name}" in proc.stdout, name
    assert "9/9 stages ok" in text and "9/9 stages ok" in proc.stdout
    assert "passed" in text and "skipped" in text  # the sync-debug test skips without CUDA
    compiled = text.split("== layers compiled float32")[1].split("== layers compiled bfloat16")[0]
    assert "mode(k=2)" in compiled and ("fullgraph" in compiled or "breaks" in compiled)
    cl = text.split("== layers eager channels-last bfloat16")[1].split("== layers compiled")[0]
    assert "eager, bfloat16, channels last" in cl
    assert "compiled step time ratio" in text and "final test acc" in text
