"""Normalization layers by name.

A *spec* names a layer and optionally its keyword arguments::

    make_norm("bn", 64)
    make_norm("gn(num_groups=16)", 64)
    make_norm("bcn(micro_batch=true)", 64)
    make_norm({"name": "mixture", "k": 5, "em_iters": 2}, 64)

Values in a spec string are Python-like literals; ``true``/``false``/``none`` are accepted in any
case, and a bare word (``activation=relu``) is read as a string. Every layer built here accepts both
``(N, C)`` and ``(N, C, *)`` input. New layers register themselves with :func:`register_norm`.
Importing this module runs ``normlab.nn``'s ``__init__`` first, which imports every layer file,
so the registry is complete before any lookup.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "NormSpec",
    "available_norms",
    "make_norm",
    "norm_classes",
    "parse_spec",
    "register_norm",
]

NormSpec = str | Mapping[str, Any]


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_norm(name: str, description: str) -> Callable[[Any], Any]:
    """Class/function decorator adding a layer to the registry under ``name``.

    The factory is called as ``factory(num_features, **kwargs)``; its signature defines which
    keyword arguments a spec may use. Registering a different factory under a taken name raises
    ``ValueError``.

    Args:
        name: the registry name (case-insensitive).
        description: the one-line description :func:`available_norms` shows.

    Example (a layer of your own, then built by name like the built-in ones)::

        @normlab.register_norm("scaled_bn", "batch norm without affine, times a fixed scale")
        class ScaledBN(nn.BatchNorm2d):
            def __init__(self, num_features, scale=2.0):
                super().__init__(num_features, affine=False)
                self.scale = scale

            def forward(self, x):
                return super().forward(x) * self.scale

        layer = normlab.make_norm("scaled_bn(scale=3.0)", 64)
    """
    key = name.lower()

    def deco(factory: Any) -> Any:
        if key in _REGISTRY and _REGISTRY[key].factory is not factory:
            raise ValueError(f"normalization {name!r} is already registered")
        _REGISTRY[key] = _Entry(key, factory, description)
        return factory

    return deco


def available_norms() -> dict[str, str]:
    """Registered names mapped to a one-line description, in registration order.

    Example::

        >>> descriptions = available_norms()
        >>> {"bn", "gn", "bcn", "mixture", "mode", "iternorm"} <= set(descriptions)
        True
    """
    return {k: e.description for k, e in _REGISTRY.items()}


def norm_classes() -> tuple[type, ...]:
    """The module classes the registry can build (used by :func:`normlab.convert`)."""
    return tuple(e.factory for e in _REGISTRY.values() if isinstance(e.factory, type))


def _literal(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Name):
        low = node.id.lower()
        return {"true": True, "false": False, "none": None, "null": None}.get(low, node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"cannot parse the value {ast.unparse(node)!r} in norm spec {spec!r}: use numbers, "
            "true/false/none, quoted strings, bare words, lists or tuples"
        ) from None


def parse_spec(spec: NormSpec) -> tuple[str, dict[str, Any]]:
    """Split a spec into ``(name, kwargs)`` without building anything.

    Args:
        spec: ``"name"``, ``"name(key=value, ...)"`` (Python-like literals; ``true``/``false``/
            ``none`` in any case; bare words are strings) or a dict with a ``"name"`` key.

    Example::

        >>> parse_spec("GN(num_groups=16, affine=False)")
        ('gn', {'num_groups': 16, 'affine': False})
        >>> parse_spec({"name": "mixture", "k": 5})
        ('mixture', {'k': 5})
    """
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"a dict norm spec needs a 'name' key, got keys {sorted(spec)}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
        if not isinstance(name, str):
            raise ValueError(f"norm spec 'name' must be a string, got {name!r}")
        return name.strip().lower(), kwargs
    if not isinstance(spec, str):
        raise TypeError(
            f"a norm spec must be a string like 'gn(num_groups=16)' or a dict, got "
            f"{type(spec).__name__}"
        )
    text = spec.strip()
    if not text:
        raise ValueError("empty norm spec; valid names: " + ", ".join(available_norms()))
    match = _SPEC_RE.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse norm spec {spec!r}; expected 'name' or 'name(key=value, ...)'"
        )
    name, args = match.group(1).lower(), match.group(2)
    if args is None or not args.strip():
        return name, {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError:
        raise ValueError(
            f"cannot parse the arguments of norm spec {spec!r}; expected 'name(key=value, ...)'"
        ) from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise ValueError(
            f"norm spec {spec!r}: arguments must be given by keyword, e.g. '{name}(k=3)'"
        )
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f"norm spec {spec!r}: '**' is not allowed")
        kwargs[kw.arg] = _literal(kw.value, spec)
    return name, kwargs


_SPEC_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?$", re.DOTALL)


def _valid_kwargs(factory: Callable[..., Any]) -> list[str]:
    params = list(inspect.signature(factory).parameters.values())[1:]  # skip num_features
    return [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def make_norm(spec: NormSpec, num_features: int) -> nn.Module:
    """Build the normalization layer described by ``spec`` for ``num_features`` channels.

    Unknown names or keywords raise ``ValueError`` listing the valid ones.

    Args:
        spec: a spec string or dict (see :func:`parse_spec`).
        num_features: C, the channel count of the input the layer will see.

    Example::

        >>> gn = make_norm("gn(num_groups=4)", 32)
        >>> type(gn).__name__, gn.num_groups, gn.num_channels
        ('GroupNorm', 4, 32)
        >>> make_norm({"name": "bcn", "micro_batch": True}, 64).micro_batch
        True
    """
    name, kwargs = parse_spec(spec)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown normalization {name!r}; valid names: {', '.join(sorted(_REGISTRY))}"
        )
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    entry = _REGISTRY[name]
    valid = _valid_kwargs(entry.factory)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for normalization {name!r}; valid arguments: "
            f"{', '.join(valid) if valid else '(none)'}"
        )
    return entry.factory(num_features, **kwargs)
