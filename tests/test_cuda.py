"""No host synchronisation in a training step on a GPU (needs ``pytest --device cuda``).

Under ``torch.cuda.set_sync_debug_mode("error")`` every operation that makes the host wait for
the GPU (``.item()``, ``.cpu()``, ``nonzero``, a Python ``if`` on a CUDA tensor, ...) raises. Three
training steps — forward, ``loss.backward()``, the optimizer step — of every registered layer, and
of ``small_cnn`` with every registered layer, run in that mode after one warm-up step outside it
(lazy initialisation may synchronise once); so does an eval forward after training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.models import create

pytestmark = pytest.mark.cuda

NAMES = sorted(normlab.available_norms())
STEPS = 3


@contextlib.contextmanager
def _sync_is_an_error() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _training_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        if opt is not None:
            opt.step()

    return step


def _check(model: nn.Module, step: Callable[[], None], x: torch.Tensor) -> None:
    model.train()
    step()  # warm-up, outside the mode
    torch.cuda.synchronize()
    with _sync_is_an_error():
        for _ in range(STEPS):
            step()
        model.eval()
        with torch.no_grad():
            model(x)
    torch.cuda.synchronize()


@pytest.mark.parametrize("shape", [(32, 16), (8, 16, 6, 6)], ids=["2d", "4d"])
@pytest.mark.parametrize("name", NAMES)
def test_layer_step_does_not_synchronise(name: str, shape: tuple[int, ...], device) -> None:
    layer = normlab.make_norm(name, 16).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)

    def loss() -> torch.Tensor:
        return (layer(x) * g).mean()

    _check(layer, _training_step(layer, loss), x)


@pytest.mark.parametrize("name", NAMES)
def test_small_cnn_step_does_not_synchronise(name: str, device) -> None:
    model = create("small_cnn", 10, in_channels=1, norm=name).to(device)
    x = torch.randn(32, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (32,), device=device)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    _check(model, _training_step(model, loss), x)
