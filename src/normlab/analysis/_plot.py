"""Figure helpers for :mod:`normlab.analysis`: figures are built without ``pyplot`` (no global
state, no backend switch, never ``show()``) and written as files with matplotlib's Agg renderer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` with an ``(nrows, ncols)`` array of axes: ``(fig, axes)``."""
    from matplotlib.figure import Figure

    if size is None:
        size = (3.2 * ncols + 0.6, 2.6 * nrows + 0.4)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG if none; parents created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    p = Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, dpi=dpi)
    return p
