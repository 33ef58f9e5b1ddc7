"""Model registry: ``create(name, num_classes, in_channels, norm, conv, **kw)`` builds a paper
architecture by name with a norm spec and a conv spec; :func:`register_model` adds one."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from normlab.models._blocks import ConvSpec, parse_conv
from normlab.nn.registry import NormSpec, parse_spec

__all__ = ["available_models", "create", "model_descriptions", "register_model"]

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, tuple[ModelFactory, str]] = {}


def register_model(name: str, description: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding ``factory(num_classes, in_channels, norm, conv, **kw)`` under ``name``."""

    def deco(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS and _MODELS[name][0] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = (fn, description)
        return fn

    return deco


def available_models() -> list[str]:
    """Names accepted by :func:`create`, in registration order.

    Example::

        >>> {"small_cnn", "cifar_cnn", "resnet_cifar", "densenet", "vgg"} <= set(available_models())
        True
    """
    return list(_MODELS)


def model_descriptions() -> dict[str, str]:
    """Registered names mapped to a one-line description (the paper and section they follow)."""
    return {k: d for k, (_, d) in _MODELS.items()}


def create(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: NormSpec = "bn",
    conv: ConvSpec = "plain",
    **kw: object,
) -> nn.Module:
    """Build architecture ``name`` with every normalization slot ``make_norm(norm, C)`` and every
    convolution plain or weight-standardized per the conv spec ``conv`` (``"plain"``, ``"ws"``,
    ``"ws(center=false)"``, ``{"name": "ws", "scale": False}``, ... — see
    :func:`normlab.models._blocks.parse_conv`; MLPs apply it to their hidden linear layers).
    ``kw`` are the model's own knobs (``width``, ``depth``, ``growth``, ...); unknown names raise
    ``ValueError`` listing the valid ones, and so does a bad conv spec (naming the key and value).

    Args:
        name: a name of :func:`available_models`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        norm: the norm spec of every normalization slot (see :func:`normlab.make_norm`).
        conv: the conv spec of every convolution.
        **kw: the model's own keyword arguments.

    Example::

        >>> net = create("small_cnn", 10, in_channels=1, norm="gn(num_groups=4)", conv="ws")
        >>> type(net.conv1.norm).__name__, type(net.conv1.conv).__name__
        ('GroupNorm', 'WSConv2d')
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_MODELS)}")
    for nm, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {nm} must be a positive integer, got {v!r}")
    parse_conv(conv)  # fail early on a malformed conv spec
    parse_spec(norm)  # fail early on a malformed spec
    fn, _ = _MODELS[name]
    params = inspect.signature(fn).parameters
    valid = [p for p in params if p not in ("num_classes", "in_channels", "norm", "conv")]
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for model {name!r}; valid arguments: "
            f"{', '.join(valid) if valid else '(none)'}"
        )
    return fn(num_classes=num_classes, in_channels=in_channels, norm=norm, conv=conv, **kw)
