"""Atomic checkpoints loadable with ``torch.load(..., weights_only=True)``, and RNG state capture.

Everything in a checkpoint is a tensor or a plain Python value (dict, list, tuple, int, float,
str, bool, None), so the safe ``weights_only`` unpickler reads it back: the numpy RNG state's key
array is stored as an int64 tensor, Python's ``random`` state as nested tuples of ints.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write_text",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace`` — a reader (or
    a resumed run) never sees a half-written checkpoint, even if the process is killed mid-write."""
    _atomic(Path(path), lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler (``weights_only=True``) onto the CPU."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temp file + ``os.replace``)."""
    _atomic(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
