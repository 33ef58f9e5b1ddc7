"""Residual networks for 32×32 input: ``resnet_cifar`` (He et al. 2016, depth 6n+2; Deecke et al.,
Sec. 4.2, Qiao et al.), ``resnet18_cifar`` (Qiao et al., Table 8) and ``wrn``
(Zagoruyko & Komodakis, WRN-d-k; Huang et al., Sec. 5.2).

Names: the stem is ``conv1`` (a ConvNormAct; a bare conv ``conv1`` for the pre-activation WRN),
stages ``layer1``, ``layer2``, … of blocks ``layerS.B``; a post-activation basic block has
``conv1`` (conv+norm+ReLU), ``conv2`` (conv+norm), ``shortcut`` and ``act`` (ReLU after the sum), so
``"layer2.*.conv1.norm"`` addresses the first norm of every block of stage 2 and ``"*"`` every norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models._blocks import (
    ConvNormAct,
    ConvSpec,
    Named,
    NormActConv,
    check_positive,
    init_weights,
    make_act,
    make_conv,
    scaled,
)
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec, make_norm

__all__ = ["BasicBlock", "PadShortcut", "WideBlock", "resnet18_cifar", "resnet_cifar", "wrn"]


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the extra channels
    (parameter-free, the CIFAR ResNet-20/56/110 of the original paper).

    Shape: ``(N, C_in, H, W)`` -> ``(N, C_out, ⌈H/stride⌉, ⌈W/stride⌉)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"PadShortcut: out_channels={out_channels} must be >= in_channels={in_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Post-activation residual block: ``act(conv2(conv1(x)) + shortcut(x))``.

    ``conv1`` = 3×3 conv (stride) + norm + ReLU, ``conv2`` = 3×3 conv + norm (no activation),
    ``shortcut`` = identity, option A (:class:`PadShortcut`) or option B (1×1 conv + norm, a
    ConvNormAct without activation) when the shape changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: NormSpec,
        conv: ConvSpec,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, stride, norm=norm, conv=conv)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, 1, norm=norm, conv=conv, act=None)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = ConvNormAct(
                in_channels, out_channels, 1, stride, 0, norm=norm, conv=conv, act=None
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.act = make_act("relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def _stage(
    blocks: int, cin: int, cout: int, stride: int, norm: NormSpec, conv: ConvSpec, shortcut: str
) -> nn.Sequential:
    return nn.Sequential(
        *[
            BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, norm, conv, shortcut)
            for i in range(blocks)
        ]
    )


@register_model("resnet_cifar", "He et al. CIFAR ResNet, depth 6n+2 (20/56/110), 16/32/64 channels")
def resnet_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    depth: int = 20,
    width: float = 1.0,
    shortcut: str = "A",
) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016, Sec. 4.2): a 3×3 stem ``conv1`` (16 channels), three
    stages ``layer1..layer3`` of n = (depth − 2)/6 basic blocks with 16, 32, 64 channels (stride 2
    at the start of stages 2 and 3), global average pool, ``fc``.

    ``shortcut="A"`` (default) is the original parameter-free zero-padding shortcut, giving
    ResNet-20 ≈ 0.27M, ResNet-56 ≈ 0.85M, ResNet-110 ≈ 1.7M parameters; ``"B"`` uses 1×1
    conv + norm projections (then a norm sits on the shortcut as well). Deecke et al. use depths
    20 and 56, Qiao et al. 110. ``width`` scales the channels.

    Example::

        >>> net = resnet_cifar(10, depth=20, norm="gn(num_groups=4)", conv="ws")
        >>> len(net.layer2), type(net.layer2[0].conv1.conv).__name__
        (3, 'WSConv2d')
    """
    check_positive(depth, "depth", "resnet_cifar")
    if (depth - 2) % 6:
        raise ValueError(
            f"resnet_cifar: depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}"
        )
    n = (depth - 2) // 6
    c = [scaled(v, width) for v in (16, 32, 64)]
    net = Named(
        [
            ("conv1", ConvNormAct(in_channels, c[0], 3, norm=norm, conv=conv)),
            ("layer1", _stage(n, c[0], c[0], 1, norm, conv, shortcut)),
            ("layer2", _stage(n, c[0], c[1], 2, norm, conv, shortcut)),
            ("layer3", _stage(n, c[1], c[2], 2, norm, conv, shortcut)),
            ("gap", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(c[2], num_classes)),
        ]
    )
    return init_weights(net)


@register_model(
    "resnet18_cifar", "Qiao et al., Table 8: ResNet-18 for CIFAR (3x3 stem, no max-pool), 64..512"
)
def resnet18_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
) -> nn.Module:
    """ResNet-18 adapted to CIFAR, the variant Qiao et al., Table 8 compares against (from the SN/DN
    papers): a 3×3 stride-1 stem ``conv1`` (64 channels, no max-pool), four stages
    ``layer1..layer4`` of two basic blocks with 64, 128, 256, 512 channels (stride 2 from stage 2),
    1×1-projection (option B) shortcuts, global average pool, ``fc``. ≈ 11.17M parameters.
    ``blocks`` gives other depths (e.g. ``(1, 1, 1, 1)`` for a quick test).

    Example (Qiao et al., Table 8: BCN with WS, micro-batch training)::

        >>> net = resnet18_cifar(10, norm="bcn(micro_batch=true, rate=0.1)", conv="ws", width=0.125)
        >>> net(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    blocks = tuple(blocks)
    if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"resnet18_cifar: blocks must be positive integers, got {blocks!r}")
    widths = [scaled(64 * 2**i, width) for i in range(len(blocks))]
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", ConvNormAct(in_channels, widths[0], 3, norm=norm, conv=conv))
    ]
    cin = widths[0]
    for i, (nb, cout) in enumerate(zip(blocks, widths)):
        layers.append((f"layer{i + 1}", _stage(nb, cin, cout, 1 if i == 0 else 2, norm, conv, "B")))
        cin = cout
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(cin, num_classes)),
    ]
    return init_weights(Named(layers))


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016):
    ``conv2(drop(preact2(conv1(preact1(x))))) + shortcut``, written with two
    :class:`~normlab.models.NormActConv` blocks ``conv1``/``conv2`` (children ``norm``, ``act``,
    ``conv``: the norm *before* each convolution).

    When the shape changes, the shortcut is a 1×1 convolution applied to the pre-activated input
    ``act(norm(x))`` of ``conv1``, as in the authors' implementation; otherwise identity on ``x``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: NormSpec,
        conv: ConvSpec,
        dropout: float,
    ) -> None:
        super().__init__()
        self.conv1 = NormActConv(in_channels, out_channels, 3, stride, norm=norm, conv=conv)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = NormActConv(out_channels, out_channels, 3, 1, norm=norm, conv=conv)
        self.project = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            make_conv(in_channels, out_channels, 1, stride, 0, conv=conv)
            if self.project
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.conv1.act(self.conv1.norm(x))
        h = self.conv1.conv(pre)
        h = self.conv2(self.drop(h))
        return h + self.shortcut(pre if self.project else x)


@register_model("wrn", "Wide ResNet WRN-d-k (Huang et al., Sec. 5.2: 28-10, 40-10), pre-activation")
def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    depth: int = 28,
    widen: int | float = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """WRN-``depth``-``widen`` (Zagoruyko & Komodakis 2016): bare 3×3 stem ``conv1`` (16 channels),
    three stages ``layer1..layer3`` of n = (depth − 4)/6 :class:`WideBlock` s with 16k, 32k, 64k
    channels, a final ``final`` (norm + ReLU), global average pool, ``fc``.

    WRN-28-10 ≈ 36.5M parameters. ``dropout`` is applied between the two convolutions of a block
    (default 0; see ``docs/models.md``). ``widen`` may be fractional for reduced test models.

    Example::

        >>> net = wrn(10, depth=16, widen=0.5)
        >>> net(torch.randn(2, 3, 8, 8)).shape, net.final.norm.num_features
        (torch.Size([2, 10]), 32)
    """
    check_positive(depth, "depth", "wrn")
    if (depth - 4) % 6:
        raise ValueError(f"wrn: depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"wrn: dropout must be in [0, 1), got {dropout!r}")
    n = (depth - 4) // 6
    c0 = 16
    c = [scaled(16, widen), scaled(32, widen), scaled(64, widen)]
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", make_conv(in_channels, c0, 3, 1, 1, conv=conv))
    ]
    cin = c0
    for s, cout in enumerate(c):
        blocks = [
            WideBlock(
                cin if i == 0 else cout,
                cout,
                (1 if s == 0 else 2) if i == 0 else 1,
                norm,
                conv,
                dropout,
            )
            for i in range(n)
        ]
        layers.append((f"layer{s + 1}", nn.Sequential(*blocks)))
        cin = cout
    final = Named([("norm", make_norm(norm, cin)), ("act", make_act("relu"))])
    layers += [
        ("final", final),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(cin, num_classes)),
    ]
    return init_weights(Named(layers))
