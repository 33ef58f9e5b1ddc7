r"""Batch statistics over all processes of a ``torch.distributed`` run (issue 9).

:func:`sync_stats` is normlab's analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: after

.. code-block:: python

    torch.distributed.init_process_group("gloo")          # or "nccl"; torchrun sets the env
    model = normlab.sync_stats(model)                      # before wrapping in DDP
    model = torch.nn.parallel.DistributedDataParallel(model)

every batch-statistics layer of ``model`` computes its statistics over the samples of *all*
processes in training mode, with the gradients of that global-batch computation. It works with
gloo on CPU tensors (``nn.SyncBatchNorm`` refuses them) as well as with NCCL.

**Mechanism.** Every normlab layer takes its batch statistics as sums from
:mod:`normlab.nn.stats`, and every sums function there ends in
:func:`normlab.nn.stats.reduce_sums`. :func:`sync_stats` registers a forward pre-hook and an
(always-called) forward hook on each batch-statistics layer; in training mode they open a
*reduction scope* over the process group around the layer's forward, inside which
``reduce_sums`` all-reduces (SUM) its tensors with :func:`all_reduce_sum` — one flattened
collective per call, differentiable: its backward all-reduces the incoming gradients, exactly as
``SyncBatchNorm`` does with ``sum_dy`` and ``sum_dy_xmu``. Counts are all-reduced with the sums, so
processes may hold different batch sizes. The scope is thread-local; in eval mode no scope is
opened (eval uses running statistics, and evaluation loops often differ between processes — a
collective there would deadlock), mirroring ``SyncBatchNorm``.

**No-op without a process group.** When ``torch.distributed`` is unavailable or not initialised,
or the group has one process, the hooks open a scope with no group and ``reduce_sums`` returns its
arguments: outputs are bit-for-bit those of the unsynchronised model. The decision is made at every
forward, so :func:`sync_stats` may be called before ``init_process_group``.

**Gradients.** With the SUM-backward all-reduce, the sum over processes of the per-process
gradients of per-process losses ``L_r`` equals the gradient of ``Σ_r L_r`` computed on the global
batch; DDP's averaging then gives the gradient of the global mean loss. Every process must run the
same synchronised layers in the same order, in forward and backward (each is a collective), and
must agree on whether the input requires grad.

**torch's BatchNorm.** ``nn.BatchNorm1d/2d/3d`` layers are replaced by :class:`normlab.nn.BatchNorm`
sharing the same parameter and buffer tensors (so optimizers and ``state_dict`` keys are
unaffected); ``nn.SyncBatchNorm`` is left alone. ``convert_batchnorm=False`` leaves torch's layers
local.

The standardization loss is not a module of the model; synchronise it with
``sync_stats(model, std_loss=std)`` or ``std.sync(process_group)``
(:meth:`normlab.StandardizationLoss.sync`).

**Joining a torchrun job.** :func:`init_distributed` initialises the default group from the
variables ``torchrun`` sets (gloo on CPU, NCCL on CUDA), :func:`dist_info` describes this process,
:func:`shard` splits a batch between processes and :func:`broadcast_object` sends rank 0's value
to all; ``normlab.train`` uses them (``run.sync_stats = true`` turns :func:`sync_stats` on).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from normlab.nn import stats

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "broadcast_object",
    "dist_info",
    "env_world_size",
    "init_distributed",
    "is_main_process",
    "register_batch_stats_layer",
    "resolve_group",
    "shard",
    "sync_stats",
    "synced_layers",
    "unsync_stats",
]


# ----------------------------------------------------------------------------------------------
# The collective
# ----------------------------------------------------------------------------------------------


_DIST_AVAILABLE = torch.distributed.is_available()


def resolve_group(process_group: Any = None) -> Any | None:
    """The process group to reduce over, or ``None`` when there is nothing to synchronise.

    ``process_group=None`` means the default group (``torch.distributed.group.WORLD``). Returns
    ``None`` if ``torch.distributed`` is unavailable or not initialised, or if the group has fewer
    than two processes (or this process is not a member of it).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) < 2:
        return None
    return group


def _all_reduce_flat(tensors: Sequence[Tensor], group: Any) -> tuple[Tensor, ...]:
    """All-reduce (SUM) without autograd: one collective per dtype on a flattened copy."""
    dist = torch.distributed
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        if len(idx) == 1:
            flat = tensors[idx[0]].detach().clone(memory_format=torch.contiguous_format)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            out[idx[0]] = flat
            continue
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        parts = flat.split([tensors[i].numel() for i in idx])
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.view(tensors[i].shape)
    return tuple(out)  # type: ignore[arg-type]


class _AllReduceSum(torch.autograd.Function):
    """``(t_1, …, t_n) ↦ (Σ_r t_1, …, Σ_r t_n)`` over the processes of a group.

    The adjoint of an all-reduce SUM is an all-reduce SUM of the incoming gradients: process r's
    loss reaches every process's sum, so ``∂(Σ_r' L_r')/∂t_r = Σ_r' ∂L_r'/∂(Σ t)``. The backward
    applies this Function again, so double backward works too. Outputs are fresh tensors.
    """

    @staticmethod
    def forward(ctx, group: Any, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.group = group
        return tuple(t.clone() for t in _all_reduce_flat(tensors, group))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *all_reduce_sum(grads, ctx.group))


def all_reduce_sum(tensors: Sequence[Tensor], group: Any) -> tuple[Tensor, ...]:
    """All-reduce (SUM) ``tensors`` over ``group`` and return the results as new tensors.

    One flattened collective per dtype (normally one). Differentiable when grad mode is on and an
    input requires grad: the backward all-reduces the gradients (see :class:`_AllReduceSum`).
    Every process must call it with tensors of the same shapes and dtypes.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _AllReduceSum.apply(group, *tensors)
    return _all_reduce_flat(tensors, group)


# ----------------------------------------------------------------------------------------------
# Which layers, and the hooks
# ----------------------------------------------------------------------------------------------

_EXTRA_TYPES: list[type[nn.Module]] = []


def register_batch_stats_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a layer class (e.g. your own) whose batch statistics come from
    :mod:`normlab.nn.stats` sums, so that :func:`sync_stats` synchronises it. Usable as a class
    decorator; returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_batch_stats_layer: expected an nn.Module subclass, got {cls!r}")
    if cls not in _EXTRA_TYPES:
        _EXTRA_TYPES.append(cls)
    return cls


def _layer_types() -> tuple[type[nn.Module], ...]:
    """The synchronisable layer types. Imported lazily: the layer files import
    :mod:`normlab.nn.stats`, as does this one."""
    from normlab.nn import batch_channel, fixedstats, mixture, mode, standard, whitening

    supported: list[type[nn.Module]] = [standard.BatchNorm, batch_channel.BCNorm]
    supported += [getattr(mode, "ModeNorm", None), getattr(whitening, "IterNorm", None)]
    supported += [getattr(whitening, "DBN", None), getattr(fixedstats, "FixedStatsNorm", None)]
    supported += [getattr(mixture, "MixtureNorm", None)]
    return tuple(t for t in [*supported, *_EXTRA_TYPES] if t is not None)


class _SyncSpec:
    """Stored on a synchronised layer as ``_normlab_sync``: its group (``None`` = default group)
    and the hook handles."""

    __slots__ = ("group", "handles")

    def __init__(self, group: Any, handles: list) -> None:
        self.group = group
        self.handles = handles


def _enter_scope(module: nn.Module, args: Any) -> None:
    group = None
    if module.training and _DIST_AVAILABLE and torch.distributed.is_initialized():
        spec = module.__dict__.get("_normlab_sync")
        if spec is not None:
            group = resolve_group(spec.group)
    stats.push_group(group)


def _exit_scope(module: nn.Module, args: Any, output: Any) -> None:
    stats.pop_group()


def _convert_torch_bn(module: nn.Module) -> nn.Module:
    """torch ``nn.BatchNorm1d/2d/3d`` -> :class:`normlab.nn.BatchNorm` sharing parameters and
    buffers (recursively); other modules are returned as they are, with converted children."""
    from normlab.nn.standard import BatchNorm

    torch_bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if isinstance(module, torch_bn) and not isinstance(
        module, BatchNorm | nn.SyncBatchNorm | nn.modules.lazy.LazyModuleMixin
    ):
        new = BatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        new_child = _convert_torch_bn(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def sync_stats(
    model: nn.Module,
    process_group: Any = None,
    *,
    std_loss: Any = None,
    convert_batchnorm: bool = True,
) -> nn.Module:
    """Make every batch-statistics layer of ``model`` compute its statistics over all processes.

    Args:
        model: the network (a single layer works too). Call before wrapping it in DDP.
        process_group: the ``torch.distributed`` group to synchronise over; ``None`` = the
            default group, resolved at every forward (so this may be called before
            ``init_process_group``).
        std_loss: a :class:`normlab.StandardizationLoss` to synchronise over the same group.
        convert_batchnorm: replace torch's ``nn.BatchNorm1d/2d/3d`` by normlab's ``BatchNorm``
            (same parameter and buffer tensors) so that they are synchronised too. The root
            module itself may be replaced — use the return value.

    Synchronised layers (training mode only): ``bn`` (:class:`~normlab.nn.BatchNorm`), ``bcn``
    (both modes), ``mixture`` (:class:`~normlab.nn.MixtureNorm`: the whole fit — k-means++
    seeding, k-means, EM — runs on the global batch and ends identical on every process, see
    :mod:`normlab.nn.mixture`), ``mode`` (:class:`~normlab.nn.ModeNorm`), ``iternorm``, ``dbn``,
    ``fixedstats`` and layers declared with :func:`register_batch_stats_layer`. Layers whose
    statistics are per sample (gn, ln, in, mgn, WS) need nothing. Calling it again updates the
    group. Without an initialised process group (or with a one-process group) outputs are
    unchanged.

    Returns:
        the model (the same object unless the root itself was a converted torch BatchNorm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sync_stats: model must be an nn.Module, got {type(model).__name__}")
    if process_group is not None and not _looks_like_group(process_group):
        raise TypeError(
            "sync_stats: process_group must be a torch.distributed ProcessGroup or None (the "
            f"default group), got {type(process_group).__name__}"
        )
    if convert_batchnorm:
        model = _convert_torch_bn(model)
    supported = _layer_types()
    for _, m in model.named_modules():
        if not isinstance(m, supported):
            continue
        spec = m.__dict__.get("_normlab_sync")
        if spec is not None:
            spec.group = process_group
            continue
        handles = [
            m.register_forward_pre_hook(_enter_scope),
            m.register_forward_hook(_exit_scope, always_call=True),
        ]
        m._normlab_sync = _SyncSpec(process_group, handles)
    if std_loss is not None:
        if not hasattr(std_loss, "sync"):
            raise TypeError(
                "sync_stats: std_loss must be a normlab.StandardizationLoss, got "
                f"{type(std_loss).__name__}"
            )
        std_loss.sync(process_group)
    return model


def _looks_like_group(group: Any) -> bool:
    dist = torch.distributed
    if not dist.is_available():
        return False
    return isinstance(group, dist.ProcessGroup)


def unsync_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`sync_stats` on ``model``'s layers (hooks removed; converted torch BatchNorm
    layers stay normlab ``BatchNorm``, which computes the same thing). Returns ``model``."""
    for m in model.modules():
        spec = m.__dict__.pop("_normlab_sync", None)
        if spec is not None:
            for h in spec.handles:
                h.remove()
    return model


def synced_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers of ``model`` that :func:`sync_stats` synchronises (``""`` is
    the root)."""
    return [n for n, m in model.named_modules() if "_normlab_sync" in m.__dict__]


# ----------------------------------------------------------------------------------------------
# Joining a torchrun job (used by normlab.train)
# ----------------------------------------------------------------------------------------------


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
