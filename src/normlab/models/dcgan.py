"""DCGAN generator and discriminator for 32×32 images (Kalayeh & Shah, Sec. 4.5).

Kalayeh & Shah: "Its generator consists of one linear and four deconvolution layers. The first
three deconvolution layers are separated from each other by batch normalization followed by
ReLU." MN replaces "the batch normalization layers associated with the first two deconvolution
layers", i.e. ``include=["deconv1.norm", "deconv2.norm"]`` on the generator. The layout is the
standard CIFAR DCGAN (Miyato et al. 2018, "standard CNN"; z ∈ R^128, base width 512); how it was
chosen is in ``docs/models.md``.

generator ``G``: ``project`` (linear z → 512·4·4, reshape, norm, ReLU) → ``deconv1`` (4×4/2, 256,
norm, ReLU) → ``deconv2`` (128) → ``deconv3`` (64) → ``deconv4`` (3×3/1 conv to the image
channels, tanh).

discriminator ``D``: ``conv1`` 3×3 (64, no norm) → ``conv2`` 4×4/2 (128) → ``conv3`` 3×3 (128) →
``conv4`` 4×4/2 (256) → ``conv5`` 3×3 (256) → ``conv6`` 4×4/2 (512) → ``conv7`` 3×3 (512), each
with norm and LeakyReLU(0.2) except the first (no norm), then ``fc`` on the flattened map.

Three ways to build it: ``create("dcgan_g", ...)``, ``create("dcgan_d", ...)`` or
``create("dcgan", ..., g_norm=..., d_norm=...)`` — one module :class:`DCGAN` holding ``generator``
and ``discriminator`` (names ``generator.deconv1.norm``, …) whose ``forward(z)`` generates.
``conv="ws"`` (or any ``"ws(...)"`` conv spec) weight-standardizes the ``nn.Conv2d`` layers (all
of D, and G's last layer); the transposed convolutions stay plain (normlab has no
weight-standardized transposed convolution).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from normlab.models._blocks import (
    ConvNormAct,
    ConvSpec,
    Named,
    check_positive,
    conv_bias,
    make_act,
    reinit_weight,
    scaled,
)
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec, make_norm

__all__ = ["DCGAN", "DeconvNormAct", "dcgan", "dcgan_discriminator", "dcgan_generator"]


class DeconvNormAct(nn.Sequential):
    """``ConvTranspose2d(4×4, stride 2, pad 1) -> norm -> act`` (doubles H and W); children
    ``conv``, ``norm``, ``act``."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormSpec, act: str = "relu"
    ) -> None:
        super().__init__(
            OrderedDict(
                [
                    (
                        "conv",
                        nn.ConvTranspose2d(
                            in_channels, out_channels, 4, 2, 1, bias=conv_bias(norm)
                        ),
                    ),
                    ("norm", make_norm(norm, out_channels)),
                    ("act", make_act(act)),
                ]
            )
        )


def _dcgan_init(model: nn.Module) -> nn.Module:
    # Radford et al.: weights from N(0, 0.02), biases zero; norms keep their own initialization.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            reinit_weight(m, nn.init.normal_, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _check_image_size(image_size: int, model: str) -> int:
    check_positive(image_size, "image_size", model)
    if image_size % 8:
        raise ValueError(
            f"{model}: image_size must be a multiple of 8 (8, 16, 32, ...), got {image_size}"
        )
    return image_size


@register_model(
    "dcgan_g", "Kalayeh & Shah, Sec. 4.5: DCGAN generator (linear + 4 deconv), z -> image"
)
def dcgan_generator(
    num_classes: int = 1,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    z_dim: int = 128,
    width: float = 1.0,
    image_size: int = 32,
) -> nn.Module:
    """The DCGAN generator: ``(N, z_dim)`` (or ``(N, z_dim, 1, 1)``) noise ->
    ``(N, in_channels, image_size, image_size)`` images in (−1, 1).

    ``in_channels`` is the number of *image* channels produced (so one dataset spec builds both
    networks); ``num_classes`` is unused (the generator has no classifier). ``image_size`` must be
    a multiple of 8 (the 4×4 base for 32).
    """
    check_positive(z_dim, "z_dim", "dcgan_g")
    bw = _check_image_size(image_size, "dcgan_g") // 8
    c = [scaled(v, width) for v in (512, 256, 128, 64)]
    project = Named(
        [
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(z_dim, c[0] * bw * bw, bias=conv_bias(norm))),
            ("reshape", nn.Unflatten(1, (c[0], bw, bw))),
            ("norm", make_norm(norm, c[0])),
            ("act", make_act("relu")),
        ]
    )
    net = Named(
        [
            ("project", project),
            ("deconv1", DeconvNormAct(c[0], c[1], norm)),
            ("deconv2", DeconvNormAct(c[1], c[2], norm)),
            ("deconv3", DeconvNormAct(c[2], c[3], norm)),
            (
                "deconv4",
                ConvNormAct(c[3], in_channels, 3, norm=None, conv=conv, act="tanh", bias=True),
            ),
        ]
    )
    net.z_dim = z_dim  # type: ignore[assignment]
    return _dcgan_init(net)


@register_model(
    "dcgan_d", "Kalayeh & Shah, Sec. 4.5: DCGAN discriminator (7 conv + linear), image -> logit"
)
def dcgan_discriminator(
    num_classes: int = 1,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    image_size: int = 32,
) -> nn.Module:
    """The DCGAN discriminator: ``(N, in_channels, image_size, image_size)`` ->
    ``(N, num_classes)`` logits (``num_classes=1``: the real/fake score)."""
    bw = _check_image_size(image_size, "dcgan_d") // 8
    c = [scaled(v, width) for v in (64, 128, 256, 512)]
    spec = [  # (out, kernel, stride, pad)
        (c[0], 3, 1, 1),
        (c[1], 4, 2, 1),
        (c[1], 3, 1, 1),
        (c[2], 4, 2, 1),
        (c[2], 3, 1, 1),
        (c[3], 4, 2, 1),
        (c[3], 3, 1, 1),
    ]
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for i, (o, k, st, p) in enumerate(spec):
        nrm = None if i == 0 else norm
        layers.append(
            (f"conv{i + 1}", ConvNormAct(cin, o, k, st, p, norm=nrm, conv=conv, act="lrelu"))
        )
        cin = o
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(cin * bw * bw, num_classes))]
    return _dcgan_init(Named(layers))


class DCGAN(nn.Module):
    """A generator and a discriminator in one module (``generator``, ``discriminator``).

    ``forward(z)`` returns generated images; ``sample(n)`` draws ``z ~ N(0, I)`` and generates.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, z_dim: int) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.z_dim = z_dim

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = next(self.generator.parameters()).device
        gdev = generator.device if generator is not None else dev
        z = torch.randn(n, self.z_dim, generator=generator, device=gdev).to(dev)
        return self.generator(z)


@register_model(
    "dcgan", "Kalayeh & Shah, Sec. 4.5: DCGAN generator + discriminator pair, per-network norms"
)
def dcgan(
    num_classes: int = 1,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    g_norm: NormSpec | None = None,
    d_norm: NormSpec | None = None,
    z_dim: int = 128,
    width: float = 1.0,
    image_size: int = 32,
) -> nn.Module:
    """:class:`DCGAN` with ``g_norm`` in the generator and ``d_norm`` in the discriminator (each
    defaults to ``norm``).

    Example (Kalayeh & Shah's DCGAN-MN)::

        >>> gan = normlab.models.create("dcgan", 1, in_channels=3, g_norm="bn", d_norm="none")
        >>> normlab.convert(gan, "mixture(k=3, em_iters=2)",
        ...                 include=["generator.deconv1.norm", "generator.deconv2.norm"])
        ['generator.deconv1.norm', 'generator.deconv2.norm']
        >>> gan(torch.randn(4, 128)).shape
        torch.Size([4, 3, 32, 32])
    """
    g = dcgan_generator(
        1, in_channels, norm if g_norm is None else g_norm, conv, z_dim, width, image_size
    )
    d = dcgan_discriminator(
        num_classes, in_channels, norm if d_norm is None else d_norm, conv, width, image_size
    )
    return DCGAN(g, d, z_dim)
