"""Every registered normalization on channels-last input (``torch.channels_last``, 4-D, and
``torch.channels_last_3d``, 5-D).

Oracle: the same layer (a deep copy, same RNG state) on the same values stored contiguously.
Outputs, input and parameter gradients and buffers after two training steps and one eval step
must agree (float64, 1e-10: only the order of sums may differ), and the output must be stored
as torch's BatchNorm stores it: channels last for channels-last input. The whitening layers
(iternorm, dbn) give contiguous output (their products need channel-first memory, and the
benchmark showed that copying back costs more than it saves); that exception is written out
here, so a change either way fails a test.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlab
from normlab.nn._utils import channel_first_input, same_memory_format

C = 8
NAMES = sorted(normlab.available_norms())
CONTIGUOUS_OUTPUT = {"iternorm", "dbn"}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
SHAPES = {4: (6, C, 3, 4), 5: (4, C, 2, 3, 2)}


def _layer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = normlab.make_norm(name, C).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _run(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, seed: int, fn=None) -> dict:
    """``fn`` (default: ``layer``) on a copy of ``x`` from RNG state ``seed``, backward; the
    output, the gradients and ``layer``'s buffers."""
    torch.manual_seed(seed)
    xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = (layer if fn is None else fn)(xr)
    (y * gy).sum().backward()
    out = {"y": y.detach(), "x.grad": xr.grad, "y_format": y}
    for n, p in layer.named_parameters():
        if p.grad is not None:
            out[f"{n}.grad"] = p.grad.clone()
            p.grad = None
    out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    return out


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_channels_last_equals_contiguous(name: str, ndim: int) -> None:
    ref = _layer(name)
    cl = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(2)
    fmt = FORMATS[ndim]
    for step, training in enumerate([True, True, False]):
        ref.train(training)
        cl.train(training)
        x = torch.randn(SHAPES[ndim], generator=gen, dtype=torch.float64) * 1.5 + 0.3
        gy = torch.randn(SHAPES[ndim], generator=gen, dtype=torch.float64)
        xl, gl = x.contiguous(memory_format=fmt), gy.contiguous(memory_format=fmt)
        assert not xl.is_contiguous()  # the case under test really is channels last
        want = _run(ref, x, gy, seed=5 + step)
        got = _run(cl, xl, gl, seed=5 + step)
        y = got.pop("y_format")
        want.pop("y_format")
        if name in CONTIGUOUS_OUTPUT:
            assert y.is_contiguous(), f"{name}: output memory format changed"
        else:
            assert y.is_contiguous(memory_format=fmt), f"{name}: output not channels last"
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-10, atol=1e-10, msg=f"{name} step {step}: {key}"
            )


class _Record(torch.nn.Module):
    """Records the memory layout its decorated forward sees; returns ``2 x``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    @channel_first_input
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.is_contiguous())
        return 2 * x


def test_same_memory_format_restores_only_channels_last() -> None:
    class Flat(torch.nn.Module):
        @same_memory_format
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.contiguous() + 1

    m = Flat()
    x = torch.randn(2, 3, 4, 5)
    xl = x.contiguous(memory_format=torch.channels_last)
    y = m(xl)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    assert m(x).is_contiguous()
    yt = m(torch.randn(2, 3, 5, 4).transpose(2, 3))  # not channels last: left as computed
    assert yt.is_contiguous()


def test_channel_first_input_copies_only_when_needed() -> None:
    m = _Record()
    x = torch.randn(2, 3, 4, 5)
    assert m(x).data_ptr() != x.data_ptr()
    xl = x.contiguous(memory_format=torch.channels_last)
    y = m(xl)
    assert m.seen == [True, True]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    # another non-contiguous input (a transposed view) is made contiguous, and so is its output
    xt = torch.randn(2, 3, 5, 4).transpose(2, 3)
    yt = m(xt)
    assert m.seen[-1] and yt.is_contiguous()
    torch.testing.assert_close(yt, 2 * xt, rtol=0, atol=0)
    # (N, C) and a non-tensor pass straight through (the layer's own check then speaks)
    m(torch.randn(4, 3).t())
    assert m.seen[-1] is False


def test_channels_last_compiles_to_one_graph() -> None:
    """MixtureNorm's decorated forward traces with ``fullgraph=True`` on channels-last input and
    gives the eager values (aot_eager: forward and backward graphs as inductor gets them)."""
    torch._dynamo.reset()
    eager = _layer("mixture").float()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager", dynamic=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, C, 3, 4, generator=gen) * 1.5 + 0.3
    x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(6, C, 3, 4, generator=gen)
    want = _run(eager, x, gy, seed=3)
    got = _run(twin, x, gy, seed=3, fn=compiled)
    assert got.pop("y_format").is_contiguous(memory_format=torch.channels_last)
    want.pop("y_format")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
