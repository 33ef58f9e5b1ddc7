"""Running an experiment: every (variant, seed) in its own run directory, trained exactly once.

:func:`run_experiment` writes ``OUT/suite.json`` (what was run, at which scale, each run's
status as this invocation saw it), ``OUT/experiment.toml`` (a copy of the file) and one directory
per run, ``OUT/<variant>/seed<k>/``: a training run directory (``config.toml``, ``metrics.jsonl``,
``summary.json``, ``checkpoint.pt`` and what the collectors recorded) or an analysis result
(``params.json``, ``result.json``), with ``run.log`` and, after a failure, ``failed.json``.

A run is *finished* when its ``summary.json`` (training) or ``result.json`` (analysis) exists.
Finished runs are skipped after checking that their saved configuration is the one requested
(a different one is an error), unfinished training runs resume from their checkpoint, so running
the same command again continues an interrupted sweep and retries failed runs;
``overwrite=True`` starts every run again.

The unit of work is one run directory (:mod:`~normlab.experiments.runs`): every launcher runs
it with :func:`execute_claimed`, :func:`execute_run` under the directory's claim
(:mod:`~normlab.experiments.claims`), so two launchers on one output directory never train the
same run twice. The launchers (:mod:`~normlab.experiments.launchers`): ``serial`` runs here,
one run after the other (``jobs = 1``) or in ``jobs`` spawned worker processes with
``threads`` (default 1) torch threads each; ``slurm`` submits a job array through submitit,
``ray`` one Ray task per run. Each run seeds itself from its configuration, so the numbers do
not depend on the launcher.

Under ``torchrun`` every process trains the training runs together (``jobs`` must be 1); rank 0
alone claims runs, writes the suite files and runs the analyses.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from normlab.experiments.analyses import get_runner
from normlab.experiments.catalog import load_experiment
from normlab.experiments.collectors import json_default
from normlab.experiments.launchers import LAUNCHERS, Launch, LaunchOptions, register_launcher
from normlab.experiments.runs import (
    PreemptedError,
    RunSpec,
    execute_claimed,
    execute_run,
    with_config,
    write_json,
)
from normlab.experiments.spec import Experiment, ExperimentError, parse_experiment
from normlab.provenance import provenance
from normlab.train import (
    RESUME_MUTABLE_KEYS,
    Config,
    atomic_write_text,
    config_from_dict,
    diff_configs,
    select_device,
)
from normlab.train.distributed import env_world_size, is_main_process

__all__ = [
    "EXPERIMENT_COPY",
    "LAUNCHERS",
    "SUITE_FILE",
    "Launch",
    "LaunchOptions",
    "PreemptedError",
    "RunSpec",
    "default_jobs",
    "execute_claimed",
    "execute_run",
    "load_suite",
    "plan_runs",
    "read_suite",
    "register_launcher",
    "run_experiment",
    "with_config",
    "write_json",
]

SUITE_FILE = "suite.json"
EXPERIMENT_COPY = "experiment.toml"


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


def read_suite(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``suite.json`` of a suite run directory (:class:`ExperimentError` if it has none)."""
    p = Path(run_dir) / SUITE_FILE
    if not p.is_file():
        raise ExperimentError(
            f"{str(run_dir)!r} is not an experiment run directory (no {SUITE_FILE}); create one "
            "with `normlab run EXPERIMENT`"
        )
    return json.loads(p.read_text(encoding="utf-8"))


def load_suite(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Experiment]:
    """``(suite.json contents, the experiment)`` of a suite run directory. The experiment is read
    from its file when that still exists (so tables and claims refined after the run are used;
    ``suite["experiment_changed"]`` is then set if it differs from the copy made at run time),
    else from the copy ``experiment.toml`` in the run directory."""
    d = Path(run_dir)
    suite = read_suite(d)
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


_NOTES = {
    "skipped": "finished by another launcher, skipped",
    "busy": "claimed by {holder}, skipped",
    "preempted": "checkpointed at step {step}, to resume",
    "lost": "claim taken over by another launcher, stopped",
    "submitted": "submitted as job {job_id}",
}


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
        status = outcome["status"]
        if status == "failed":
            self.log(f"{head}  FAILED: {outcome['error']}")
        elif status in _NOTES:
            self.log(f"{head}  {_NOTES[status].format_map(_Missing(outcome))}")
        elif "summary" in outcome:
            s = outcome["summary"]
            self.log(
                f"{head}  best {100 * (s['best_test_acc'] or 0):.2f}%  "
                f"final {100 * (s['final_test_acc'] or 0):.2f}%  "
                f"{1000 * s['time_per_step']:.1f} ms/step  {times}"
            )
        else:
            self.log(f"{head}  {status} {times}")


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "?"


# ----------------------------------------------------------------------------------------------
# the suite


def _check_suite(out: Path, suite: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The ``suite.json`` already in ``out`` (None when there is none or with ``overwrite``);
    an error when it belongs to another experiment or scale."""
    p = out / SUITE_FILE
    if not p.is_file() or overwrite:
        return None
    old = json.loads(p.read_text(encoding="utf-8"))
    for key in ("experiment", "scale"):
        if old.get(key) != suite[key]:
            raise ExperimentError(
                f"{str(out)!r} holds a run of {old.get('experiment')!r} at scale "
                f"{old.get('scale')!r}; choose another --out or pass --overwrite"
            )
    return old


def _device_name(specs: Sequence[RunSpec], device: str | None) -> str:
    """The device the runs train on, as a word: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    want = device
    if want is None and specs:
        cfg = specs[0].config
        want = cfg.get("device", "auto") if isinstance(cfg, dict) else cfg.run.device
    try:
        dev = select_device(want or "auto")
    except ValueError:
        return str(want)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return dev.type


_PROVENANCE_KEYS = ("git_commit", "git_dirty", "torch", "device", "experiment_sha256")


def _carry_history(old: dict[str, Any] | None, suite: dict[str, Any]) -> None:
    """Keep the provenance of earlier invocations that wrote runs into the same directory (a
    sweep resumed on other code) under ``provenance_history``, so the report can say the runs
    are mixed."""
    if old is None:
        return
    history = list(old.get("provenance_history", []))
    prev = old.get("provenance")
    new = suite["provenance"]
    if prev and prev not in history and any(prev.get(k) != new.get(k) for k in _PROVENANCE_KEYS):
        history.append(prev)
    if history:
        suite["provenance_history"] = history


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
    jobs: int | None = None,
    keep_going: bool = False,
    launcher: str = "serial",
    options: LaunchOptions | None = None,
) -> dict[str, Any]:
    """Run every (variant, seed) of an experiment at ``scale`` into ``out`` (default
    ``runs/<experiment>-<scale>``), each run exactly once (:func:`execute_claimed`).

    Args:
        seeds: seeds 0 .. seeds-1 (default: the experiment's at this scale).
        device: ``run.device`` of every training run.
        overrides: ``key=value`` strings or pairs applied to every training run, last.
        variants: globs narrowing the variants run.
        overwrite: start every run again instead of skipping / resuming.
        log: receives one line per run (default: silent).
        progress: ``run.progress`` of every training run.
        threads: torch CPU threads: for this process with ``jobs = 1`` (restored afterwards),
            per worker with ``jobs > 1`` (default 1), per run under ``slurm`` / ``ray``
            (default: ``cpus_per_run``).
        jobs: ``serial``: worker processes (default 1: everything here, one run after the
            other); ``ray`` on a local cluster: runs at once (default: every CPU / GPU).
        keep_going: record a run that raises as ``"failed"`` (with its ``error``) and go on;
            otherwise the first failure stops the sweep and propagates.
        launcher: ``"serial"``, ``"slurm"`` or ``"ray"`` (:data:`LAUNCHERS`).
        options: settings of the ``slurm`` / ``ray`` launchers and of the claims.

    Returns the suite record written to ``out/suite.json``, with each run's ``status``
    (``trained``, ``resumed``, ``analysed``, ``skipped``, ``busy``, ``failed``, ``submitted``,
    ...) and ``out``.

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
    if launcher not in LAUNCHERS:
        raise ExperimentError(f"--launcher: {launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")
    if jobs is not None:
        _positive(jobs, "--jobs")
    if threads is not None:
        _positive(threads, "--threads")
    if (jobs or 1) > 1 and env_world_size() > 1:
        raise ExperimentError("--jobs: parallel worker processes cannot be combined with torchrun")
    if launcher != "serial" and env_world_size() > 1:
        raise ExperimentError(f"--launcher {launcher}: start it once, not under torchrun")
    options = options or LaunchOptions()
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    if scale != "full":
        exp.scale(scale)  # raises for an unknown scale
    out = Path(out) if out is not None else Path("runs") / f"{exp.name}-{scale}"
    if launcher != "serial":  # the jobs may start in another working directory
        out = out.absolute()
    log = log or (lambda msg: None)
    extra = [e if isinstance(e, str) else f"{e[0]}={json.dumps(e[1])}" for e in overrides]
    specs = [
        with_config(s, progress=progress)
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
        "launcher": launcher,
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
    suite["provenance"] = provenance(_device_name(specs, device), exp.path)
    _carry_history(_check_suite(out, suite, overwrite), suite)
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
    suite["jobs"] = (min(jobs or 1, len(todo)) or 1) if launcher == "serial" else jobs

    def save() -> None:
        if main:
            write_json(out / SUITE_FILE, suite)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EXPERIMENT_COPY, exp.path.read_text(encoding="utf-8"))
        save()
    width = max((len(s.variant.name) for s, _ in todo), default=0)
    prog = _Progress(log, len(todo), width)

    def record(spec: RunSpec, rec: dict[str, Any], outcome: dict[str, Any]) -> None:
        rec["status"] = outcome["status"]
        for key in ("error", "holder", "job_id"):
            if key in outcome:
                rec[key] = outcome[key]
        prog.finished(spec, outcome)
        save()

    ctx = Launch(exp, out, todo, overwrite, threads, jobs, keep_going, log, options, suite, record)
    LAUNCHERS[launcher](ctx)
    if not any(r["status"] == "submitted" for r in suite["runs"]):
        suite["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    suite["wall_time"] = round(time.perf_counter() - prog.t0, 2)
    save()
    suite["out"] = str(out)
    return suite
