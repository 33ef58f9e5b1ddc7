"""``normlab status``: what each run of a suite directory is doing, read from its files.

A run is *finished* (``summary.json`` / ``result.json``), *running* (a live claim: where, since
when, its last step and heartbeat), *failed* (``failed.json`` without a live claim: the error
and the end of ``run.log``) or *queued* (none of these: not started, submitted to Slurm and
waiting, or stopped with a checkpoint, e.g. a preempted job waiting to be requeued). The run
directories are the truth: several launchers may have written ``suite.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.experiments.claims import (
    RUN_LOG,
    ClaimPolicy,
    describe_owner,
    owner_identity,
    read_claim,
    read_failure,
    stale_reason,
    tail,
)
from normlab.experiments.launchers import JOBS_FILE
from normlab.experiments.runner import read_suite
from normlab.train import read_metrics

__all__ = ["STATES", "RunStatus", "format_status", "suite_status"]

STATES = ("finished", "running", "queued", "failed")


@dataclass
class RunStatus:
    """One run's state and a line of details (``log``: the end of a failed run's log)."""

    variant: str
    seed: int
    dir: str
    state: str
    detail: str = ""
    log: list[str] = field(default_factory=list)


def _ago(t: float, now: float) -> str:
    s = max(0.0, now - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _finished_detail(d: Path) -> str | None:
    p = d / "summary.json"
    if p.is_file():
        s = json.loads(p.read_text(encoding="utf-8"))
        acc = [
            f"{k} {100 * s[key]:.2f}%"
            for k, key in (("final", "final_test_acc"), ("best", "best_test_acc"))
            if isinstance(s.get(key), int | float)
        ]
        return "  ".join([*acc, f"{s.get('steps')} steps"])
    return "analysed" if (d / "result.json").is_file() else None


def _run_status(
    d: Path,
    rec: dict[str, Any],
    jobs: dict[str, Any],
    me: dict[str, Any],
    policy: ClaimPolicy,
    lines: int,
) -> RunStatus:
    st = RunStatus(rec["variant"], int(rec["seed"]), rec["dir"], "queued")
    now = time.time()
    done = _finished_detail(d)
    if done is not None:
        st.state, st.detail = "finished", done
        return st
    claim = read_claim(d)
    stale = stale_reason(claim, me, policy, now) if claim is not None else None
    if claim is not None and stale is None:
        step = claim.get("step")
        total = claim.get("total_steps")
        where = describe_owner(claim)
        st.state = "running"
        st.detail = (
            f"on {where} since {claim.get('since', '?')}"
            + (f", step {step}" + (f"/{total}" if total else "") if step is not None else "")
            + f", heartbeat {_ago(float(claim.get('heartbeat', now)), now)} ago"
        )
        return st
    failure = read_failure(d)
    if failure is not None:
        st.state = "failed"
        st.detail = (
            f"{failure.get('error')} (attempt {failure.get('attempt', 1)}, {failure.get('time')})"
        )
        st.log = tail(d / RUN_LOG, lines)
        return st
    notes = []
    job = jobs.get(rec["dir"])
    if job:
        notes.append(
            f"{job.get('cluster', 'slurm')} job {job['job_id']} submitted {job.get('submitted')}"
        )
    records = read_metrics(d) if (d / "metrics.jsonl").is_file() else []
    if records:
        notes.append(f"stopped after step {records[-1].get('step')} (resumes from its checkpoint)")
    if claim is not None:
        notes.append(f"stale claim of {describe_owner(claim)}: {stale}")
    st.detail = "; ".join(notes) or "not started"
    return st


def suite_status(
    run_dir: str | os.PathLike[str], policy: ClaimPolicy | None = None, lines: int = 8
) -> tuple[dict[str, Any], list[RunStatus]]:
    """``(suite.json contents, one RunStatus per run)`` of a directory written by
    ``normlab run``; ``lines``: how much of a failed run's log to keep."""
    out = Path(run_dir)
    suite = read_suite(out)
    jp = out / JOBS_FILE
    jobs = json.loads(jp.read_text(encoding="utf-8")) if jp.is_file() else {}
    me, policy = owner_identity(), policy or ClaimPolicy()
    runs = [_run_status(out / r["dir"], r, jobs, me, policy, lines) for r in suite["runs"]]
    return suite, runs


def format_status(run_dir: str | os.PathLike[str], lines: int = 8) -> str:
    """The text ``normlab status RUN_DIR`` prints: a header with the totals, one line per run
    (failed runs followed by the end of their log).

    Example::

        >>> import json, pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> runs = [{"variant": "bn", "seed": 0, "dir": "bn/seed0"}]
        >>> _ = (d / "suite.json").write_text(json.dumps({"experiment": "demo", "runs": runs}))
        >>> print(format_status(d).splitlines()[-1])
        bn          0  queued    not started
    """
    suite, runs = suite_status(run_dir, lines=lines)
    counts = {s: sum(r.state == s for r in runs) for s in STATES}
    head = (
        f"{suite.get('experiment')} (scale {suite.get('scale')}) in {run_dir}: {len(runs)} runs: "
        + ", ".join(f"{counts[s]} {s}" for s in STATES)
    )
    width = max([len("variant"), *(len(r.variant) for r in runs)])
    out = [head, "", f"{'variant':<{width}}  seed  {'state':<8}  details"]
    for r in runs:
        out.append(f"{r.variant:<{width}}  {r.seed:>4}  {r.state:<8}  {r.detail}")
        out += [f"{'':<{width}}        | {line}" for line in r.log]
    return "\n".join(out)
