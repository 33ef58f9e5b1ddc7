"""Figure helpers for :mod:`normlab.analysis`: figures are built without ``pyplot`` (no global
state, no backend switch, never ``show()``) and written as files with matplotlib's Agg renderer."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

__all__ = ["figure_caption", "new_figure", "save_figure"]

_CAPTION: ContextVar[str | None] = ContextVar("normlab_figure_caption", default=None)


@contextmanager
def figure_caption(text: str | None) -> Iterator[None]:
    """Every figure saved by :func:`save_figure` inside this block without a title of its own
    gets ``text`` as its title (a report names the data its figures come from this way)."""
    token = _CAPTION.set(text)
    try:
        yield
    finally:
        _CAPTION.reset(token)


def set_caption(fig: Any, text: str, fontsize: float = 8) -> None:
    """``text`` as the figure's title, wrapped to the figure's width."""
    width = max(30, int(fig.get_figwidth() * 15))
    fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None) -> Any:
    """A ``matplotlib.figure.Figure`` with an ``(nrows, ncols)`` array of axes: ``(fig, axes)``."""
    from matplotlib.figure import Figure

    if size is None:
        size = (3.2 * ncols + 0.6, 2.6 * nrows + 0.4)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG if none; parents created), titled
    with the :func:`figure_caption` in force when it has no title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    p = Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    caption = _CAPTION.get()
    if caption and not fig.get_suptitle():
        set_caption(fig, caption)
    FigureCanvasAgg(fig)
    fig.savefig(p, dpi=dpi)
    return p
