"""The report sections of the analysis runners (:mod:`normlab.experiments.analyses`).

:data:`REPORTS` maps a runner's name to ``section(data, out_dir, results) -> (markdown lines,
claim rows, figure paths)``: it reads the runs' ``result.json`` (and ``params.json``) from the
loaded suite, aggregates over seeds, draws the tables and figures, checks the experiment's claims
and adds its numbers to ``results`` (written to ``results.json``):

* ``snd_conditioning`` — per sweep a table of the condition number, SND and relative SND
  (mean ± std) of every variant — rows per x, or per variant for a sweep with ``layout =
  "variants"`` (many layers) — and one figure per metric (Huang et al., Fig. 4–5);
* ``cost`` — it/s and the ratio to BN beside the paper's (Kalayeh & Shah, Table 7), a bar chart;
* ``gan`` — the lowest FID beside the paper's, the loss / FID curves and sample grids
  (Kalayeh & Shah, Fig. 6–7).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from normlab.analysis._plot import new_figure, save_figure
from normlab.analysis.disturbance import plot_snd
from normlab.report.markdown import markdown_table
from normlab.report.metrics import (
    SuiteData,
    aggregate,
    evaluate_claims,
    format_agg,
    format_value,
)

__all__ = ["REPORTS"]

Section = Callable[
    [SuiteData, Path, dict[str, Any]], tuple[list[str], list[dict[str, Any]], list[Path]]
]


# ----------------------------------------------------------------------------------------------
# Huang et al., Fig. 4-5: SND and conditioning (of any layer)

#: the metrics of the ``snd_conditioning`` runner and their names in tables and figures
_SND_METRICS = {
    "cond": "condition number",
    "snd": "SND",
    "rel_snd": "relative SND (% of the output's std)",
}


def _snd_tables(data: SuiteData) -> dict[str, dict[str, dict[str, Any]]]:
    """sweep -> variant label -> {x, and per metric its means over seeds and stds}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in data.variants:
        per_seed = [r.result.get("sweeps", {}) for r in data.runs[v.name] if r.result]
        if not per_seed:
            continue
        for sname in per_seed[0]:
            recs = [p[sname] for p in per_seed if sname in p]
            agg: dict[str, Any] = {"x": recs[0]["x"]}
            for m in _SND_METRICS:
                if m in recs[0]:
                    cols = list(zip(*(r[m] for r in recs), strict=True))
                    agg[m] = [
                        statistics.fmean(c) if all(math.isfinite(a) for a in c) else math.inf
                        for c in cols
                    ]
                    agg[f"{m}_std"] = [
                        statistics.stdev(c)
                        if len(c) > 1 and all(math.isfinite(a) for a in c)
                        else recs[0][f"{m}_std"][i]
                        for i, c in enumerate(cols)
                    ]
            out.setdefault(sname, {})[v.label] = agg
    return out


def _cell(rec: dict[str, Any], m: str, i: int) -> str:
    """``mean ± std`` of metric ``m`` at point ``i`` (relative SND in per cent)."""
    v, sd = rec[m][i], rec[f"{m}_std"][i]
    if not math.isfinite(v):
        return "inf"
    scale = 100.0 if m == "rel_snd" else 1.0
    return f"{scale * v:.4g} ± {scale * sd:.2g}"


def _rows_by_x(s: dict[str, Any], by_label: dict[str, dict[str, Any]], metrics: list[str]) -> str:
    """One row per x, one column per variant and metric (Huang et al.'s figures as a table)."""
    labels = list(by_label)
    header = [s.get("x", "x")]
    for m in metrics:
        header += [f"{lab} {_SND_METRICS[m]}" for lab in labels if m in by_label[lab]]
    rows = []
    for i, x in enumerate(by_label[labels[0]]["x"]):
        row = [x]
        for m in metrics:
            row += [_cell(by_label[lab], m, i) for lab in labels if m in by_label[lab]]
        rows.append(row)
    return markdown_table(header, rows)


def _rows_by_variant(
    data: SuiteData, s: dict[str, Any], by_label: dict[str, dict[str, Any]], m: str
) -> str:
    """One row per variant (with its setting), one column per x: for many layers at once."""
    settings = {v.label: v.setting for v in data.variants}
    labels = [lab for lab in by_label if m in by_label[lab]]
    xs = by_label[labels[0]]["x"]
    name = "B" if s.get("x") == "batch_size" else "d"
    header = ["layer", "setting", *(f"{name} = {x}" for x in xs)]
    rows = [
        [lab, settings.get(lab, ""), *(_cell(by_label[lab], m, i) for i in range(len(xs)))]
        for lab in labels
    ]
    return markdown_table(header, rows)


def _snd_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    exp = data.experiment
    tables = _snd_tables(data)
    sweeps: dict[str, Any] = {}
    for v in data.variants:  # the sweeps as run (params.json), else as the file says now
        p = data.runs[v.name][0].path / "params.json"
        if p.is_file():
            params = json.loads(p.read_text(encoding="utf-8"))
        else:
            params = exp.analysis_params(v, data.suite.get("scale", "full"))
        for sw in params.get("sweeps", []):
            sweeps.setdefault(sw["name"], sw)
    lines: list[str] = []
    paths: list[Path] = []
    results["sweeps"] = tables
    n_seeds = data.suite.get("seeds")
    lines += [
        f"Mean ± std (SND: over the sampled examples{'' if n_seeds == 1 else ' and seeds'}; "
        "condition number: over the mini-batches). Relative SND is SND / (σ_out·√D), σ_out "
        "the output's std and D its elements per sample, in per cent. No numbers can be read "
        "from the papers' SND figures; the claims below are checked on ours.",
        "",
    ]
    for sname, by_label in tables.items():
        s = sweeps.get(sname, {"x": "x"})
        labels = list(by_label)
        metrics = [m for m in _SND_METRICS if any(m in by_label[lab] for lab in labels)]
        fixed = (
            f"batch size {s.get('batch_size')}"
            if s.get("x") == "dim"
            else f"dimension {s.get('dim')}"
        )
        lines += [f"### {s.get('title', sname)} ({s.get('x')} sweep, {fixed})", ""]
        if s.get("note"):
            lines += [str(s["note"]), ""]
        by_variant = s.get("layout") == "variants"
        if by_variant:
            for m in metrics:
                lines += [f"**{_SND_METRICS[m]}**", "", _rows_by_variant(data, s, by_label, m), ""]
        else:
            lines += [_rows_by_x(s, by_label, metrics), ""]
        zero = [lab for lab in labels if all(y == 0 for y in by_label[lab].get("snd", [1.0]))]
        for m in metrics:
            logy = m == "cond" or by_variant  # many layers: orders of magnitude apart
            scale = 100.0 if m == "rel_snd" else 1.0
            curves = {
                lab: (by_label[lab]["x"], [scale * y for y in by_label[lab][m]])
                for lab in labels
                if m in by_label[lab] and not (logy and lab in zero)
            }
            if curves:
                paths.append(
                    plot_snd(
                        curves,
                        out_dir / f"{sname}_{m}.png",
                        xlabel="dimension" if s.get("x") == "dim" else "batch size",
                        ylabel=_SND_METRICS[m],
                        logx=True,
                        logy=logy,
                    )
                )
        if by_variant and zero:
            lines += [
                f"SND exactly 0 at every point (left out of the figures): {', '.join(zero)}.",
                "",
            ]

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        sname = claim.get("sweep")
        if sname not in tables:
            raise ValueError(f"no sweep {sname!r} in the results")
        label = exp.variant(side).label
        if label not in tables[sname]:
            return []
        rec = tables[sname][label]
        vals = rec.get(claim["metric"])
        if vals is None:
            raise ValueError(f"sweep {sname!r} has no metric {claim['metric']!r}")
        at = claim.get("at")
        pts = list(zip(rec["x"], vals, strict=True))
        if at is None:
            return pts
        at = at if isinstance(at, list) else [at]
        return [p for p in pts if p[0] in at]

    rows = evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full"))
    return lines, rows, paths


# ----------------------------------------------------------------------------------------------
# Kalayeh & Shah, Table 7: computation cost


def _cost_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    exp = data.experiment
    paper: dict[str, Any] = {}
    for t in exp.tables:
        paper.update({k: v[0] for k, v in (t.get("paper") or {}).items()})
    rows, res, xs, ys = [], {}, [], []
    for v in data.variants:
        rs = [r.result for r in data.runs[v.name] if r.result]
        ratio = aggregate([r["ratio"] for r in rs])
        its = aggregate([r["it_per_s"] for r in rs])
        pv = paper.get(v.name)
        base_name = next(
            (n for n in paper if n.startswith("BN") and n.split("-")[1:] == v.name.split("-")[1:]),
            None,
        )
        pratio = (
            pv / paper[base_name] if isinstance(pv, (int, float)) and base_name in paper else None
        )
        rows.append(
            [
                v.label,
                v.setting,
                format_agg(its),
                format_value(pv),
                format_agg(ratio),
                format_value(pratio),
            ]
        )
        res[v.name] = {
            "it_per_s": its.mean,
            "ratio": ratio.mean,
            "paper_it_per_s": pv,
            "paper_ratio": pratio,
        }
        xs.append(v.label)
        ys.append(ratio.mean or 0.0)
    results["cost"] = res
    lines = [
        "### Table 7: iterations per second (whole network), and throughput relative to BN",
        "",
        "Ours are CPU/GPU timings of this machine: only the ratio to BN (measured alternately in the same "
        "process) is comparable with the paper's Titan X numbers; the paper's ratio is its MN it/s divided by "
        "its BN it/s of the same batch size and dimension.",
        "",
        markdown_table(
            [
                "model",
                "setting",
                "it/s (ours)",
                "it/s (paper)",
                "ratio to BN (ours)",
                "ratio to BN (paper)",
            ],
            rows,
        ),
        "",
    ]
    fig, axes = new_figure(size=(max(4.0, 0.45 * len(xs) + 1.5), 3.2))
    ax = axes[0, 0]
    ax.bar(range(len(xs)), ys)
    ax.set_xticks(range(len(xs)), xs, rotation=60, fontsize=6)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_ylabel("throughput / BN")
    path = save_figure(fig, out_dir / "cost_ratio.png")

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        return [(None, res.get(side, {}).get(claim["metric"]))]

    return lines, evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full")), [path]


# ----------------------------------------------------------------------------------------------
# Kalayeh & Shah, Sec. 4.5: DCGAN


def _gan_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    exp = data.experiment
    paper: dict[str, Any] = {}
    for t in exp.tables:
        paper.update({k: v[0] for k, v in (t.get("paper") or {}).items()})
    rows, res = [], {}
    fig, axes = new_figure(1, 2, size=(8.0, 3.2))
    for v in data.variants:
        rs = [r.result for r in data.runs[v.name] if r.result]
        best = aggregate([r["best_fid"] for r in rs if r.get("best_fid") is not None])
        res[v.name] = {"best_fid": best.mean}
        rows.append(
            [
                v.label,
                format_agg(best) if best.total else rs[0].get("fid", "—"),
                format_value(paper.get(v.name)),
            ]
        )
        h = rs[0]["history"]
        axes[0, 0].plot([r["step"] for r in h], [r["d_loss"] for r in h], label=f"{v.label} D")
        axes[0, 0].plot(
            [r["step"] for r in h], [r["g_loss"] for r in h], ls="--", label=f"{v.label} G"
        )
        if any("fid" in r for r in h):
            axes[0, 1].plot(
                [r["step"] for r in h if "fid" in r],
                [r["fid"] for r in h if "fid" in r],
                marker="o",
                label=v.label,
            )
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].legend(fontsize=6)
    axes[0, 1].set_xlabel("step")
    axes[0, 1].set_ylabel("FID")
    paths = [save_figure(fig, out_dir / "gan.png")]
    for v in data.variants:
        p = data.runs[v.name][0].path / "samples.pt"
        if p.is_file():
            s = torch.load(p, weights_only=True)["samples"]
            grid = _grid(s)
            f2, ax2 = new_figure(size=(3.2, 3.4))
            ax2[0, 0].imshow(grid.squeeze(), cmap="gray" if grid.shape[-1] == 1 else None)
            ax2[0, 0].set_axis_off()
            ax2[0, 0].set_title(v.label)
            paths.append(save_figure(f2, out_dir / f"samples_{v.name}.png"))
    results["gan"] = res
    lines = [
        "### Fig. 6: lowest FID",
        "",
        "FID needs an Inception network that normlab does not ship: pass its features with "
        '`[analysis] fid_features = "inception.pt"` (TorchScript) or `"module:function"`.',
        "",
        markdown_table(["model", "lowest FID (ours)", "lowest FID (paper)"], rows),
        "",
    ]

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        return [(None, res.get(side, {}).get(claim["metric"]))]

    return lines, evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full")), paths


def _grid(s: torch.Tensor, cols: int = 8) -> Any:
    n, c, h, w = s.shape
    rows = math.ceil(n / cols)
    out = torch.ones(c, rows * (h + 1), cols * (w + 1))
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = s[i]
    return out.permute(1, 2, 0).numpy()


#: runner name -> report section
REPORTS: dict[str, Section] = {
    "snd_conditioning": _snd_report,
    "cost": _cost_report,
    "gan": _gan_report,
}
