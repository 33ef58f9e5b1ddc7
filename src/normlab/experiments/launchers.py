"""Launchers: where the runs of ``normlab run`` train — here, on Slurm (submitit) or on Ray.

A launcher gets a :class:`Launch` (the unfinished runs, each with its record in ``suite.json``)
and calls :meth:`Launch.record` once per run; every run goes through
:func:`~normlab.experiments.runs.execute_claimed`, so whichever launcher reaches a run first
trains it and the others skip it.

* ``serial``: here, one run after the other, or in ``jobs`` spawned worker processes.
* ``slurm``: one submitit job per run, submitted together as a job array (``--slurm-cluster
  local``: submitit's local executor, real subprocesses on this machine). Each job is a
  :class:`SlurmRun`, a callable with a ``checkpoint`` method: at preemption or time-out submitit
  calls it, the run saves a checkpoint at the end of its current step and submitit requeues the
  job, which resumes from that checkpoint. A run with ``gpus_per_run = N > 1`` is one job with N
  tasks (submitit's ``tasks_per_node``), each given torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the run trains with DDP;
  those runs resume from their last periodic checkpoint. Without ``wait`` the launcher returns
  after submitting (``normlab status`` follows the jobs); ``OUT/jobs.json`` keeps the job ids.
* ``ray``: one Ray task per run with ``num_gpus = gpus_per_run`` and ``num_cpus =
  cpus_per_run``, on the cluster at ``ray_address`` or on a Ray started here; it blocks until
  every run has ended.
"""

from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.experiments.claims import (
    ClaimPolicy,
    describe_owner,
    owner_identity,
    read_claim,
    read_failure,
    stale_reason,
)
from normlab.experiments.runs import RunSpec, execute_claimed, with_config, write_json
from normlab.experiments.spec import Experiment, ExperimentError, Launcher, slurm_minutes

try:  # optional dependency: normlab[slurm]
    import submitit
    from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment
except ImportError:  # pragma: no cover - exercised only without the extra
    submitit = None

__all__ = [
    "JOBS_FILE",
    "LAUNCHERS",
    "Launch",
    "LaunchOptions",
    "SlurmRun",
    "register_launcher",
    "slurm_parameters",
]

JOBS_FILE = "jobs.json"
#: How many times a Slurm job may be requeued after reaching its time limit.
MAX_REQUEUES = 20
#: Seconds a preempted job waits for its run to reach the end of a step and save.
STOP_WAIT_S = 60.0
SLURM_CLUSTERS = ("slurm", "local", "debug")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class LaunchOptions:
    """How ``slurm`` and ``ray`` run the runs (``serial`` uses ``claims`` only).

    Args:
        resources: each run's resources (default: the experiment's ``[launcher]`` table).
        wait: Slurm: block until every job has ended (and write the report).
        cluster: submitit's executor: ``"slurm"``, ``"local"`` (subprocesses on this machine)
            or ``"debug"`` (in this process; implies ``wait``).
        ray_address: the Ray cluster to join (default: ``resources.ray_address``, else a Ray
            started on this machine).
        claims: heartbeat interval and expiry of the runs' claims.
        poll_s: seconds between checks of the jobs while waiting (default: 0.5 for a local
            executor, 30 on Slurm).
    """

    resources: Launcher | None = None
    wait: bool = False
    cluster: str = "slurm"
    ray_address: str | None = None
    claims: ClaimPolicy = field(default_factory=ClaimPolicy)
    poll_s: float | None = None


@dataclass
class Launch:
    """What a launcher is handed: the runs to do, each with its record in the suite; it calls
    :meth:`record` once per run with the outcome of
    :func:`~normlab.experiments.runs.execute_claimed` (or ``status = "submitted"``)."""

    exp: Experiment
    out: Path
    todo: list[tuple[RunSpec, dict[str, Any]]]
    overwrite: bool
    threads: int | None
    jobs: int | None
    keep_going: bool
    log: Callable[[str], None]
    options: LaunchOptions
    suite: dict[str, Any]
    record: Callable[[RunSpec, dict[str, Any], dict[str, Any]], None]

    @property
    def resources(self) -> Launcher:
        return self.options.resources or self.exp.launcher

    def failed(self, spec: RunSpec, e: BaseException, t: float) -> dict[str, Any]:
        """The outcome of a run that raised ``e``; the error is the one its ``failed.json``
        recorded when the exception came back from another process."""
        marker = read_failure(spec.run_dir) or {}
        error = marker.get("error") or f"{type(e).__name__}: {e}"
        return {"status": "failed", "error": error, "seconds": time.perf_counter() - t}


#: Launchers by name: functions of a :class:`Launch`.
LAUNCHERS: dict[str, Callable[[Launch], None]] = {}


def register_launcher(name: str, launch: Callable[[Launch], None]) -> None:
    """Make ``launch`` available as ``run_experiment(launcher=name)`` / ``--launcher name``."""
    LAUNCHERS[name] = launch


# ------------------------------------------------------------------------------------ serial


def _execute_in_worker(
    exp: Experiment, spec: RunSpec, overwrite: bool, policy: ClaimPolicy
) -> dict[str, Any]:
    return execute_claimed(exp, spec, overwrite, _stderr, policy=policy)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _launch_serial(ctx: Launch) -> None:
    """One run after the other here (``jobs = 1``), or in ``jobs`` spawned worker processes."""
    workers, threads, policy = ctx.suite["jobs"], ctx.threads, ctx.options.claims
    if workers == 1:
        prev = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for spec, rec in ctx.todo:
                verb = "analysing" if spec.kind == "analysis" else "training"
                if (
                    spec.kind == "train"
                    and (spec.run_dir / "checkpoint.pt").is_file()
                    and not ctx.overwrite
                ):
                    verb = "resuming"
                ctx.log(f"  {verb} {spec.variant.name} seed {spec.seed} ...")
                t = time.perf_counter()
                try:
                    outcome = execute_claimed(ctx.exp, spec, ctx.overwrite, ctx.log, policy=policy)
                except Exception as e:
                    if not ctx.keep_going:
                        raise
                    outcome = ctx.failed(spec, e, t)
                ctx.record(spec, rec, outcome)
        finally:
            torch.set_num_threads(prev)
        return
    ctx.log(
        f"  {workers} worker processes with {threads or 1} torch thread(s) each; "
        "one line per finished run follows"
    )
    with ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads or 1,),
    ) as ex:
        futures: dict[Future[dict[str, Any]], tuple[RunSpec, dict[str, Any], float]] = {
            ex.submit(_execute_in_worker, ctx.exp, spec, ctx.overwrite, policy): (
                spec,
                rec,
                time.perf_counter(),
            )
            for spec, rec in ctx.todo
        }
        for fut in as_completed(futures):
            spec, rec, t = futures[fut]
            try:
                outcome = fut.result()
            except Exception as e:
                if not ctx.keep_going:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise
                outcome = ctx.failed(spec, e, t)
            ctx.record(spec, rec, outcome)


register_launcher("serial", _launch_serial)


def _claimed_elsewhere(ctx: Launch) -> list[tuple[RunSpec, dict[str, Any]]]:
    """The runs to hand to a cluster: those without a live claim (the others are recorded as
    ``busy``)."""
    me, todo = owner_identity(), []
    for spec, rec in ctx.todo:
        info = read_claim(spec.run_dir)
        if info is not None and stale_reason(info, me, ctx.options.claims) is None:
            ctx.record(spec, rec, {"status": "busy", "holder": describe_owner(info), "seconds": 0})
        else:
            todo.append((spec, rec))
    return todo


# ------------------------------------------------------------------------------------- slurm


def slurm_parameters(
    res: Launcher, cluster: str = "slurm", name: str = "normlab"
) -> dict[str, Any]:
    """submitit's ``update_parameters`` keywords for one run with the resources ``res``.

    Example::

        >>> p = slurm_parameters(Launcher(partition="gpu", gpus_per_run=2, time="4:00:00"))
        >>> p["slurm_partition"], p["gpus_per_node"], p["tasks_per_node"], p["timeout_min"]
        ('gpu', 2, 2, 240)
    """
    if res.time in ("", None) and cluster == "slurm":
        raise ExperimentError(
            '--time: a Slurm job needs a time limit (e.g. --time 4:00:00, or time = "4:00:00" '
            "in [launcher]); the job is requeued each time it reaches it and resumes"
        )
    tasks = max(1, res.gpus_per_run)
    p: dict[str, Any] = {
        "name": name,
        "timeout_min": slurm_minutes(res.time) if res.time not in ("", None) else 60,
        "nodes": 1,
        "tasks_per_node": tasks,
        "cpus_per_task": max(1, res.cpus_per_run // tasks),
    }
    if res.gpus_per_run:
        p["gpus_per_node"] = res.gpus_per_run
    for key in ("partition", "account", "qos", "mem"):
        if getattr(res, key):
            p[f"slurm_{key}"] = getattr(res, key)
    if res.slurm_params:
        p["slurm_additional_parameters"] = dict(res.slurm_params)
    return p


class SlurmRun:
    """One run as a submitit job: claims the run directory and trains it (see the module
    docstring). submitit calls :meth:`checkpoint` when the job is preempted or reaches its time
    limit; it returns the job to requeue."""

    def __init__(
        self,
        exp: Experiment,
        spec: RunSpec,
        overwrite: bool = False,
        threads: int | None = None,
        policy: ClaimPolicy | None = None,
    ) -> None:
        self.exp, self.spec, self.overwrite = exp, spec, overwrite
        self.threads, self.policy = threads, policy
        self._stop: threading.Event | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_worker")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stop=None, _worker=None)

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        if self.threads:
            torch.set_num_threads(self.threads)
        kw = {"job_id": env.job_id, "launcher": "slurm", "policy": self.policy}
        if env.num_tasks > 1:  # DDP: torchrun's variables for every task, rank 0 claims
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            spec = self.spec
            if torch.cuda.is_available() and torch.cuda.device_count() == 1:
                spec = with_config(spec, device="cuda:0")  # one GPU bound to each task
            return execute_claimed(self.exp, spec, self.overwrite, _stderr, **kw)
        # one process: the run trains in a thread, so that the main thread (where submitit's
        # signal handler runs) can ask it to save at the end of its step
        box: dict[str, Any] = {}
        stop = self._stop = threading.Event()

        def work() -> None:
            try:
                box["outcome"] = execute_claimed(
                    self.exp, self.spec, self.overwrite, _stderr, stop=stop, **kw
                )
            except BaseException as e:
                box["error"] = e

        self._worker = threading.Thread(target=work, name="normlab-run", daemon=True)
        self._worker.start()
        while self._worker.is_alive():
            self._worker.join(0.2)
        if "error" in box:
            raise box["error"]
        return box["outcome"]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the run at the end of its current step (it saves a checkpoint), then return the
        submission that resumes it (submitit's checkpoint protocol)."""
        if self._stop is not None:
            self._stop.set()
        if self._worker is not None:
            self._worker.join(STOP_WAIT_S)
        again = SlurmRun(self.exp, self.spec, False, self.threads, self.policy)
        return DelayedSubmission(again, *args, **kwargs)


def _save_jobs(out: Path, cluster: str, submitted: dict[str, str]) -> None:
    p = out / JOBS_FILE
    jobs = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    for d, job_id in submitted.items():
        jobs[d] = {"job_id": job_id, "cluster": cluster, "submitted": now}
    write_json(p, jobs)


def _launch_slurm(ctx: Launch) -> None:
    if submitit is None:
        raise ExperimentError("--launcher slurm needs submitit: pip install 'normlab[slurm]'")
    opts, res = ctx.options, ctx.resources
    if opts.cluster not in SLURM_CLUSTERS:
        raise ExperimentError(
            f"--slurm-cluster: {opts.cluster!r} is unknown; valid: {', '.join(SLURM_CLUSTERS)}"
        )
    params = slurm_parameters(res, opts.cluster, f"normlab-{ctx.exp.name}")
    todo = _claimed_elsewhere(ctx)
    if not todo:
        return
    folder = ctx.out / "slurm"
    ex = submitit.AutoExecutor(
        folder=folder / "%j", cluster=opts.cluster, slurm_max_num_timeout=MAX_REQUEUES
    )
    ex.update_parameters(**params)
    threads = ctx.threads or params["cpus_per_task"]
    jobs = []
    with ex.batch():
        for spec, _ in todo:
            run = SlurmRun(
                ctx.exp,
                with_config(spec, save_checkpoints=True),
                ctx.overwrite,
                threads,
                opts.claims,
            )
            jobs.append(ex.submit(run))
    t0 = time.perf_counter()
    by_id = {}
    for job, (spec, rec) in zip(jobs, todo, strict=True):
        by_id[job.job_id] = (spec, rec)
        if not (opts.wait or opts.cluster == "debug"):
            ctx.record(spec, rec, {"status": "submitted", "job_id": job.job_id, "seconds": 0})
    _save_jobs(
        ctx.out,
        opts.cluster,
        {
            str(s.run_dir.relative_to(ctx.out)): j.job_id
            for j, (s, _) in zip(jobs, todo, strict=True)
        },
    )
    ctx.log(
        f"  submitted {len(jobs)} run(s) on {opts.cluster}: jobs "
        + ", ".join(j.job_id for j in jobs)
        + f"; logs in {folder}"
    )
    if not (opts.wait or opts.cluster == "debug"):
        ctx.log(f"  follow them with: normlab status {ctx.out}")
        ctx.log(f"  when they have ended: normlab report {ctx.out}")
        return
    poll = opts.poll_s or (30.0 if opts.cluster == "slurm" else 0.5)
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
        spec, rec = by_id[job.job_id]
        try:
            outcome = job.results()[0]  # rank 0's, for a run with several tasks
        except Exception as e:
            outcome = ctx.failed(spec, e, t0)
        outcome.setdefault("seconds", time.perf_counter() - t0)
        outcome["job_id"] = job.job_id
        ctx.record(spec, rec, outcome)


register_launcher("slurm", _launch_slurm)


# --------------------------------------------------------------------------------------- ray


def _ray_run(
    exp: Experiment,
    spec: RunSpec,
    overwrite: bool,
    threads: int,
    policy: ClaimPolicy,
    job_id: str,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return execute_claimed(exp, spec, overwrite, job_id=job_id, launcher="ray", policy=policy)


def _launch_ray(ctx: Launch) -> None:
    try:
        import ray  # optional dependency: normlab[ray]
    except ImportError:
        raise ExperimentError("--launcher ray needs ray: pip install 'normlab[ray]'") from None
    res = ctx.resources
    if res.gpus_per_run > 1:
        raise ExperimentError(
            f"--gpus-per-run: {res.gpus_per_run}: the ray launcher trains each run in one process "
            "(one GPU at most); use --launcher slurm or torchrun for multi-GPU runs"
        )
    todo = _claimed_elsewhere(ctx)
    if not todo:
        return
    address = ctx.options.ray_address or res.ray_address or None
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ncpu = ctx.jobs * res.cpus_per_run if ctx.jobs and not res.gpus_per_run else None
            ray.init(num_cpus=ncpu, **kw)
    try:
        have = ray.cluster_resources().get("GPU", 0)
        if res.gpus_per_run and have < res.gpus_per_run:
            raise ExperimentError(
                f"--gpus-per-run: {res.gpus_per_run} GPU(s) per run, but the Ray cluster has "
                f"{have:g}"
            )
        task = ray.remote(_ray_run).options(
            num_cpus=res.cpus_per_run, num_gpus=res.gpus_per_run, max_retries=1
        )
        tag = uuid.uuid4().hex[:8]
        threads = ctx.threads or res.cpus_per_run
        pending = {}
        for i, (spec, rec) in enumerate(todo):
            ref = task.remote(
                ctx.exp, spec, ctx.overwrite, threads, ctx.options.claims, f"ray-{tag}-{i}"
            )
            pending[ref] = (spec, rec, time.perf_counter())
        ctx.log(f"  {len(todo)} Ray task(s) submitted; one line per finished run follows")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec, rec, t = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as e:
                if not ctx.keep_going:
                    for ref in pending:
                        ray.cancel(ref)
                    raise
                outcome = ctx.failed(spec, e, t)
            ctx.record(spec, rec, outcome)
    finally:
        if started:
            ray.shutdown()


register_launcher("ray", _launch_ray)
