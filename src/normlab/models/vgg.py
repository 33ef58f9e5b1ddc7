"""VGG networks for 32×32 input (Simonyan & Zisserman 2015): VGG13 of Deecke et al., Sec. 4.2 and
the 16-convolution, 1-linear VGG of Huang et al., Sec. 5.1 (``depth=19``).

Convolutions are numbered ``conv1..convN`` in order and max-pools ``pool1..pool5``; Deecke et
al.'s layer names map as "conv3-64-1" → ``conv1`` (the first 3×3, 64-channel conv),
"conv3-256-1" → the first 256-channel conv (``conv5`` in VGG13).
"""

from __future__ import annotations

from torch import nn

from normlab.models._blocks import (
    ConvNormAct,
    ConvSpec,
    Named,
    check_positive,
    init_weights,
    scaled,
)
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec

__all__ = ["VGG_CONFIGS", "vgg"]

#: Channels per 3×3 convolution; "M" is a 2×2 max-pool (configurations A, B, D, E).
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}  # fmt: skip


@register_model(
    "vgg",
    "VGG for CIFAR: depth 13 (Deecke et al.) or 19 = 16 conv + 1 linear (Huang et al., Sec. 5.1)",
)
def vgg(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    depth: int = 13,
    width: float = 1.0,
) -> nn.Module:
    """VGG-``depth`` with a norm after every 3×3 convolution (ConvNormAct ``conv1..convN``), five
    2×2 max-pools ``pool1..pool5`` and one linear classifier ``fc`` on the 512 pooled features.

    CIFAR VGGs replace the three ImageNet fully-connected layers by one linear layer. Huang et
    al.'s "16 convolution layers and 1 fully-connected layer" is ``depth=19``, configuration E
    (``docs/models.md``). The pools use ``ceil_mode`` and a global average pool precedes ``fc``:
    identical on 32×32 input (the map is already 1×1) and it lets 8×8 inputs pass. ``width``
    scales the channels.

    Example::

        >>> net = vgg(10, depth=19, width=0.125)
        >>> sum(name.startswith("conv") for name, _ in net.named_children())
        16
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_positive(depth, "depth", "vgg")
    if depth not in VGG_CONFIGS:
        raise ValueError(f"vgg: depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
    layers: list[tuple[str, nn.Module]] = []
    cin, nc, npool = in_channels, 0, 0
    for v in VGG_CONFIGS[depth]:
        if v == "M":
            npool += 1
            layers.append((f"pool{npool}", nn.MaxPool2d(2, ceil_mode=True)))
        else:
            nc += 1
            cout = scaled(int(v), width)
            layers.append((f"conv{nc}", ConvNormAct(cin, cout, 3, norm=norm, conv=conv)))
            cin = cout
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(cin, num_classes)),
    ]
    return init_weights(Named(layers))
