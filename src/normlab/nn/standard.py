"""PyTorch's standard normalizations behind the registry, accepting ``(N, C)`` and ``(N, C, *)``.

``bn`` is batch normalization over every dimension except channels (``nn.BatchNorm1d/2d/3d`` in
one class); ``gn``, ``ln`` and ``in`` are group normalization with G groups, one group, and one
group per channel. All have a per-channel affine (γ, β) by default.
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab.nn._utils import check_input, check_positive_int
from normlab.registry import register_norm

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "default_num_groups"]


def default_num_groups(num_channels: int) -> int:
    """Default group count: ``min(32, C // 4)`` (004 Sec. 8.2), at least 1; when that does not
    divide C, the largest divisor of C below it (so every channel count gets a valid default)."""
    g = max(1, min(32, num_channels // 4))
    while num_channels % g:
        g -= 1
    return g


@register_norm("bn", "batch normalization (Ioffe & Szegedy), running statistics for eval")
class BatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch normalization for ``(N, C)`` and ``(N, C, *)`` input.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β`` with statistics over every dimension but 1.
    Same arguments, buffers and ``state_dict`` keys as ``nn.BatchNorm2d``.
    """

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


class GroupNorm(nn.GroupNorm):
    r"""Group normalization for ``(N, C)`` and ``(N, C, *)`` input.

    Each sample's channels are split into ``num_groups`` groups, normalized over the group's
    channels and positions, then a per-channel affine. ``num_groups=None`` picks
    :func:`default_num_groups`.
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
    """Layer normalization of channel-first input: group normalization with a single group."""

    _layer = "LayerNorm"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, 1, eps, affine)


@register_norm("in", "instance normalization: one group per channel, no running statistics")
class InstanceNorm(GroupNorm):
    """Instance normalization: each channel of each sample over its positions, per-channel affine.

    For ``(N, C)`` input there is one value per group, so the normalized value is 0 and the output
    is β (finite; this is what instance normalization means at H = W = 1).
    """

    _layer = "InstanceNorm"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_features, eps, affine)
