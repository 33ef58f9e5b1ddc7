"""Where a result came from: the code (normlab version, git commit, uncommitted changes), torch,
the device, and the sha256 of the experiment file that ran.

``normlab run`` records :func:`provenance` in ``suite.json``, every training run records
:func:`git_state` in its ``env.json``, and ``normlab report`` copies them into ``results.json``,
so a committed result can be checked against the experiment file it claims to come from.

Example::

    >>> state = git_state()
    >>> sorted(state)
    ['git_commit', 'git_dirty']
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from normlab import __version__

__all__ = ["git_state", "provenance", "sha256_bytes", "sha256_of"]

# src/normlab/provenance.py -> the checkout holding src/ (when normlab runs from one)
_CHECKOUT = Path(__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_state(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` of the checkout normlab is
    imported from (or of ``root``). Both are ``None`` when normlab is not imported from a git
    checkout of its own (an installed wheel), so an enclosing repository is never mistaken for
    normlab's. ``git_dirty`` is true when tracked files differ from the commit."""
    r = Path(root) if root is not None else _CHECKOUT
    if root is None and not (r / "pyproject.toml").is_file():
        return {"git_commit": None, "git_dirty": None}
    top = _git(r, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != r.resolve():
        return {"git_commit": None, "git_dirty": None}
    head = _git(r, "rev-parse", "HEAD")
    status = _git(r, "status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": head.strip() if head else None,
        "git_dirty": None if status is None else bool(status.strip()),
    }


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of the file at ``path``."""
    return sha256_bytes(Path(path).read_bytes())


def provenance(device: str | None = None, experiment: str | os.PathLike[str] | None = None) -> dict:
    """The code and environment of this process: normlab's version and git state, torch and
    python versions, ``device`` (as given: ``"cpu"``, ``"cuda:0 (NVIDIA H200)"``, ...) and, with
    ``experiment``, that file's name and sha256."""
    rec: dict[str, Any] = {
        "normlab": __version__,
        **git_state(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if experiment is not None:
        rec["experiment_file"] = Path(experiment).name
        rec["experiment_sha256"] = sha256_of(experiment)
    return rec
