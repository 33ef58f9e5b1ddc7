"""``normlab quickstart``: the experiment ``quickstart.toml``, run by the experiment runner.

Trains :func:`normlab.models.small_cnn` on scikit-learn's 8×8 digits with every method of
:data:`METHODS` and several seeds, all with the same optimizer, schedule and budget, in worker
processes with one torch thread each (``OUT/runs/<method>/seed<k>/``, every run started afresh),
and computes the comparison :func:`normlab.report.quickstart.write_quickstart_report` renders:

* final and best test accuracy, mean ± std over seeds;
* "steps to BN best": the BN model's best accuracy is the maximum of BN's seed-averaged
  test-accuracy curve; for every method, the first evaluated step at which its own seed-averaged
  curve reaches it, or never (evaluations every ``train.eval_every_steps`` steps are the
  resolution of this column; Kalayeh & Shah, Tables 3, 5, 6 measure acceleration this way);
* "time/step vs BN": each method's mean training time per step (evaluation excluded) over BN's;
  the runs are timed separately, so it is a rough ratio (``benchmarks/`` pairs its timings).

``normlab run quickstart`` runs the same experiment with the general report instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.data import load_dataset
from normlab.experiments.catalog import PACKAGED, load_experiment
from normlab.experiments.runner import default_jobs, run_experiment
from normlab.experiments.spec import Experiment, ExperimentError
from normlab.train import Config

__all__ = [
    "METHODS",
    "QUICKSTART",
    "MethodResult",
    "QuickstartResult",
    "build_rows",
    "run_quickstart",
]

#: The quickstart's experiment file.
QUICKSTART = PACKAGED / "quickstart.toml"


def _experiment() -> Experiment:
    return load_experiment(QUICKSTART)


#: method name -> description (the variants of the quickstart experiment, in table order)
METHODS: dict[str, str] = {v.name: v.setting for v in _experiment().variants}


@dataclass
class MethodResult:
    """All seeds of one method: evaluated steps, test accuracy per seed, the runs' summaries."""

    name: str
    description: str
    spec: str
    steps: list[int] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _arr(self, key: str) -> np.ndarray:
        return np.array([s[key] for s in self.summaries], dtype=float)

    @staticmethod
    def _ms(a: np.ndarray) -> tuple[float, float]:
        if a.size == 0:
            return math.nan, math.nan
        return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0

    @property
    def final(self) -> tuple[float, float]:
        return self._ms(self._arr("final_test_acc"))

    @property
    def best(self) -> tuple[float, float]:
        return self._ms(self._arr("best_test_acc"))

    @property
    def time_per_step(self) -> float:
        a = self._arr("time_per_step")
        return float(a.mean()) if a.size else math.nan

    def mean_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, mean accuracy, std accuracy) over the seeds that finished."""
        if not self.curves:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        n = min(len(c) for c in self.curves)
        acc = np.array([c[:n] for c in self.curves], dtype=float)
        std = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros(n)
        return np.array(self.steps[:n]), acc.mean(axis=0), std


@dataclass
class QuickstartResult:
    """What :func:`run_quickstart` measured; ``rows`` is the table (also in ``results.json``)."""

    out: Path
    methods: dict[str, MethodResult]
    rows: list[dict[str, Any]]
    setting: str
    seeds: int
    workers: int
    eval_every: int
    wall_time: float
    title: str = ""


def _spec_of(cfg: Config) -> str:
    """The norm column: the norm spec, ``+ WS`` and the standardization loss's weight."""
    m = cfg.model
    spec = m.norm if isinstance(m.norm, str) else json.dumps(m.norm)
    if m.conv == "ws":
        spec += " + WS"
    if m.std_loss_weight:
        spec += f" + std loss ({m.std_loss_weight:g})"
    return spec


def _steps_to(steps: np.ndarray, acc: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(acc >= target - 1e-12)[0]
    return int(steps[hit[0]]) if hit.size else None


def build_rows(methods: dict[str, MethodResult]) -> list[dict[str, Any]]:
    """The table as dicts, one per method (also written to ``results.json``)."""
    bn = methods.get("bn")
    target = None
    bn_tps = math.nan
    if bn is not None and bn.curves:
        _, bn_mean, _ = bn.mean_curve()
        target = float(bn_mean.max())
        bn_tps = bn.time_per_step
    rows = []
    for m in methods.values():
        steps, mean, _ = m.mean_curve()
        reach = _steps_to(steps, mean, target) if (target is not None and m.curves) else None
        rows.append(
            {
                "method": m.name,
                "spec": m.spec,
                "seeds": len(m.summaries),
                "failed": len(m.errors),
                "final_acc_mean": m.final[0],
                "final_acc_std": m.final[1],
                "best_acc_mean": m.best[0],
                "best_acc_std": m.best[1],
                "bn_best_target": target,
                "steps_to_bn_best": reach,
                "time_per_step": m.time_per_step,
                "time_vs_bn": m.time_per_step / bn_tps if bn_tps == bn_tps else math.nan,
                "errors": m.errors,
            }
        )
    return rows


def _read_run(d: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    return [json.loads(x) for x in lines if x.strip()], summary


def _clean(x: Any) -> Any:
    """Non-finite floats -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _check_count(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{key}: must be a positive integer, got {value!r}")


def run_quickstart(
    out: str | os.PathLike[str] = "quickstart_out",
    seeds: int = 3,
    epochs: int | None = None,
    methods: Sequence[str] | None = None,
    jobs: int | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Train every method in ``methods`` (default: all of :data:`METHODS`) with seeds
    ``0 .. seeds-1`` into ``out/runs/`` and write ``out/results.json``.

    Args:
        epochs: ``train.epochs`` of every run (default: the experiment's, 12).
        jobs: worker processes with one torch thread each (default: the CPU count, at most 8);
            ``jobs=1`` trains in this process.
        overrides: ``key=value`` config overrides applied to every run (e.g. ``optim.lr=0.1``).
        log: receives progress lines (default: standard error).

    Raises ``ValueError`` naming the option for a bad argument, before any training.

    Example (about a minute on two cores)::

        >>> res = run_quickstart("quickstart_out", methods=["bn", "mode"], jobs=2)  # doctest: +SKIP
        >>> [(r["method"], r["steps_to_bn_best"]) for r in res.rows]  # doctest: +SKIP
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    names = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ExperimentError(
            f"--methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}"
        )
    if not names:
        raise ExperimentError("--methods: give at least one method")
    _check_count(seeds, "--seeds")
    if epochs is not None:
        _check_count(epochs, "--epochs")
    jobs = default_jobs() if jobs is None else jobs
    _check_count(jobs, "--jobs")
    exp = _experiment()
    extra = ([f"train.epochs={epochs}"] if epochs is not None else []) + list(overrides)
    cfgs = {m: exp.config(m, "small", 0, extra) for m in names}  # bad --set keys fail here
    cfg0 = cfgs[names[0]]
    data = load_dataset(cfg0.data.name, root=cfg0.data.root or None, seed=cfg0.data.split_seed)
    n_train, n_test = len(data.train_y), len(data.test_y)
    bs = cfg0.train.batch_size
    spe = math.ceil(
        (n_train // bs if cfg0.train.drop_last else math.ceil(n_train / bs))
        / cfg0.train.accum_steps
    )
    total = cfg0.train.steps or cfg0.train.epochs * spe
    o, s = cfg0.optim, cfg0.schedule
    setting = (
        f"{cfg0.data.name} ({n_train} train / {n_test} test), {cfg0.model.name}, "
        f"{o.name.upper()} lr {o.lr:g} momentum {o.momentum:g} wd {o.weight_decay:g}, "
        f"{s.name} schedule, batch {bs}, {cfg0.train.epochs} epochs = {total} steps"
    )
    out = Path(out)
    workers = min(jobs, len(names) * seeds)
    log(
        f"normlab quickstart: {len(names)} methods × {seeds} seeds = {len(names) * seeds} training runs"
    )
    log(f"  setting: {setting}")
    log(f"  methods: {', '.join(names)}")
    log(f"  output in {out.resolve()}")
    suite = run_experiment(
        exp,
        out / "runs",
        scale="small",
        seeds=seeds,
        overrides=extra,
        variants=names,
        overwrite=True,
        log=log,
        threads=1,
        jobs=workers,
        keep_going=True,
    )
    results = {m: MethodResult(m, METHODS[m], _spec_of(cfgs[m])) for m in names}
    for r in sorted(suite["runs"], key=lambda r: r["seed"]):
        mr = results[r["variant"]]
        if r["status"] == "failed":
            mr.errors.append(f"seed {r['seed']}: {r['error']}")
            continue
        records, summary = _read_run(out / "runs" / r["dir"])
        mr.steps = [rec["step"] for rec in records]
        mr.curves.append([rec["test_acc"] for rec in records])
        mr.summaries.append(summary)
    rows = build_rows(results)
    wall = float(suite["wall_time"])
    payload = {
        "setting": setting,
        "seeds": seeds,
        "wall_time": wall,
        "rows": rows,
        "curves": {
            m: {
                "steps": [int(x) for x in r.mean_curve()[0]],
                "acc_mean": [float(x) for x in r.mean_curve()[1]],
                "acc_std": [float(x) for x in r.mean_curve()[2]],
            }
            for m, r in results.items()
        },
    }
    (out / "results.json").write_text(json.dumps(_clean(payload), indent=2) + "\n")
    title = (
        f"normlab quickstart — {cfg0.data.name}, {cfg0.model.name}, mean ± std over {seeds} seed(s)"
    )
    return QuickstartResult(
        out, results, rows, setting, seeds, workers, cfg0.train.eval_every_steps or spe, wall, title
    )
