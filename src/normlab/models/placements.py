"""The papers' placements of a normalization layer, as ``normlab.convert`` include lists.

Plain data, so an experiment config can name a placement instead of spelling out module names::

    model_name, include = PLACEMENTS["mixture/inception/inc2_0+inc3_0"]
    normlab.convert(model, "mixture(k=5, em_iters=2)", include=include)

The Inception entries list "the last batch normalization in each branch" of each named layer
(Kalayeh & Shah, Table 4 caption); they equal ``model.branch_end_norms(...)`` (checked by the tests).

The ImageNet ResNet entries are Huang et al.'s (Sec. 5.3, Tables 2–3): "L1" is the first norm only
(the one after the stem convolution; the rest stay BN), "L1+DF" adds the norm on the pooled
features before the classifier (an identity slot until converted). "IterNorm-Full" needs no entry:
it is the norm everywhere (``norm="iternorm"``). The same placements serve DBN ("DBN-L1").
"""

from __future__ import annotations

__all__ = ["FEATURE_NORM", "FIRST_NORM", "PLACEMENTS", "inception_branch_ends", "placement"]

#: The ImageNet ResNets' first norm (after the 7×7 stem convolution) and their norm slot on the
#: pooled features (see :mod:`normlab.models.imagenet`).
FIRST_NORM = "conv1.norm"
FEATURE_NORM = "feature_norm"

_BRANCH_ENDS = {
    "inc1": ["branch0.0", "branch1.1", "branch2.2", "branch3.0"],
    "red1": ["branch0.0", "branch1.2"],
    "inc2": ["branch0.0", "branch1.2", "branch2.4", "branch3.0"],
    "red2": ["branch0.1", "branch1.3"],
    "inc3": ["branch0.0", "branch1.1.a", "branch1.1.b", "branch2.2.a", "branch2.2.b", "branch3.0"],
}


def inception_branch_ends(*layers: str) -> list[str]:
    """Qualified names of the last norm of each branch of Inception layers such as ``"inc2_0"``
    or ``"red1"`` in :func:`normlab.models.inception.inception_v3_cifar`."""
    out: list[str] = []
    for layer in layers:
        kind = layer.split("_")[0]
        if kind not in _BRANCH_ENDS:
            raise ValueError(
                f"{layer!r} is not an Inception layer name (inc1_0..2, red1, inc2_0..3, red2, "
                "inc3_0..1)"
            )
        out += [f"{layer}.{b}.norm" for b in _BRANCH_ENDS[kind]]
    return out


#: key -> (model name, include list). Keys are "<paper>/<model>/<placement as in the paper>".
PLACEMENTS: dict[str, tuple[str, list[str]]] = {
    # Kalayeh & Shah, Table 2: CIFAR CNN.
    "mixture/cifar_cnn/conv3": ("cifar_cnn", ["conv3.norm"]),
    "mixture/cifar_cnn/conv2": ("cifar_cnn", ["conv2.norm"]),
    "mixture/cifar_cnn/conv2+conv3": ("cifar_cnn", ["conv2.norm", "conv3.norm"]),
    # Kalayeh & Shah, Table 4 / Fig. 4: Inception-V3.
    "mixture/inception/red1+red2": ("inception_v3_cifar", inception_branch_ends("red1", "red2")),
    "mixture/inception/red1+red2+inc3_0": (
        "inception_v3_cifar",
        inception_branch_ends("red1", "red2", "inc3_0"),
    ),
    "mixture/inception/inc2_0+inc3_0": (
        "inception_v3_cifar",
        inception_branch_ends("inc2_0", "inc3_0"),
    ),
    "mixture/inception/inc2_1+inc3_0": (
        "inception_v3_cifar",
        inception_branch_ends("inc2_1", "inc3_0"),
    ),
    # Kalayeh & Shah, Sec. 4.4: the two transitions and the norm after the third dense block.
    "mixture/densenet/transitions+final": (
        "densenet",
        ["trans1.norm", "trans2.norm", "final.norm"],
    ),
    # Kalayeh & Shah, Sec. 4.5: the norms of the generator's first two deconvolutions.
    "mixture/dcgan/deconv1+deconv2": (
        "dcgan",
        ["generator.deconv1.norm", "generator.deconv2.norm"],
    ),
    "mixture/dcgan_g/deconv1+deconv2": ("dcgan_g", ["deconv1.norm", "deconv2.norm"]),
    # Huang et al., Table 2 (ResNet-18) and Table 3 (ResNet-50/101): IterNorm-L1 (and DBN-L1),
    # IterNorm-L1 + DF.
    "iternorm/resnet18/l1": ("resnet18", [FIRST_NORM]),
    "iternorm/resnet18/l1+df": ("resnet18", [FIRST_NORM, FEATURE_NORM]),
    "iternorm/resnet50/l1": ("resnet50", [FIRST_NORM]),
    "iternorm/resnet50/l1+df": ("resnet50", [FIRST_NORM, FEATURE_NORM]),
    "iternorm/resnet101/l1": ("resnet101", [FIRST_NORM]),
    "iternorm/resnet101/l1+df": ("resnet101", [FIRST_NORM, FEATURE_NORM]),
}


def placement(key: str) -> tuple[str, list[str]]:
    """``(model name, include list)`` for a key of :data:`PLACEMENTS`."""
    if key not in PLACEMENTS:
        raise ValueError(f"unknown placement {key!r}; valid keys: {', '.join(PLACEMENTS)}")
    name, include = PLACEMENTS[key]
    return name, list(include)
