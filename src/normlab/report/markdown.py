"""Markdown pieces of the reports: GitHub-flavoured tables and relative links."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "relative_link"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped, newlines made spaces).

    Example::

        >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
        | a | b |
        | --- | --- |
        | 1 | x\\|y |
    """

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def relative_link(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` with ``/`` separators (the path itself across drives)."""
    try:
        return os.path.relpath(path, base).replace(os.sep, "/")
    except ValueError:  # different drives
        return str(path)
