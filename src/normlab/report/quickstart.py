"""The quickstart's table and figure (:func:`normlab.experiments.run_quickstart` measures them).

:func:`write_quickstart_report` writes ``results.md`` (the table and how to read it) and
``test_error.png`` (test error against optimizer steps, the seed mean with a ±1 std band, on a
log scale and for the second half of training) next to the ``results.json`` of the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from normlab.analysis._plot import new_figure, save_figure
from normlab.experiments.quickstart import MethodResult, QuickstartResult
from normlab.report.plots import _colors

__all__ = ["QUICKSTART_COLUMNS", "format_table", "plot_test_error", "write_quickstart_report"]

QUICKSTART_COLUMNS = [
    "method",
    "norm",
    "seeds",
    "final test acc (%)",
    "best test acc (%)",
    "steps to BN best",
    "time/step vs BN",
]


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`normlab.experiments.quickstart.build_rows` as a fixed-width text table
    (also valid Markdown)."""
    body = []
    for r in rows:
        if r["seeds"] == 0:
            reach = "failed"
        elif r["bn_best_target"] is None:
            reach = "n/a"
        else:
            reach = "never" if r["steps_to_bn_best"] is None else str(r["steps_to_bn_best"])
        tvb = r["time_vs_bn"]
        body.append(
            [
                r["method"],
                r["spec"],
                f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                _pct(r["final_acc_mean"], r["final_acc_std"]),
                _pct(r["best_acc_mean"], r["best_acc_std"]),
                reach,
                "—" if tvb != tvb else f"{tvb:.2f}×",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(QUICKSTART_COLUMNS, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(QUICKSTART_COLUMNS), sep, *(line(b) for b in body)])


def plot_test_error(methods: dict[str, MethodResult], path: Path, title: str) -> Path:
    """Test error (%) against optimizer steps, seed mean with a ±1 std band, one line per method:
    the whole run on a log scale (left) and the second half of training (right)."""
    fig, axes = new_figure(1, 2, size=(13.0, 5.0))
    left, right = axes[0, 0], axes[0, 1]
    floor = 0.1  # % — the log panel's floor (a 0 % error cannot be drawn on a log axis)
    colors = _colors(len(methods))
    for col, m in zip(colors, methods.values(), strict=True):
        steps, mean, std = m.mean_curve()
        if steps.size == 0:
            continue
        err, band = 100 * (1 - mean), 100 * std
        for ax in (left, right):
            ax.plot(steps, err, color=col, label=m.name, lw=1.6)
            ax.fill_between(
                steps, np.clip(err - band, floor, 100), err + band, color=col, alpha=0.15
            )
    left.set_yscale("log")
    left.set_ylim(floor, 100)
    left.set_title("test error (log scale)")
    right.set_title("test error, second half of training")
    last = max((m.steps[-1] for m in methods.values() if m.steps), default=None)
    if last is not None:
        right.set_xlim(last / 2, last)
        tails = [100 * (1 - m.mean_curve()[1]) for m in methods.values() if m.curves]
        hi = max(
            (float(np.percentile(t[len(t) // 2 :], 90)) for t in tails if t.size), default=10.0
        )
        right.set_ylim(0, min(100.0, max(2.0, 1.3 * hi)))
    for ax in (left, right):
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def write_quickstart_report(res: QuickstartResult) -> tuple[str, Path]:
    """Write ``res.out / results.md`` and ``res.out / test_error.png``; returns the table and the
    figure's path."""
    table = format_table(res.rows)
    plot = plot_test_error(res.methods, res.out / "test_error.png", res.title)
    target = res.rows[0]["bn_best_target"] if res.rows else None
    notes = [
        f"Setting: {res.setting}.",
        f"Seeds: {res.seeds}. Wall time: {res.wall_time:.1f} s with {res.workers} worker(s).",
        f"Steps to BN best: first evaluated step (every {res.eval_every} steps) where the "
        "method's seed-mean test accuracy "
        + (
            f"reaches BN's best seed-mean accuracy ({100 * target:.2f}%)."
            if target
            else "reaches BN's best (BN not run)."
        ),
        "Time/step vs BN: mean training time per step (no evaluation) over BN's; separate runs "
        "on a shared machine, so a rough ratio.",
    ]
    (res.out / "results.md").write_text(
        "# normlab quickstart\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n",
        encoding="utf-8",
    )
    return table, plot
