r"""Weight Standardization (Qiao et al., Sec. 4.1, Eq. 5–7).

Each output channel's fan-in (``C_in / groups × kernel`` weights, I values) is reparameterized as

.. math::  \hat W_{i,j} = \frac{W_{i,j} - \mu_{W_{i,\cdot}}}{\sigma_{W_{i,\cdot}}},\qquad
           \sigma_{W_{i,\cdot}} = \sqrt{\tfrac1I \textstyle\sum_j W_{i,j}^2 - \mu_{W_{i,\cdot}}^2 + \epsilon}

(population variance, ε inside the square root, Eq. 7) and the layer convolves with :math:`\hat W`.
There is no affine transform of the weights (Qiao et al., Sec. 4.1); the bias is kept as in the torch layer.
Gradients flow to the raw weights W through the standardization, which is what gives Eq. 14–15.

``center`` / ``scale`` give the ablation of Qiao et al., Table 4: ``center=False`` skips the subtraction of
the mean ("/ div" only); ``scale=False`` skips the division ("− mean" only, Eq. 11). With
``center=False`` the divisor is still σ of Eq. 7 (the standard deviation, not the root mean square),
so "divide only" gives unit variance without centering — each flag does exactly its own part.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WSConv1d", "WSConv2d", "WSLinear", "standardize_weight", "ws_from_module"]


def standardize_weight(
    weight: Tensor, eps: float = 1e-5, center: bool = True, scale: bool = True
) -> Tensor:
    """Standardize ``weight`` (shape ``(O, ...)``) over all dimensions but the first (Eq. 5–7).

    Computed in float32 for half-precision weights and cast back.
    """
    if not (center or scale):
        return weight
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    dims = tuple(range(1, w.dim()))
    if scale:
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=0)
        num = w - mean if center else w
        out = num * torch.rsqrt(var + eps)
    else:
        out = w - w.mean(dim=dims, keepdim=True)
    return out.to(weight.dtype)


def _check_ws_args(eps: float, center: bool, scale: bool, layer: str) -> None:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps < 0:
        raise ValueError(f"{layer}: eps must be a non-negative number, got {eps!r}")
    for name, v in (("center", center), ("scale", scale)):
        if not isinstance(v, bool):
            raise ValueError(f"{layer}: {name} must be True or False, got {v!r}")


class _WSMixin:
    eps: float
    center: bool
    scale: bool
    weight: Tensor

    def standardized_weight(self) -> Tensor:
        """The weight actually used by the layer: Ŵ = WS(W)."""
        return standardize_weight(self.weight, self.eps, self.center, self.scale)

    def _ws_repr(self) -> str:
        return f", eps={self.eps}, center={self.center}, scale={self.scale}"


class _WSConvNd(_WSMixin):
    """Shared constructor/forward of the weight-standardized convolutions (the torch conv class
    comes next in the MRO)."""

    _conv_forward: Callable[..., Tensor]
    bias: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        eps: float = 1e-5,
        center: bool = True,
        scale: bool = True,
    ) -> None:
        _check_ws_args(eps, center, scale, type(self).__name__)
        super().__init__(  # type: ignore[call-arg]
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.eps, self.center, self.scale = float(eps), center, scale

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()  # type: ignore[misc]


class WSConv2d(_WSConvNd, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization: same arguments plus ``eps``, ``center``,
    ``scale``.

    Shape: as ``nn.Conv2d``.
    """


class WSConv1d(_WSConvNd, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization: same arguments plus ``eps``, ``center``,
    ``scale``.

    Shape: as ``nn.Conv1d``.
    """


class WSLinear(_WSMixin, nn.Linear):
    """``nn.Linear`` with Weight Standardization of each output unit's ``in_features`` weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        eps: float = 1e-5,
        center: bool = True,
        scale: bool = True,
    ) -> None:
        _check_ws_args(eps, center, scale, "WSLinear")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.eps, self.center, self.scale = float(eps), center, scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._ws_repr()


def ws_from_module(module: nn.Module, **ws_kwargs: object) -> nn.Module:
    """Build the WS counterpart of an ``nn.Conv1d/2d`` or ``nn.Linear``, sharing nothing but copying
    its raw weights and bias, on the same device and dtype."""
    w = module.weight
    fk = {"device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.Conv2d | nn.Conv1d):
        cls = WSConv2d if isinstance(module, nn.Conv2d) else WSConv1d
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            **fk,
            **ws_kwargs,
        )
    elif isinstance(module, nn.Linear):
        new = WSLinear(
            module.in_features, module.out_features, module.bias is not None, **fk, **ws_kwargs
        )
    else:
        raise TypeError(f"cannot weight-standardize a {type(module).__name__}")
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.train(module.training)
    return new
