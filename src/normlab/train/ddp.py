"""The multi-process side of a training run: one object the loop asks, one process or many.

:class:`DDPContext` joins the ``torchrun`` job (:func:`~normlab.train.distributed.init_distributed`)
and answers the loop's questions the same way for one process and for many:

* :meth:`~DDPContext.wrap` puts the model in ``DistributedDataParallel`` (the loop applies
  :func:`normlab.sync_stats` first when ``run.sync_stats`` is set) and :meth:`~DDPContext.no_sync`
  skips DDP's gradient all-reduce on all but the last micro-batch of a step;
* :meth:`~DDPContext.shard` is this process's contiguous share of a global batch, and
  :meth:`~DDPContext.share_scale` the factor that makes DDP's gradient average the gradient of
  the global batch's mean loss when the shares are uneven;
* :meth:`~DDPContext.all_sum` sums float64 values over the processes (the train metrics of
  :class:`TrainSums`, gathered evaluation), :meth:`~DDPContext.sync_buffers` gives every
  process rank 0's buffers;
* :meth:`~DDPContext.on_main` runs a function on rank 0 alone and hands its result, or its
  exception, to every process;
* :meth:`~DDPContext.guard` forwards a failure: when one process raises, the others raise a
  :class:`RemoteRankError` that names its rank, exception type and message, instead of waiting
  in a collective for ever or failing with the backend's "connection closed".

How the guard works: the failing process records its exception in the job's key-value store.
When every process failed (the same error everywhere, e.g. a bad value or a callback that
raises on all of them) each raises its own and the process group stays usable. Otherwise, after
a grace period, the failing process destroys its process group, which makes the collective the
others wait in fail at once (gloo: "connection closed by peer"); they find the record, raise
:class:`RemoteRankError`, destroy their group too (which wakes processes further away) and
acknowledge; the failing process waits for the acknowledgements, then raises its exception.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import pickle
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from normlab.train.config import ConfigError
from normlab.train.distributed import (
    DistInfo,
    broadcast_object,
    env_world_size,
    init_distributed,
    shard,
)

if torch.distributed.is_available():
    # Imported now, before any process group exists: these functions take the default group as a
    # default argument value, so imported later (DDP imports them lazily) they would keep the
    # group alive for ever, and destroying it would no longer close its connections, which is
    # how a failing process wakes the others (see DDPContext.guard).
    import torch.distributed.nn.functional

__all__ = ["DDPContext", "RemoteRankError", "TrainSums", "process_device", "select_device"]

T = TypeVar("T")

#: Seconds a failing process waits for the others to fail as well before it breaks the group.
FAILURE_GRACE_S = 5.0
#: Seconds a failing process waits for the others to acknowledge its failure.
ACK_TIMEOUT_S = 30.0
_POLL_S = 0.02
# every guard gets the same number on every process (they enter them in the same order)
_GUARDS = itertools.count()


def select_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(spec)`` (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {spec!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: {spec!r} requested but MPS is not available")
    return dev


def process_device(spec: str = "auto") -> torch.device:
    """:func:`select_device`; under ``torchrun`` an unindexed CUDA device becomes
    ``cuda:LOCAL_RANK``."""
    dev = select_device(spec)
    if env_world_size() > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return dev


class RemoteRankError(RuntimeError):
    """Raised on the other processes of a multi-process run when process ``rank`` failed.

    ``exc_type`` is the qualified name of its exception, ``remote_message`` its message and
    ``remote_traceback`` its formatted traceback (as printed by that process).
    """

    def __init__(
        self, rank: int, exc_type: str, remote_message: str, remote_traceback: str = ""
    ) -> None:
        super().__init__(f"rank {rank} failed with {exc_type}: {remote_message}")
        self.rank = rank
        self.exc_type = exc_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.rank, self.exc_type, self.remote_message, self.remote_traceback)
        return (type(self), args)


def _qualname(e: BaseException) -> str:
    cls = type(e)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _portable(e: BaseException, rank: int) -> BaseException:
    """``e`` itself when it survives pickling (it crosses to the other processes), else a
    :class:`RemoteRankError` describing it."""
    try:
        again = pickle.loads(pickle.dumps(e))
        if type(again) is type(e) and str(again) == str(e):
            return e
    except Exception:
        pass
    return RemoteRankError(rank, _qualname(e), str(e))


def _is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` looks like a collective that failed because a peer went away."""
    if isinstance(e, torch.distributed.DistError):
        return True
    if type(e) is not RuntimeError:
        return False
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset"))


class DDPContext:
    """This process's place in the run and the collectives the loop needs (see the module
    docstring). For one process every method is the identity or a no-op.

    Args:
        device: this process's device (CUDA devices get NCCL under ``backend="auto"``).
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.

    Example (one process)::

        >>> ctx = DDPContext(torch.device("cpu"))
        >>> ctx.world_size, ctx.shard(torch.arange(5)).tolist(), ctx.on_main(lambda: "ok")
        (1, [0, 1, 2, 3, 4], 'ok')
    """

    def __init__(self, device: torch.device, backend: str = "auto") -> None:
        self.device = device
        self.info: DistInfo = init_distributed(device, backend)
        self.module: DistributedDataParallel | None = None
        self.failure_grace_s = FAILURE_GRACE_S
        self.ack_timeout_s = ACK_TIMEOUT_S

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def backend(self) -> str | None:
        """The ``torch.distributed`` backend (``None`` for one process)."""
        return self.info.backend

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.info.enabled

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.info.is_main

    # ------------------------------------------------------------------ the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (several processes; a collective: every
        process calls it), else ``model`` itself."""
        if not self.enabled:
            return model
        if self.module is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # a conv with one input channel gets weight gradients whose stride along that size-1
            # dimension differs from the parameter's: same layout, but DDP warns on every process
            warnings.filterwarnings(
                "ignore", message="Grad strides do not match bucket view strides"
            )
            self.module = DistributedDataParallel(model, device_ids=ids)
        return self.module

    def unwrap(self) -> None:
        """Drop the DDP wrapper: one still alive when the process group is destroyed can abort
        the process in its destructor, and it sits in reference cycles, hence the collection."""
        if self.module is not None:
            self.module = None
            gc.collect()

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Inside: backward passes skip DDP's gradient all-reduce, unless ``last``."""
        if self.module is None or last:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers on every process (as DDP does before each training forward)."""
        if self.enabled:
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)

    # ------------------------------------------------------------------ data and sums

    def shard(self, t: Tensor) -> Tensor:
        """This process's contiguous share of the first dimension of ``t``."""
        return shard(t, self.world_size, self.rank)

    def share_scale(self, n_local: int, n_global: int) -> float:
        """``n_local · N / n_global``: times each process's mean loss, DDP's average of the
        gradients is the gradient of the global batch's mean loss."""
        return n_local * self.world_size / n_global

    def all_sum(self, values: Tensor) -> Tensor:
        """``values`` (float64) summed over the processes."""
        values = values.double()
        if self.enabled:
            torch.distributed.all_reduce(values)
        return values

    # ------------------------------------------------------------------ errors

    def on_main(self, fn: Callable[[], T], share: bool = True) -> T | None:
        """``fn()`` on rank 0; every process gets its result (``share=False``: rank 0 keeps it,
        the others get ``None``) or raises its exception."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # every process must leave the broadcast
                error = e
        sent = broadcast_object(
            (result if share else None, _portable(error, 0) if error is not None else None)
        )
        if error is not None:
            raise error
        if sent[1] is not None:
            raise sent[1]
        return result if self.is_main else sent[0]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Forward an exception raised inside to the other processes (module docstring)."""
        if not self.enabled:
            yield
            return
        store = torch.distributed.distributed_c10d._get_default_store()
        prefix = f"normlab/guard/{next(_GUARDS)}/"
        try:
            yield
        except Exception as e:
            try:
                remote = self._handle_failure(store, prefix, e)
            except Exception:  # the store is gone as well: there is nothing to forward
                remote = None
            if remote is not None:
                raise remote from e
            raise
        with contextlib.suppress(Exception):
            store.add(prefix + "settled", 1)

    def teardown(self) -> None:
        """Drop the DDP wrapper and destroy the process group (after a failure)."""
        self.unwrap()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group may fail to say goodbye
                dist.destroy_process_group()

    def _handle_failure(self, store: Any, prefix: str, e: Exception) -> RemoteRankError | None:
        """The other process's error when ``e`` is the consequence of its failure, else
        ``None`` once ``e`` is published."""
        remote = self._remote_failure(store, prefix) if _is_comm_error(e) else None
        if remote is not None:
            store.add(prefix + "settled", 1)
            self.teardown()  # wakes the processes still waiting on this one
            return remote
        self._publish(store, prefix, e)
        return None

    def _publish(self, store: Any, prefix: str, e: BaseException) -> None:
        """Record this process's failure; break the group unless every process failed."""
        text = "".join(traceback.format_exception(e))
        store.set(prefix + f"rank{self.rank}", pickle.dumps((_qualname(e), str(e), text)))
        store.add(prefix + "failed", 1)
        store.add(prefix + "settled", 1)
        if _wait_count(store, prefix + "failed", self.world_size, self.failure_grace_s):
            return  # everybody failed: each raises its own, the group stays usable
        self.teardown()  # the others' pending collectives now fail and they read the record
        _wait_count(store, prefix + "settled", self.world_size, self.ack_timeout_s)

    def _remote_failure(self, store: Any, prefix: str) -> RemoteRankError | None:
        """The recorded failure of the lowest other rank (waiting a moment for one)."""
        keys = [prefix + f"rank{r}" for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + min(self.failure_grace_s, 2.0)
        while True:
            for key in keys:
                if store.check([key]):
                    exc_type, message, text = pickle.loads(store.get(key))
                    rank = int(key.rpartition("rank")[2])
                    return RemoteRankError(rank, exc_type, message, text)
            if time.monotonic() > deadline:
                return None
            time.sleep(_POLL_S)


def _wait_count(store: Any, key: str, target: int, timeout_s: float) -> bool:
    """Wait until the counter ``key`` reaches ``target``; whether it did within the timeout."""
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < target:
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


class TrainSums:
    """The running train metrics since the last record, summed on the device (no host
    synchronisation per step) and over the processes when read: the loss times the samples, the
    correct predictions, the samples, each auxiliary loss per step, and the steps."""

    def __init__(self, device: torch.device, aux_names: Sequence[str]) -> None:
        self.device, self.names = device, list(aux_names)
        self.reset()

    def reset(self) -> None:
        z = torch.zeros((), device=self.device)
        self.loss = z.clone()
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.aux = {n: z.clone() for n in self.names}
        self.seen = 0
        self.steps = 0

    def totals(self, dist: DDPContext) -> tuple[float, float, int, dict[str, float]]:
        """(loss, correct, seen, aux) summed over every process (one all-reduce)."""
        seen = torch.tensor(float(self.seen), dtype=torch.float64, device=self.device)
        parts = [self.loss.double(), self.correct.double(), seen]
        values = dist.all_sum(torch.stack(parts + [a.double() for a in self.aux.values()]))
        loss, correct, n, *aux = values.tolist()
        return loss, correct, round(n), dict(zip(self.names, aux, strict=True))

    def globalize(self, dist: DDPContext) -> None:
        """Rank 0 holds the global sums and the others zero (their sum is unchanged), so a
        checkpoint written by rank 0 holds the global ones."""
        loss, correct, seen, aux = self.totals(dist)
        keep = dist.is_main
        self.loss.fill_(loss if keep else 0.0)
        for n, v in aux.items():
            self.aux[n].fill_(v if keep else 0.0)
        self.correct.fill_(round(correct) if keep else 0)
        self.seen = seen if keep else 0

    def state(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu(),
            "correct": self.correct.detach().cpu(),
            "aux": {n: a.detach().cpu() for n, a in self.aux.items()},
        }

    def load(self, sums: dict[str, Any], seen: int, steps: int, keep: bool) -> None:
        """Restore from a checkpoint (which holds the global sums: rank 0 keeps them)."""
        self.loss = sums["loss"].to(self.device)
        self.correct = sums["correct"].to(self.device)
        self.aux = {n: sums["aux"][n].to(self.device) for n in self.names}
        self.seen, self.steps = seen, steps
        if not keep:
            self.loss.zero_()
            self.correct.zero_()
            for a in self.aux.values():
                a.zero_()
            self.seen = 0
