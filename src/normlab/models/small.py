"""The papers' small networks: ``small_cnn`` (quickstart), ``cifar_cnn`` (Kalayeh & Shah, Table 1),
``lenet`` (Deecke et al., Sec. 4.1), ``nin`` (Deecke et al., Sec. 4.2), ``cnn3`` (Collins et al.,
App. A.1), ``mlp`` (Collins et al., App. A.2; Huang et al., Fig. 3) and ``convnet4`` (Qiao et al.,
Sec. 6.1.3). Where a paper leaves the architecture open, the reading is in ``docs/models.md``.

Every convolution block is a :class:`~normlab.models.ConvNormAct` named ``conv1``, ``conv2``, … at
the top level, so ``normlab.convert(model, spec, include="conv3.*")`` reaches the norm after the
third convolution; the classifier is ``fc``.
"""

from __future__ import annotations

from torch import nn

from normlab.models._blocks import (
    ConvNormAct,
    ConvSpec,
    LinearNormAct,
    Named,
    check_positive,
    init_weights,
    make_linear,
    scaled,
)
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec

__all__ = ["cifar_cnn", "cnn3", "convnet4", "lenet", "mlp", "nin", "small_cnn"]


def _head(channels: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    return [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(channels, num_classes)),
    ]


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@register_model("small_cnn", "quickstart CNN for 8x8 digits: 3 conv blocks, GAP, linear")
def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
) -> nn.Module:
    """conv1 (32, 3×3) → conv2 (64, 3×3) → ``pool2`` 2×2 max-pool → conv3 (64, 3×3) → global
    average pool → ``fc``. Channel counts are multiplied by ``width``.

    Shape: ``(N, in_channels, H, W)`` with H, W ≥ 2 -> ``(N, num_classes)``.

    Example::

        >>> net = small_cnn(10, in_channels=1, norm="bcn", conv="ws")
        >>> [name for name, _ in net.named_children()][:4], net(torch.randn(4, 1, 8, 8)).shape
        (['conv1', 'conv2', 'pool2', 'conv3'], torch.Size([4, 10]))
    """
    c1, c2 = scaled(32, width), scaled(64, width)
    net = Named(
        [
            ("conv1", ConvNormAct(in_channels, c1, 3, norm=norm, conv=conv)),
            ("conv2", ConvNormAct(c1, c2, 3, norm=norm, conv=conv)),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", ConvNormAct(c2, c2, 3, norm=norm, conv=conv)),
            *_head(c2, num_classes),
        ]
    )
    return init_weights(net)


@register_model("cifar_cnn", "Kalayeh & Shah, Table 1: 5-layer CIFAR CNN, conv1..conv4 + linear")
def cifar_cnn(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
) -> nn.Module:
    """The CIFAR CNN of Kalayeh & Shah, Table 1.

    ======  ====================  ======  ================
    layer   type                  kernel  (stride, pad)
    ======  ====================  ======  ================
    conv1   conv+norm+relu, 64    5×5     (1, 2)
    pool1   max pool              3×3     (2, SAME)
    conv2   conv+norm+relu, 128   5×5     (1, 2)
    pool2   max pool              3×3     (2, SAME)
    conv3   conv+norm+relu, 128   5×5     (1, 2)
    pool3   max pool              3×3     (2, SAME)
    conv4   conv+norm+relu, 256   3×3     (1, 1)
    pool4   average pool          global
    fc      linear                        num_classes
    ======  ====================  ======  ================

    The max-pools use ``padding=1`` (TensorFlow's SAME: 32 → 16 → 8 → 4) and ``pool4`` is a
    global average pool (identical to the table's 4×4 pool on 32×32 input; it also runs on 8×8
    digits). Channels are multiplied by ``width``. MN-1..4 of Kalayeh & Shah, Table 2 replace
    ``conv3.norm``.

    Example::

        >>> net = cifar_cnn(10, norm="bn")
        >>> normlab.convert(net, "mixture(k=3, em_iters=2)", include="conv3.*")  # MN-1
        ['conv3.norm']
        >>> net(torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 10])
    """
    c = [scaled(v, width) for v in (64, 128, 128, 256)]
    net = Named(
        [
            ("conv1", ConvNormAct(in_channels, c[0], 5, norm=norm, conv=conv)),
            ("pool1", nn.MaxPool2d(3, 2, padding=1)),
            ("conv2", ConvNormAct(c[0], c[1], 5, norm=norm, conv=conv)),
            ("pool2", nn.MaxPool2d(3, 2, padding=1)),
            ("conv3", ConvNormAct(c[1], c[2], 5, norm=norm, conv=conv)),
            ("pool3", nn.MaxPool2d(3, 2, padding=1)),
            ("conv4", ConvNormAct(c[2], c[3], 3, norm=norm, conv=conv)),
            ("pool4", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(c[3], num_classes)),
        ]
    )
    return init_weights(net)


@register_model("lenet", "Deecke et al., Sec. 4.1: LeNet-5 for the 40-way multi-task set")
def lenet(
    num_classes: int = 40,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    image_size: int = 32,
    padding: int = 0,
    fc_norm: bool = False,
) -> nn.Module:
    """LeNet-5 (LeCun et al.) as used for the multi-task experiment of Deecke et al., Sec. 4.1.

    conv1 (6, 5×5) → pool1 (2×2 max) → conv2 (16, 5×5) → pool2 → fc1 (120) → fc2 (84) → ``fc``
    (``num_classes``, 40 in Deecke et al.): the classic LeNet-5 with a norm slot after each
    convolution (``fc_norm=True`` also puts one after fc1/fc2, as ``fc1.norm``/``fc2.norm``).
    ``image_size`` (square input side, 32 in Deecke et al.) sizes the first linear layer;
    ``padding=2`` keeps the convolutions "same" so 8×8 digits fit (8 → 4 → 2, flattening 16·2·2).

    Example::

        >>> net = lenet(40, in_channels=3, norm="mode(k=2)", image_size=32)
        >>> net(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 40])
    """
    check_positive(image_size, "image_size", "lenet")
    c1, c2 = scaled(6, width), scaled(16, width)
    f1, f2 = scaled(120, width), scaled(84, width)
    s = _out_size(image_size, 5, 1, padding) // 2
    s = _out_size(s, 5, 1, padding) // 2
    if s < 1:
        raise ValueError(
            f"lenet: image_size={image_size} with padding={padding} is too small (use padding=2 "
            "for 8x8 input)"
        )
    fnorm = norm if fc_norm else None
    net = Named(
        [
            ("conv1", ConvNormAct(in_channels, c1, 5, padding=padding, norm=norm, conv=conv)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", ConvNormAct(c1, c2, 5, padding=padding, norm=norm, conv=conv)),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", LinearNormAct(c2 * s * s, f1, norm=fnorm)),
            ("fc2", LinearNormAct(f1, f2, norm=fnorm)),
            ("fc", nn.Linear(f2, num_classes)),
        ]
    )
    return init_weights(net)


@register_model(
    "nin", "Deecke et al., Sec. 4.2: Network in Network with a norm after every conv, dropout 0.25"
)
def nin(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    dropout: float = 0.25,
) -> nn.Module:
    """Network in Network (Lin et al. 2014, CIFAR version) with every convolution coupled to a
    normalization layer (Deecke et al., Sec. 4.2) and dropout reduced to 0.25.

    conv1 (192, 5×5) conv2 (160, 1×1) conv3 (96, 1×1) → pool1 (3×3/2 max) → drop1 →
    conv4 (192, 5×5) conv5 (192, 1×1) conv6 (192, 1×1) → pool2 (3×3/2 avg) → drop2 →
    conv7 (192, 3×3) conv8 (192, 1×1) conv9 (num_classes, 1×1) → global average pool.

    The last "mlpconv" layer produces the class maps and, as in the original, is followed by its
    norm and ReLU before the global average pool. Pools use padding 1 (Caffe's ceil mode:
    32 → 16 → 8). About 0.97M parameters.

    Example::

        >>> nin(10)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"nin: dropout must be in [0, 1), got {dropout!r}")
    a, b, c = scaled(192, width), scaled(160, width), scaled(96, width)

    def blk(i: int, o: int, k: int) -> ConvNormAct:
        return ConvNormAct(i, o, k, norm=norm, conv=conv)

    net = Named(
        [
            ("conv1", blk(in_channels, a, 5)),
            ("conv2", blk(a, b, 1)),
            ("conv3", blk(b, c, 1)),
            ("pool1", nn.MaxPool2d(3, 2, padding=1)),
            ("drop1", nn.Dropout(dropout)),
            ("conv4", blk(c, a, 5)),
            ("conv5", blk(a, a, 1)),
            ("conv6", blk(a, a, 1)),
            ("pool2", nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)),
            ("drop2", nn.Dropout(dropout)),
            ("conv7", blk(a, a, 3)),
            ("conv8", blk(a, a, 1)),
            ("conv9", blk(a, num_classes, 1)),
            ("gap", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
        ]
    )
    return init_weights(net)


@register_model("cnn3", "Collins et al., App. A.1: 3-layer CNN, 32/16/8 filters, 5x5, stride 2")
def cnn3(
    num_classes: int = 10,
    in_channels: int = 1,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    image_size: int = 28,
) -> nn.Module:
    """The MNIST CNN of Collins et al., App. A.1: conv1 (32), conv2 (16), conv3 (8), each 5×5 with
    stride 2 (padding 2) and ReLU, then a linear classifier ``fc`` on the flattened last feature
    map (28 → 14 → 7 → 4, so 8·4·4 = 128 features; ``image_size`` sizes it, 8 for the digits:
    8 → 4 → 2 → 1). With ``norm="none"`` this is the network trained with the standardization
    loss; the norm slots sit on the pre-activations the loss is computed on.

    Example::

        >>> net = cnn3(10, in_channels=1, norm="none", image_size=28)
        >>> net.fc.in_features, net(torch.randn(2, 1, 28, 28)).shape
        (128, torch.Size([2, 10]))
    """
    check_positive(image_size, "image_size", "cnn3")
    c = [scaled(v, width) for v in (32, 16, 8)]
    s = image_size
    for _ in range(3):
        s = _out_size(s, 5, 2, 2)
    net = Named(
        [
            ("conv1", ConvNormAct(in_channels, c[0], 5, 2, norm=norm, conv=conv)),
            ("conv2", ConvNormAct(c[0], c[1], 5, 2, norm=norm, conv=conv)),
            ("conv3", ConvNormAct(c[1], c[2], 5, 2, norm=norm, conv=conv)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(c[2] * s * s, num_classes)),
        ]
    )
    return init_weights(net)


@register_model(
    "mlp",
    "Collins et al., App. A.2 / Huang et al., Fig. 3: MLP, configurable depth and width (100)",
)
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    depth: int = 3,
    hidden: int = 100,
    image_size: int = 28,
    in_features: int | None = None,
) -> nn.Module:
    """Multi-layer perceptron: flatten → ``depth`` hidden blocks ``layer1..layerD`` (children
    ``fc``, ``norm``, ``act``; ``hidden`` units, ReLU) → classifier ``fc``.

    Collins et al., App. A.2 ("3 layers with 100 units per layer") is ``depth=3``; Huang et al.,
    Fig. 3 ("a 4-layer MLP") is read as ``depth=4`` (``docs/models.md``). The norms see
    ``(N, hidden)`` input. Input size is ``in_features`` or
    ``in_channels * image_size**2``. A ``"ws"`` conv spec (``conv="ws"``,
    ``"ws(center=false)"``, ...) makes the hidden linear layers :class:`normlab.WSLinear` with its
    ``eps``/``center``/``scale`` (an MLP has no convolution; the classifier stays plain).

    Example::

        >>> net = mlp(10, in_channels=1, image_size=8, depth=3, hidden=100, norm="iternorm")
        >>> [n for n, _ in net.named_children()], net(torch.randn(16, 1, 8, 8)).shape
        (['flatten', 'layer1', 'layer2', 'layer3', 'fc'], torch.Size([16, 10]))
    """
    check_positive(depth, "depth", "mlp")
    check_positive(hidden, "hidden", "mlp")
    d_in = in_features if in_features is not None else in_channels * image_size * image_size
    check_positive(d_in, "in_features", "mlp")
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i in range(depth):
        layers.append(
            (
                f"layer{i + 1}",
                LinearNormAct(d_in if i == 0 else hidden, hidden, norm=norm, ws=conv),
            )
        )
    layers.append(("fc", make_linear(hidden, num_classes)))
    return Named(layers)


@register_model(
    "convnet4",
    "Qiao et al., Sec. 6.1.3: 4 conv layers of 32 channels, each + 2x avg pool, GAP, linear",
)
def convnet4(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    pool: bool = True,
) -> nn.Module:
    """The 4-layer network of Qiao et al., Sec. 6.1.3 (Fig. 5): conv1..conv4, each 32 channels
    (3×3; the paper does not state the kernel size) + norm + ReLU and followed by a 2× average
    pool ``pool1..pool4``; then global average pool and ``fc``. ``pool=False`` drops the four
    pools (for inputs smaller than 16×16, e.g. the 8×8 digits, whose side would otherwise shrink
    to 0).

    Example (Qiao et al., Fig. 5: every channel normalized to fixed random statistics)::

        >>> net = convnet4(10, norm="fixedstats(sigma_mu=1.0, sigma_sigma=0.5)")
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    c = scaled(32, width)
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for i in range(1, 5):
        layers.append((f"conv{i}", ConvNormAct(cin, c, 3, norm=norm, conv=conv)))
        if pool:
            layers.append((f"pool{i}", nn.AvgPool2d(2)))
        cin = c
    return init_weights(Named([*layers, *_head(c, num_classes)]))
