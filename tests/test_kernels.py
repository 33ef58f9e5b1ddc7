"""Every hand-written kernel against its plain-autograd reference, on every registered layer.

``normlab.use_kernels(False)`` makes each layer run the functional that reads like its paper, with
autograd doing the backward. With the same input, parameters and RNG state, the kernel path must
give the same outputs, input gradients, parameter gradients and buffer updates, in float64,
float32 and bfloat16, in training and (after one training step) in eval mode, on the device of
``pytest --device`` (both paths on the same device).
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlab
from normlab.nn.registry import make_norm

C = 16
SHAPES = [(12, C), (6, C, 3, 5)]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}
# layers whose hand-written kernels live in normlab.nn._kernels (checked below, so that this
# test cannot pass by comparing one path with itself)
WITH_KERNELS = {"mode", "mgn", "iternorm", "dbn", "mixture"}


def _kernel_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd Functions from ``normlab.nn._kernels`` in ``out``'s graph."""
    seen, stack, found = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls.__module__.startswith("normlab.nn._kernels"):
            found.add(cls.__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _run(layer: torch.nn.Module, x: torch.Tensor, kernels: bool, seed: int, device: torch.device):
    """One training forward/backward on ``device``, then an eval forward; everything that comes
    out."""
    layer = copy.deepcopy(layer).to(device)
    x = x.detach().to(device).clone().requires_grad_(True)
    torch.manual_seed(seed)
    with normlab.use_kernels(kernels):
        layer.train()
        y = layer(x)
        nodes = _kernel_nodes(y)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
        g = g.to(device=y.device, dtype=y.dtype)
        (y.float() * g.float()).sum().backward()
        layer.eval()
        with torch.no_grad():
            y_eval = layer(x.detach())
    grads = {n: p.grad for n, p in layer.named_parameters()}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    return y.detach(), x.grad, grads, buffers, y_eval, nodes


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    a64, b64 = a.double(), b.double()
    scale = max(1.0, b64.abs().max().item())
    err = (a64 - b64).abs().max().item() if a.numel() else 0.0
    assert err <= tol * scale, f"{what}: max |kernel − reference| = {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(normlab.available_norms()))
def test_kernel_equals_reference(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    torch.manual_seed(0)
    layer = make_norm(name, C)
    with torch.no_grad():  # non-trivial affine parameters, so their gradients are checked
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # parameters stay float32 for bfloat16 input, as under autocast; the layers keep float32 stats
    if dtype == torch.float64:
        layer = layer.double()
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    ker = _run(layer, x, True, seed=3, device=device)
    ref = _run(layer, x, False, seed=3, device=device)
    tol = TOL[dtype]
    _close(ker[0], ref[0], tol, "train output")
    _close(ker[1], ref[1], tol, "input gradient")
    for n in ref[2]:
        assert (ker[2][n] is None) == (ref[2][n] is None), n
        if ref[2][n] is not None:
            _close(ker[2][n], ref[2][n], tol, f"gradient of {n}")
    for n in ref[3]:
        _close(ker[3][n], ref[3][n], tol, f"buffer {n}")
    _close(ker[4], ref[4], tol, "eval output")
    assert not ref[5], f"kernels ran although disabled: {ref[5]}"


@pytest.mark.parametrize("name", sorted(WITH_KERNELS))
def test_layers_with_kernels_use_them(name: str, device: torch.device) -> None:
    """The switch really changes the path: with kernels on, a Function from
    ``normlab.nn._kernels`` is in the graph (for at least one input rank); with them off, none."""
    layer = make_norm(name, C).double()
    used = set()
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.float64)
        used |= _run(layer, x, True, seed=0, device=device)[5]
        assert not _run(layer, x, False, seed=0, device=device)[5]
    assert used, f"{name}: no kernel from normlab.nn._kernels ran with kernels enabled"


def test_switch_restores_and_checks_type() -> None:
    assert normlab.nn.kernels_enabled()
    with normlab.use_kernels(False):
        assert not normlab.nn.kernels_enabled()
        with normlab.use_kernels(True):
            assert normlab.nn.kernels_enabled()
        assert not normlab.nn.kernels_enabled()
    assert normlab.nn.kernels_enabled()
    with pytest.raises(TypeError, match="bool"):
        normlab.nn.set_kernels_enabled("no")
