"""The two reference layers without normalization: ``none`` and ``affine``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn._utils import channel_view, check_input, check_positive_int
from normlab.nn.registry import register_norm

__all__ = ["Affine", "NoNorm"]


@register_norm("none", "identity: no normalization")
class NoNorm(nn.Identity):
    """Identity that remembers ``num_features`` so it can be converted back to a norm later.

    Shape: any ``(N, C, *)`` -> same.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "NoNorm")

    def extra_repr(self) -> str:
        return f"{self.num_features}"


@register_norm("affine", "learnable per-channel scale and shift, no normalization")
class Affine(nn.Module):
    r"""``y = γ ⊙ x + β`` per channel, with γ initialised to 1 and β to 0.

    The output has the input's dtype (float32 parameters with half-precision input, as under
    autocast, compute in float32 and cast back — as torch's normalization layers do).

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same.
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
