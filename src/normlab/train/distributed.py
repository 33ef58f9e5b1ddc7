"""Joining a ``torchrun`` job: process-group initialisation, this process's place in the job,
rank-0 broadcasts and batch sharding (used by :mod:`normlab.train`).

``run.sync_stats = true`` in a training config turns :func:`normlab.sync_stats` on for the model.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DistInfo",
    "broadcast_object",
    "dist_info",
    "env_world_size",
    "init_distributed",
    "is_main_process",
    "shard",
]


class DistInfo(NamedTuple):
    """This process's place in a ``torch.distributed`` job: ``rank``, ``world_size``,
    ``local_rank`` (index on its machine) and ``backend`` (``None`` for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def dist_info() -> DistInfo:
    """The current job: from the initialised default process group, else a single process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend()
    )


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that logs and writes files.
    Before the process group is initialised, read from torchrun's ``RANK`` variable."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


_INITIALISED_HERE = False


def _destroy_at_exit() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(
    device: torch.device | str | None = None, backend: str = "auto", timeout_s: float = 1800.0
) -> DistInfo:
    """Join the job ``torchrun`` describes in the environment, once per process.

    ``torchrun --nproc_per_node=N`` (or ``python -m torch.distributed.run``) sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1``
    this initialises the default process group from them (``init_method="env://"``) with
    ``backend`` — ``"auto"``: NCCL when ``device`` is a CUDA device, gloo otherwise — and makes
    ``device`` the current CUDA device. Without those variables (or with ``WORLD_SIZE = 1``) it
    does nothing and returns a single-process :class:`DistInfo`. An already initialised default
    group is used as it is (so a launcher of its own may initialise it first). The group is
    destroyed at interpreter exit.
    """
    global _INITIALISED_HERE
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = env_world_size()
    if world < 2:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=_env_int("RANK", 0),
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    if not _INITIALISED_HERE:
        atexit.register(_destroy_at_exit)
        _INITIALISED_HERE = True
    return dist_info()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (pickled; any picklable value). Identity for a
    single process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(t: Tensor, world_size: int, rank: int) -> Tensor:
    """Process ``rank``'s contiguous share of the first dimension of ``t``: ``world_size`` parts
    whose sizes differ by at most one, the larger ones first (``torch.tensor_split``)."""
    if world_size < 2:
        return t
    return torch.tensor_split(t, world_size)[rank]
