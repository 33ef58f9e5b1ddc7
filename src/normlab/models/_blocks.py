"""Building blocks shared by every architecture: one conv factory, one Conv-Norm-Act block.

Every normalization slot is built by :func:`normlab.make_norm` from the model's norm spec, and every
convolution by :func:`make_conv` from the model's *conv spec*, so ``conv="ws"`` turns every
convolution of a model into a :class:`normlab.WSConv2d` (Qiao et al., Sec. 4) and the module names line up
across models: ``<block>.conv``, ``<block>.norm``, ``<block>.act``.

A conv spec is written like a norm spec (parsed by :func:`normlab.nn.registry.parse_spec`)::

    "plain"                      # nn.Conv2d
    "ws"                         # WSConv2d, Eq. 5-7 (Eq. 11 and 12)
    "ws(scale=false)"            # centering only, "- mean" of Qiao et al., Table 4 (Eq. 11)
    "ws(center=false)"           # scaling only, "/ std" of Qiao et al., Table 4 (Eq. 12)
    "ws(eps=1e-4)"
    {"name": "ws", "center": False}
    "wn"                         # nn.Conv2d with torch's weight norm, Eq. 8 (Qiao et al., Table 3)
    "cwn"  or  "cwn(eps=1e-6)"   # nn.Conv2d with Centered Weight Normalization, Eq. 9

The ``ws`` keywords are the WS layers' own: ``eps``, ``center``, ``scale``; ``cwn`` takes ``eps``,
``wn`` and ``plain`` take none (:data:`CONV_KWARGS`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.nn.registry import NormSpec, make_norm, parse_spec
from normlab.nn.weight_std import WSConv2d, WSLinear, apply_weight_norm

__all__ = [
    "CONV_KINDS",
    "CONV_KWARGS",
    "WS_KWARGS",
    "ConvNormAct",
    "ConvSpec",
    "LinearNormAct",
    "Named",
    "NormActConv",
    "check_conv_kind",
    "check_positive",
    "conv_bias",
    "init_weights",
    "make_act",
    "make_conv",
    "make_linear",
    "parse_conv",
    "reinit_weight",
    "scaled",
]

CONV_KINDS = ("plain", "ws", "wn", "cwn")
WS_KWARGS = ("eps", "center", "scale")
CONV_KWARGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "ws": WS_KWARGS,
    "wn": (),
    "cwn": ("eps",),
}

ConvSpec = str | Mapping[str, Any]

_CONV_HELP = (
    f"valid conv specs: 'plain', 'ws' or 'ws(key=value, ...)' with the keyword arguments "
    f"{', '.join(WS_KWARGS)} (eps a non-negative number, center and scale true or false), 'wn', "
    f"'cwn' or 'cwn(eps=...)'"
)


def parse_conv(conv: ConvSpec) -> tuple[str, dict[str, Any]]:
    """Split and validate a conv spec into ``(kind, kwargs)``: ``kind`` one of :data:`CONV_KINDS`,
    ``kwargs`` only the given ones of the kind's :data:`CONV_KWARGS` — ``eps`` (a non-negative
    number) for ``ws`` and ``cwn``, ``center``, ``scale`` (true or false) for ``ws``. Raises
    ``ValueError`` naming the spec, the key, the value and what is allowed."""
    if isinstance(conv, str) and conv in CONV_KINDS:  # the common case, no parsing
        return conv, {}
    try:
        name, kwargs = parse_spec(conv)
    except (ValueError, TypeError) as e:
        # parse_spec speaks of norm specs; the grammar is the same for conv specs.
        msg = str(e).replace("norm spec", "conv spec")
        raise ValueError(f"conv: {msg}; {_CONV_HELP}") from None
    if name not in CONV_KINDS:
        raise ValueError(
            f"conv: unknown convolution kind {name!r} in conv spec {conv!r}; {_CONV_HELP}"
        )
    allowed = CONV_KWARGS[name]
    if not allowed:
        if kwargs:
            raise ValueError(
                f"conv: {name!r} takes no arguments, got {kwargs} in conv spec {conv!r}; "
                f"{_CONV_HELP}"
            )
        return name, {}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in allowed:
            problem = f"unknown argument {key}={value!r}"
        elif key == "eps":
            ok = (
                not isinstance(value, bool)
                and isinstance(value, int | float)
                and math.isfinite(value)
                and value >= 0
            )
            problem = "" if ok else f"eps must be a finite non-negative number, got {value!r}"
        else:
            ok = isinstance(value, bool)
            problem = "" if ok else f"{key} must be true or false, got {value!r}"
        if problem:
            raise ValueError(f"conv: {problem} in conv spec {conv!r}; {_CONV_HELP}")
        out[key] = float(value) if key == "eps" else value
    return name, out


def check_conv_kind(conv: ConvSpec) -> str:
    """Validate a conv spec (:func:`parse_conv`) and return its kind (one of :data:`CONV_KINDS`)."""
    return parse_conv(conv)[0]


def conv_bias(norm: NormSpec | None) -> bool:
    """Convolutions carry a bias only when no normalization follows (``norm`` is None/"none");
    otherwise the norm's shift (or its mean subtraction) makes the bias redundant."""
    return norm is None or parse_spec(norm)[0] == "none"


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    bias: bool = False,
    conv: ConvSpec = "plain",
    groups: int = 1,
) -> nn.Conv2d:
    """``nn.Conv2d`` for ``conv="plain"``, :class:`normlab.WSConv2d` for a ``"ws"`` conv spec
    (its ``eps``/``center``/``scale`` passed on, e.g. ``conv="ws(center=false)"``), an
    ``nn.Conv2d`` with a weight-normalized ``weight`` for ``"wn"`` / ``"cwn"``
    (:func:`normlab.nn.weight_std.apply_weight_norm`)."""
    kind, kwargs = parse_conv(conv)
    common = dict(stride=stride, padding=padding, bias=bias, groups=groups)
    if kind == "ws":
        return WSConv2d(in_channels, out_channels, kernel_size, **common, **kwargs)
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, **common)
    if kind != "plain":
        apply_weight_norm(layer, kind, **kwargs)
    return layer


def make_linear(
    in_features: int, out_features: int, bias: bool = True, ws: bool | ConvSpec = False
) -> nn.Linear:
    """``nn.Linear``, or :class:`normlab.WSLinear` (only where a paper does so) when ``ws`` is
    True or a ``"ws"`` conv spec (then with its ``eps``/``center``/``scale``); ``False`` or
    ``"plain"`` give ``nn.Linear``; ``"wn"`` / ``"cwn"`` an ``nn.Linear`` with a
    weight-normalized ``weight``."""
    if isinstance(ws, bool):
        kind, kwargs = ("ws" if ws else "plain"), {}
    else:
        kind, kwargs = parse_conv(ws)
    if kind == "ws":
        return WSLinear(in_features, out_features, bias=bias, **kwargs)
    layer = nn.Linear(in_features, out_features, bias=bias)
    if kind != "plain":
        apply_weight_norm(layer, kind, **kwargs)
    return layer


def make_act(act: str | None) -> nn.Module:
    """``"relu"``, ``"lrelu"`` (slope 0.2, DCGAN), ``"tanh"``, ``"elu"`` or ``None`` (identity)."""
    if act is None or act == "none":
        return nn.Identity()
    table = {
        "relu": lambda: nn.ReLU(),
        "lrelu": lambda: nn.LeakyReLU(0.2),
        "tanh": lambda: nn.Tanh(),
        "elu": lambda: nn.ELU(),
        "sigmoid": lambda: nn.Sigmoid(),
    }
    if act not in table:
        raise ValueError(f"act must be one of {sorted(table)} or None, got {act!r}")
    return table[act]()


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> act`` with children named ``conv``, ``norm``, ``act``.

    ``norm=None`` leaves the norm slot out entirely (e.g. the DCGAN discriminator's first layer);
    ``norm="none"`` puts an identity there that :func:`normlab.convert` can still replace.
    The conv has a bias exactly when no normalization follows (:func:`conv_bias`) unless ``bias``
    is given.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        norm: NormSpec | None = "bn",
        conv: ConvSpec = "plain",
        act: str | None = "relu",
        bias: bool | None = None,
    ) -> None:
        if padding is None:
            k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
            padding = (k[0] // 2, k[1] // 2)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = make_conv(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            bias=conv_bias(norm) if bias is None else bias,
            conv=conv,
        )
        if norm is not None:
            layers["norm"] = make_norm(norm, out_channels)
        layers["act"] = make_act(act)
        super().__init__(layers)


class NormActConv(nn.Sequential):
    """Pre-activation ``norm -> act -> conv`` (DenseNet, Wide ResNet), children named ``norm``,
    ``act``, ``conv``; here ``<block>.norm`` is the norm *before* the block's convolution.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        norm: NormSpec = "bn",
        conv: ConvSpec = "plain",
        act: str | None = "relu",
        bias: bool = False,
    ) -> None:
        if padding is None:
            k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
            padding = (k[0] // 2, k[1] // 2)
        super().__init__(
            OrderedDict(
                [
                    ("norm", make_norm(norm, in_channels)),
                    ("act", make_act(act)),
                    (
                        "conv",
                        make_conv(
                            in_channels, out_channels, kernel_size, stride, padding, bias, conv
                        ),
                    ),
                ]
            )
        )


class LinearNormAct(nn.Sequential):
    """``fc -> norm -> act`` for MLPs, children ``fc``, ``norm``, ``act`` (norm sees ``(N, C)``).

    ``ws`` (True or a ``"ws"`` conv spec) makes ``fc`` a :class:`normlab.WSLinear`
    (:func:`make_linear`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        norm: NormSpec | None = "bn",
        act: str | None = "relu",
        ws: bool | ConvSpec = False,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["fc"] = make_linear(in_features, out_features, bias=conv_bias(norm), ws=ws)
        if norm is not None:
            layers["norm"] = make_norm(norm, out_features)
        layers["act"] = make_act(act)
        super().__init__(layers)


class Named(nn.Sequential):
    """A ``Sequential`` whose children are named (``conv1``, ``pool1``, ``fc``, ...) at the top
    level, so a norm's qualified name is e.g. ``conv3.norm``."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__(OrderedDict(layers))


def check_positive(value: object, name: str, model: str) -> int:
    """Validate a positive integer model argument and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be a positive integer, got {value!r}")
    return value


def scaled(channels: int, width: float) -> int:
    """``round(channels * width)``, at least 1 (the ``width`` multiplier of reduced models)."""
    if not width > 0:
        raise ValueError(f"width must be a positive multiplier, got {width!r}")
    return max(1, round(channels * width))


def reinit_weight(module: nn.Module, init: Callable[..., object], **kwargs: object) -> None:
    """Apply the ``nn.init`` function ``init`` (e.g. ``nn.init.kaiming_normal_``) to
    ``module.weight``. A parametrized weight (``wn``/``cwn``) is computed, so an in-place init
    would be lost: the initialised tensor is assigned instead, which sets the parametrization's
    parameters through its ``right_inverse`` (WN and CWN: v = the tensor, g = its norm). Draws
    the same random numbers either way."""
    if parametrize.is_parametrized(module, "weight"):
        with torch.no_grad():
            w = torch.empty_like(module.weight)
            init(w, **kwargs)
            module.weight = w
    else:
        init(module.weight, **kwargs)


def init_weights(model: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """He (fan-out) initialization for convolutions and zero biases, the usual choice for the
    papers' ReLU networks; linear layers keep torch's default. Norm layers keep their own init.
    Weight-normalized convolutions (``wn``, ``cwn``) get it through :func:`reinit_weight`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            reinit_weight(m, nn.init.kaiming_normal_, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
