"""ModeNorm and ModeGroupNorm under ``torch.compile(fullgraph=True)`` and ONNX export.

Oracle: the same layer run eagerly (same parameters, inputs and output gradients): outputs,
input and parameter gradients and the running buffers after every step, over three training
steps with SGD updates and two eval steps, with the hand-written kernels and with the plain
references (``normlab.use_kernels(False)``). ``fullgraph=True`` fails on any graph break; dynamo's
``error_on_recompile`` fails on a recompile after the first step of each mode (the switch to eval
may compile one more graph). The ``aot_eager`` backend traces forward and backward as inductor
does without generating code (fast); the inductor runs are ``slow``. ONNX: the eval-mode layer
exported with a dynamic batch dimension, run by onnxruntime at another batch size, against
eager.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import normlab
from normlab import ModeGroupNorm, ModeNorm

C = 8
LAYERS = {
    "mode k=3": lambda: ModeNorm(C, k=3, momentum=0.3),
    "mgn mean k=3": lambda: ModeGroupNorm(C, k=3),
    "mgn gated k=2": lambda: ModeGroupNorm(C, k=2, combine="gated"),
}
SHAPES = {"NC": (6, C), "NCHW": (4, C, 3, 2)}
TOL = 1e-4


def _layer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[name]()
    with torch.no_grad():  # non-trivial gate, affine and (for ModeNorm) running estimates
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _step(layer: torch.nn.Module, fn, x: torch.Tensor, gy: torch.Tensor) -> dict:
    """Forward, backward, an SGD update; everything that came out."""
    xr = x.clone().requires_grad_()
    y = fn(xr)
    (y * gy).sum().backward()
    out = {"y": y.detach(), "x.grad": xr.grad}
    with torch.no_grad():
        for n, p in layer.named_parameters():
            out[f"{n}.grad"] = p.grad.clone()
            p.sub_(0.1 * p.grad)
            p.grad = None
    out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    return out


def _compiled_equals_eager(name: str, shape: tuple[int, ...], kernels: bool, backend: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager = _layer(name)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    with normlab.use_kernels(kernels):
        for step, training in enumerate([True, True, True, False, False]):
            eager.train(training)
            twin.train(training)
            x = torch.randn(shape, generator=gen) * 1.5 + 0.5
            gy = torch.randn(shape, generator=gen)
            want = _step(eager, eager, x, gy)
            with torch._dynamo.config.patch(error_on_recompile=step not in (0, 3)):
                got = _step(twin, compiled, x, gy)
            assert got.keys() == want.keys()
            for key, ref in want.items():
                torch.testing.assert_close(
                    got[key], ref, rtol=TOL, atol=TOL, msg=lambda m, k=key, s=step: f"{s} {k}: {m}"
                )
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LAYERS)
def test_compiled_kernels_equal_eager_without_recompiles(name, shape):
    _compiled_equals_eager(name, shape, kernels=True, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LAYERS)
def test_compiled_reference_equals_eager_without_recompiles(name, shape):
    _compiled_equals_eager(name, shape, kernels=False, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LAYERS)
def test_inductor_equals_eager_without_recompiles(name, shape, kernels):
    _compiled_equals_eager(name, shape, kernels=kernels, backend="inductor")


def test_grad_mode_changes_do_not_recompile():
    """Training steps alternating with ``torch.no_grad()`` evaluation: two graphs, compiled in
    the first round, reused afterwards."""
    torch._dynamo.reset()
    counters.clear()
    layer = _layer("mode k=3")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(SHAPES["NCHW"])
    for cycle in range(3):
        with torch._dynamo.config.patch(error_on_recompile=cycle > 0):
            layer.train()
            compiled(x.requires_grad_()).square().sum().backward()
            layer.eval()
            with torch.no_grad():
                compiled(x)
    assert counters["stats"]["unique_graphs"] == 2


# --------------------------------------------------------------------------------------------
# ONNX


def _export_and_run(layer: torch.nn.Module, shape: tuple[int, ...], kernels: bool, tmp_path):
    """Export ``layer`` (eval) at batch size ``shape[0]`` with a dynamic batch dimension and run
    it in onnxruntime at another batch size; returns (onnxruntime output, eager output)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(shape)
    batch = torch.export.Dim("batch", min=1)
    with normlab.use_kernels(kernels), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(layer, (x,), dynamo=True, dynamic_shapes=({0: batch},))
    path = tmp_path / "layer.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn((shape[0] + 3, *shape[1:])) * 2 + 0.5
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad(), normlab.use_kernels(kernels):
        want = layer(x2)
    return torch.from_numpy(got), want


def _trained_eval_layer(name: str) -> torch.nn.Module:
    layer = _layer(name)
    with torch.no_grad():  # running estimates away from their initial values
        for _ in range(2):
            layer(torch.randn(16, C, 3, 3) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize(
    "name, shape", [("mode k=3", SHAPES["NCHW"]), ("mgn gated k=2", SHAPES["NC"])]
)
def test_onnx_round_trip_at_a_new_batch_size(name, shape, tmp_path):
    got, want = _export_and_run(_trained_eval_layer(name), shape, True, tmp_path)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", LAYERS)
def test_onnx_round_trip_every_layer_and_path(name, shape, kernels, tmp_path):
    got, want = _export_and_run(_trained_eval_layer(name), shape, kernels, tmp_path)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
