r"""Training acceleration from learning curves (Kalayeh & Shah, Tables 2–6; Collins et al., Table 1,
Fig. 5).

A learning curve is a pair ``(steps, values)`` of equal-length 1-D arrays — e.g. the ``step`` and
``test_acc`` of the records of a run's ``metrics.jsonl`` (:func:`learning_curve`). The measures:

* **Steps to a target** (Kalayeh & Shah, Tables 3, 5, 6, following Ioffe & Szegedy): the first step
  at which the curve reaches the target accuracy; by default the target is the *baseline's* maximum
  accuracy. ``None`` when the curve never reaches it.
* **Relative reduction** (Kalayeh & Shah: "reduces the number of training steps ... by ~31%"):
  :math:`1 - s_{method}/s_{baseline}`; **speed-up** (Collins et al., Table 1, "4.4 x = 26.6/6.1"):
  :math:`s_{baseline}/s_{method}`.
* **Best accuracy after a fraction of training** (Kalayeh & Shah, Tables 2, 4: maximum test accuracy
  after 25/50/75/100 % of the epochs): the maximum over the records with step <= fraction × total
  steps.
* **Speed-up over the course of training** (Collins et al., Fig. 5–6): for every accuracy the
  baseline reaches (each new running maximum), its steps to that accuracy divided by the method's.

:func:`acceleration_table` turns ``{run name: metrics records}`` into table rows for a report.
All functions are pure (lists/arrays in, Python numbers out).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.analysis._plot import new_figure, save_figure

__all__ = [
    "Acceleration",
    "acceleration",
    "acceleration_table",
    "best_accuracy",
    "best_after_fractions",
    "learning_curve",
    "plot_speedup",
    "speedup_curve",
    "steps_to_target",
]

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def _curve(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, where: str):
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(
            f"{where}: steps and values must have the same length, got {s.size} and {v.size}"
        )
    if s.size and np.any(np.diff(s) < 0):
        order = np.argsort(s, kind="stable")
        s, v = s[order], v[order]
    return s, v


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def learning_curve(
    records: Iterable[Mapping[str, Any]], key: str = "test_acc", step_key: str = "step"
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` from metrics records (dicts with ``step_key`` and ``key``), sorted by
    step; records without the key, or with a None / non-finite value, are skipped.

    Example::

        >>> recs = [{"step": 20, "test_acc": 0.6}, {"step": 10, "test_acc": 0.4}, {"step": 30}]
        >>> learning_curve(recs)
        (array([10., 20.]), array([0.4, 0.6]))
    """
    pairs = []
    for r in records:
        v = r.get(key)
        if v is None or step_key not in r or not math.isfinite(float(v)):
            continue
        pairs.append((float(r[step_key]), float(v)))
    pairs.sort(key=lambda p: p[0])
    if not pairs:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pairs, strict=True)
    return np.asarray(s), np.asarray(v)


def best_accuracy(steps: Sequence[float], values: Sequence[float]) -> tuple[float, int | float]:
    """``(maximum value, first step at which it is reached)``; ValueError for an empty curve.

    Example::

        >>> best_accuracy([100, 200, 300, 400], [0.5, 0.8, 0.8, 0.7])
        (0.8, 200)
    """
    s, v = _curve(steps, values, "best_accuracy")
    if s.size == 0:
        raise ValueError("best_accuracy: the curve is empty")
    i = int(np.argmax(v))
    return float(v[i]), _num(s[i])


def steps_to_target(
    steps: Sequence[float], values: Sequence[float], target: float, tol: float = 0.0
) -> int | float | None:
    """First step at which ``value >= target - tol`` (Kalayeh & Shah, Table 3 "steps to
    87.95%"), or ``None`` if the curve never reaches the target.

    Example::

        >>> steps_to_target([100, 200, 300], [0.5, 0.8, 0.9], target=0.75)
        200
        >>> steps_to_target([100], [0.5], target=0.9) is None
        True
    """
    s, v = _curve(steps, values, "steps_to_target")
    hit = np.nonzero(v >= target - tol)[0]
    return None if hit.size == 0 else _num(s[hit[0]])


def best_after_fractions(
    steps: Sequence[float],
    values: Sequence[float],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    total_steps: float | None = None,
) -> list[float | None]:
    """Maximum value over the records with ``step <= fraction * total_steps`` for each fraction
    (Kalayeh & Shah, Tables 2, 4: best test accuracy after 25/50/75/100 % of training).
    ``total_steps`` defaults to the last step of the curve; ``None`` where no record falls in the
    window.

    Example::

        >>> best_after_fractions([100, 200, 300, 400], [0.5, 0.8, 0.7, 0.9])
        [0.5, 0.8, 0.8, 0.9]
    """
    s, v = _curve(steps, values, "best_after_fractions")
    if total_steps is None:
        if s.size == 0:
            return [None for _ in fractions]
        total_steps = float(s[-1])
    out: list[float | None] = []
    for f in fractions:
        if not f >= 0:
            raise ValueError(f"best_after_fractions: fractions must be >= 0, got {f!r}")
        limit = f * total_steps
        mask = s <= limit + 1e-9 * max(abs(limit), 1.0)
        out.append(float(v[mask].max()) if mask.any() else None)
    return out


@dataclass(frozen=True)
class Acceleration:
    """Steps to ``target`` for a baseline and a method, and the derived ratios (None where a
    curve never reaches the target)."""

    target: float
    baseline_steps: int | float | None
    method_steps: int | float | None
    reduction: float | None  # 1 - method / baseline (Kalayeh & Shah: "reduces ... by ~31%")
    speedup: float | None  # baseline / method (Collins et al., Table 1)


def acceleration(
    baseline_steps: Sequence[float],
    baseline_values: Sequence[float],
    method_steps: Sequence[float],
    method_values: Sequence[float],
    target: float | None = None,
    tol: float = 0.0,
) -> Acceleration:
    r"""Steps each curve needs to reach ``target`` (default: the baseline's best value) and the
    relative reduction / speed-up of the method over the baseline (Kalayeh & Shah, Tables 3,
    5, 6; Collins et al., Table 1).

    .. math::  \text{reduction} = 1 - s_{method}/s_{baseline}, \qquad
               \text{speed-up} = s_{baseline}/s_{method}

    Example::

        >>> acc = acceleration([100, 200, 300, 400], [0.5, 0.7, 0.8, 0.9],
        ...                    [100, 200, 300, 400], [0.7, 0.9, 0.9, 0.9])
        >>> acc.target, acc.baseline_steps, acc.method_steps, acc.reduction, acc.speedup
        (0.9, 400, 200, 0.5, 2.0)
    """
    if target is None:
        target = best_accuracy(baseline_steps, baseline_values)[0]
    sb = steps_to_target(baseline_steps, baseline_values, target, tol)
    sm = steps_to_target(method_steps, method_values, target, tol)
    reduction = speedup = None
    if sb is not None and sm is not None and sb > 0:
        reduction = 1.0 - sm / sb
        speedup = sb / sm if sm > 0 else math.inf
    return Acceleration(float(target), sb, sm, reduction, speedup)


def speedup_curve(
    baseline_steps: Sequence[float],
    baseline_values: Sequence[float],
    method_steps: Sequence[float],
    method_values: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Speed-up over the course of training (Collins et al., Fig. 5–6).

    For every baseline record that sets a new running maximum a (the accuracies the baseline
    reaches, in order), the speed-up is (baseline's steps to a) / (method's steps to a). Returns
    ``(accuracies, baseline steps, speed-ups)``; the speed-up is NaN where the method never
    reaches a, and inf where the method reaches it at step 0 but the baseline does not.

    Example::

        >>> accs, steps, speedups = speedup_curve([1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8],
        ...                                       [1, 2, 3, 4], [0.6, 0.8, 0.8, 0.8])
        >>> speedups.tolist()  # 0.6 at step 2 vs 1, 0.7 at 3 vs 2, 0.8 at 4 vs 2
        [1.0, 2.0, 1.5, 2.0]
    """
    sb, vb = _curve(baseline_steps, baseline_values, "speedup_curve")
    sm, vm = _curve(method_steps, method_values, "speedup_curve")
    accs, bsteps, ratios = [], [], []
    best = -math.inf
    for s, v in zip(sb, vb, strict=True):
        if v <= best:
            continue
        best = v
        hit = np.nonzero(vm >= v)[0]
        if hit.size == 0:
            r = math.nan
        elif sm[hit[0]] > 0:
            r = s / sm[hit[0]]
        else:
            r = math.inf if s > 0 else 1.0
        accs.append(v)
        bsteps.append(s)
        ratios.append(r)
    return np.asarray(accs), np.asarray(bsteps), np.asarray(ratios)


def acceleration_table(
    runs: Mapping[str, Iterable[Mapping[str, Any]]],
    baseline: str,
    target: float | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    key: str = "test_acc",
    total_steps: float | None = None,
) -> list[dict[str, Any]]:
    """Rows of an acceleration table from metrics records (lists of dicts with ``step`` and
    ``key``, as in ``metrics.jsonl``), one per run in the order given, baseline included.

    Each row: ``name``, ``best`` (max value) and ``best_step``, ``best_after`` (a dict fraction ->
    best value after that fraction of ``total_steps``, default each run's own last step; Kalayeh &
    Shah, Tables 2, 4), ``target`` (default the baseline's best), ``steps_to_target``, ``reduction``
    and ``speedup`` relative to the baseline (Kalayeh & Shah, Tables 3, 5, 6; Collins et al., Table
    1; None where a curve never reaches the target).

    Example::

        >>> runs = {"BN": [{"step": s, "test_acc": a} for s, a in [(1, 0.5), (2, 0.7), (3, 0.8)]],
        ...         "MN": [{"step": s, "test_acc": a} for s, a in [(1, 0.6), (2, 0.8), (3, 0.8)]]}
        >>> rows = acceleration_table(runs, baseline="BN")
        >>> [(r["name"], r["steps_to_target"], r["speedup"]) for r in rows]
        [('BN', 3, 1.0), ('MN', 2, 1.5)]
    """
    if baseline not in runs:
        raise ValueError(
            f"acceleration_table: baseline {baseline!r} is not among the runs {sorted(runs)}"
        )
    curves = {name: learning_curve(recs, key) for name, recs in runs.items()}
    bs, bv = curves[baseline]
    if bs.size == 0:
        raise ValueError(f"acceleration_table: the baseline run {baseline!r} has no {key!r} values")
    if target is None:
        target = best_accuracy(bs, bv)[0]
    rows = []
    for name, (s, v) in curves.items():
        acc = acceleration(bs, bv, s, v, target)
        best, best_step = best_accuracy(s, v) if s.size else (None, None)
        after = best_after_fractions(s, v, fractions, total_steps)
        rows.append(
            {
                "name": name,
                "best": best,
                "best_step": best_step,
                "best_after": dict(zip(fractions, after, strict=True)),
                "target": acc.target,
                "steps_to_target": acc.method_steps,
                "reduction": acc.reduction,
                "speedup": acc.speedup,
            }
        )
    return rows


def plot_speedup(
    baseline: Iterable[Mapping[str, Any]],
    methods: Mapping[str, Iterable[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    key: str = "test_acc",
) -> Path:
    """Collins et al., Fig. 5–6: speed-up of each method over the baseline across training
    (:func:`speedup_curve`) against the baseline's steps, from metrics records. Returns the path.

    Example::

        >>> import tempfile
        >>> base = [{"step": s, "test_acc": a} for s, a in [(100, 0.5), (200, 0.7), (300, 0.8)]]
        >>> fast = [{"step": s, "test_acc": a} for s, a in [(100, 0.7), (200, 0.8), (300, 0.85)]]
        >>> plot_speedup(base, {"MN": fast}, tempfile.mkdtemp() + "/speedup").suffix
        '.png'
    """
    bs, bv = learning_curve(baseline, key)
    fig, axes = new_figure(size=(4.6, 3.2))
    ax = axes[0, 0]
    for label, recs in methods.items():
        ms, mv = learning_curve(recs, key)
        _, steps, ratio = speedup_curve(bs, bv, ms, mv)
        ax.plot(steps, ratio, marker="o", ms=3, label=label)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("baseline steps")
    ax.set_ylabel("speed-up (x)")
    if methods:
        ax.legend(fontsize="small")
    return save_figure(fig, path)
