"""Loading a suite run directory and computing the report's metrics (mean ± std over seeds).

A metric is named ``"name"`` or ``"name:arg"``:

============================  ===================================================================
``best_acc`` / ``best_error``  maximum test accuracy (%) over training / 100 − it (Deecke et al. "top
                               performances", Huang et al. and Qiao et al. tables report final errors instead)
``final_acc`` / ``final_error``  test accuracy / error (%) at the last evaluation
``best_acc_after:F``          maximum test accuracy (%) over the evaluations at step ≤ F × total
                              steps (Kalayeh & Shah, Tables 2, 4: "maximum test accuracy after 25 % … epochs")
``steps_to:REF``              optimizer steps until the run first reaches the maximum test accuracy
                              of variant REF with the same seed (Kalayeh & Shah, Tables 3, 5, 6); REF is a
                              label looked up in the run's group first, or a variant name;
                              ``inf`` when never reached
``reduction:REF``             100 · (1 − steps_to:REF / REF's steps to its own maximum): "reduces
                              the number of training steps by ~31 %" (Kalayeh & Shah, Sec. 4.2)
``speedup:REF``               REF's steps to its maximum / steps_to:REF (Collins et al., Table 1, Fig. 5)
``final_train_loss``, ``final_test_loss``, ``time_per_step`` (ms), ``params``
``statdiff_final``            mean StatDiff over layers at the last record (Qiao et al., Fig. 6)
============================  ===================================================================

Aggregation over seeds: mean ± sample standard deviation (ddof = 1) of the finite per-seed values;
``inf`` values (target never reached) are counted and shown, never averaged.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.analysis.curves import (
    best_accuracy,
    best_after_fractions,
    learning_curve,
    steps_to_target,
)
from normlab.experiments import Experiment, Variant, load_suite

__all__ = [
    "Agg",
    "RunData",
    "SuiteData",
    "aggregate",
    "evaluate_claims",
    "format_agg",
    "format_value",
    "load_suite_data",
    "metric_values",
]


@dataclass
class RunData:
    """One finished (or partial) run of a suite: its records and files."""

    variant: Variant
    seed: int
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # analysis runs
    statdiff: list[dict[str, Any]] = field(default_factory=list)
    percentiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.summary) or bool(self.result)

    @functools.cached_property
    def params(self) -> dict[str, Any]:
        """An analysis run's parameters (``params.json``; empty for a training run)."""
        p = self.path / "params.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    @property
    def total_steps(self) -> int | None:
        if self.summary.get("steps"):
            return int(self.summary["steps"])
        return int(self.records[-1]["step"]) if self.records else None


@dataclass
class SuiteData:
    """A suite run directory, loaded: the experiment, the suite record and every run found."""

    root: Path
    suite: dict[str, Any]
    experiment: Experiment
    runs: dict[str, list[RunData]]  # variant name -> runs sorted by seed

    @property
    def variants(self) -> list[Variant]:
        """The variants that have at least one run, in the experiment's order."""
        return [v for v in self.experiment.variants if self.runs.get(v.name)]

    def resolve(self, ref: str, group: str) -> str | None:
        """A variant name from a label (in ``group`` first) or a name."""
        for v in self.experiment.variants:
            if v.label == ref and v.group == group:
                return v.name
        for v in self.experiment.variants:
            if v.name == ref:
                return v.name
        for v in self.experiment.variants:
            if v.label == ref:
                return v.name
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: ignore
                continue
    return out


def load_suite_data(run_dir: str | Path) -> SuiteData:
    """Read ``suite.json``, the experiment copy and every ``<variant>/seed<k>/`` directory."""
    root = Path(run_dir)
    suite, exp = load_suite(root)
    runs: dict[str, list[RunData]] = {}
    for v in exp.variants:
        vdir = root / v.name
        if not vdir.is_dir():
            continue
        found = []
        for sd in sorted(vdir.glob("seed*")):
            try:
                seed = int(sd.name[4:])
            except ValueError:
                continue
            rd = RunData(v, seed, sd)
            rd.records = _jsonl(sd / "metrics.jsonl")
            if (sd / "summary.json").is_file():
                rd.summary = json.loads((sd / "summary.json").read_text(encoding="utf-8"))
            if (sd / "config.toml").is_file():
                rd.config = tomllib.loads((sd / "config.toml").read_text(encoding="utf-8"))
            if (sd / "result.json").is_file():
                rd.result = json.loads((sd / "result.json").read_text(encoding="utf-8"))
            rd.statdiff = _jsonl(sd / "statdiff.jsonl")
            rd.percentiles = _jsonl(sd / "percentiles.jsonl")
            if rd.records or rd.result:
                found.append(rd)
        if found:
            runs[v.name] = sorted(found, key=lambda r: r.seed)
    return SuiteData(root, suite, exp, runs)


# ----------------------------------------------------------------------------------------------
# per-run metrics


def _curve(run: RunData, key: str = "test_acc") -> tuple[list[float], list[float]]:
    s, v = learning_curve(run.records, key)
    return list(s), list(v)


def _best(run: RunData) -> float | None:
    _s, v = _curve(run)
    return max(v) if v else None


def _steps_to_own_best(run: RunData) -> float | None:
    s, v = _curve(run)
    return float(best_accuracy(s, v)[1]) if v else None


def _ref_run(data: SuiteData, run: RunData, ref: str) -> RunData | None:
    name = data.resolve(ref, run.variant.group)
    if name is None:
        raise ValueError(f"metric reference {ref!r} names no variant (label or name)")
    for r in data.runs.get(name, []):
        if r.seed == run.seed:
            return r
    return None


def run_metric(data: SuiteData, run: RunData, metric: str) -> float | None:
    """The value of ``metric`` for one run (None when it cannot be computed)."""
    name, _, arg = metric.partition(":")
    s = run.summary
    if name in ("best_acc", "best_error"):
        b = _best(run)
        if b is None:
            return None
        return 100 * b if name == "best_acc" else 100 * (1 - b)
    if name in ("final_acc", "final_error"):
        if not run.records:
            return None
        a = run.records[-1].get("test_acc")
        if a is None:
            return None
        return 100 * a if name == "final_acc" else 100 * (1 - a)
    if name == "best_acc_after":
        frac = float(arg)
        steps, vals = _curve(run)
        total = run.total_steps
        (v,) = best_after_fractions(steps, vals, [frac], total)
        return None if v is None else 100 * v
    if name in ("steps_to", "reduction", "speedup"):
        ref = _ref_run(data, run, arg)
        if ref is None:
            return None
        target = _best(ref)
        if target is None:
            return None
        steps, vals = _curve(run)
        hit = steps_to_target(steps, vals, target)
        n = math.inf if hit is None else float(hit)
        if name == "steps_to":
            return n
        own = _steps_to_own_best(ref)
        if own is None or own <= 0:
            return None
        if name == "reduction":
            return -math.inf if math.isinf(n) else 100 * (1 - n / own)
        return 0.0 if math.isinf(n) else (math.inf if n == 0 else own / n)
    if name == "final_train_loss":
        return (
            s.get("final_train_loss")
            if s
            else (run.records[-1].get("train_loss") if run.records else None)
        )
    if name == "final_test_loss":
        return run.records[-1].get("test_loss") if run.records else None
    if name == "time_per_step":
        return 1000 * s["time_per_step"] if s.get("time_per_step") is not None else None
    if name == "params":
        return s.get("params")
    if name == "statdiff_final":
        return run.statdiff[-1]["mean"] if run.statdiff else None
    raise ValueError(
        f"unknown metric {metric!r}; valid: best_acc, best_error, final_acc, final_error, "
        "best_acc_after:F, steps_to:REF, reduction:REF, speedup:REF, final_train_loss, "
        "final_test_loss, time_per_step, params, statdiff_final"
    )


def metric_values(data: SuiteData, variant: str, metric: str) -> list[float]:
    """Per-seed values of ``metric`` for ``variant`` (missing values dropped)."""
    out = []
    for r in data.runs.get(variant, []):
        v = run_metric(data, r, metric)
        if v is not None:
            out.append(float(v))
    return out


# ----------------------------------------------------------------------------------------------
# aggregation and formatting


@dataclass
class Agg:
    """Mean ± std of the finite values of one cell; ``n`` finite values of ``total``."""

    mean: float | None
    std: float | None
    n: int
    total: int
    nonfinite: float | None = None  # the (common) non-finite value, e.g. inf = never reached

    @property
    def value(self) -> float | None:
        """The value used by claims: the mean, or the non-finite value if any seed had one."""
        if self.nonfinite is not None:
            return self.nonfinite
        return self.mean


def aggregate(values: Sequence[float]) -> Agg:
    fin = [v for v in values if math.isfinite(v)]
    nonfin = [v for v in values if not math.isfinite(v)]
    mean = statistics.fmean(fin) if fin else None
    std = statistics.stdev(fin) if len(fin) > 1 else None
    return Agg(mean, std, len(fin), len(values), nonfin[0] if nonfin else None)


def format_value(v: Any, metric: str = "") -> str:
    """A number the way the tables show it (strings pass through; NaN/None = '—')."""
    if v is None:
        return "—"
    if isinstance(v, str):
        return v or "—"
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "never"  # steps_to = inf, reduction = -inf: the target was never reached
    name = metric.partition(":")[0]
    if name in ("steps_to", "params"):
        return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.0f}"
    if name == "speedup":
        return "never" if v == 0 else f"{v:.2f}x"  # 0: the target was never reached
    if name in ("final_train_loss", "final_test_loss", "statdiff_final"):
        return f"{v:.3f}"
    if abs(v) >= 1e4 or (abs(v) < 1e-2 and v != 0):
        return f"{v:.3g}"
    return f"{v:.2f}"


def format_agg(a: Agg, metric: str = "") -> str:
    if a.total == 0:
        return "—"
    if a.mean is None:
        return format_value(a.nonfinite, metric) if a.nonfinite is not None else "—"
    s = format_value(a.mean, metric)
    if a.std is not None:
        s += f" ± {format_value(a.std, metric).rstrip('x')}"
    if a.n < a.total:
        s += f" ({a.total - a.n}/{a.total} never)"
    return s


# ----------------------------------------------------------------------------------------------
# claims


_CMP = {
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    from scipy.stats import spearmanr  # scipy.stats is slow to import; only claims need it

    if len(xs) < 2 or np.allclose(ys, ys[0]):
        return 0.0
    return float(spearmanr(xs, ys).statistic)


def _welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (None with fewer than 2 values a side or no spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind  # scipy.stats is slow to import; only claims need it

    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical samples
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def evaluate_claims(
    claims: Sequence[Mapping[str, Any]],
    lookup: Any,
    scale: str,
    samples: Any = None,
) -> list[dict[str, Any]]:
    """Check each claim with ``lookup(claim, side_value) -> list[(x, value)]``.

    ``op`` ``<``/``>``/``<=``/``>=`` compares ``a`` with ``b`` (a variant, a number, or a table
    ``{variant: weight}`` meaning the weighted sum of the variants' values — ``{none = 0.5, bn =
    0.5}`` is "halfway between none and BN") at every
    point returned by the lookup (all must hold); ``increasing``/``decreasing`` asks that ``a``'s
    values over the sweep have a Spearman rank correlation of at least +0.8 / at most −0.8 with
    x and that the last value is above / below the first. A claim with ``scale = "..."`` is only
    checked at that scale. ``samples(claim, side) -> list[float]`` (optional) gives per-seed values
    of a side; when both sides have two or more, the row gets Welch's t-test p-value (``p``) and a
    ``note`` "n.s." if it is >= 0.05, "untested: ..." when no test is possible (one seed, or no
    spread over the seeds on either side). Returns rows ``{text, ours, holds[, p, note]}`` (holds None =
    not checkable).
    """
    rows = []
    for c in claims:
        if c.get("scale") and c["scale"] != scale:
            continue
        op = c["op"]
        try:
            a = lookup(c, c["a"])
            if op in ("increasing", "decreasing"):
                xs = [p[0] for p in a if p[1] is not None and math.isfinite(p[1])]
                ys = [p[1] for p in a if p[1] is not None and math.isfinite(p[1])]
                if len(ys) < 2:
                    rows.append({"text": c["text"], "ours": "not enough points", "holds": None})
                    continue
                rho = _spearman(xs, ys)
                ok = (
                    rho >= 0.8 and ys[-1] > ys[0]
                    if op == "increasing"
                    else rho <= -0.8 and ys[-1] < ys[0]
                )
                ours = f"{format_value(ys[0])} → {format_value(ys[-1])} (Spearman ρ = {rho:+.2f})"
                rows.append({"text": c["text"], "ours": ours, "holds": ok})
                continue
            b_spec = c["b"]
            if isinstance(b_spec, str):
                b = lookup(c, b_spec)
            elif isinstance(
                b_spec, Mapping
            ):  # a weighted sum of variants, e.g. halfway between two
                parts = [(float(w), dict(lookup(c, n))) for n, w in b_spec.items()]
                b = []
                for x, _ in a:
                    vals = [(w, m.get(x)) for w, m in parts]
                    ok_vals = all(v is not None and math.isfinite(v) for _, v in vals)
                    b.append((x, sum(w * v for w, v in vals) if ok_vals else None))
            else:
                b = [(p[0], float(b_spec)) for p in a]
            pairs = []
            bmap = dict(b)
            for x, va in a:
                vb = bmap.get(x)
                if va is None or vb is None:
                    continue
                pairs.append((x, va, vb))
            if not pairs:
                rows.append({"text": c["text"], "ours": "not run at this scale", "holds": None})
                continue
            ok = all(_CMP[op](va, vb) for _, va, vb in pairs)
            metric = c["metric"]
            row: dict[str, Any] = {}
            if len(pairs) == 1:
                _, va, vb = pairs[0]
                ours = f"{format_value(va, metric)} vs {format_value(vb, metric)}"
                if samples is not None and isinstance(b_spec, str):
                    sa, sb = samples(c, c["a"]), samples(c, b_spec)
                    p = _welch_p(sa, sb)
                    if p is not None:
                        row["p"] = p
                        ours += f" (p = {p:.2g})"
                        if p >= 0.05:
                            row["note"] = "n.s."
                    elif min(len(sa), len(sb)) < 2:
                        row["note"] = "untested: one seed"
                    else:  # every seed gave the same value on both sides: no t-test exists
                        row["note"] = "untested: no spread over seeds"
            else:
                bad = [x for x, va, vb in pairs if not _CMP[op](va, vb)]
                ours = (
                    f"holds at all {len(pairs)} points"
                    if not bad
                    else f"fails at {', '.join(str(x) for x in bad)} ({len(bad)}/{len(pairs)})"
                )
            rows.append({"text": c["text"], "ours": ours, "holds": ok, **row})
        except (KeyError, ValueError) as e:
            rows.append({"text": c["text"], "ours": f"cannot check: {e}", "holds": None})
    return rows
