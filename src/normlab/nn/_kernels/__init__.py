"""Hand-written autograd Functions and fused fast paths, one module per method family.

Each method's file in :mod:`normlab.nn` holds the module and a plain-autograd functional that
reads like the paper; the kernels here compute the same values and gradients faster or with less
memory. One switch chooses between them for every layer::

    with normlab.nn.use_kernels(False):   # the plain references, e.g. to check a kernel
        y = layer(x)
    normlab.nn.set_kernels_enabled(True)  # the default

The switch is read at every forward, so it needs no rebuilding of a model; under
``torch.compile`` a change of the switch triggers a recompile (it is a guarded global).
A test checks every kernel against its reference on every registered layer: outputs, input and
parameter gradients, in float32, float64 and bfloat16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["kernels_enabled", "set_kernels_enabled", "use_kernels"]

_ENABLED = True


def kernels_enabled() -> bool:
    """Whether layers use their hand-written kernels (``True``, the default) or the plain
    references."""
    return _ENABLED


def set_kernels_enabled(enabled: bool) -> None:
    """Choose the hand-written kernels (``True``) or the plain-autograd references (``False``)."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"set_kernels_enabled: enabled must be a bool, got {enabled!r}")
    _ENABLED = enabled


@contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Context manager: use the kernels (``True``) or the plain references (``False``) inside,
    and restore the previous choice on exit."""
    previous = _ENABLED
    set_kernels_enabled(enabled)
    try:
        yield
    finally:
        set_kernels_enabled(previous)
