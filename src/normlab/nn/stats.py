"""Sufficient statistics: the one place where layers reduce over the batch.

Every normlab layer that uses batch statistics obtains them from the functions here, which return
*sums* (counts, sums, sums of squares, weighted sums, covariance sums) rather than means. Sums are
what a distributed run must all-reduce to get the statistics of the global batch, so this module is
the seam where synchronisation across processes plugs in (:func:`reduce_sums`).

Cross-process reduction. Every sums function below ends in :func:`reduce_sums`, which is
the identity unless a *reduction scope* is open in the current thread: inside
``with reduction_scope(group):`` (or between :func:`push_group` / :func:`pop_group`) it all-reduces
(SUM) its tensors over the process group — one flattened collective per call, inside autograd
(the backward all-reduces the incoming gradients, as ``nn.SyncBatchNorm`` does), see
:func:`normlab.nn.collective.all_reduce_sum`. :func:`normlab.sync_stats` opens that scope around the
forward of every batch-statistics layer in training mode, so a layer that takes *all* its batch
sums from this module is synchronised without any change of its own. What a layer must still
respect for the reduced sums to be the global batch's:

* anything subtracted from the data before summing (a numerical "shift") must be the same on every
  process (e.g. a running mean, or a mean obtained from an all-reduced :func:`channel_sums`), never
  a per-process batch mean;
* counts must come from the returned (reduced) sums, not from the local tensor's shape;
* sums computed in a custom ``autograd.Function.backward`` run outside the forward's scope: capture
  :func:`current_group` in the forward and re-enter it with :func:`reduction_scope` in the
  backward (and compute parameter gradients from the *local* sums);
* every process must make the same sequence of calls (same layers, same number of iterations),
  since each call is a collective.

All sums are accumulated in float32 for float16/bfloat16 input (see :func:`stat_dtype`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from normlab.nn._utils import stat_dtype, to_points
from normlab.nn.collective import all_reduce_sum

__all__ = [
    "ChannelSums",
    "CovarianceSums",
    "WeightedSums",
    "channel_sums",
    "covariance_sums",
    "current_group",
    "gram_sums",
    "group_batch",
    "pop_group",
    "push_group",
    "reduce_sums",
    "reduction_scope",
    "weighted_channel_first_sums",
    "weighted_channel_sums",
    "weighted_sums",
]


class ChannelSums(NamedTuple):
    """Per-channel sums over every dimension except 1: ``count`` (scalar tensor), ``s1`` and ``s2``
    of shape (C,)."""

    count: Tensor
    s1: Tensor
    s2: Tensor

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """Mean and biased (population) variance; the variance is clamped at 0."""
        mean = self.s1 / self.count
        var = (self.s2 / self.count - mean * mean).clamp_min(0)
        return mean, var


class WeightedSums(NamedTuple):
    """Soft-assignment sums for K components over m points of dimension C:
    ``w`` (K,) total weight, ``s1`` (K, C) weighted sums, ``s2`` (K, C) weighted sums of squares."""

    w: Tensor
    s1: Tensor
    s2: Tensor


class CovarianceSums(NamedTuple):
    """Per-group covariance sums: ``count`` (scalar), ``s1`` (G, d), ``outer`` (G, d, d) =
    Σ x xᵀ."""

    count: Tensor
    s1: Tensor
    outer: Tensor


class _ScopeState(threading.local):
    """Per-thread reduction state: ``group`` is the process group sums are all-reduced over
    (``None``: no reduction), ``stack`` the enclosing scopes' groups."""

    group: object | None = None  # class default: the first read in a new thread needs no setup

    def __init__(self) -> None:
        self.stack: list[object | None] = []


_STATE = _ScopeState()


def reduce_sums(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The cross-process reduction of sufficient statistics.

    Outside a reduction scope (single process, eval mode, or a layer that is not synchronised):
    returns its arguments unchanged — one thread-local attribute read. Inside one: all-reduces
    (SUM) the tensors over the scope's process group with
    :func:`normlab.nn.collective.all_reduce_sum` (one collective per dtype; differentiable, the
    backward all-reduces the gradients).
    """
    group = _STATE.group
    if group is None:
        return tensors
    return all_reduce_sum(tensors, group)


def current_group() -> object | None:
    """The process group :func:`reduce_sums` reduces over in this thread, or ``None``."""
    return _STATE.group


def push_group(group: object | None) -> None:
    """Open a reduction scope over ``group`` (a ``torch.distributed`` ProcessGroup; ``None`` opens a
    scope in which nothing is reduced). Must be paired with :func:`pop_group`."""
    state = _STATE
    state.stack.append(state.group)
    state.group = group


def pop_group() -> None:
    """Close the innermost scope opened by :func:`push_group` (no-op if none is open)."""
    stack = _STATE.stack
    if stack:
        _STATE.group = stack.pop()


@contextmanager
def reduction_scope(group: object | None) -> Iterator[None]:
    """``with reduction_scope(group):`` — sums computed inside are all-reduced over ``group``
    (``None``: not reduced, e.g. to re-enter a captured :func:`current_group` that was ``None``)."""
    push_group(group)
    try:
        yield
    finally:
        pop_group()


def channel_sums(x: Tensor) -> ChannelSums:
    """Count, Σx and Σx² per channel of a channel-first ``(N, C, *)`` tensor (in float32 for
    half-precision input). Differentiable; all-reduced inside a reduction scope.

    Example::

        >>> sums = channel_sums(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> sums.count, sums.s1, sums.s2
        (tensor(2.), tensor([4., 8.]), tensor([10., 40.]))
        >>> sums.mean_var()
        (tensor([2., 4.]), tensor([1., 4.]))
    """
    dt = stat_dtype(x)
    xf = x.to(dt)
    dims = [0, *range(2, x.dim())]
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=dt, device=x.device)
    s1 = xf.sum(dims)
    s2 = (xf * xf).sum(dims)
    count, s1, s2 = reduce_sums(count, s1, s2)
    return ChannelSums(count, s1, s2)


def weighted_sums(points: Tensor, weights: Tensor) -> WeightedSums:
    """Σ_i w_ik, Σ_i w_ik x_i and Σ_i w_ik x_i² for points ``(m, C)`` and weights ``(m, K)``,
    as two matrix products. Differentiable in both arguments.

    Example::

        >>> points = torch.tensor([[1.0], [3.0], [5.0]])
        >>> weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])  # soft assignments, K = 2
        >>> sums = weighted_sums(points, weights)
        >>> sums.w, sums.s1 / sums.w[:, None]  # component weights and weighted means
        (tensor([1.5000, 1.5000]), tensor([[1.6667],
                [4.3333]]))
    """
    dt = stat_dtype(points)
    p = points.to(dt)
    w = weights.to(dt)
    wt = w.t()
    out = (w.sum(0), wt @ p, wt @ (p * p))
    return WeightedSums(*reduce_sums(*out))


def weighted_channel_sums(x: Tensor, weights: Tensor, x2: Tensor | None = None) -> WeightedSums:
    """:func:`weighted_sums` for channel-first tensors, without moving channels last.

    ``x`` is ``(N, C, *)`` and ``weights`` is ``(N, K, *)`` (weight of component k at each
    position); returns Σ w_k, Σ w_k x and Σ w_k x2 over every dimension but the channel one, with
    ``x2 = x * x`` unless given (pass a precomputed square, or any other per-position tensor of x's
    shape that should be summed with the same weights). ``(N, C)`` input is N points. Computed as
    batched matrix products on the channel-first layout (no transpose copy). Differentiable.
    """
    dt = stat_dtype(x)
    p = x.to(dt)
    p2 = p * p if x2 is None else x2.to(dt)
    return WeightedSums(*reduce_sums(*_channel_products(weights.to(dt), p, p2)))


def weighted_channel_first_sums(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Σ w_k and Σ w_k x of :func:`weighted_channel_sums` alone (no pass over the squares)."""
    dt = stat_dtype(x)
    cnt, s1 = reduce_sums(*_channel_products(weights.to(dt), x.to(dt)))
    return cnt, s1


def _channel_products(w: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """(Σ w_k, Σ w_k x for every x in ``xs``) over every dimension but the channel one."""
    if w.dim() == 2:  # N points: plain (K, N) @ (N, C) products
        wt = w.t()
        return (w.sum(0), *(wt @ p for p in xs))
    # (B, K, L) @ (B, L, C) per sample, then summed over the batch (with the points as the
    # transposed operand: 1.7x faster on CPU than (B, C, L) @ (B, L, K))
    n, k = w.shape[0], w.shape[1]
    wk = w.reshape(n, k, -1)
    return (
        wk.sum((0, 2)),
        *((wk @ p.reshape(n, p.shape[1], -1).transpose(1, 2)).sum(0) for p in xs),
    )


class _GramSums(torch.autograd.Function):
    """``A ↦ (Σ_l A[..., l], A Aᵀ)`` for a batch ``A`` of shape ``(B, d, L)``.

    The backward is one batched product, ``(Ḡ + Ḡᵀ) A + s̄ 1ᵀ`` (autograd of ``a.sum(-1)`` and
    ``torch.bmm(a, a.mT)`` would compute ``Ḡ A`` and ``Ḡᵀ A`` separately and add three full-size
    gradients). Twice differentiable.
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.set_materialize_grads(False)
        return a.sum(-1), torch.bmm(a, a.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_s1: Tensor | None, grad_outer: Tensor | None) -> Tensor | None:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        if grad_outer is None:
            if grad_s1 is None:
                return None
            return grad_s1.unsqueeze(-1).expand_as(a)
        sym = grad_outer + grad_outer.transpose(1, 2)
        if grad_s1 is None:
            return torch.bmm(sym, a)
        return torch.baddbmm(grad_s1.unsqueeze(-1), sym, a)


def group_batch(x: Tensor, group_size: int) -> tuple[Tensor, int]:
    """Channels of a channel-first tensor in groups of ``group_size`` as a batch of ``d × L``
    matrices, in the input's own layout (a view for contiguous input, no transposed copy).

    Returns ``(batch, reps)``: ``(N, C)`` input gives the ``(G, d, N)`` view and ``reps = 1``;
    ``(N, C, *)`` input gives ``(N·G, d, prod(*))`` (one matrix per sample and group) and
    ``reps = N``. A layer that both reduces and transforms the groups can use the same batch for
    :func:`gram_sums` and for its own products, so autograd meets a single view of ``x``.
    """
    n, c = x.shape[0], x.shape[1]
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 1
        or c % group_size
    ):
        raise ValueError(
            f"group_size must be a positive divisor of the channel count {c}, got {group_size!r}"
        )
    g, d = c // group_size, group_size
    if x.dim() == 2:
        return x.reshape(n, g, d).permute(1, 2, 0), 1
    return x.reshape(n * g, d, -1), n


def gram_sums(batch: Tensor, reps: int) -> CovarianceSums:
    """Covariance sums of a :func:`group_batch` ``(reps·G, d, L)``: count ``reps·L``, Σx (G, d) and
    Σ x xᵀ (G, d, d), summed over the L columns and the ``reps`` copies of each group.

    One batched product (``_GramSums``: its backward is a single batched product too). In float32
    for half-precision input. Differentiable (twice).
    """
    dt = stat_dtype(batch)
    b = batch.to(dt)
    bg, d, length = b.shape
    g = bg // reps
    count = torch.tensor(float(reps * length), dtype=dt, device=b.device)
    s1, outer = _GramSums.apply(b)
    if reps > 1:
        s1 = s1.reshape(reps, g, d).sum(0)
        outer = outer.reshape(reps, g, d, d).sum(0)
    return CovarianceSums(*reduce_sums(count, s1, outer))


def covariance_sums(x: Tensor, group_size: int) -> CovarianceSums:
    """Per-group covariance sums of a channel-first tensor whose channel count is a multiple of
    ``group_size``: returns count, Σx of shape (G, d) and Σ x xᵀ of shape (G, d, d), d = group_size,
    summed over every position of every sample.

    Computed as one batched matrix product in the input's own layout (no transposed copy of the
    data, see :func:`group_batch` and :func:`gram_sums`). Differentiable; the backward of Σ x xᵀ is
    a single batched product.

    Example::

        >>> x = torch.randn(16, 8, 4, 4, dtype=torch.float64)
        >>> sums = covariance_sums(x, group_size=4)  # two groups of four channels
        >>> pts = x[:, :4].movedim(1, -1).reshape(-1, 4)  # group 0 as points
        >>> sums.count.item(), torch.allclose(sums.outer[0], pts.T @ pts)
        (256.0, True)
    """
    return gram_sums(*group_batch(x.to(stat_dtype(x)), group_size))


def points_of(x: Tensor) -> Tensor:
    """Alias of :func:`normlab.nn._utils.to_points` for layers that work on points."""
    return to_points(x)
