"""Running an experiment: every (variant, seed) in its own run directory; skip, resume, parallel.

:func:`run_experiment` writes ``OUT/suite.json`` (what was run, at which scale, each run's
status), ``OUT/experiment.toml`` (a copy of the file) and one directory per run,
``OUT/<variant>/seed<k>/``: a training run directory (``config.toml``, ``metrics.jsonl``,
``summary.json``, ``checkpoint.pt`` and what the collectors recorded) or an analysis result
(``params.json``, ``result.json``).

A run is *finished* when its ``summary.json`` (training) or ``result.json`` (analysis) exists.
Finished runs are skipped after checking that their saved configuration is the one requested
(a different one is an error), unfinished training runs resume from their checkpoint, so running
the same command again continues an interrupted sweep; ``overwrite=True`` starts every run again.

``jobs = 1`` runs one run after the other in this process. ``jobs > 1`` trains in that many
spawned worker processes with ``threads`` (default 1) torch threads each: on a CPU, several
one-thread runs finish a sweep much sooner than one run using every core. Each run seeds itself
from its configuration, so the numbers do not depend on ``jobs``. The unit of work is one run
directory, :func:`execute_run`; a launcher (a cluster's job array, another process pool) calls it
with the :class:`RunSpec` objects of :func:`plan_runs`.

Under ``torchrun`` every process trains the training runs together (``jobs`` must be 1); rank 0
alone writes the suite files and runs the analyses.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import multiprocessing as mp
import os
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.experiments.analyses import get_runner
from normlab.experiments.catalog import load_experiment
from normlab.experiments.collectors import build_collectors, json_default
from normlab.experiments.spec import Experiment, ExperimentError, Variant, parse_experiment
from normlab.train import (
    RESUME_MUTABLE_KEYS,
    Config,
    Trainer,
    atomic_write_text,
    config_from_dict,
    diff_configs,
)
from normlab.train.distributed import env_world_size, is_main_process

__all__ = [
    "EXPERIMENT_COPY",
    "SUITE_FILE",
    "RunSpec",
    "default_jobs",
    "execute_run",
    "load_suite",
    "plan_runs",
    "run_experiment",
    "write_json",
]

SUITE_FILE = "suite.json"
EXPERIMENT_COPY = "experiment.toml"


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


def _positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{key}: expected a positive integer, got {value!r}")
    return value


def plan_runs(
    exp: Experiment,
    out: str | os.PathLike[str],
    scale: str = "small",
    seeds: int | None = None,
    overrides: Iterable[Any] = (),
    device: str | None = None,
    variants: Sequence[str] = (),
) -> list[RunSpec]:
    """Every (variant, seed) run of ``exp`` at ``scale``, with its configuration, in table order
    (seed-major: all variants of seed 0 first, so a partial sweep is a complete comparison).

    Example::

        >>> specs = plan_runs(load_experiment("quickstart"), "runs/qs", seeds=2, variants=["bn"])
        >>> [(s.variant.name, s.seed, s.run_dir.as_posix(), s.config.run.seed) for s in specs]
        [('bn', 0, 'runs/qs/bn/seed0', 0), ('bn', 1, 'runs/qs/bn/seed1', 1)]
    """
    n = _positive(seeds, "--seeds") if seeds is not None else exp.seeds_at(scale)
    out = Path(out)
    extra = list(overrides)
    specs = []
    chosen = [v for v in exp.variants_at(scale, variants) if not v.disabled]
    for k in range(n):
        for v in chosen:
            d = out / v.name / f"seed{k}"
            if exp.kind == "train":
                cfg: Config | dict[str, Any] = exp.config(v, scale, k, extra, device)
            else:
                if extra:
                    raise ExperimentError(f"{exp.name}: --set applies to training experiments only")
                cfg = exp.analysis_params(v, scale)
                get_runner(cfg.get("runner"), exp.name).validate(cfg, v)
            specs.append(RunSpec(v, k, d, cfg))
    return specs


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically (paths and arrays as strings / lists)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def load_suite(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Experiment]:
    """``(suite.json contents, the experiment)`` of a suite run directory. The experiment is read
    from its file when that still exists (so tables and claims refined after the run are used;
    ``suite["experiment_changed"]`` is then set if it differs from the copy made at run time),
    else from the copy ``experiment.toml`` in the run directory."""
    d = Path(run_dir)
    p = d / SUITE_FILE
    if not p.is_file():
        raise ExperimentError(
            f"{str(d)!r} is not an experiment run directory (no {SUITE_FILE}); create one with "
            "`normlab run EXPERIMENT`"
        )
    suite = json.loads(p.read_text(encoding="utf-8"))
    copy_path = d / EXPERIMENT_COPY
    orig = Path(suite.get("experiment_path", ""))
    if orig.is_file():
        text = orig.read_text(encoding="utf-8")
        exp = parse_experiment(tomllib.loads(text), orig)
        if copy_path.is_file() and copy_path.read_text(encoding="utf-8") != text:
            suite["experiment_changed"] = True
    elif copy_path.is_file():
        exp = parse_experiment(
            tomllib.loads(copy_path.read_text(encoding="utf-8")),
            orig.with_name(suite["experiment"] + ".toml"),
        )
    else:
        exp = load_experiment(suite["experiment"])
    return suite, exp


def default_jobs() -> int:
    """The CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


# ----------------------------------------------------------------------------------------------
# one run


def _quiet(msg: str) -> None:
    pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def execute_run(
    exp: Experiment,
    spec: RunSpec,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train or analyse one run into ``spec.run_dir`` (resuming a training run from its
    checkpoint unless ``overwrite``). Returns ``{status, seconds[, summary]}`` with status
    ``"trained"``, ``"resumed"`` or ``"analysed"``; exceptions propagate."""
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
    trainer = Trainer(spec.config, d, resume=not overwrite, overwrite=overwrite, log=_quiet)
    # collectors write files: rank 0's alone under torchrun (they hold no collectives)
    collectors = (
        build_collectors(exp.collect, trainer, d, overwrite or not resumed, exp.name)
        if trainer.dist.is_main
        else []
    )
    trainer.callbacks.extend(collectors)
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


def _execute_in_worker(exp: Experiment, spec: RunSpec, overwrite: bool) -> dict[str, Any]:
    return execute_run(exp, spec, overwrite, _stderr)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _finished(exp: Experiment, spec: RunSpec, overwrite: bool) -> bool:
    """Whether ``spec`` is a finished run to skip; a finished run made with another
    configuration raises :class:`ExperimentError`."""
    if overwrite or not spec.finished:
        return False
    d = spec.run_dir
    if isinstance(spec.config, dict):
        p = d / "params.json"
        saved = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        if saved is not None and saved != json.loads(json.dumps(spec.config, default=json_default)):
            raise ExperimentError(
                f"{d} is a finished analysis with different parameters; use another --out or "
                "--overwrite"
            )
        return True
    p = d / "config.toml"
    if p.is_file():
        saved_cfg = config_from_dict(tomllib.loads(p.read_text(encoding="utf-8")))
        diffs = {
            k: v
            for k, v in diff_configs(saved_cfg, spec.config).items()
            if k not in RESUME_MUTABLE_KEYS
        }
        if diffs:
            lines = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diffs.items())
            raise ExperimentError(
                f"{d} is a finished run with a different configuration ({lines}); "
                "use another --out or --overwrite"
            )
    return True


# ----------------------------------------------------------------------------------------------
# the suite


def _check_suite(out: Path, suite: dict[str, Any], overwrite: bool) -> None:
    p = out / SUITE_FILE
    if not p.is_file() or overwrite:
        return
    old = json.loads(p.read_text(encoding="utf-8"))
    for key in ("experiment", "scale"):
        if old.get(key) != suite[key]:
            raise ExperimentError(
                f"{str(out)!r} holds a run of {old.get('experiment')!r} at scale "
                f"{old.get('scale')!r}; choose another --out or pass --overwrite"
            )


def _with_progress(spec: RunSpec, progress: str) -> RunSpec:
    if isinstance(spec.config, dict) or spec.config.run.progress == progress:
        return spec
    cfg = copy.deepcopy(spec.config)
    cfg.run.progress = progress
    return RunSpec(spec.variant, spec.seed, spec.run_dir, cfg.validate())


class _Progress:
    """The log lines of a sweep: one per finished run, with the time left."""

    def __init__(self, log: Callable[[str], None], n: int, width: int) -> None:
        self.log, self.n, self.width = log, n, width
        self.done = 0
        self.t0 = time.perf_counter()

    def tag(self, spec: RunSpec) -> str:
        return f"{spec.variant.name:<{self.width}} seed {spec.seed}"

    def finished(self, spec: RunSpec, outcome: dict[str, Any]) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.n - self.done)
        head = f"  [{self.done:>{len(str(self.n))}}/{self.n}] {self.tag(spec)}"
        times = f"({outcome['seconds']:.1f} s; {elapsed:.0f} s elapsed, ~{left:.0f} s left)"
        if outcome["status"] == "failed":
            self.log(f"{head}  FAILED: {outcome['error']}")
        elif "summary" in outcome:
            s = outcome["summary"]
            self.log(
                f"{head}  best {100 * (s['best_test_acc'] or 0):.2f}%  "
                f"final {100 * (s['final_test_acc'] or 0):.2f}%  "
                f"{1000 * s['time_per_step']:.1f} ms/step  {times}"
            )
        else:
            self.log(f"{head}  {outcome['status']} {times}")


def run_experiment(
    experiment: Experiment | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    scale: str = "small",
    seeds: int | None = None,
    device: str | None = None,
    overrides: Iterable[Any] = (),
    variants: Sequence[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: str = "off",
    threads: int | None = None,
    jobs: int = 1,
    keep_going: bool = False,
) -> dict[str, Any]:
    """Run every (variant, seed) of an experiment at ``scale`` into ``out`` (default
    ``runs/<experiment>-<scale>``).

    Args:
        seeds: seeds 0 .. seeds-1 (default: the experiment's at this scale).
        device: ``run.device`` of every training run.
        overrides: ``key=value`` strings or pairs applied to every training run, last.
        variants: globs narrowing the variants run.
        overwrite: start every run again instead of skipping / resuming.
        log: receives one line per run (default: silent).
        progress: ``run.progress`` of every training run.
        threads: torch CPU threads: for this process with ``jobs = 1`` (restored afterwards),
            per worker with ``jobs > 1`` (default 1).
        jobs: worker processes; 1 runs everything here, one run after the other.
        keep_going: record a run that raises as ``"failed"`` (with its ``error``) and go on;
            otherwise the first failure stops the sweep and propagates.

    Returns the suite record written to ``out/suite.json``, with each run's ``status``
    (``trained``, ``resumed``, ``analysed``, ``skipped`` or ``failed``) and ``out``.

    Example::

        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> suite = run_experiment("quickstart", out, seeds=1, variants=["bn"],
        ...                        overrides=["train.steps=2", "model.kwargs.width=0.25"])
        >>> [(r["variant"], r["status"]) for r in suite["runs"]]
        [('bn', 'trained')]
        >>> suite = run_experiment("quickstart", out, seeds=1, variants=["bn"],
        ...                        overrides=["train.steps=2", "model.kwargs.width=0.25"])
        >>> [r["status"] for r in suite["runs"]]
        ['skipped']
    """
    jobs = _positive(jobs, "--jobs")
    if threads is not None:
        _positive(threads, "--threads")
    if jobs > 1 and env_world_size() > 1:
        raise ExperimentError("--jobs: parallel worker processes cannot be combined with torchrun")
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    if scale != "full":
        exp.scale(scale)  # raises for an unknown scale
    out = Path(out) if out is not None else Path("runs") / f"{exp.name}-{scale}"
    log = log or _quiet
    extra = [e if isinstance(e, str) else f"{e[0]}={json.dumps(e[1])}" for e in overrides]
    specs = [
        _with_progress(s, progress)
        for s in plan_runs(exp, out, scale, seeds, extra, device, variants)
    ]
    suite: dict[str, Any] = {
        "experiment": exp.name,
        "experiment_path": str(exp.path.resolve()),
        "title": exp.title,
        "kind": exp.kind,
        "scale": scale,
        "seeds": seeds if seeds is not None else exp.seeds_at(scale),
        "overrides": extra,
        "device": device,
        "variants": [s.variant.name for s in specs if s.seed == 0],
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "runs": [
            {
                "variant": s.variant.name,
                "seed": s.seed,
                "dir": str(s.run_dir.relative_to(out)),
                "status": "pending",
            }
            for s in specs
        ],
    }
    _check_suite(out, suite, overwrite)
    main = is_main_process()
    if not main and exp.kind == "analysis":
        suite["out"] = str(out)
        return suite
    todo = []
    for spec, rec in zip(specs, suite["runs"], strict=True):
        if _finished(exp, spec, overwrite):
            rec["status"] = "skipped"
            log(f"  {spec.variant.name} seed {spec.seed}: finished, skipped")
        else:
            todo.append((spec, rec))
    workers = min(jobs, len(todo)) or 1
    suite["jobs"] = workers

    def save() -> None:
        if main:
            write_json(out / SUITE_FILE, suite)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EXPERIMENT_COPY, exp.path.read_text(encoding="utf-8"))
        save()
    width = max((len(s.variant.name) for s, _ in todo), default=0)
    prog = _Progress(log, len(todo), width)
    if workers > 1:
        log(
            f"  {workers} worker processes with {threads or 1} torch thread(s) each; "
            "one line per finished run follows"
        )

    def record(spec: RunSpec, rec: dict[str, Any], outcome: dict[str, Any]) -> None:
        rec["status"] = outcome["status"]
        if "error" in outcome:
            rec["error"] = outcome["error"]
        prog.finished(spec, outcome)
        save()

    def failure(e: Exception, t: float) -> dict[str, Any]:
        return {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "seconds": time.perf_counter() - t,
        }

    if workers == 1:
        prev = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for spec, rec in todo:
                verb = "analysing" if spec.kind == "analysis" else "training"
                if (
                    spec.kind == "train"
                    and (spec.run_dir / "checkpoint.pt").is_file()
                    and not overwrite
                ):
                    verb = "resuming"
                log(f"  {verb} {spec.variant.name} seed {spec.seed} ...")
                t = time.perf_counter()
                try:
                    outcome = execute_run(exp, spec, overwrite, log)
                except Exception as e:
                    if not keep_going:
                        raise
                    outcome = failure(e, t)
                record(spec, rec, outcome)
        finally:
            torch.set_num_threads(prev)
    else:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(threads or 1,)
        ) as ex:
            futures: dict[Future[dict[str, Any]], tuple[RunSpec, dict[str, Any], float]] = {
                ex.submit(_execute_in_worker, exp, spec, overwrite): (
                    spec,
                    rec,
                    time.perf_counter(),
                )
                for spec, rec in todo
            }
            for fut in as_completed(futures):
                spec, rec, t = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as e:
                    if not keep_going:
                        ex.shutdown(wait=True, cancel_futures=True)
                        raise
                    outcome = failure(e, t)
                record(spec, rec, outcome)
    suite["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    suite["wall_time"] = round(time.perf_counter() - prog.t0, 2)
    save()
    suite["out"] = str(out)
    return suite
