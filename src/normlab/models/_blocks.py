"""Building blocks shared by every architecture: one conv factory, one Conv-Norm-Act block.

Every normalization slot is built by :func:`normlab.make_norm` from the model's norm spec, and every
convolution by :func:`make_conv`, so ``conv="ws"`` turns every convolution of a model into a
:class:`normlab.WSConv2d` (004 Sec. 4) and the module names line up across models:
``<block>.conv``, ``<block>.norm``, ``<block>.act``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from normlab.nn.weight_std import WSConv2d, WSLinear
from normlab.registry import NormSpec, make_norm, parse_spec

__all__ = [
    "CONV_KINDS",
    "ConvNormAct",
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
    "scaled",
]

CONV_KINDS = ("plain", "ws")


def check_conv_kind(conv: str) -> str:
    if conv not in CONV_KINDS:
        raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")
    return conv


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
    conv: str = "plain",
    groups: int = 1,
) -> nn.Conv2d:
    """``nn.Conv2d`` for ``conv="plain"``, :class:`normlab.WSConv2d` for ``conv="ws"``."""
    cls = WSConv2d if check_conv_kind(conv) == "ws" else nn.Conv2d
    return cls(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        bias=bias,
        groups=groups,
    )


def make_linear(
    in_features: int, out_features: int, bias: bool = True, ws: bool = False
) -> nn.Linear:
    """``nn.Linear``, or :class:`normlab.WSLinear` when ``ws`` (only where a paper does so)."""
    return (WSLinear if ws else nn.Linear)(in_features, out_features, bias=bias)


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
        conv: str = "plain",
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
        conv: str = "plain",
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
    """``fc -> norm -> act`` for MLPs, children ``fc``, ``norm``, ``act`` (norm sees ``(N, C)``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        norm: NormSpec | None = "bn",
        act: str | None = "relu",
        ws: bool = False,
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


def init_weights(model: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """He (fan-out) initialization for convolutions and zero biases, the usual choice for the
    papers' ReLU networks; linear layers keep torch's default. Norm layers keep their own init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
