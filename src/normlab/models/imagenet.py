"""ImageNet residual networks: ``resnet18``, ``resnet50``, ``resnet101`` (He et al. 2016) and
``resnext50_32x4d`` (Xie et al. 2017), every norm slot built from a norm spec and every convolution
from a conv spec, like the CIFAR networks.

Names: the stem ``conv1`` (7×7/2 conv + norm + ReLU) and ``maxpool``; stages ``layer1..layer4`` of
blocks ``layerS.B``. A basic block has ``conv1``, ``conv2`` (3×3 each), ``shortcut`` and ``act``; a
bottleneck has ``conv1`` (1×1), ``conv2`` (3×3, carrying the stride, grouped for ResNeXt), ``conv3``
(1×1, ×4 channels), ``shortcut`` and ``act``. A projection shortcut is a 1×1 conv + norm
(``shortcut.norm``). Then ``gap``, ``flatten``, ``feature_norm`` and ``fc``.

Two slots carry Huang et al.'s ImageNet placements (Sec. 5.3, Tables 2–3): ``conv1.norm`` is the
first norm ("IterNorm-L1", "DBN-L1"), and ``feature_norm`` is a norm on the pooled features before
``fc`` ("+ DF"). ``feature_norm`` is an identity (the ``"none"`` norm, no parameters) unless the
``feature_norm`` argument names a spec; :func:`normlab.convert` can replace it like any norm::

    model = create("resnet50", 1000, norm="bn")
    normlab.convert(model, "iternorm", include=["conv1.norm", "feature_norm"])  # IterNorm-L1 + DF

Because the slot counts as a norm, ``convert(model, spec)`` with the default ``include="*"``
replaces it too; write ``include=["conv1.norm", "layer*"]`` to keep it an identity.

With BN the parameter counts are the standard ones: ResNet-18 11,689,512, ResNet-50 25,557,032,
ResNet-101 44,549,160, ResNeXt-50 (32×4d) 25,028,904.
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab.models._blocks import (
    ConvNormAct,
    ConvSpec,
    Named,
    check_positive,
    init_weights,
    make_act,
    make_conv,
    scaled,
)
from normlab.models.registry import ModelFactory, register_model
from normlab.models.resnet import BasicBlock
from normlab.nn.registry import NormSpec, make_norm

__all__ = ["Bottleneck", "imagenet_resnet", "resnet18", "resnet50", "resnet101", "resnext50_32x4d"]


class Bottleneck(nn.Module):
    """Bottleneck residual block: ``act(conv3(conv2(conv1(x))) + shortcut(x))``.

    ``conv1`` = 1×1 conv + norm + ReLU to ``mid_channels``, ``conv2`` = 3×3 conv with ``stride``
    and ``groups`` + norm + ReLU, ``conv3`` = 1×1 conv + norm to ``out_channels`` (no activation);
    ``shortcut`` is the identity, or a 1×1 conv (``stride``) + norm when the shape changes. The
    stride sits on the 3×3 convolution (the torchvision variant, "ResNet v1.5"); the parameter
    count is the same as with the stride on ``conv1``.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Example::

        >>> block = Bottleneck(64, 32, 128, stride=2, norm="gn(num_groups=8)", conv="ws", groups=4)
        >>> block(torch.randn(2, 64, 9, 9)).shape
        torch.Size([2, 128, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int,
        norm: NormSpec,
        conv: ConvSpec,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, mid_channels, 1, 1, 0, norm=norm, conv=conv)
        self.conv2 = Named(
            [
                (
                    "conv",
                    make_conv(mid_channels, mid_channels, 3, stride, 1, conv=conv, groups=groups),
                ),
                ("norm", make_norm(norm, mid_channels)),
                ("act", make_act("relu")),
            ]
        )
        self.conv3 = ConvNormAct(
            mid_channels, out_channels, 1, 1, 0, norm=norm, conv=conv, act=None
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ConvNormAct(
                in_channels, out_channels, 1, stride, 0, norm=norm, conv=conv, act=None
            )
        self.act = make_act("relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _last_scale(block: nn.Module) -> nn.Parameter | None:
    """The scale applied last by a residual block's last norm: BCN's per-group ``group_weight``
    (its group affine comes after the channel affine), otherwise the norm's ``weight``."""
    last = block.conv3 if isinstance(block, Bottleneck) else block.conv2
    for attr in ("group_weight", "weight"):
        p = getattr(last.norm, attr, None)
        if isinstance(p, nn.Parameter):
            return p
    return None


def _zero_init_residual(net: nn.Module, name: str, norm: NormSpec) -> None:
    for block in net.modules():
        if isinstance(block, BasicBlock | Bottleneck):
            scale = _last_scale(block)
            if scale is None:
                raise ValueError(
                    f"{name}: zero_init_residual=True needs a norm with a learnable scale "
                    f"('weight'), but norm {norm!r} has none; use zero_init_residual=False"
                )
            nn.init.zeros_(scale)


def imagenet_resnet(
    name: str,
    bottleneck: bool,
    blocks: tuple[int, ...] | list[int],
    num_classes: int = 1000,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    groups: int = 1,
    width_per_group: int = 64,
    zero_init_residual: bool = False,
    feature_norm: NormSpec = "none",
) -> nn.Module:
    """An ImageNet ResNet/ResNeXt (He et al. 2016, Table 1; Xie et al. 2017, Table 1).

    A 7×7 stride-2 stem ``conv1`` (64 channels) and a 3×3 stride-2 ``maxpool``, then one stage
    ``layerS`` per entry of ``blocks`` with 64·2^(S−1) channels (×4 at a bottleneck's output),
    stride 2 from the second stage on, global average pooling, ``feature_norm`` and ``fc``.
    A bottleneck's inner width is ``groups`` × ``width_per_group``·2^(S−1) (ResNet: 1 × 64, so the
    inner width equals the stage's channels; ResNeXt-50 32×4d: 32 × 4).

    Args:
        name: the model name used in error messages.
        bottleneck: bottleneck blocks (ResNet-50/101, ResNeXt) or basic blocks (ResNet-18/34).
        blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for 50.
        num_classes, in_channels: output classes and input channels.
        norm, conv: norm spec of every norm slot but ``feature_norm``; conv spec of every conv.
        width: multiplier of every channel count (reduced test models).
        groups, width_per_group: ResNeXt's cardinality and per-group width (bottleneck only).
        zero_init_residual: start the scale of each block's last norm at zero, so every residual
            block begins as the identity (Goyal et al. 2017). Default off, as in He et al.
        feature_norm: norm spec of the slot on the pooled features (default ``"none"``).

    Shape: ``(N, in_channels, H, W)`` -> ``(N, num_classes)``; 224×224 is the usual input.

    Example (ResNet-34, which is not registered)::

        >>> model = imagenet_resnet("resnet34", False, (3, 4, 6, 3), num_classes=1000)
        >>> sum(p.numel() for p in model.parameters())
        21797672
    """
    blocks = tuple(blocks)
    if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(
            f"{name}: blocks must be a non-empty list of positive integers, got {blocks!r}"
        )
    check_positive(groups, "groups", name)
    check_positive(width_per_group, "width_per_group", name)
    if not isinstance(zero_init_residual, bool):
        raise TypeError(
            f"{name}: zero_init_residual must be true or false, got {zero_init_residual!r}"
        )
    if not bottleneck and (groups, width_per_group) != (1, 64):
        raise ValueError(
            f"{name}: basic blocks support only groups=1 and width_per_group=64, got "
            f"groups={groups}, width_per_group={width_per_group}"
        )
    stem = scaled(64, width)
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", ConvNormAct(in_channels, stem, 7, 2, 3, norm=norm, conv=conv)),
        ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    cin = stem
    for s, n in enumerate(blocks):
        planes = scaled(64 * 2**s, width)
        stage: list[nn.Module] = []
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            if bottleneck:
                mid = groups * scaled(width_per_group * 2**s, width)
                stage.append(Bottleneck(cin, mid, 4 * planes, stride, norm, conv, groups))
                cin = 4 * planes
            else:
                stage.append(BasicBlock(cin, planes, stride, norm, conv, "B"))
                cin = planes
        layers.append((f"layer{s + 1}", nn.Sequential(*stage)))
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("feature_norm", make_norm(feature_norm, cin)),
        ("fc", nn.Linear(cin, num_classes)),
    ]
    net = init_weights(Named(layers))
    if zero_init_residual:
        _zero_init_residual(net, name, norm)
    return net


def _resnet(
    name: str, description: str, bottleneck: bool, default_blocks: tuple[int, ...], doc: str
) -> ModelFactory:
    """Register the ResNet ``name``: :func:`imagenet_resnet` with its kind of block and depth."""

    def factory(
        num_classes: int = 1000,
        in_channels: int = 3,
        norm: NormSpec = "bn",
        conv: ConvSpec = "plain",
        width: float = 1.0,
        blocks: tuple[int, ...] | list[int] = default_blocks,
        zero_init_residual: bool = False,
        feature_norm: NormSpec = "none",
    ) -> nn.Module:
        return imagenet_resnet(
            name, bottleneck, blocks, num_classes, in_channels, norm, conv, width,
            zero_init_residual=zero_init_residual, feature_norm=feature_norm,
        )  # fmt: skip

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return register_model(name, description)(factory)


resnet18 = _resnet(
    "resnet18",
    "He et al. ImageNet ResNet-18: basic blocks (2, 2, 2, 2), 11.7M params",
    False,
    (2, 2, 2, 2),
    """ResNet-18 (Huang et al., Table 2); the arguments are those of :func:`imagenet_resnet`.

    Example::

        >>> model = resnet18(10, norm="gn(num_groups=32)", conv="ws")
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """,
)

resnet50 = _resnet(
    "resnet50",
    "He et al. ImageNet ResNet-50: bottlenecks (3, 4, 6, 3), 25.6M params",
    True,
    (3, 4, 6, 3),
    """ResNet-50 (Huang et al., Table 3; Qiao et al., Tables 1–4); the arguments are those of
    :func:`imagenet_resnet`. ``blocks=(3, 8, 36, 3)`` gives ResNet-152.

    Example (Huang et al.'s "IterNorm-L1 + DF": whitening after the stem and on the features)::

        >>> model = resnet50(10, feature_norm="iternorm")
        >>> normlab.convert(model, "iternorm", include="conv1.norm")
        ['conv1.norm']
    """,
)

resnet101 = _resnet(
    "resnet101",
    "He et al. ImageNet ResNet-101: bottlenecks (3, 4, 23, 3), 44.5M params",
    True,
    (3, 4, 23, 3),
    """ResNet-101 (Huang et al., Table 3; Qiao et al., Tables 2 and 6); the arguments are those
    of :func:`imagenet_resnet`.

    Example::

        >>> model = resnet101(1000, zero_init_residual=True)
        >>> int(torch.count_nonzero(model.layer3[0].conv3.norm.weight))
        0
    """,
)


@register_model(
    "resnext50_32x4d", "Xie et al. ResNeXt-50 (32x4d): grouped bottlenecks (3, 4, 6, 3), 25.0M"
)
def resnext50_32x4d(
    num_classes: int = 1000,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    blocks: tuple[int, ...] | list[int] = (3, 4, 6, 3),
    groups: int = 32,
    width_per_group: int = 4,
    zero_init_residual: bool = False,
    feature_norm: NormSpec = "none",
) -> nn.Module:
    """ResNeXt-50 (32×4d) (Qiao et al., Table 5): 32 groups of 4 channels in the first stage's
    3×3 convolutions, doubling per stage; the arguments are those of :func:`imagenet_resnet`.

    Example::

        >>> model = resnext50_32x4d(1000, norm="gn", conv="ws")
        >>> model.layer1[0].conv2.conv.groups
        32
    """
    return imagenet_resnet(
        "resnext50_32x4d", True, blocks, num_classes, in_channels, norm, conv, width,
        groups, width_per_group, zero_init_residual, feature_norm,
    )  # fmt: skip
