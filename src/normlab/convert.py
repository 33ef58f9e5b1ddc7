"""Model surgery: swap normalization layers, or convolutions, by qualified-name pattern.

Patterns are shell-style globs (``fnmatch``) matched against the qualified module name as given by
``model.named_modules()``, e.g. ``"conv3.norm"``, ``"conv3.*"``, ``"layer1.*.bn?"``, ``"*"``.
``include``/``exclude`` take one pattern or a list of them; a module is replaced when it matches
some include pattern and no exclude pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

from normlab.nn.registry import NormSpec, make_norm, norm_classes
from normlab.nn.weight_std import (
    WEIGHT_NORM_KINDS,
    WSConv1d,
    WSConv2d,
    WSLinear,
    apply_weight_norm,
    ws_from_module,
)

__all__ = ["convert", "convert_conv", "is_norm_layer", "norm_num_features"]

Patterns = str | Iterable[str] | None


def _patterns(p: Patterns, arg: str) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    out = list(p)
    if not all(isinstance(s, str) for s in out):
        raise TypeError(f"{arg} must be a glob string or a list of glob strings, got {p!r}")
    return out


def _torch_norm_types() -> tuple[type, ...]:
    return (
        nn.modules.batchnorm._BatchNorm,
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LayerNorm,
    )


def is_norm_layer(module: nn.Module) -> bool:
    """True for torch's BatchNorm*/SyncBatchNorm/GroupNorm/InstanceNorm*, a LayerNorm over one
    (channel) dimension, and every layer in normlab's registry."""
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    return isinstance(module, _torch_norm_types() + norm_classes())


def norm_num_features(module: nn.Module) -> int:
    """The channel count a normalization module was built for."""
    for attr in ("num_features", "num_channels"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    raise ValueError(f"cannot infer num_features of {type(module).__name__}")


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device, None
    return None, None


def _placement(model: nn.Module, name: str) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype for the layer that replaces ``model.get_submodule(name)``: the old layer's
    own, else those of its nearest enclosing module that has (floating-point) tensors — a
    parameter-free norm (``nn.InstanceNorm2d()``, ``nn.GroupNorm(affine=False)``, ``none``) has
    none, and its replacement must still land on the model's device and dtype."""
    parts = name.split(".")
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    for i in range(len(parts), -1, -1):
        d, t = _device_dtype(model.get_submodule(".".join(parts[:i])))
        device = device if device is not None else d
        dtype = dtype if dtype is not None else t
        if device is not None and dtype is not None:
            break
    return device, dtype


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _select(
    model: nn.Module, pred, include: Patterns, exclude: Patterns
) -> tuple[list[str], list[str]]:
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    candidates = [n for n, m in model.named_modules() if n and pred(m)]
    chosen = [
        n
        for n in candidates
        if any(fnmatchcase(n, p) for p in inc) and not any(fnmatchcase(n, p) for p in exc)
    ]
    return candidates, chosen


def convert(
    model: nn.Module,
    spec: NormSpec,
    include: Patterns = "*",
    exclude: Patterns = None,
) -> list[str]:
    """Replace the normalization layers of ``model`` whose names match by ``make_norm(spec, C)``.

    ``num_features`` is inferred from each replaced layer; the new layer is moved to the old one's
    device and dtype (a parameter-free old layer: those of its nearest enclosing module with
    tensors) and takes its train/eval mode. Works in place and returns the replaced names
    (in module order). If ``include`` is not ``"*"`` and matches no normalization layer, raises
    ``ValueError`` listing the normalization layers the model has (a typo should not pass silently).

    Example — MixtureNorm only after ``conv3`` (Kalayeh & Shah, Table 2, MN-1)::

        normlab.convert(model, "mixture(k=3)", include="conv3.*")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    candidates, chosen = _select(model, is_norm_layer, include, exclude)
    if not chosen and include != "*":
        raise ValueError(
            f"include={include!r} (exclude={exclude!r}) matches no normalization layer; the model's "
            f"normalization layers are: {candidates or '(none)'}"
        )
    for name in chosen:
        old = model.get_submodule(name)
        new = make_norm(spec, norm_num_features(old))
        device, dtype = _placement(model, name)
        if device is not None:
            new = new.to(device=device)
        if dtype is not None:
            new = new.to(dtype=dtype)
        new.train(old.training)
        _set_submodule(model, name, new)
    return chosen


def convert_conv(
    model: nn.Module,
    kind: str = "ws",
    include: Patterns = "*",
    exclude: Patterns = None,
    linear: bool = False,
    **kwargs: object,
) -> list[str]:
    """Swap ``nn.Conv1d``/``nn.Conv2d`` (and ``nn.Linear`` when ``linear=True``) for their
    weight-normalized versions (Qiao et al., Sec. 4), keeping the raw weights, bias, device and dtype.

    ``kind`` is ``"ws"`` (Weight Standardization, Eq. 5–7: a new :class:`normlab.WSConv2d` etc.
    with the old layer's raw weight; ``kwargs`` ``eps``, ``center``, ``scale``), ``"wn"`` (Weight
    Normalization, Eq. 8, torch's weight norm; no ``kwargs``), ``"cwn"`` (Centered Weight
    Normalization, Eq. 9; ``kwargs`` ``eps``) or ``"plain"`` (no change). ``"wn"`` and ``"cwn"``
    parametrize the matched layers' ``weight`` in place (the module objects stay, with new
    parameters g and v, so build the optimizer afterwards); a WN layer computes what it computed
    before, a CWN layer uses its weight's centered direction at the weight's length. Layers that
    are already weight-standardized or parametrized are left alone. Returns the replaced names.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> convert_conv(model, "cwn")
        ['0', '2']
    """
    if kind == "plain":
        return []
    if kind != "ws" and kind not in WEIGHT_NORM_KINDS:
        raise ValueError(f"convert_conv: kind must be 'ws', 'wn', 'cwn' or 'plain', got {kind!r}")
    ws_types = (WSConv1d, WSConv2d, WSLinear)
    types: tuple[type, ...] = (nn.Conv1d, nn.Conv2d) + ((nn.Linear,) if linear else ())

    def pred(m: nn.Module) -> bool:
        return type(m) in types and not isinstance(m, ws_types)

    candidates, chosen = _select(model, pred, include, exclude)
    if not chosen and include != "*":
        raise ValueError(
            f"include={include!r} matches no convolution{' or linear' if linear else ''} layer; "
            f"candidates: {candidates or '(none)'}"
        )
    for name in chosen:
        old = model.get_submodule(name)
        if kind == "ws":
            _set_submodule(model, name, ws_from_module(old, **kwargs))
        else:
            apply_weight_norm(old, kind, **kwargs)
    return chosen
