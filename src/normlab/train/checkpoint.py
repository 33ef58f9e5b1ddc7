"""Sound checkpoints: atomic, checksummed, readable with ``torch.load(..., weights_only=True)``.

:func:`save_checkpoint` writes a temporary file, records its sha256 beside it
(``<name>.sha256``, in ``sha256sum`` format, so ``sha256sum -c`` checks it too) and renames the
file into place; given ``previous=``, the file it replaces is first kept there (with its own
checksum) if it verifies. Every step of that is a rename or an atomic write, ordered so that a
process killed at any point leaves at least one checkpoint that verifies.

:func:`load_checkpoint` recomputes the sha256, compares it with the recorded one and reads the
file with the safe unpickler; a missing, truncated, overwritten or foreign file raises
:class:`CheckpointError` (a ``ValueError``) naming the file and what is wrong with it, never
torch's own unpickling message. A file without a recorded checksum (written before checksums
existed) is read unverified, with a :class:`CheckpointWarning`.

Everything in a checkpoint is a tensor or a plain Python value, so the safe unpickler reads it
back: the numpy RNG state's key array is stored as an int64 tensor, Python's ``random`` state as
nested tuples of ints (:func:`capture_rng`, :func:`restore_rng`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "atomic_write_json",
    "atomic_write_text",
    "capture_rng",
    "checksum_path",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "sha256_file",
    "verify_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: ``path`` is the file, ``reason`` what is wrong with it
    (the message is ``"<path> <reason>"``)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (sent from rank 0 to the others)
        return (type(self), (self.path, self.reason))


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, foreign) or read without a recorded checksum."""


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform / file system
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """``write`` into a new temporary file beside ``path``, flushed to disk; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temporary file + ``os.replace``)."""
    p = Path(path)
    _replace(_write_temp(p, lambda fh: fh.write(text.encode("utf-8"))), p)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- checksums


def checksum_path(path: str | os.PathLike[str]) -> Path:
    """Where the sha256 of checkpoint ``path`` is recorded: ``<path>.sha256``."""
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded_sha256(path: Path) -> str | None:
    """The checksum recorded for ``path`` (``None``: none recorded)."""
    try:
        text = checksum_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""
    return (text.split() or [""])[0].lower()


def _write_checksum(path: Path, digest: str) -> None:
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")


def verify_checkpoint(path: str | os.PathLike[str]) -> bool | None:
    """Whether the file's sha256 is the recorded one (``None``: no checksum is recorded)."""
    p = Path(path)
    if not p.is_file():
        return False
    recorded = _recorded_sha256(p)
    if recorded is None:
        return None
    return recorded == sha256_file(p)


# ----------------------------------------------------------------------------- save and load


def save_checkpoint(
    obj: dict[str, Any],
    path: str | os.PathLike[str],
    previous: str | os.PathLike[str] | None = None,
) -> str:
    """``torch.save(obj)`` to ``path`` atomically, with its sha256 in ``<path>.sha256``.

    With ``previous``, the checkpoint already at ``path`` is kept there first when it verifies
    (a damaged one is dropped, so a good ``previous`` is never replaced by it). A reader never
    sees a half-written file, and a process killed at any point leaves a checkpoint that
    verifies. Returns the new file's sha256.

    Example::

        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for step in (1, 2):
        ...     _ = save_checkpoint({"step": step}, d / "last.pt", previous=d / "prev.pt")
        >>> load_checkpoint(d / "last.pt"), load_checkpoint(d / "prev.pt")
        ({'step': 2}, {'step': 1})
        >>> sorted(p.name for p in d.iterdir())
        ['last.pt', 'last.pt.sha256', 'prev.pt', 'prev.pt.sha256']
    """
    p = Path(path)
    tmp = _write_temp(p, lambda fh: torch.save(obj, fh))
    try:
        digest = sha256_file(tmp)  # of the bytes on disk, read back
        if previous is not None and verify_checkpoint(p):
            prev = Path(previous)
            # the order keeps one verifying checkpoint at every step: prev's checksum first (prev
            # is unverified, p still good), then p becomes prev (good), then p's new checksum
            # (no p), then the new p
            _write_checksum(prev, _recorded_sha256(p) or "")
            os.replace(p, prev)
            _fsync_dir(p.parent)
        _write_checksum(p, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, p)
    return digest


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a checkpoint's sha256 and read it with the safe unpickler (``weights_only=True``)
    onto the CPU. Raises :class:`CheckpointError` naming the file when it is missing, does not
    match its checksum, or is not a readable torch file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "does not exist")
    ok = verify_checkpoint(p)
    if ok is False:
        raise CheckpointError(
            p, f"is corrupt (its sha256 differs from the one in {checksum_path(p).name})"
        )
    if ok is None:
        warnings.warn(
            f"{p}: no {checksum_path(p).name} beside it; read without verifying it",
            CheckpointWarning,
            stacklevel=2,
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickling/zip errors; its message is not for users here
        raise CheckpointError(
            p, f"is corrupt (not a readable torch checkpoint: {type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(p, f"is not a checkpoint (holds a {type(obj).__name__})")
    return obj


# ----------------------------------------------------------------------------- RNG states


def capture_rng(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of torch's CPU (and CUDA) generators, Python's ``random``, numpy's global RNG and
    the data-order generator, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def _tuplify(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_tuplify(v) for v in x)
    return x


def restore_rng(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])
