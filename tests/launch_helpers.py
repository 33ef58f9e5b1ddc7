"""Shared pieces of the launcher, claim and status tests: a tiny experiment file, the metrics and
summaries two sweeps are compared by, and a process that stands for another live launcher."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from normlab.experiments import load_experiment

EXP = """
[experiment]
title = "launcher test"
seeds = 1

[base.data]
name = "digits"
[base.model]
name = "small_cnn"
kwargs = { width = 0.25 }
[base.train]
steps = __STEPS__
batch_size = 32
eval_every_steps = 10
[base.run]
progress = "off"
save_checkpoints = false
threads = 1

[[variant]]
name = "bn"
set = { model.norm = "bn" }

[[variant]]
name = "gn"
set = { model.norm = "gn(num_groups=2)", optim.lr = 0.2 }

[[variant]]
name = "ln"
set = { model.norm = "ln" }

[[variant]]
name = "none"
set = { model.norm = "none" }
__EXTRA__
[scale.small]
"""

BROKEN = """
[[variant]]
name = "broken"
set = { data.name = "cifar10", data.root = "__ROOT__" }
"""

# summary keys that do not depend on timing
SUMMARY_KEYS = ("steps", "final_test_acc", "final_test_loss", "final_train_loss", "best_test_acc")


def write_experiment(tmp: Path, steps: int = 30, broken: bool = False, name: str = "lx") -> Path:
    """An experiment file in ``tmp`` with the variants bn, gn, ln, none (and ``broken``: a run
    that fails for want of its dataset files)."""
    empty = tmp / "no_data"
    empty.mkdir(exist_ok=True)
    extra = BROKEN.replace("__ROOT__", str(empty)) if broken else ""
    text = textwrap.dedent(EXP).replace("__STEPS__", str(steps)).replace("__EXTRA__", extra)
    p = tmp / f"{name}.toml"
    p.write_text(text)
    load_experiment(p, validate=True)
    return p


def metrics(run_dir: Path) -> list[tuple]:
    """(step, test_acc, train_loss, test_loss) of every record of a run's ``metrics.jsonl``."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["test_acc"], r["train_loss"], r["test_loss"]) for r in recs]


def summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s[k] for k in SUMMARY_KEYS}


def attempts(run_dir: Path) -> int:
    """How many launchers started the run (one ``attempt by`` line of ``run.log`` each)."""
    return sum("attempt by" in line for line in (run_dir / "run.log").read_text().splitlines())


def write_lock(
    run_dir: Path,
    host: str | None = None,
    pid: int = 1,
    heartbeat: float | None = None,
    job_id: str = "",
    step: int | None = None,
    total: int | None = None,
) -> None:
    """A ``claim.lock`` as another launcher would have written it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = {
        "token": f"other-{pid}-{job_id}",
        "host": host or socket.gethostname(),
        "pid": pid,
        "pid_start": None,
        "job_id": job_id,
        "launcher": "serial",
        "since": "2024-01-01T00:00:00+00:00",
        "heartbeat": time.time() if heartbeat is None else heartbeat,
        "step": step,
        "total_steps": total,
    }
    (run_dir / "claim.lock").write_text(json.dumps(rec))


def sleeper() -> subprocess.Popen:
    """A live process on this host (stands for another launcher)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
