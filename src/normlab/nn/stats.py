"""Sufficient statistics: the one place where layers reduce over the batch.

Every normlab layer that uses batch statistics obtains them from the functions here, which return
*sums* (counts, sums, sums of squares, weighted sums, covariance sums) rather than means. Sums are
what a distributed run must all-reduce to get the statistics of the global batch, so this module is
the seam where synchronisation across processes plugs in (:func:`reduce_sums`).

All sums are accumulated in float32 for float16/bfloat16 input (see :func:`stat_dtype`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from normlab.nn._utils import stat_dtype, to_points

__all__ = [
    "ChannelSums",
    "CovarianceSums",
    "WeightedSums",
    "channel_sums",
    "covariance_sums",
    "reduce_sums",
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
    """Per-group covariance sums: ``count`` (scalar), ``s1`` (G, d), ``outer`` (G, d, d) = Σ x xᵀ."""

    count: Tensor
    s1: Tensor
    outer: Tensor


def reduce_sums(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Hook for cross-process reduction of sufficient statistics.

    Single-process: returns its arguments unchanged. A distributed wrapper replaces the reduction
    (all-reduce SUM inside autograd) without any layer having to change.
    """
    reducer = _REDUCER
    if reducer is None:
        return tensors
    return reducer(*tensors)


_REDUCER = None  # set by a synchronisation context; None means single process


def channel_sums(x: Tensor) -> ChannelSums:
    """Count, Σx and Σx² per channel of a channel-first ``(N, C, *)`` tensor (in float32 for
    half-precision input). Differentiable."""
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
    as two matrix products. Differentiable in both arguments."""
    dt = stat_dtype(points)
    p = points.to(dt)
    w = weights.to(dt)
    wt = w.t()
    out = (w.sum(0), wt @ p, wt @ (p * p))
    return WeightedSums(*reduce_sums(*out))


def covariance_sums(x: Tensor, group_size: int) -> CovarianceSums:
    """Per-group covariance sums of a channel-first tensor whose channel count is a multiple of
    ``group_size``: returns count, Σx of shape (G, d) and Σ x xᵀ of shape (G, d, d), d = group_size,
    computed as one batched matrix product."""
    dt = stat_dtype(x)
    p = to_points(x).to(dt)  # (m, C)
    m, c = p.shape
    g = c // group_size
    pg = p.t().reshape(g, group_size, m)  # (G, d, m)
    count = torch.tensor(float(m), dtype=dt, device=x.device)
    s1 = pg.sum(-1)
    outer = torch.bmm(pg, pg.transpose(1, 2))
    return CovarianceSums(*reduce_sums(count, s1, outer))


def points_of(x: Tensor) -> Tensor:
    """Alias of :func:`normlab.nn._utils.to_points` for layers that work on points."""
    return to_points(x)
