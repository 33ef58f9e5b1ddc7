"""One run of an experiment, the unit of work: its spec, and training or analysing it exactly once.

:class:`RunSpec` is one (variant, seed) run: where it goes and its configuration.
:func:`execute_run` trains (resuming from the run directory's checkpoint) or analyses it.
:func:`execute_claimed` is what every launcher calls: :func:`execute_run` under the run
directory's claim (:mod:`~normlab.experiments.claims`), so a run with a live claim elsewhere is
skipped, a failure leaves ``failed.json`` and the traceback in ``run.log``, and a launcher that
must stop (a Slurm job's preemption or time limit) can ask the run to checkpoint and stop at the
next step.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.analyses import get_runner
from normlab.experiments.claims import (
    ClaimLostError,
    ClaimPolicy,
    RunClaim,
    clear_failure,
    describe_owner,
    record_failure,
    run_log_writer,
)
from normlab.experiments.collectors import build_collectors, json_default
from normlab.experiments.spec import Experiment, Variant
from normlab.train import Config, Trainer, atomic_write_text
from normlab.train.ddp import process_device
from normlab.train.distributed import (
    broadcast_object,
    env_world_size,
    init_distributed,
    is_main_process,
)

__all__ = [
    "PreemptedError",
    "RunSpec",
    "execute_claimed",
    "execute_run",
    "with_config",
    "write_json",
]


@dataclass
class RunSpec:
    """One (variant, seed) run of an experiment, where it goes and its configuration: a
    :class:`normlab.train.Config` (training) or the analysis parameters (a dict)."""

    variant: Variant
    seed: int
    run_dir: Path
    config: Config | dict[str, Any]

    @property
    def kind(self) -> str:
        return "analysis" if isinstance(self.config, dict) else "train"

    @property
    def finished(self) -> bool:
        marker = "summary.json" if self.kind == "train" else "result.json"
        return (self.run_dir / marker).is_file()


def with_config(spec: RunSpec, **run: Any) -> RunSpec:
    """``spec`` with ``run.<key> = value`` for each keyword (keys a resume may change, such as
    ``progress`` or ``save_checkpoints``); an analysis run is returned as it is."""
    if isinstance(spec.config, dict) or all(
        getattr(spec.config.run, k) == v for k, v in run.items()
    ):
        return spec
    cfg = copy.deepcopy(spec.config)
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return RunSpec(spec.variant, spec.seed, spec.run_dir, cfg.validate())


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically (paths and arrays as strings / lists)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def _quiet(msg: str) -> None:
    pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def execute_run(
    exp: Experiment,
    spec: RunSpec,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence[Callable[[Trainer], None]] = (),
    trainer_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train or analyse one run into ``spec.run_dir`` (resuming a training run from its
    checkpoint unless ``overwrite``). Returns ``{status, seconds[, summary]}`` with status
    ``"trained"``, ``"resumed"`` or ``"analysed"``; exceptions propagate. ``callbacks`` run after
    the collectors at every step; ``trainer_log`` receives the trainer's own lines (epochs,
    resume). This is the bare unit of work: launchers call :func:`execute_claimed`."""
    log = log or _quiet
    t = time.perf_counter()
    d = spec.run_dir
    if isinstance(spec.config, dict):
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "params.json", spec.config)
        runner = get_runner(spec.config.get("runner"), exp.name)
        result = runner.run(spec.config, spec.seed, d, log)
        result = {
            "variant": spec.variant.name,
            "seed": spec.seed,
            "time": round(time.perf_counter() - t, 3),
            **result,
        }
        write_json(d / "result.json", result)
        return {"status": "analysed", "seconds": time.perf_counter() - t}
    resumed = (d / "checkpoint.pt").is_file() and not overwrite
    trainer = Trainer(
        spec.config, d, resume=not overwrite, overwrite=overwrite, log=trainer_log or _quiet
    )
    # collectors write files: rank 0's alone under torchrun (they hold no collectives)
    collectors = (
        build_collectors(exp.collect, trainer, d, overwrite or not resumed, exp.name)
        if trainer.dist.is_main
        else []
    )
    trainer.callbacks.extend(collectors)
    trainer.callbacks.extend(callbacks)
    try:
        summary = trainer.fit().summary
    finally:
        for c in collectors:
            c.close()
    return {
        "status": "resumed" if resumed else "trained",
        "seconds": time.perf_counter() - t,
        "summary": summary,
    }


class PreemptedError(RuntimeError):
    """A launcher asked the run to stop (preemption, timeout); it saved a checkpoint at
    ``step`` and stopped, to resume when the job is requeued."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step} to be requeued")
        self.step = step


def _step_callback(
    claim: RunClaim | None, stop: threading.Event | None
) -> Callable[[Trainer], None]:
    def on_step(trainer: Trainer) -> None:
        if claim is not None:
            claim.progress(trainer.step, trainer.total_steps)
            if claim.lost.is_set():
                raise ClaimLostError(
                    f"{claim.run_dir}: the claim was taken over by another launcher"
                )
        if stop is not None and stop.is_set():
            trainer.save()
            raise PreemptedError(trainer.step)

    return on_step


def _decide(claim: RunClaim | None, spec: RunSpec, overwrite: bool) -> str:
    """``"go"`` (claimed), ``"busy"`` (a live claim elsewhere) or ``"skipped"`` (finished by
    another launcher after this one planned)."""
    if claim is None:
        return "go"
    if not claim.acquire():
        return "busy"
    if spec.finished and not overwrite:
        claim.release()
        return "skipped"
    return "go"


def execute_claimed(
    exp: Experiment,
    spec: RunSpec,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    *,
    job_id: str = "",
    launcher: str = "serial",
    policy: ClaimPolicy | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """:func:`execute_run` under the run directory's claim.

    Returns the outcome of :func:`execute_run`, or one with status ``"busy"`` (a live claim of
    ``holder`` elsewhere), ``"skipped"`` (another launcher finished the run meanwhile),
    ``"preempted"`` (``stop`` was set: the run saved a checkpoint and stopped) or ``"lost"``
    (another launcher took the claim over). A run that raises leaves ``failed.json`` and the
    traceback in ``run.log``, then the exception propagates; success removes ``failed.json``.
    Under ``torchrun`` (or a Slurm job with several tasks) rank 0 claims and tells the others.
    """
    log = log or _quiet
    t = time.perf_counter()
    main = is_main_process()
    claim = RunClaim(spec.run_dir, job_id, launcher, policy) if main else None
    decision = _decide(claim, spec, overwrite)
    if env_world_size() > 1 and not isinstance(spec.config, dict):
        run = spec.config.run
        init_distributed(process_device(run.device), run.dist_backend)
        decision = broadcast_object(decision)
    if decision != "go":
        out: dict[str, Any] = {"status": decision, "seconds": time.perf_counter() - t}
        if claim is not None and claim.holder is not None:
            out["holder"] = describe_owner(claim.holder)
        return out
    runlog = run_log_writer(spec.run_dir) if main else _quiet
    if claim is not None:
        note = f"; took over a claim that was {claim.took_over}" if claim.took_over else ""
        runlog(f"attempt by {describe_owner(claim.me)}{note}")
    try:
        outcome = execute_run(
            exp, spec, overwrite, log, [_step_callback(claim, stop)], trainer_log=runlog
        )
    except PreemptedError as e:
        runlog(f"checkpointed at step {e.step} and stopped, to resume when requeued")
        return {"status": "preempted", "step": e.step, "seconds": time.perf_counter() - t}
    except ClaimLostError as e:
        runlog(f"stopped: {e}")
        return {"status": "lost", "error": str(e), "seconds": time.perf_counter() - t}
    except Exception as e:
        if claim is not None:
            rec = record_failure(spec.run_dir, e, claim.me)
            runlog(f"FAILED (attempt {rec['attempt']}): {rec['error']}\n{traceback.format_exc()}")
        raise
    finally:
        if claim is not None:
            claim.release()
    if main:
        clear_failure(spec.run_dir)
        runlog(f"{outcome['status']} in {outcome['seconds']:.1f} s")
    return outcome
