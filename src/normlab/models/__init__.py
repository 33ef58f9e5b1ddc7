"""normlab.models: the papers' architectures, each built with a norm spec and a conv kind.

::

    from normlab.models import create
    model = create("small_cnn", num_classes=10, in_channels=1, norm="bn")
    model = create("resnet_cifar", 10, depth=20, norm="gn(num_groups=8)", conv="ws")
    model = create("resnext50_32x4d", 1000, norm="gn", conv="ws")  # an ImageNet network
    normlab.convert(model, "mode(k=2)", include="layer3.*")

Every normalization slot is ``normlab.make_norm(norm, C)``; every convolution is ``nn.Conv2d`` or
``normlab.WSConv2d`` (``conv="ws"``, or ``"ws(center=false)"`` / ``"ws(scale=false)"`` /
``"ws(eps=1e-4)"`` for the Qiao et al., Table 4 ablation). See :func:`available_models` /
:func:`model_descriptions`.
"""

from normlab.models import (  # noqa: F401  (registers the models)
    dcgan,
    densenet,
    imagenet,
    inception,
    resnet,
    small,
    vgg,
)
from normlab.models._blocks import ConvNormAct, LinearNormAct, NormActConv, make_conv
from normlab.models.imagenet import Bottleneck, imagenet_resnet
from normlab.models.placements import (
    FEATURE_NORM,
    FIRST_NORM,
    PLACEMENTS,
    inception_branch_ends,
    placement,
)
from normlab.models.registry import available_models, create, model_descriptions, register_model

__all__ = [
    "FEATURE_NORM",
    "FIRST_NORM",
    "PLACEMENTS",
    "Bottleneck",
    "ConvNormAct",
    "LinearNormAct",
    "NormActConv",
    "available_models",
    "create",
    "imagenet_resnet",
    "inception_branch_ends",
    "make_conv",
    "model_descriptions",
    "placement",
    "register_model",
]
