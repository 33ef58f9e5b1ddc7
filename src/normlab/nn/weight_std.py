r"""Weight-based normalization of convolutions: WS (Qiao et al., Sec. 4.1), WN and CWN (Sec. 4.2).

Each output channel's fan-in W_i (``C_in / groups × kernel`` weights, I values) is
reparameterized, and the layer convolves with the result Ŵ; gradients reach the raw weights.

**Weight Standardization** (Qiao et al., Eq. 5–7; :class:`WSConv2d`, :func:`standardize_weight`):

.. math::  \hat W_{i,j} = \frac{W_{i,j} - \mu_{W_{i,\cdot}}}{\sigma_{W_{i,\cdot}}},\qquad
           \sigma_{W_{i,\cdot}} = \sqrt{\tfrac1I \textstyle\sum_j W_{i,j}^2 - \mu_{W_{i,\cdot}}^2 + \epsilon}

(population variance, ε inside the square root) with no affine on Ŵ; the bias is kept.
``center=False`` / ``scale=False`` drop the subtraction / the division (the "/ std" and "− mean"
columns of Qiao et al., Table 4; Eq. 11–12).

**Weight Normalization** (Qiao et al., Eq. 8): Ŵ_i = g_i·W_i/‖W_i‖ — torch's own
``torch.nn.utils.parametrizations.weight_norm`` (``dim=0``), applied by :func:`apply_weight_norm`.

**Centered Weight Normalization** (Qiao et al., Eq. 9; :class:`CenteredWeightNorm`):

.. math::  \hat W_i = g_i\,\frac{W_i - \bar W_i}{\sqrt{\|W_i - \bar W_i\|^2 + \epsilon}}

a parametrization with a learnable length g_i per output channel, initialised to the original
weight's norm ‖W_i‖ (as torch's weight norm does), so the initial Ŵ is the centered direction of
the original weight at the original length. WN and CWN layers are the torch layers with a
parametrized ``weight`` (parameters ``parametrizations.weight.original0`` = g, shape
``(O, 1, …)``, and ``original1`` = v, the direction). Readings and the papers' numbers:
``docs/methods/ws.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

__all__ = [
    "CenteredWeightNorm",
    "WSConv1d",
    "WSConv2d",
    "WSLinear",
    "apply_weight_norm",
    "center_normalize_weight",
    "centered_weight_norm",
    "standardize_weight",
    "ws_from_module",
]

WEIGHT_NORM_KINDS = ("wn", "cwn")  # the kinds of apply_weight_norm


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


def center_normalize_weight(v: Tensor, g: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Centered Weight Normalization of ``v`` (Qiao et al., Eq. 9), per output channel (dim 0):
    ``Ŵ_i = g_i·(v_i − v̄_i)/√(‖v_i − v̄_i‖² + eps)``.

    ``eps`` keeps a constant fan-in (e.g. a fan-in of one weight, whose centered weight is 0)
    finite: its Ŵ_i is 0. Computed in float32 for half-precision weights and cast back.

    Shape: ``v`` ``(O, ...)``; ``g`` broadcastable to ``(O, 1, …, 1)``; returns ``v``'s shape.

    Example::

        >>> v = torch.randn(4, 3, 3, 3)
        >>> w = center_normalize_weight(v, torch.full((4, 1, 1, 1), 2.0))
        >>> torch.allclose(w.flatten(1).norm(dim=1), torch.full((4,), 2.0))
        True
    """
    w = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    dims = tuple(range(1, w.dim()))
    centered = w - w.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(centered.square().sum(dim=dims, keepdim=True) + eps)
    return (centered * (g.to(w.dtype) * inv)).to(v.dtype)


class CenteredWeightNorm(nn.Module):
    r"""The parametrization ``(g, v) ↦ g·(v − v̄)/√(‖v − v̄‖² + eps)`` of Centered Weight
    Normalization (Qiao et al., Eq. 9), for ``torch.nn.utils.parametrize``.

    ``right_inverse(W)`` returns ``g = ‖W_i‖`` per output channel (shape ``(O, 1, …, 1)``, as
    torch's weight norm) and ``v = W``: a weight assigned to the parametrized module
    (``module.weight = w``, e.g. to re-initialise it) becomes its centered direction at its own
    length. It is an exact inverse on centered weights (the image of the parametrization, up to
    eps).

    Args:
        eps: added to ‖v − v̄‖² inside the square root (≥ 0).

    Example::

        >>> conv = torch.nn.utils.parametrize.register_parametrization(
        ...     torch.nn.Conv2d(3, 8, 3), "weight", CenteredWeightNorm()
        ... )
        >>> torch.allclose(conv.weight.flatten(1).mean(1), torch.zeros(8), atol=1e-6)
        True
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < float("inf"):
            raise ValueError(f"CenteredWeightNorm: eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return center_normalize_weight(weight_v, weight_g, self.eps)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.norm_except_dim(weight, 2, 0), weight

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def centered_weight_norm(module: nn.Module, name: str = "weight", eps: float = 1e-8) -> nn.Module:
    """Apply Centered Weight Normalization (Qiao et al., Eq. 9) to ``module.<name>`` in place, as
    ``torch.nn.utils.parametrizations.weight_norm`` does for WN; returns the module.

    Example::

        >>> conv = centered_weight_norm(torch.nn.Conv2d(3, 8, 3))
        >>> type(conv).__name__, conv.parametrizations.weight.original0.shape
        ('ParametrizedConv2d', torch.Size([8, 1, 1, 1]))
    """
    parametrize.register_parametrization(module, name, CenteredWeightNorm(eps))
    return module


def apply_weight_norm(module: nn.Module, kind: str, **kwargs: object) -> nn.Module:
    """Reparameterize ``module.weight`` in place with ``kind`` ``"wn"`` (torch's weight norm per
    output channel, Qiao et al., Eq. 8; no keyword arguments) or ``"cwn"`` (Eq. 9,
    :func:`centered_weight_norm`; keyword ``eps``); returns the module. At the call the WN weight
    is unchanged (g = ‖W_i‖); the CWN weight is W's centered direction at W's length.

    Example::

        >>> lin = apply_weight_norm(torch.nn.Linear(4, 3), "wn")
        >>> lin.parametrizations.weight.original0.shape
        torch.Size([3, 1])
    """
    if kind == "wn":
        if kwargs:
            raise ValueError(f"apply_weight_norm: 'wn' takes no arguments, got {kwargs}")
        return parametrizations.weight_norm(module, "weight", dim=0)
    if kind == "cwn":
        unknown = sorted(set(kwargs) - {"eps"})
        if unknown:
            raise ValueError(
                f"apply_weight_norm: unknown argument(s) {unknown} for 'cwn'; valid: eps"
            )
        return centered_weight_norm(module, "weight", **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"apply_weight_norm: kind must be one of {WEIGHT_NORM_KINDS}, got {kind!r}")
