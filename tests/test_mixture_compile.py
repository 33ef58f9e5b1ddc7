"""MixtureNorm under ``torch.compile(fullgraph=True)``, on empty batches and exported to ONNX.

Oracle: the same layer run eagerly from the same RNG state (the k-means++ draws and the
sub-sample are random), with the same parameters, inputs and output gradients: outputs, input
and parameter gradients and every buffer (the fit queue, the diagnostics, the warm seed) after
each of three training steps with SGD updates and two eval steps, with the hand-written kernels
and with the plain references (``normlab.use_kernels(False)``). ``fullgraph=True`` fails on any
graph break, so the queue updates are part of the one graph; dynamo's ``error_on_recompile``
fails on a recompile after the first step of each mode (``init="warm"`` seeds its first batch by
k-means++ and every later one from the warm seed: one graph each). The ``aot_eager`` backend
traces forward and backward as inductor does without generating code (fast); the inductor runs
(``fallback_random``: inductor's own random numbers differ from eager's) are ``slow``. ONNX:
the eval-mode layer exported with a dynamic batch dimension, run by onnxruntime at other batch
sizes, against eager.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import normlab
from normlab.nn import mixture as mx

C = 8
TOL = 1e-4
# every option: the warm seed with a sub-sampled fit and the literal Eq. 38, the fused ReLU,
# hard k-means posteriors, K = 1 (batch normalization)
CONFIGS = {
    "default": {},
    "warm-subsample-literal": {"init": "warm", "sample_fraction": 0.5, "inference": "literal"},
    "relu": {"activation": "relu", "em_iters": 3},
    "hard-k4": {"k": 4, "em_iters": 0},
    "k1": {"k": 1},
}
SHAPES = {"NC": (48, C), "NCHW": (4, C, 3, 3)}


def _modes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Points of four well-separated modes, the same in every batch (well-conditioned fits:
    float32 rounding does not flip an assignment), in the layout of ``shape``."""
    m = shape[0] * (1 if len(shape) == 2 else shape[2] * shape[3])
    centres = torch.randn(4, C, generator=torch.Generator().manual_seed(0)) * 4.0
    pts = centres[torch.arange(m) % 4] + torch.randn(m, C, generator=gen)
    if len(shape) == 2:
        return pts
    n, _, h, w = shape
    return pts.reshape(n, h, w, C).permute(0, 3, 1, 2).contiguous()


def _layer(config: str) -> mx.MixtureNorm:
    torch.manual_seed(0)
    layer = mx.MixtureNorm(C, queue_size=4, **CONFIGS[config])
    with torch.no_grad():  # a non-trivial affine
        if layer.weight is not None:
            layer.weight.add_(0.3 * torch.randn(C))
            layer.bias.add_(0.3 * torch.randn(C))
    return layer


def _step(layer: torch.nn.Module, fn, x: torch.Tensor, gy: torch.Tensor, seed: int) -> dict:
    """Forward from RNG state ``seed``, backward, an SGD update; everything that came out."""
    torch.manual_seed(seed)
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


def _compiled_equals_eager(config: str, shape: tuple[int, ...], kernels: bool, backend: str):
    torch._dynamo.reset()
    counters.clear()
    eager = _layer(config)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    warm = eager.init == "warm"
    may_compile = {0, 3} | ({1} if warm else set())
    gen = torch.Generator().manual_seed(1)
    with normlab.use_kernels(kernels), torch._inductor.config.patch(fallback_random=True):
        for step, training in enumerate([True, True, True, False, False]):
            eager.train(training)
            twin.train(training)
            x = _modes(shape, gen)
            gy = torch.randn(shape, generator=gen)
            want = _step(eager, eager, x, gy, seed=10 + step)
            with torch._dynamo.config.patch(error_on_recompile=step not in may_compile):
                got = _step(twin, compiled, x, gy, seed=10 + step)
            assert got.keys() == want.keys()
            for key, ref in want.items():
                torch.testing.assert_close(
                    got[key], ref, rtol=TOL, atol=TOL, msg=lambda m, k=key, s=step: f"{s} {k}: {m}"
                )
    assert eager.num_batches_tracked == 3
    assert counters["stats"]["unique_graphs"] == (3 if warm else 2)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_kernels_equal_eager_without_recompiles(config, shape):
    _compiled_equals_eager(config, shape, kernels=True, backend="aot_eager")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_compiled_reference_equals_eager_without_recompiles(shape):
    _compiled_equals_eager("default", shape, kernels=False, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "default"])
def test_compiled_reference_every_option(config, shape):
    _compiled_equals_eager(config, shape, kernels=False, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("config", CONFIGS)
def test_inductor_equals_eager_without_recompiles(config, shape, kernels):
    _compiled_equals_eager(config, shape, kernels=kernels, backend="inductor")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_cpu_kernel_runs_the_blocked_operators(backend, monkeypatch):
    """Compiled on CPU, the kernel calls its blocked passes as opaque operators (forward
    transform, backward sums, input gradient): with a block size that splits the batch, each
    compiled training step runs them as an eager step does (three blocked loops), and compiled
    still equals eager, in one graph, without recompiles."""
    from normlab.nn._kernels import mixture as kx

    monkeypatch.setattr(kx, "_BLOCK_BYTES", 64)  # (4, 8, 3, 3) float32: one-sample blocks
    loops = []
    plain_blocks = kx._blocks

    def counted(n, per_sample):
        out = plain_blocks(n, per_sample)
        loops.append(len(out))
        return out

    monkeypatch.setattr(kx, "_blocks", counted)
    _compiled_equals_eager("default", SHAPES["NCHW"], kernels=True, backend=backend)
    assert loops == [4] * 18  # 3 eager + 3 compiled training steps, 3 blocked loops each


def test_kernel_is_traced_without_graph_breaks_and_once_differentiable():
    """The kernel's autograd Function is captured whole (no "unsafe side effect" of a
    higher-order op) and names its limit: a second derivative through it raises, while the
    plain reference is twice differentiable (gradgradcheck in float64, posteriors fixed)."""
    torch._dynamo.reset()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    nu = torch.softmax(torch.randn(6, 2, 4, dtype=torch.float64), 1)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    explained = torch._dynamo.explain(lambda t: mx.mixture_norm(t, nu, w))(x.requires_grad_())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    (gx,) = torch.autograd.grad(mx.mixture_norm(x, nu, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
    with normlab.use_kernels(False):
        for act in (None, "relu"):
            fn = lambda t, a=act: mx.mixture_norm(t, nu, w, eps=1e-2, activation=a)  # noqa: E731
            assert torch.autograd.gradgradcheck(fn, (x,))


# --------------------------------------------------------------------------------------------
# Empty batches (the module's own tests are in test_mixture.py)


@pytest.mark.parametrize("shape", [(0, C), (0, C, 3, 3)], ids=["NC", "NCHW"])
def test_compiled_empty_batch(shape):
    """An empty training batch in the compiled layer: an empty output, zero affine gradients,
    no fit queued."""
    torch._dynamo.reset()
    layer = _layer("default")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(shape, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(C))
    assert layer.num_batches_tracked == 0 and not layer.queue_valid.any()


# --------------------------------------------------------------------------------------------
# ONNX


def _trained_eval_layer(config: str) -> mx.MixtureNorm:
    layer = _layer(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # three fits queued (of a queue of four: one slot still empty)
        for _ in range(3):
            layer(_modes(SHAPES["NCHW"], gen))
    return layer.eval()


def _export_and_run(layer: torch.nn.Module, shape: tuple[int, ...], kernels: bool, tmp_path):
    """Export ``layer`` (eval) at batch size ``shape[0]`` with a dynamic batch dimension and run
    it in onnxruntime at batch sizes 1 and ``shape[0] + 3``; yields (onnxruntime, eager)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gen = torch.Generator().manual_seed(3)
    batch = torch.export.Dim("batch", min=1)
    with normlab.use_kernels(kernels), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            layer, (_modes(shape, gen),), dynamo=True, dynamic_shapes=({0: batch},)
        )
    path = tmp_path / "mixture.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, shape[0] + 3):
        x = _modes((n, *shape[1:]), gen) * 1.5 + 0.5
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad(), normlab.use_kernels(kernels):
            want = layer(x)
        yield torch.from_numpy(got), want


@pytest.mark.parametrize(
    "config, shape",
    [("default", SHAPES["NCHW"]), ("warm-subsample-literal", SHAPES["NC"])],
    ids=["default-NCHW", "literal-NC"],
)
def test_onnx_round_trip_at_new_batch_sizes(config, shape, tmp_path):
    for got, want in _export_and_run(_trained_eval_layer(config), shape, True, tmp_path):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("config", CONFIGS)
def test_onnx_round_trip_every_option_and_path(config, shape, kernels, tmp_path):
    for got, want in _export_and_run(_trained_eval_layer(config), shape, kernels, tmp_path):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_onnx_round_trip_of_a_fresh_layer(tmp_path):
    """Before any training step the eval layer is a fresh BatchNorm's eval: so is its export."""
    layer = _layer("default").eval()
    for got, want in _export_and_run(layer, SHAPES["NCHW"], True, tmp_path):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
