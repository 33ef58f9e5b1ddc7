"""The cross-process all-reduce behind synchronised batch statistics.

:func:`all_reduce_sum` sums tensors over the processes of a ``torch.distributed`` group in one
flattened collective per dtype, inside autograd: its backward all-reduces the incoming gradients,
as ``nn.SyncBatchNorm`` does with ``sum_dy`` and ``sum_dy_xmu``. :func:`resolve_group` turns a
layer's configured group into the group to reduce over, or ``None`` when there is nothing to
synchronise (no initialised process group, or a group of one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_reduce_sum", "resolve_group"]

_DIST_AVAILABLE = torch.distributed.is_available()


def resolve_group(process_group: Any = None) -> Any | None:
    """The process group to reduce over, or ``None`` when there is nothing to synchronise.

    ``process_group=None`` means the default group (``torch.distributed.group.WORLD``). Returns
    ``None`` if ``torch.distributed`` is unavailable or not initialised, or if the group has fewer
    than two processes (or this process is not a member of it).

    Example::

        >>> resolve_group() is None  # no process group initialised: nothing to synchronise
        True
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
