r"""Batch statistics over all processes of a ``torch.distributed`` run.

:func:`sync_stats` is normlab's analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``::

    torch.distributed.init_process_group("gloo")          # or "nccl"; torchrun sets the env
    model = normlab.sync_stats(model)                      # before wrapping in DDP
    model = torch.nn.parallel.DistributedDataParallel(model)

Every batch-statistics layer of ``model`` then computes its statistics over the samples of *all*
processes in training mode, with the gradients of that global-batch computation; gloo works on CPU
tensors (``nn.SyncBatchNorm`` refuses them) as well as NCCL.

**Mechanism.** normlab layers take their batch statistics as sums from :mod:`normlab.nn.stats`,
whose every sums function ends in :func:`normlab.nn.stats.reduce_sums`. A layer class declares
that it takes part with the class attribute ``sync_batch_stats = True`` (or
:func:`register_batch_stats_layer` for a class of your own). :func:`sync_stats` registers a
forward pre-hook and an always-called forward hook on each such layer; in training mode they open
a *reduction scope* over the process group around the layer's forward, inside which
``reduce_sums`` all-reduces (SUM) its tensors with :func:`normlab.nn.collective.all_reduce_sum`.
Counts travel with the sums, so processes may hold different batch sizes. In eval mode no scope is
opened (running statistics are used, and evaluation loops often differ between processes).

Without an initialised process group, or with a one-process group, outputs are bit-for-bit those
of the unsynchronised model; the decision is made at every forward. With the SUM-backward
all-reduce, DDP's gradient averaging gives the gradient of the global mean loss. Every process
must run the same synchronised layers in the same order, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normlab.nn import stats
from normlab.nn.collective import resolve_group
from normlab.nn.standard import BatchNorm

__all__ = ["register_batch_stats_layer", "sync_stats", "synced_layers", "unsync_stats"]

_DIST_AVAILABLE = torch.distributed.is_available()


def register_batch_stats_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a layer class (e.g. your own) whose batch statistics come from
    :mod:`normlab.nn.stats` sums, so that :func:`sync_stats` synchronises it. Usable as a class
    decorator; sets ``cls.sync_batch_stats = True`` and returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_batch_stats_layer: expected an nn.Module subclass, got {cls!r}")
    cls.sync_batch_stats = True  # type: ignore[attr-defined]
    return cls


def _takes_part(module: nn.Module) -> bool:
    return bool(getattr(type(module), "sync_batch_stats", False))


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

    Example::

        >>> model = sync_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> synced_layers(model), type(model[1]).__name__  # torch's BN became normlab's
        (['1'], 'BatchNorm')
        >>> model(torch.randn(2, 3, 5, 5)).shape  # no process group: computed as before
        torch.Size([2, 8, 3, 3])
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
    for _, m in model.named_modules():
        if not _takes_part(m):
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
