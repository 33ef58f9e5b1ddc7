"""The two reference layers without normalization: ``none`` (identity) and ``affine`` (a learnable
per-channel scale and shift, the affine part of a norm layer without its normalization)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn._utils import channel_view, check_input, check_positive_int
from normlab.nn.registry import register_norm

__all__ = ["Affine", "NoNorm"]


@register_norm("none", "identity: no normalization")
class NoNorm(nn.Identity):
    """Identity that remembers ``num_features`` so it can be converted back to a norm later.

    Args:
        num_features: C (kept, not checked against the input).

    Shape:
        - Input: any
        - Output: the input itself

    Example::

        >>> layer = NoNorm(16)
        >>> x = torch.randn(2, 16, 3, 3)
        >>> layer(x) is x, layer
        (True, NoNorm(16))
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "NoNorm")

    def extra_repr(self) -> str:
        return f"{self.num_features}"


@register_norm("affine", "learnable per-channel scale and shift, no normalization")
class Affine(nn.Module):
    r"""A learnable per-channel scale and shift without normalization.

    .. math::  y = \gamma \odot x + \beta

    with γ initialised to 1 and β to 0. The output has the input's dtype (float32 parameters with
    half-precision input, as under autocast, compute in float32 and cast back — as torch's
    normalization layers do).

    Args:
        num_features: C.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> layer = Affine(3)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(layer(x), x)  # γ = 1, β = 0 at initialisation
        True
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "Affine")
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, "Affine")
        w, b = channel_view(self.weight, x.dim()), channel_view(self.bias, x.dim())
        return (x * w + b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
