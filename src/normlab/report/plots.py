"""The report's figures (PNG, matplotlib's Agg renderer, no ``pyplot`` state).

* :func:`plot_curves` — test error (solid) and optionally training error (dashed) against epochs
  or steps, one panel per table group, mean over seeds with ±1 std shading (Kalayeh & Shah, Fig. 2, Huang et al.
  Fig. 6–8). With two or more seeds the band is the spread over seeds; with one seed it is the
  standard deviation within a trailing window of ``window`` evaluations, which is what Kalayeh & Shah, Fig. 2
  shows ("one standard deviation computed within a window of 10 epochs").
* :func:`plot_losses` — cross-entropy of training (circles) and test (squares) data (Collins et al., Fig. 1).
* StatDiff (Qiao et al., Fig. 6), GMM fits (Kalayeh & Shah, Fig. 1) and percentiles (Collins et al., Fig. 4) reuse the plotting
  functions of :mod:`normlab.analysis` on what the collectors recorded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.analysis._plot import figure_caption, new_figure, save_figure, set_caption
from normlab.analysis.activations import plot_activation_gmms, plot_percentiles
from normlab.analysis.statdiff import plot_stat_diff
from normlab.report.labels import run_label
from normlab.report.metrics import RunData, SuiteData

__all__ = [
    "mean_curve",
    "plot_curves",
    "plot_gmm",
    "plot_losses",
    "plot_percentile_runs",
    "plot_statdiff",
    "safe_name",
]


def safe_name(text: str) -> str:
    """A file-name-safe version of a label."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s or "all"


def _xy(run: RunData, key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in run.records:
        v = r.get(key)
        if v is None or r.get(x) is None:
            continue
        xs.append(float(r[x]))
        ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def mean_curve(
    runs: Sequence[RunData],
    key: str,
    x: str = "epoch",
    scale: float = 1.0,
    error: bool = False,
    window: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, mean, std)`` of ``key`` over seeds on the x values every seed has (``error=True``
    plots 1 − value). One seed: std within a trailing window of ``window`` points."""
    curves = []
    for r in runs:
        xs, ys = _xy(r, key, x)
        if xs.size:
            if error:
                ys = 1.0 - ys
            curves.append(dict(zip(xs.tolist(), (scale * ys).tolist(), strict=True)))
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(c) for c in curves)))
    if not common:
        common = sorted(curves[0])
        curves = curves[:1]
    m = np.array([[c[k] for k in common] for c in curves])
    mean = m.mean(0)
    if len(curves) > 1:
        std = m.std(0, ddof=1)
    else:
        std = np.array([mean[max(0, i - window + 1) : i + 1].std() for i in range(mean.size)])
    return np.asarray(common), mean, std


def _groups(data: SuiteData) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in data.variants:
        out.setdefault(v.group, []).append(v.name)
    return out


def plot_curves(
    data: SuiteData,
    out_dir: Path,
    x: str = "epoch",
    train: bool = True,
    window: int = 10,
    logy: bool = False,
    variants: Sequence[str] | None = None,
    name: str = "curves",
) -> list[Path]:
    """Error curves (%) per group, one PNG per group: ``<name>_<group>.png``."""
    paths = []
    for group, names in _groups(data).items():
        if variants is not None:
            names = [n for n in names if n in variants]
        if not names:
            continue
        fig, axes = new_figure(size=(5.6, 3.8))
        ax = axes[0, 0]
        colors = _colors(len(names))
        for col, vname in zip(colors, names, strict=True):
            runs = data.runs[vname]
            label = data.experiment.variant(vname).label
            xs, mean, std = mean_curve(runs, "test_acc", x, 100.0, error=True, window=window)
            if xs.size == 0:
                continue
            ax.plot(xs, mean, color=col, lw=1.4, label=f"{label} test")
            ax.fill_between(xs, mean - std, mean + std, color=col, alpha=0.2, lw=0)
            if train:
                xt, mt, _ = mean_curve(runs, "train_acc", x, 100.0, error=True, window=window)
                if xt.size:
                    ax.plot(xt, mt, color=col, lw=0.9, ls="--", label=f"{label} train")
        ax.set_xlabel(x)
        ax.set_ylabel("error (%)")
        if logy:
            ax.set_yscale("log")
        n = max(len(data.runs[v]) for v in names)
        band = f"±1 std over {n} seeds" if n > 1 else f"±1 std in a {window}-point window"
        what = "test error (solid), train error (dashed)" if train else "test error"
        ax.set_title(f"{what}; {band}", fontsize=7)
        set_caption(fig, run_label(data, group or None))
        ax.legend(fontsize=6, ncol=2)
        paths.append(save_figure(fig, out_dir / f"{name}_{safe_name(group)}.png"))
    return paths


def plot_losses(data: SuiteData, out_dir: Path, x: str = "step", window: int = 10) -> list[Path]:
    """Collins et al., Fig. 1 (top): cross-entropy of train (circles) and test (squares), mean ± std over
    seeds, one PNG per group ``losses_<group>.png``."""
    paths = []
    for group, names in _groups(data).items():
        fig, axes = new_figure(size=(5.6, 3.8))
        ax = axes[0, 0]
        for col, vname in zip(_colors(len(names)), names, strict=True):
            label = data.experiment.variant(vname).label
            for key, marker, tag in (("train_loss", "o", "train"), ("test_loss", "s", "test")):
                xs, mean, std = mean_curve(data.runs[vname], key, x, window=window)
                if xs.size == 0:
                    continue
                ax.errorbar(
                    xs,
                    mean,
                    yerr=std,
                    color=col,
                    marker=marker,
                    ms=3,
                    lw=1,
                    ls="-" if tag == "test" else ":",
                    capsize=2,
                    label=f"{label} {tag}",
                )
        ax.set_xlabel(x)
        ax.set_ylabel("cross entropy")
        ax.set_title("train (circles), test (squares)", fontsize=7)
        set_caption(fig, run_label(data, group or None))
        ax.legend(fontsize=6, ncol=2)
        paths.append(save_figure(fig, out_dir / f"losses_{safe_name(group)}.png"))
    return paths


def plot_statdiff(data: SuiteData, out_dir: Path, x: str = "step") -> Path | None:
    """Qiao et al., Fig. 6: StatDiff mean ± std over layers against training, one curve per variant
    (averaged over seeds)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for v in data.variants:
        hists = [r.statdiff for r in data.runs[v.name] if r.statdiff]
        if not hists:
            continue
        by_x: dict[float, list[tuple[float, float]]] = {}
        for h in hists:
            for rec in h:
                if math.isfinite(rec.get("mean", math.nan)):
                    by_x.setdefault(float(rec.get(x, rec["step"])), []).append(
                        (rec["mean"], rec["std"])
                    )
        xs = sorted(k for k, vals in by_x.items() if len(vals) == len(hists))
        runs[v.label] = [
            {
                "step": k,
                "mean": float(np.mean([a for a, _ in by_x[k]])),
                "std": float(np.mean([b for _, b in by_x[k]])),
            }
            for k in xs
        ]
    if not runs:
        return None
    path = plot_stat_diff(runs, out_dir / "statdiff.png", title="StatDiff over layers (mean ± std)")
    return path


def plot_gmm(run: RunData, out_dir: Path, ks: Sequence[int] = (1, 2, 3)) -> Path | None:
    """Kalayeh & Shah, Fig. 1: mixture fits (K = 1, 2, 3) of the activations snapshot of one run."""
    p = run.path / "gmm_snapshot.pt"
    if not p.is_file():
        return None
    snap = torch.load(p, weights_only=True)
    vals = snap["values"]  # (channels, points)
    return plot_activation_gmms(
        vals.t().contiguous(), out_dir / f"gmm_{safe_name(run.variant.name)}.png", ks=ks
    )


def plot_percentile_runs(data: SuiteData, out_dir: Path) -> list[Path]:
    """Collins et al., Fig. 4: activation percentiles over training, one panel per variant (seed
    0), one PNG per table group (``percentiles_<group>.png``; ``percentiles.png`` when the
    experiment has no groups), so variants of different groups that share a label stay apart."""
    paths = []
    for group, names in _groups(data).items():
        runs = {}
        q = None
        for name in names:
            r = data.runs[name][0]
            if r.percentiles:
                runs[data.experiment.variant(name).label] = r.percentiles
                q = r.percentiles[0].get("q", q)
        if not runs:
            continue
        kw = {"q": q} if q else {}
        fname = f"percentiles_{safe_name(group)}.png" if group else "percentiles.png"
        with figure_caption(run_label(data, group or None)):
            paths.append(plot_percentiles(runs, out_dir / fname, **kw))
    return paths


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
