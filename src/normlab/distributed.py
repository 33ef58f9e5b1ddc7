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
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normlab.nn import stats

__all__ = [
    "all_reduce_sum",
    "register_batch_stats_layer",
    "resolve_group",
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


def _layer_types() -> tuple[tuple[type[nn.Module], ...], tuple[type[nn.Module], ...]]:
    """(synchronisable layer types, batch-statistics layer types that cannot be synchronised
    yet). Imported lazily: the layer files import :mod:`normlab.nn.stats`, as does this one."""
    from normlab.nn import batch_channel, fixedstats, mixture, mode, standard, whitening

    supported: list[type[nn.Module]] = [standard.BatchNorm, batch_channel.BCNorm]
    supported += [getattr(mode, "ModeNorm", None), getattr(whitening, "IterNorm", None)]
    supported += [getattr(whitening, "DBN", None), getattr(fixedstats, "FixedStatsNorm", None)]
    unsupported = [getattr(mixture, "MixtureNorm", None)]
    return (
        tuple(t for t in [*supported, *_EXTRA_TYPES] if t is not None),
        tuple(t for t in unsupported if t is not None),
    )


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
    strict: bool = True,
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
        strict: raise ``NotImplementedError`` if the model holds a batch-statistics layer that
            cannot be synchronised yet (``MixtureNorm``); ``False`` warns and leaves it local.

    Synchronised layers (training mode only): ``bn`` (:class:`~normlab.nn.BatchNorm`), ``bcn``
    (both modes), ``mode`` (:class:`~normlab.nn.ModeNorm`), ``iternorm``, ``dbn``,
    ``fixedstats`` and layers declared with :func:`register_batch_stats_layer`. Layers whose statistics are per sample
    (gn, ln, in, mgn, WS) need nothing. Calling it again updates the group. Without an
    initialised process group (or with a one-process group) outputs are unchanged.

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
    supported, unsupported = _layer_types()
    blocked = [n or "(root)" for n, m in model.named_modules() if isinstance(m, unsupported)]
    if blocked:
        msg = (
            f"sync_stats: cannot synchronise {blocked} yet (MixtureNorm's fit is not "
            "synchronised across processes); they would use per-process statistics"
        )
        if strict:
            raise NotImplementedError(msg + " — pass strict=False to leave them local")
        warnings.warn(msg, stacklevel=2)
    for _, m in model.named_modules():
        if not isinstance(m, supported) or isinstance(m, unsupported):
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
