"""PyTorch's standard normalizations behind the registry, accepting ``(N, C)`` and ``(N, C, *)``.

``bn`` is batch normalization over every dimension except channels (``nn.BatchNorm1d/2d/3d`` in
one class); ``gn``, ``ln`` and ``in`` are group normalization with G groups, one group, and one
group per channel. All have a per-channel affine (γ, β) by default:

.. math::  y = \\frac{x - \\mathrm E[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\,\\gamma + \\beta

with the statistics over (N, *) per channel for ``bn`` and over each sample's group of channels
and positions for ``gn``/``ln``/``in``.

Synchronised batch statistics: inside a reduction scope of :mod:`normlab.nn.stats` (opened by
:func:`normlab.sync_stats` around a training forward), ``bn`` computes its statistics with
:func:`batch_norm_from_sums`, whose sums are all-reduced over the processes; elsewhere it is
``F.batch_norm``. The default group count and the numerics of :func:`batch_norm_from_sums` are
explained in ``docs/methods/standard.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn._utils import (
    channel_view,
    check_input,
    check_positive_int,
    read_running,
    stat_dtype,
)
from normlab.nn.registry import register_norm
from normlab.nn.stats import channel_sums, current_group

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "batch_norm_from_sums",
    "default_num_groups",
]


def default_num_groups(num_channels: int) -> int:
    """Default group count: ``min(32, C // 4)`` (Qiao et al., Sec. 8.2), at least 1; when that
    does not divide C, the largest divisor of C below it (so every channel count gets a valid
    default).

    Example::

        >>> [default_num_groups(c) for c in (256, 64, 24, 3)]
        [32, 16, 6, 1]
    """
    g = max(1, min(32, num_channels // 4))
    while num_channels % g:
        g -= 1
    return g


def batch_norm_from_sums(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Training-mode batch normalization with statistics from
    :func:`normlab.nn.stats.channel_sums`.

    .. math::  y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
               \text{running} \leftarrow (1 - \text{momentum})\,\text{running}
               + \text{momentum}\cdot\text{batch}

    with the batch mean and biased variance over every dimension but 1, and the running variance
    updated with the unbiased variance: the same function as ``F.batch_norm(x, running_mean,
    running_var, weight, bias, True, momentum, eps)``. Its statistics are sums, so inside a
    reduction scope (:func:`normlab.sync_stats`) they are those of the global batch, with
    gradients through the all-reduce. Differentiable in ``x``, ``weight`` and ``bias``.

    The sums are taken of ``x − c`` with a shift ``c`` that is the same on every process (the
    running mean if given, else the global batch mean from a first, gradient-free pass).
    Statistics are in float32 for half input; the output has ``x``'s dtype. A single value per
    channel is allowed (globally there may be many): its variance is 0.

    Args:
        x: the input.
        running_mean, running_var: running statistics ``(C,)`` updated in place, or ``None``.
        weight, bias: γ and β ``(C,)``, or ``None``.
        momentum: running-statistics momentum.
        eps: added to the variance.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``; ``running_*``, ``weight``, ``bias`` ``(C,)``
        - Output: same shape as the input

    Example::

        >>> x = torch.randn(16, 4, 3, 3, dtype=torch.float64)
        >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(batch_norm_from_sums(x), ref)
        True
    """
    dt = stat_dtype(x)
    nd = x.dim()
    xf = x.to(dt)
    if running_mean is not None:
        shift = read_running(running_mean).to(dt)
    else:
        with torch.no_grad():
            shift = channel_sums(xf).mean_var()[0]
    xs = xf - channel_view(shift, nd)
    sums = channel_sums(xs)
    d, var = sums.mean_var()  # d = μ − c
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(dt)
    offset = -d * scale
    if bias is not None:
        offset = offset + bias.to(dt)
    y = torch.addcmul(channel_view(offset, nd), xs, channel_view(scale, nd))
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            n = sums.count
            unbiased = var * (n / (n - 1).clamp_min(1))
            running_mean.lerp_((shift + d).to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return y.to(x.dtype)


@register_norm("bn", "batch normalization (Ioffe & Szegedy), running statistics for eval")
class BatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch normalization for ``(N, C)`` and ``(N, C, *)`` input.

    .. math::  y = \frac{x - \mathrm E[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    with statistics over every dimension but 1. Same arguments, buffers and ``state_dict`` keys as
    ``nn.BatchNorm2d``. After :func:`normlab.sync_stats` its training statistics are those of all
    processes' samples (:func:`batch_norm_from_sums`); otherwise it is exactly torch's batch
    normalization.

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running-statistics momentum (``None``: cumulative average), as in torch.
        affine: learnable per-channel γ (init 1) and β (init 0).
        track_running_stats: keep running statistics for eval.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> bn = BatchNorm(8)
        >>> bn(torch.randn(4, 8)).shape, bn(torch.randn(4, 8, 5, 5, 5)).shape
        (torch.Size([4, 8]), torch.Size([4, 8, 5, 5, 5]))
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        check_positive_int(num_features, "num_features", "BatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input, self.num_features, "BatchNorm")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or current_group() is None:
            return super().forward(input)
        # synchronised training step: torch's bookkeeping, statistics from all-reduced sums
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch does
                factor = 1.0 / float(self.num_batches_tracked)
        return batch_norm_from_sums(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            factor,
            self.eps,
        )


class GroupNorm(nn.GroupNorm):
    r"""Group normalization for ``(N, C)`` and ``(N, C, *)`` input.

    Each sample's channels are split into ``num_groups`` groups, normalized over the group's
    channels and positions, then a per-channel affine γ, β.

    Args:
        num_features: C.
        num_groups: G, a divisor of C; ``None`` picks :func:`default_num_groups`.
        eps: added to the variance.
        affine: learnable per-channel γ (init 1) and β (init 0).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> gn = GroupNorm(64)
        >>> gn.num_groups, gn(torch.randn(2, 64, 4, 4)).shape
        (16, torch.Size([2, 64, 4, 4]))
    """

    _layer = "GroupNorm"

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        check_positive_int(num_features, "num_features", self._layer)
        if num_groups is None:
            num_groups = default_num_groups(num_features)
        check_positive_int(num_groups, "num_groups", self._layer)
        if num_features % num_groups:
            raise ValueError(
                f"{self._layer}: num_groups={num_groups} must divide num_features={num_features}"
            )
        super().__init__(num_groups, num_features, eps, affine)
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, self._layer)
        return super().forward(x)


register_norm("gn", "group normalization; num_groups defaults to min(32, C // 4)")(GroupNorm)


@register_norm("ln", "layer normalization: one group over all channels (and positions)")
class LayerNorm(GroupNorm):
    """Layer normalization of channel-first input: group normalization with a single group
    (each sample over all its channels and positions), per-channel affine.

    Args:
        num_features: C.
        eps: added to the variance.
        affine: learnable per-channel γ (init 1) and β (init 0).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> y = LayerNorm(6, affine=False)(torch.randn(3, 6, 2, 2))
        >>> [round(float(v), 4) + 0.0 for v in y.mean((1, 2, 3))]
        [0.0, 0.0, 0.0]
    """

    _layer = "LayerNorm"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, 1, eps, affine)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


@register_norm("in", "instance normalization: one group per channel, no running statistics")
class InstanceNorm(GroupNorm):
    """Instance normalization: each channel of each sample over its positions, per-channel
    affine; no running statistics.

    For ``(N, C)`` input there is one value per group, so the normalized value is 0 and the output
    is β (finite; this is what instance normalization means at H = W = 1).

    Args:
        num_features: C.
        eps: added to the variance.
        affine: learnable per-channel γ (init 1) and β (init 0).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> norm = InstanceNorm(3)
        >>> norm(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
        >>> bool(norm(torch.randn(2, 3)).abs().max() < 1e-3)  # (N, C): the output is β = 0
        True
    """

    _layer = "InstanceNorm"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_features, eps, affine)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
