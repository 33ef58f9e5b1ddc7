"""Small shared helpers for normlab's layers: input checks and layout changes.

All layers take channel-first input ``(N, C)`` or ``(N, C, *)`` (a fully-connected layer is
treated as H = W = 1, as in the papers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "add_channel_affine",
    "channel_first_input",
    "channel_view",
    "check_eps",
    "check_input",
    "check_momentum",
    "check_positive_int",
    "from_points",
    "read_running",
    "reset_channel_affine",
    "same_memory_format",
    "stat_dtype",
    "to_points",
]


@torch.library.custom_op("normlab::snapshot", mutates_args=())
def _snapshot(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot.register_fake
def _snapshot_fake(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def read_running(t: Tensor) -> Tensor:
    """A running-statistic buffer read in a training forward that then updates it in place,
    detached. Eager: ``t.detach()`` (no copy). Under ``torch.compile``: a copy made by an opaque
    op, so that AOT autograd's partitioner saves the value read instead of re-reading the
    buffer in the backward, after the in-place update (a partitioner bug of torch 2.13: it
    recomputes reads of mutated inputs, giving wrong input gradients)."""
    if torch.compiler.is_compiling():
        return _snapshot(t.detach())
    return t.detach()


_M = TypeVar("_M", bound=nn.Module)


def _channels_last_format(x: Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` (4-D) / ``torch.channels_last_3d`` (5-D) when ``x`` is stored so
    (and not also plainly contiguous), else ``None``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def channel_first_input(
    forward: Callable[[_M, Tensor], Tensor],
) -> Callable[[_M, Tensor], Tensor]:
    """Decorate a layer's ``forward(self, x)`` so that it always sees contiguous channel-first
    memory, and give a channels-last input its output back in channels-last memory (as torch's
    BatchNorm does).

    Used by MixtureNorm, whose many passes over ``(N, C, L)`` points are slow on channels-last
    memory (the recommended format for convolutions under mixed precision): measured on a
    2-core CPU, the copy in and out cut its channels-last training step from 9.8× to 6.0× that
    of BatchNorm on the same input, at the price of one more activation-sized tensor at the peak
    (3.1× instead of 2.0× BatchNorm's). For ModeNorm and ModeGroupNorm the same copies gained
    little or lost time and cost the same memory, so they do not use it. Contiguous input passes
    through untouched (no copy)."""

    @functools.wraps(forward)
    def wrapper(self: _M, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 3 or x.is_contiguous():
            return forward(self, x)
        fmt = _channels_last_format(x)
        y = forward(self, x.contiguous())
        return y if fmt is None else y.contiguous(memory_format=fmt)

    return wrapper


def same_memory_format(
    forward: Callable[[_M, Tensor], Tensor],
) -> Callable[[_M, Tensor], Tensor]:
    """Decorate a layer's ``forward(self, x)`` so that a channels-last input gets a channels-last
    output (as torch's BatchNorm gives), copying only when the computed output is stored
    otherwise (ModeNorm in eval mode)."""

    @functools.wraps(forward)
    def wrapper(self: _M, x: Tensor) -> Tensor:
        y = forward(self, x)
        if not isinstance(x, Tensor) or x.dim() < 4 or x.is_contiguous():
            return y
        fmt = _channels_last_format(x)
        return y if fmt is None else y.contiguous(memory_format=fmt)

    return wrapper


def check_input(x: Tensor, num_features: int, layer: str) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor or non-float input) unless ``x`` is
    ``(N, C)`` or ``(N, C, *)`` with ``C == num_features``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{layer}: expected input of shape (N, C) or (N, C, *), got a {x.dim()}-D tensor "
            f"of shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels (dim 1), got input of shape "
            f"{tuple(x.shape)}"
        )
    if not (x.is_floating_point()):
        raise TypeError(f"{layer}: expected a floating-point input, got dtype {x.dtype}")


def check_positive_int(value: object, name: str, layer: str, minimum: int = 1) -> int:
    """Validate an integer argument ``>= minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{layer}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_eps(eps: object, layer: str) -> float:
    """Validate a positive ``eps`` and return it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"{layer}: eps must be a positive number, got {eps!r}")
    return float(eps)


def check_momentum(momentum: object, layer: str) -> float:
    """Validate a momentum in [0, 1] and return it as a float."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, int | float)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"{layer}: momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against a ``ndim``-D channel-first
    tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics are accumulated in float32 for half/bfloat16 input, else in the input dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def to_points(x: Tensor) -> Tensor:
    """``(N, C, *)`` -> ``(m, C)`` with ``m = N * prod(*)``: one C-dimensional point per
    position."""
    if x.dim() == 2:
        return x
    c = x.shape[1]
    return x.movedim(1, -1).reshape(-1, c)


def from_points(p: Tensor, like_shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_points` for an input of shape ``like_shape``."""
    if len(like_shape) == 2:
        return p
    n, c, *rest = like_shape
    return p.reshape(n, *rest, c).movedim(-1, 1)


def add_channel_affine(module: nn.Module, num_features: int, affine: object, layer: str) -> bool:
    """Register the per-channel affine ``weight`` (γ = 1) and ``bias`` (β = 0) of a norm layer,
    or ``None`` for both when ``affine`` is False; returns the validated flag."""
    if not isinstance(affine, bool):
        raise ValueError(f"{layer}: affine must be True or False, got {affine!r}")
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features))
        module.bias = nn.Parameter(torch.zeros(num_features))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
    return affine


def reset_channel_affine(module: nn.Module) -> None:
    """γ ← 1, β ← 0 for a layer set up by :func:`add_channel_affine` (no-op without affine)."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
