"""DenseNet for CIFAR (G. Huang, Liu, van der Maaten & Weinberger 2017) as used in Kalayeh & Shah,
Sec. 4.4: three dense blocks, two transition layers, growth rate 12, depth 40 or 100, basic
(non-bottleneck) layers.

Names: ``conv1`` (bare 3×3 stem conv), ``dense1`` / ``dense2`` / ``dense3`` with layers
``denseB.layerI`` (children ``norm``, ``act``, ``conv``: pre-activation), transitions ``trans1``,
``trans2`` (children ``norm``, ``act``, ``conv``, ``pool``) and ``final`` (``norm``, ``act``) before
global average pooling and ``fc``. Kalayeh & Shah's MN placement ("the batch normalization layers
of two transition layers and the last, after the third dense block") is
``include=["trans*.norm", "final.norm"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.models._blocks import (
    ConvSpec,
    Named,
    NormActConv,
    check_positive,
    init_weights,
    make_act,
    make_conv,
)
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec, make_norm

__all__ = ["DenseLayer", "densenet"]

#: The DenseNet placement of mixture normalization of Kalayeh & Shah, Sec. 4.4, as ``convert``
#: include patterns.
DENSENET_MN_PLACEMENT = ["trans*.norm", "final.norm"]


class DenseLayer(NormActConv):
    """``cat([x, conv(act(norm(x)))])``: one basic DenseNet layer adding ``growth`` channels.

    Shape: ``(N, C, H, W)`` -> ``(N, C + growth, H, W)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, super().forward(x)], dim=1)


@register_model(
    "densenet",
    "Kalayeh & Shah, Sec. 4.4: DenseNet-40/100 (k=12) for CIFAR, 3 blocks, 2 transitions",
)
def densenet(
    num_classes: int = 100,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    depth: int = 40,
    growth: int = 12,
    init_channels: int | None = None,
) -> nn.Module:
    """DenseNet-``depth`` with growth rate ``growth``: (depth − 4)/3 layers per dense block, each
    norm → ReLU → 3×3 conv (``growth`` channels) concatenated to its input; transitions norm →
    ReLU → 1×1 conv (channels kept, no compression) → 2×2 average pool; final norm → ReLU →
    global average pool → ``fc``. The stem is a 3×3 conv with ``init_channels`` (default 16, as
    for the basic DenseNets of the DenseNet paper; 2·growth is its choice for DenseNet-BC).

    DenseNet-40 (k = 12) ≈ 1.0M and DenseNet-100 (k = 12) ≈ 7.0M parameters (the DenseNet paper's
    Table 2); the last normalization sees 16 + 3·12·12 = 448 channels for depth 40 (Kalayeh &
    Shah, Sec. 5.1, Table 7). Basic layers only, no bottleneck and no compression (the reading is
    in ``docs/models.md``).

    Example::

        >>> net = densenet(100, in_channels=3, depth=40, norm="bn")
        >>> net.final.norm.num_features, net(torch.randn(2, 3, 8, 8)).shape
        (448, torch.Size([2, 100]))
    """
    check_positive(depth, "depth", "densenet")
    check_positive(growth, "growth", "densenet")
    if (depth - 4) % 3 or depth < 7:
        raise ValueError(f"densenet: depth must be 3n+4 with n >= 1 (40, 100, ...), got {depth}")
    n = (depth - 4) // 3
    c = 16 if init_channels is None else check_positive(init_channels, "init_channels", "densenet")
    layers: list[tuple[str, nn.Module]] = [("conv1", make_conv(in_channels, c, 3, 1, 1, conv=conv))]
    for b in range(1, 4):
        block = Named(
            [
                (f"layer{i + 1}", DenseLayer(c + i * growth, growth, 3, norm=norm, conv=conv))
                for i in range(n)
            ]
        )
        layers.append((f"dense{b}", block))
        c += n * growth
        if b < 3:
            trans = Named(
                [
                    ("norm", make_norm(norm, c)),
                    ("act", make_act("relu")),
                    ("conv", make_conv(c, c, 1, 1, 0, conv=conv)),
                    ("pool", nn.AvgPool2d(2)),
                ]
            )
            layers.append((f"trans{b}", trans))
    layers += [
        ("final", Named([("norm", make_norm(norm, c)), ("act", make_act("relu"))])),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c, num_classes)),
    ]
    return init_weights(Named(layers))
