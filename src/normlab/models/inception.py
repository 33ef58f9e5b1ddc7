"""Inception-V3 (Szegedy et al. 2016) adapted to CIFAR as in Kalayeh & Shah, Sec. 4.3.

Kalayeh & Shah's modification: the first convolution has stride 1 instead of 2 and the first
max-pool is removed, so the output stride is 8 and a 32×32 input ends as a 3×3 map before global
average pooling. The rest is Inception-V3: three Inception blocks of 3, 4 and 2 layers separated by
two grid-reduction modules.

Names (Kalayeh & Shah, Table 4 notation → module name):

* stem convolutions ``conv1`` .. ``conv5`` (ConvNormAct) and the remaining max-pool ``pool``;
* "inc1/0".."inc1/2" → ``inc1_0``..``inc1_2`` (35×35-type modules, Fig. 5 of Szegedy et al.);
* "red1" → ``red1``; "inc2/0".."inc2/3" → ``inc2_0``..``inc2_3`` (factorized 7×7 modules);
* "red2" → ``red2``; "inc3/0", "inc3/1" → ``inc3_0``, ``inc3_1`` (expanded filter bank modules);
* ``gap``, ``dropout``, ``fc``.

Inside a module the branches are ``branch0``, ``branch1``, … and a branch's convolutions are
numbered from 0 (a leading pool is ``pool``), so Kalayeh & Shah's "inc2/0/2/4" (the fifth norm of
the third branch of the first layer of block 2) is ``inc2_0.branch2.4.norm``. Where a branch ends in
two parallel convolutions (1×3 and 3×1 in ``inc3_*``), they are ``.a`` and ``.b`` of a split module.
Kalayeh & Shah replace "the last batch normalization in each branch" of a layer; use
:meth:`InceptionV3CIFAR.branch_end_norms` to get those names as ``convert`` include patterns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.models._blocks import ConvNormAct, ConvSpec, Named, init_weights, scaled
from normlab.models.registry import register_model
from normlab.nn.registry import NormSpec

__all__ = ["InceptionModule", "InceptionV3CIFAR", "Split", "inception_v3_cifar"]


class Split(nn.Module):
    """Two parallel blocks ``a`` and ``b`` on the same input, concatenated along channels."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class InceptionModule(nn.Module):
    """Parallel branches ``branch0``, ``branch1``, … concatenated along channels."""

    def __init__(self, branches: list[nn.Module], out_channels: int) -> None:
        super().__init__()
        self.num_branches = len(branches)
        self.out_channels = out_channels
        for i, b in enumerate(branches):
            self.add_module(f"branch{i}", b)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.num_branches)], dim=1)

    def branch_end_norms(self) -> list[str]:
        """Names (relative to this module) of the last normalization in each branch."""
        out: list[str] = []
        for i in range(self.num_branches):
            branch = getattr(self, f"branch{i}")
            last_name, last = list(branch.named_children())[-1]
            prefix = f"branch{i}.{last_name}"
            if isinstance(last, Split):
                out += [f"{prefix}.a.norm", f"{prefix}.b.norm"]
            elif isinstance(last, ConvNormAct) and hasattr(last, "norm"):
                out.append(f"{prefix}.norm")
        return out


class InceptionV3CIFAR(Named):
    """The Inception-V3 network of :func:`inception_v3_cifar` (a named ``Sequential``)."""

    def branch_end_norms(self, *layers: str) -> list[str]:
        """Qualified names of the last normalization of every branch of the given Inception/
        reduction layers (Kalayeh & Shah, Table 4: "we only replace the last batch normalization
        in each branch of the corresponding Inception layer").

        Example::

            >>> model = inception_v3_cifar(10, width=0.125)
            >>> include = model.branch_end_norms("inc2_0", "inc3_0")
            >>> include[:2]
            ['inc2_0.branch0.0.norm', 'inc2_0.branch1.2.norm']
            >>> normlab.convert(model, "mixture(k=3)", include=include) == include
            True
        """
        names: list[str] = []
        for layer in layers:
            mod = getattr(self, layer, None)
            if not isinstance(mod, InceptionModule):
                valid = [n for n, m in self.named_children() if isinstance(m, InceptionModule)]
                raise ValueError(f"{layer!r} is not an Inception layer; valid: {', '.join(valid)}")
            names += [f"{layer}.{n}" for n in mod.branch_end_norms()]
        return names


def inception_v3_cifar_layers() -> list[str]:
    """The Inception/reduction layer names in order."""
    return [
        *(f"inc1_{i}" for i in range(3)),
        "red1",
        *(f"inc2_{i}" for i in range(4)),
        "red2",
        *(f"inc3_{i}" for i in range(2)),
    ]


@register_model(
    "inception_v3_cifar",
    "Kalayeh & Shah, Sec. 4.3: Inception-V3 for CIFAR (stride-1 first conv, no first max-pool)",
)
def inception_v3_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    width: float = 1.0,
    dropout: float = 0.2,
    pad_reductions: bool = False,
) -> nn.Module:
    """Inception-V3 for 32×32 input (Kalayeh & Shah, Sec. 4.3), channel counts of Szegedy et al.
    (2016) times ``width``; every convolution is conv + norm + ReLU (ConvNormAct).

    Stem: conv1 3×3/1 (32) → conv2 3×3 (32) → conv3 3×3 (64) → [first max-pool removed] →
    conv4 1×1 (80) → conv5 3×3 (192) → ``pool`` 3×3/2 max. Then inc1_0..2 (pool features 32, 64,
    64), red1, inc2_0..3 (7×7 bottleneck 128, 160, 160, 192), red2, inc3_0..1, global average pool,
    dropout, ``fc``. Without auxiliary classifier. With num_classes = 1000 it has exactly the
    parameter count of the reference Inception-V3 without its auxiliary head (23.83M).

    Padding: the stem convolutions are "same"-padded, the max-pool and the two grid reductions
    unpadded (32 → 15 → 7 → 3), so a 32×32 input ends as the 3×3 map Kalayeh & Shah state.
    ``pad_reductions=True`` pads those three stride-2 steps as well (32 → 16 → 8 → 4;
    8 → 4 → 2 → 1), which lets 8×8 inputs through. ``dropout`` before ``fc`` defaults to 0.2.
    Minimum input side: 15 (4 with ``pad_reductions``). Why these choices: ``docs/models.md``.

    Example::

        >>> net = inception_v3_cifar(10, width=0.125, pad_reductions=True)
        >>> net(torch.randn(2, 3, 8, 8)).shape, len(net.branch_end_norms("inc2_0"))
        (torch.Size([2, 10]), 4)
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"inception_v3_cifar: dropout must be in [0, 1), got {dropout!r}")

    def s(c: int) -> int:
        return scaled(c, width)

    rp = 1 if pad_reductions else 0

    def cna(i: int, o: int, k: int | tuple[int, int], stride: int = 1, padding=None) -> ConvNormAct:
        return ConvNormAct(i, o, k, stride, padding, norm=norm, conv=conv)

    def branch(*items: nn.Module, pool: nn.Module | None = None) -> Named:
        layers: list[tuple[str, nn.Module]] = [] if pool is None else [("pool", pool)]
        return Named(layers + [(str(i), m) for i, m in enumerate(items)])

    def avg() -> nn.Module:
        return nn.AvgPool2d(3, 1, 1)

    def block_a(cin: int, pool_features: int) -> InceptionModule:
        b0 = branch(cna(cin, s(64), 1))
        b1 = branch(cna(cin, s(48), 1), cna(s(48), s(64), 5))
        b2 = branch(cna(cin, s(64), 1), cna(s(64), s(96), 3), cna(s(96), s(96), 3))
        b3 = branch(cna(cin, s(pool_features), 1), pool=avg())
        return InceptionModule([b0, b1, b2, b3], s(64) + s(64) + s(96) + s(pool_features))

    def reduction_a(cin: int) -> InceptionModule:
        b0 = branch(cna(cin, s(384), 3, 2, rp))
        b1 = branch(cna(cin, s(64), 1), cna(s(64), s(96), 3), cna(s(96), s(96), 3, 2, rp))
        b2 = branch(pool=nn.MaxPool2d(3, 2, rp))
        return InceptionModule([b0, b1, b2], s(384) + s(96) + cin)

    def block_c(cin: int, c7: int) -> InceptionModule:
        c7 = s(c7)
        b0 = branch(cna(cin, s(192), 1))
        b1 = branch(cna(cin, c7, 1), cna(c7, c7, (1, 7)), cna(c7, s(192), (7, 1)))
        b2 = branch(
            cna(cin, c7, 1),
            cna(c7, c7, (7, 1)),
            cna(c7, c7, (1, 7)),
            cna(c7, c7, (7, 1)),
            cna(c7, s(192), (1, 7)),
        )
        b3 = branch(cna(cin, s(192), 1), pool=avg())
        return InceptionModule([b0, b1, b2, b3], 4 * s(192))

    def reduction_b(cin: int) -> InceptionModule:
        b0 = branch(cna(cin, s(192), 1), cna(s(192), s(320), 3, 2, rp))
        b1 = branch(
            cna(cin, s(192), 1),
            cna(s(192), s(192), (1, 7)),
            cna(s(192), s(192), (7, 1)),
            cna(s(192), s(192), 3, 2, rp),
        )
        b2 = branch(pool=nn.MaxPool2d(3, 2, rp))
        return InceptionModule([b0, b1, b2], s(320) + s(192) + cin)

    def block_e(cin: int) -> InceptionModule:
        def split(c: int) -> Split:
            return Split(cna(c, s(384), (1, 3)), cna(c, s(384), (3, 1)))

        b0 = branch(cna(cin, s(320), 1))
        b1 = branch(cna(cin, s(384), 1), split(s(384)))
        b2 = branch(cna(cin, s(448), 1), cna(s(448), s(384), 3), split(s(384)))
        b3 = branch(cna(cin, s(192), 1), pool=avg())
        return InceptionModule([b0, b1, b2, b3], s(320) + 4 * s(384) + s(192))

    layers: list[tuple[str, nn.Module]] = [
        ("conv1", cna(in_channels, s(32), 3, 1)),
        ("conv2", cna(s(32), s(32), 3)),
        ("conv3", cna(s(32), s(64), 3)),
        ("conv4", cna(s(64), s(80), 1)),
        ("conv5", cna(s(80), s(192), 3)),
        ("pool", nn.MaxPool2d(3, 2, rp)),
    ]
    c = s(192)
    for i, pf in enumerate((32, 64, 64)):
        m = block_a(c, pf)
        layers.append((f"inc1_{i}", m))
        c = m.out_channels
    m = reduction_a(c)
    layers.append(("red1", m))
    c = m.out_channels
    for i, c7 in enumerate((128, 160, 160, 192)):
        m = block_c(c, c7)
        layers.append((f"inc2_{i}", m))
        c = m.out_channels
    m = reduction_b(c)
    layers.append(("red2", m))
    c = m.out_channels
    for i in range(2):
        m = block_e(c)
        layers.append((f"inc3_{i}", m))
        c = m.out_channels
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("dropout", nn.Dropout(dropout)),
        ("fc", nn.Linear(c, num_classes)),
    ]
    return init_weights(InceptionV3CIFAR(layers))
