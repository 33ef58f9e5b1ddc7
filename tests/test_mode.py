"""Tests for Mode Normalization and Mode Group Normalization (Deecke et al., Sec. 3.2–3.3, Alg. 1–3, Eq. 2–5).

Oracles: torch's own F.batch_norm / F.group_norm for the K = 1 and collapsed-gate reductions,
hand-computed two-sample examples, loop-based numpy re-statements of the paper's formulas, and
torch.autograd.gradcheck / gradgradcheck in float64. The hand-written kernels
(normlab.nn._kernels.mode) are checked against the plain-autograd reference that
normlab.use_kernels(False) selects, and the reference on its own against the numpy oracles.
"""

from __future__ import annotations

import copy
import math
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab import ModeGroupNorm, ModeNorm, make_norm
from normlab.nn import stats
from test_kernels import _kernel_nodes  # the kernel Functions in a graph

# --------------------------------------------------------------------------------------------
# numpy oracles: the paper's formulas written out with explicit loops over samples and modes


def _np_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _np_flat(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy()
    return a.reshape(a.shape[0], a.shape[1], -1)


def np_mode_norm_train(x, gw, gb, alpha, beta, eps):
    """Alg. 1 / Eq. 2–3 with loops; returns output (N, C, L), batch ⟨x⟩_k and ⟨x²⟩_k (K, C)."""
    xs = _np_flat(x)
    n, c, _ = xs.shape
    k = gw.shape[0]
    phi = xs.mean(2)  # (N, C)
    g = _np_softmax(phi @ gw.T + gb, axis=1)  # (N, K)
    mu = np.zeros((k, c))
    var = np.zeros((k, c))
    sq = np.zeros((k, c))
    for j in range(k):
        nk = sum(g[i, j] for i in range(n))
        mu[j] = sum(g[i, j] * xs[i].mean(1) for i in range(n)) / nk
        var[j] = sum(g[i, j] * ((xs[i] - mu[j][:, None]) ** 2).mean(1) for i in range(n)) / nk
        sq[j] = sum(g[i, j] * (xs[i] ** 2).mean(1) for i in range(n)) / nk
    y = np.zeros_like(xs)
    for i in range(n):
        for j in range(k):
            y[i] += g[i, j] * (xs[i] - mu[j][:, None]) / np.sqrt(var[j][:, None] + eps)
    y = alpha[None, :, None] * y + beta[None, :, None]
    return y, mu, sq


def np_mode_norm_eval(x, gw, gb, alpha, beta, eps, run_mean, run_sq):
    """Alg. 2: running estimates, gates from the input."""
    xs = _np_flat(x)
    n, _, _ = xs.shape
    k = gw.shape[0]
    g = _np_softmax(xs.mean(2) @ gw.T + gb, axis=1)
    y = np.zeros_like(xs)
    for i in range(n):
        for j in range(k):
            var = run_sq[j] - run_mean[j] ** 2
            y[i] += g[i, j] * (xs[i] - run_mean[j][:, None]) / np.sqrt(var[:, None] + eps)
    return alpha[None, :, None] * y + beta[None, :, None]


def np_mode_group_norm(x, w, b, alpha, beta, eps, combine):
    """Sec. 3.3 / Eq. 5 per sample, channel gates g_ck = softmax_k(w_k ⟨x_c⟩ + b_k)."""
    xs = _np_flat(x)
    n = xs.shape[0]
    k = w.shape[0]
    y = np.zeros_like(xs)
    for i in range(n):
        m = xs[i].mean(1)  # (C,)
        g = _np_softmax(m[:, None] * w[None, :] + b[None, :], axis=1)  # (C, K)
        for j in range(k):
            ck = g[:, j].sum()
            mu = (g[:, j] * m).sum() / ck
            var = (g[:, j] * ((xs[i] - mu) ** 2).mean(1)).sum() / ck
            z = (xs[i] - mu) / np.sqrt(var + eps)
            y[i] += z / k if combine == "mean" else g[:, j][:, None] * z
    return alpha[None, :, None] * y + beta[None, :, None]


def _randomize(layer: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# --------------------------------------------------------------------------------------------
# ModeNorm


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (7, 5), (5, 3, 8)])
def test_k1_equals_batch_norm_train(shape):
    torch.manual_seed(0)
    c = shape[1]
    layer = ModeNorm(c, k=1)
    _randomize(layer)
    x = torch.randn(shape) * 3 + 1.5
    g = torch.randn(shape)
    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    y1.backward(g)
    x2 = x.clone().requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    y2 = F.batch_norm(x2, rm, rv, layer.weight.detach(), layer.bias.detach(), True, 0.1, 1e-5)
    y2.backward(g)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=1e-4)
    # running ⟨x⟩ is BN's running mean; ⟨x²⟩ − ⟨x⟩² relates to the biased batch variance
    torch.testing.assert_close(layer.running_mean[0], rm, atol=1e-6, rtol=1e-5)
    dims = [0, *range(2, x.dim())]
    bvar = x.var(dim=dims, unbiased=False)
    bmean = x.mean(dim=dims)
    torch.testing.assert_close(
        layer.running_sqmean[0], 0.9 + 0.1 * (bvar + bmean**2), rtol=1e-5, atol=1e-5
    )


def test_k1_large_mean_is_accurate():
    """Statistics stay accurate in float32 when |mean| ≫ std (centred sums, no cancellation)."""
    torch.manual_seed(1)
    x = torch.randn(16, 4, 4, 4) + 1000.0
    layer = ModeNorm(4, k=1)
    y = layer(x)
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, ref, atol=2e-3, rtol=0)


def _hand_layer() -> ModeNorm:
    """C = 1, K = 2, gate logits ±a⟨x⟩ with a = ln 3 / 4, so ⟨x⟩ = ±2 gives gates (3/4, 1/4)
    and ⟨x⟩ = ±4 gives (9/10, 1/10)."""
    layer = ModeNorm(1, k=2, momentum=0.1, eps=1e-5)
    a = math.log(3.0) / 4
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[a], [-a]]))
        layer.gate.bias.zero_()
    return layer


def test_hand_computed_training_and_running_estimates():
    layer = _hand_layer()
    # batch 1: sample 1 = [1, 3] (mean 2), sample 2 = [-1, -3] (mean -2); gates (3/4,1/4), (1/4,3/4)
    x1 = torch.tensor([[[[1.0, 3.0]]], [[[-1.0, -3.0]]]])
    torch.testing.assert_close(
        layer.gates(x1), torch.tensor([[0.75, 0.25], [0.25, 0.75]]), atol=1e-6, rtol=0
    )
    y = layer(x1)
    # N_k = 1; μ_1 = 3/4·2 + 1/4·(−2) = 1, μ_2 = −1;
    # σ²_1 = 3/4·((0² + 2²)/2) + 1/4·((2² + 4²)/2) = 1.5 + 2.5 = 4 = σ²_2
    s = 1 / math.sqrt(4 + 1e-5)
    # y(x) = 3/4 (x − 1) s + 1/4 (x + 1) s for sample 1; 1/4 (x − 1) s + 3/4 (x + 1) s for sample 2
    expected = torch.tensor([[[[0.5 * s, 2.5 * s]]], [[[-0.5 * s, -2.5 * s]]]])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    # running: ⟨x⟩ = 0.1·(±1) ; ⟨x²⟩ = 0.9·1 + 0.1·(σ² + μ²) = 0.9 + 0.5 = 1.4
    torch.testing.assert_close(layer.running_mean, torch.tensor([[0.1], [-0.1]]))
    torch.testing.assert_close(layer.running_sqmean, torch.tensor([[1.4], [1.4]]))
    # batch 2 = 2 × batch 1: gates (9/10, 1/10) and (1/10, 9/10); μ_1 = 0.9·4 − 0.1·4 = 3.2,
    # ⟨x²⟩_1 = 0.9·(4 + 36)/2 + 0.1·(4 + 36)/2 = 20
    layer(2 * x1)
    torch.testing.assert_close(layer.running_mean, torch.tensor([[0.41], [-0.41]]))  # .09+.32
    torch.testing.assert_close(layer.running_sqmean, torch.tensor([[3.26], [3.26]]))  # 1.26+2
    # eval (Alg. 2): μ_k = ±0.41, σ²_k = 3.26 − 0.41², gates from the input
    layer.eval()
    x3 = torch.tensor([[[[0.5, 2.5]]], [[[-1.0, -3.0]]], [[[2.0, 2.0]]]])
    y3 = layer(x3)
    gw = layer.gate.weight.detach().double().numpy()
    ref = np_mode_norm_eval(
        x3, gw, np.zeros(2), np.ones(1), np.zeros(1), 1e-5,
        np.array([[0.41], [-0.41]]), np.array([[3.26], [3.26]]),
    )  # fmt: skip
    np.testing.assert_allclose(_np(y3).reshape(ref.shape), ref, atol=1e-5)
    # spot-check one value fully by hand: sample 2 (mean −2 → gates 1/4, 3/4), x = −1
    v = 3.26 - 0.41**2
    by_hand = (0.25 * (-1 - 0.41) + 0.75 * (-1 + 0.41)) / math.sqrt(v + 1e-5)
    assert abs(y3[1, 0, 0, 0].item() - by_hand) < 1e-5


@pytest.mark.parametrize("shape", [(9, 4, 3, 2), (9, 4)])
@pytest.mark.parametrize("k", [2, 3])
def test_mode_norm_matches_numpy_reference(shape, k):
    torch.manual_seed(3)
    c = shape[1]
    layer = ModeNorm(c, k=k, momentum=0.3)
    _randomize(layer, seed=k)
    x = torch.randn(shape) + torch.linspace(-2, 2, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    gw, gb = _np(layer.gate.weight), _np(layer.gate.bias)
    alpha, beta = _np(layer.weight), _np(layer.bias)
    y = layer(x)
    ref, mu, sq = np_mode_norm_train(x, gw, gb, alpha, beta, 1e-5)
    np.testing.assert_allclose(_np(y).reshape(ref.shape), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(_np(layer.running_mean), 0.3 * mu, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(_np(layer.running_sqmean), 0.7 + 0.3 * sq, atol=1e-5, rtol=1e-5)
    layer.eval()
    x2 = torch.randn(shape)
    ref2 = np_mode_norm_eval(
        x2, gw, gb, alpha, beta, 1e-5, _np(layer.running_mean), _np(layer.running_sqmean)
    )
    np.testing.assert_allclose(_np(layer(x2)).reshape(ref2.shape), ref2, atol=2e-5, rtol=1e-4)


def test_gates_receive_gradients_and_learn():
    torch.manual_seed(4)
    # bimodal batch: half the samples shifted by +3, half by −3 on every channel
    x = torch.randn(32, 6, 4, 4)
    x[:16] += 3.0
    x[16:] -= 3.0
    target = torch.randn_like(x)
    layer = ModeNorm(6, k=2)
    w0 = layer.gate.weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        assert layer.gate.weight.grad is not None
        assert layer.gate.weight.grad.abs().sum() > 0
        assert layer.gate.bias.grad.abs().sum() > 0
        opt.step()
    assert (layer.gate.weight - w0).abs().max() > 1e-4


def test_gate_gradient_matches_finite_difference_float32_path():
    """The fused backward's gate gradient equals a central finite difference (float64)."""
    torch.manual_seed(5)
    layer = ModeNorm(3, k=2).double()
    _randomize(layer, seed=5)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    g = torch.randn_like(x)
    (layer(x) * g).sum().backward()
    analytic = layer.gate.weight.grad[1, 2].item()
    h = 1e-6
    with torch.no_grad():
        layer.gate.weight[1, 2] += h
        up = (layer(x) * g).sum().item()
        layer.gate.weight[1, 2] -= 2 * h
        down = (layer(x) * g).sum().item()
    assert abs((up - down) / (2 * h) - analytic) < 1e-6 * max(1.0, abs(analytic))


def test_collapsed_gates_equal_batch_norm_and_dead_mode_keeps_running_stats():
    torch.manual_seed(6)
    layer = ModeNorm(4, k=2)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([100.0, -100.0]))  # mode 2 gets exactly 0 in float32
    x = (torch.randn(8, 4, 3, 3) * 2).requires_grad_()
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.gate.weight.grad).all()
    ref = F.batch_norm(x.detach(), None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean[1], torch.zeros(4))  # dead mode untouched
    torch.testing.assert_close(layer.running_sqmean[1], torch.ones(4))
    assert layer.running_mean[0].abs().sum() > 0  # live mode updated
    layer.eval()
    assert torch.isfinite(layer(x.detach())).all()


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 3, 3), (5, 4, 1, 1), (6, 4, 2, 2)])
def test_degenerate_batches_stay_finite(shape):
    layer = ModeNorm(4, k=3)
    x = torch.full(shape, 2.5, requires_grad=True)  # zero variance everywhere
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_sqmean).all()


def test_huge_gate_logits_stay_finite():
    """Gates saturated to 0/1 per sample (one-hot assignment) and a mode with no samples."""
    layer = ModeNorm(3, k=3)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1e4, 0, 0], [-1e4, 0, 0], [0, 0, 0]]))
        layer.gate.bias.copy_(torch.tensor([0.0, 0.0, -1e4]))
    x = torch.randn(10, 3, 2, 2, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(layer.running_sqmean[2], torch.ones(3))


def test_eval_uses_running_stats_and_state_dict_round_trip():
    torch.manual_seed(7)
    layer = ModeNorm(5, k=2)
    for _ in range(3):
        layer(torch.randn(8, 5, 3, 3) * 2 + 1)
    layer.eval()
    x = torch.randn(4, 5, 3, 3)
    y = layer(x)
    # eval is per-sample: one sample at a time gives the same output
    torch.testing.assert_close(layer(x[:1]), y[:1])
    other = ModeNorm(5, k=2)
    other.load_state_dict(layer.state_dict())
    other.eval()
    torch.testing.assert_close(other(x), y)
    assert set(layer.state_dict()) == {
        "gate.weight", "gate.bias", "weight", "bias", "running_mean", "running_sqmean"
    }  # fmt: skip
    torch.testing.assert_close(layer.running_var, layer.running_sqmean - layer.running_mean**2)


def test_no_grad_path_matches_autograd_path():
    torch.manual_seed(8)
    x = torch.randn(6, 4, 3, 2)
    for layer in (ModeNorm(4, k=2), ModeGroupNorm(4), ModeGroupNorm(4, combine="gated")):
        _randomize(layer, seed=8)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        y1 = layer(x.clone().requires_grad_())
        layer.load_state_dict(state)
        with torch.no_grad():
            y2 = layer(x)
        torch.testing.assert_close(y1.detach(), y2)


def test_non_contiguous_input():
    torch.manual_seed(9)
    x = torch.randn(4, 6, 5, 5)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    for make in (lambda: ModeNorm(6, k=2), lambda: ModeGroupNorm(6, combine="gated")):
        torch.manual_seed(0)
        a = make()
        torch.manual_seed(0)
        b = make()
        ya = a(x)
        yb = b(xc)
        torch.testing.assert_close(ya, yb)
        yb.sum().backward()
        assert xc.grad is not None and torch.isfinite(xc.grad).all()


def test_autocast_bfloat16_statistics_in_float32():
    torch.manual_seed(10)
    x = torch.randn(8, 4, 4, 4) * 2 + 1
    for layer in (ModeNorm(4, k=2), ModeGroupNorm(4)):
        ref = layer(x).detach()
        if isinstance(layer, ModeNorm):
            layer.reset_running_stats()
        xb = x.to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
        y.float().sum().backward()
        assert xb.grad is not None and torch.isfinite(xb.grad.float()).all()
        if isinstance(layer, ModeNorm):
            assert layer.running_mean.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# ModeGroupNorm


@pytest.mark.parametrize("combine", ["mean", "gated"])
@pytest.mark.parametrize("shape", [(1, 6, 3, 4), (4, 6, 3, 4), (3, 6)])
@pytest.mark.parametrize("k", [2, 3])
def test_mgn_matches_numpy_and_train_equals_eval(combine, shape, k):
    torch.manual_seed(11)
    layer = ModeGroupNorm(6, k=k, combine=combine)
    _randomize(layer, seed=k)
    x = torch.randn(shape) * torch.linspace(0.5, 3, 6).reshape(1, 6, *([1] * (len(shape) - 2)))
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    ref = np_mode_group_norm(
        x,
        _np(layer.gate.weight)[:, 0],
        _np(layer.gate.bias),
        _np(layer.weight),
        _np(layer.bias),
        1e-5,
        combine,
    )
    np.testing.assert_allclose(_np(y_train).reshape(ref.shape), ref, atol=3e-5, rtol=1e-4)


def test_mgn_readings_differ_and_default_is_eq5_as_printed():
    torch.manual_seed(12)
    x = torch.randn(2, 8, 3, 3) * torch.linspace(0.2, 4, 8).reshape(1, 8, 1, 1)
    mean_layer = ModeGroupNorm(8, k=2)
    assert mean_layer.combine == "mean"
    _randomize(mean_layer, seed=1)
    gated = ModeGroupNorm(8, k=2, combine="gated")
    gated.load_state_dict(mean_layer.state_dict())
    assert (mean_layer(x) - gated(x)).abs().max() > 1e-3


@pytest.mark.parametrize("combine", ["mean", "gated"])
def test_mgn_k1_and_collapsed_gates_equal_layer_norm(combine):
    torch.manual_seed(13)
    x = torch.randn(3, 6, 4, 4) * 2 + 0.5
    ref = F.group_norm(x, 1, eps=1e-5)
    torch.testing.assert_close(ModeGroupNorm(6, k=1, combine=combine)(x), ref, atol=1e-5, rtol=1e-5)
    layer = ModeGroupNorm(6, k=2, combine=combine)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([100.0, -100.0]))  # mode 2 has zero weight
    xr = x.clone().requires_grad_()
    y = layer(xr)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(xr.grad).all() and torch.isfinite(layer.gate.weight.grad).all()
    if combine == "gated":  # all weight on mode 1: exactly layer normalization
        torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)


def test_mgn_constant_input_and_single_channel_finite():
    for x in (torch.full((2, 4, 3, 3), -1.5), torch.randn(3, 1, 2, 2), torch.randn(1, 1)):
        for combine in ("mean", "gated"):
            layer = ModeGroupNorm(x.shape[1], k=2, combine=combine)
            xr = x.clone().requires_grad_()
            y = layer(xr)
            y.sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all()


# --------------------------------------------------------------------------------------------
# gradients


def _gradcheck_layer(layer, x):
    params = [p for p in layer.parameters()]

    def f(x, *ps):
        return layer(x)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 3, 2, 2), (4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_mode_norm(shape, training):
    torch.manual_seed(14)
    layer = ModeNorm(3, k=2).double()
    _randomize(layer, seed=14)
    with torch.no_grad():
        layer.running_sqmean.add_(1.0)
    layer.train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    _gradcheck_layer(layer, x)


@pytest.mark.parametrize("shape", [(2, 4, 2, 2), (2, 4), (1, 4, 3)])
@pytest.mark.parametrize("combine", ["mean", "gated"])
def test_gradcheck_mode_group_norm(shape, combine):
    torch.manual_seed(15)
    layer = ModeGroupNorm(4, k=3, combine=combine).double()
    _randomize(layer, seed=15)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    _gradcheck_layer(layer, x)


def test_gradients_only_to_parameters():
    """Input that does not require grad: parameters still get the right gradients."""
    torch.manual_seed(16)
    layer = ModeNorm(3, k=2).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    g1 = layer.gate.weight.grad.clone()
    layer.zero_grad()
    layer.reset_running_stats()
    layer(x.clone().requires_grad_()).pow(2).sum().backward()
    torch.testing.assert_close(layer.gate.weight.grad, g1)


# --------------------------------------------------------------------------------------------
# configuration, errors, registry


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"k": 2.5},
        {"k": True},
        {"momentum": 1.5},
        {"momentum": -0.1},
        {"eps": 0},
        {"eps": -1e-5},
        {"affine": "yes"},
    ],
)
def test_mode_norm_bad_config(kwargs):
    with pytest.raises(ValueError, match="ModeNorm"):
        ModeNorm(4, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"k": 0}, {"k": "2"}, {"eps": 0.0}, {"combine": "sum"}, {"affine": 1}]
)
def test_mode_group_norm_bad_config(kwargs):
    with pytest.raises(ValueError, match="ModeGroupNorm"):
        ModeGroupNorm(4, **kwargs)


@pytest.mark.parametrize("cls", [ModeNorm, ModeGroupNorm])
def test_bad_input(cls):
    with pytest.raises(ValueError):
        cls(0)
    layer = cls(4)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="k"):
        make_norm("mode(k=0)", 4)


def test_functional_eval_without_running_stats_raises():
    x = torch.randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match="running"):
        normlab.mode_norm(x, torch.ones(2, 2), None, None, None, training=False)


@pytest.mark.parametrize("spec", ["mode", "mode(k=4)", "mgn(k=2)", "mgn(k=3, combine=gated)"])
@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 5, 5)])
def test_registry_specs_forward_backward(spec, shape):
    layer = make_norm(spec, 6)
    assert isinstance(layer, ModeNorm | ModeGroupNorm)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())
    layer.eval()
    assert torch.isfinite(layer(x.detach())).all()


def test_repr_and_reset():
    layer = make_norm("mode(k=4)", 6)
    assert layer.k == 4 and layer.gate.weight.shape == (4, 6)
    assert "k=4" in repr(layer) and "momentum=0.1" in repr(layer)
    # initial gate weights are 1/K + 0.01·N(0, 1)
    w = layer.gate.weight.detach()
    assert (w - 0.25).abs().max() < 0.06 and (w - 0.25).abs().max() > 0
    layer(torch.randn(5, 6, 2, 2) + 3)
    layer.reset_running_stats()
    torch.testing.assert_close(layer.running_mean, torch.zeros(4, 6))
    torch.testing.assert_close(layer.running_sqmean, torch.ones(4, 6))
    mgn = make_norm("mgn(k=2, combine=gated)", 6)
    assert mgn.gate.weight.shape == (2, 1) and "combine='gated'" in repr(mgn)
    torch.testing.assert_close(mgn.gate.bias.detach(), torch.zeros(2))
    assert ModeNorm(6, affine=False).weight is None


def test_double_backward_is_refused_clearly():
    layer = ModeNorm(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


# --------------------------------------------------------------------------------------------
# (N, C) input: the hand-written backward of the MLP paths against plain-autograd oracles


def _oracle_mode_norm_2d(x, gw, gb, w, b, eps=1e-5):
    """Eq. 2–3 for (N, C) input written out with autograd (σ²_k about μ_k, no shortcuts)."""
    logits = x @ gw.T + (0.0 if gb is None else gb)
    g = torch.softmax(logits, dim=1)  # (N, K)
    nk = g.sum(0)
    mu = (g.T @ x) / nk[:, None]  # (K, C)
    y = torch.zeros_like(x)
    var = []
    for k in range(gw.shape[0]):
        var_k = (g[:, k : k + 1] * (x - mu[k]) ** 2).sum(0) / nk[k]
        var.append(var_k)
        y = y + g[:, k : k + 1] * (x - mu[k]) / torch.sqrt(var_k + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, mu, torch.stack(var)


def _oracle_mgn_2d(x, gw, gb, w, b, combine, eps=1e-5):
    """Sec. 3.3 / Eq. 5 for (N, C) input: channel gates per sample, written out with autograd."""
    logits = x.unsqueeze(2) * gw.reshape(1, 1, -1) + (0.0 if gb is None else gb)
    g = torch.softmax(logits, dim=2)  # (N, C, K)
    k = gw.shape[0]
    y = torch.zeros_like(x)
    for j in range(k):
        gj = g[:, :, j]
        ck = gj.sum(1, keepdim=True)
        mu = (gj * x).sum(1, keepdim=True) / ck
        var = (gj * (x - mu) ** 2).sum(1, keepdim=True) / ck
        z = (x - mu) / torch.sqrt(var + eps)
        y = y + (z / k if combine == "mean" else gj * z)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("gate_bias", [True, False])
def test_mode_norm_2d_training_matches_autograd_oracle(k, affine, gate_bias):
    gen = torch.Generator().manual_seed(20 + k)
    n, c = 11, 5
    dt = torch.float64
    x = torch.randn(n, c, generator=gen, dtype=dt) * 2 + torch.linspace(-2, 2, n, dtype=dt)[:, None]
    gw = torch.randn(k, c, generator=gen, dtype=dt)
    gb = torch.randn(k, generator=gen, dtype=dt) if gate_bias else None
    w = torch.randn(c, generator=gen, dtype=dt) if affine else None
    b = torch.randn(c, generator=gen, dtype=dt) if affine else None
    gy = torch.randn(n, c, generator=gen, dtype=dt)
    rm, rsq = torch.zeros(k, c, dtype=dt), torch.ones(k, c, dtype=dt)
    ins = _leaves(x, gw, gb, w, b)
    y = normlab.mode_norm(ins[0], ins[1], ins[2], rm, rsq, ins[3], ins[4], True, 0.25, 1e-5)
    y.backward(gy)
    ref_ins = _leaves(x, gw, gb, w, b)
    ref, mu, var = _oracle_mode_norm_2d(*ref_ins)
    ref.backward(gy)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(ins, ref_ins):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm, 0.25 * mu.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rsq, 0.75 + 0.25 * (var + mu**2).detach(), rtol=1e-10, atol=1e-12)
    # only the parameters need gradients: same parameter gradients
    params = _leaves(gw, gb, w, b)
    normlab.mode_norm(x, params[0], params[1], None, None, params[2], params[3]).backward(gy)
    for got, want in zip(params, ref_ins[1:]):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("combine", ["mean", "gated"])
@pytest.mark.parametrize("affine", [True, False])
def test_mgn_2d_matches_autograd_oracle(k, combine, affine):
    gen = torch.Generator().manual_seed(40 + k)
    n, c = 4, 7
    dt = torch.float64
    x = torch.randn(n, c, generator=gen, dtype=dt) * torch.linspace(0.5, 3, c, dtype=dt) + 0.5
    gw = torch.randn(k, 1, generator=gen, dtype=dt)
    gb = torch.randn(k, generator=gen, dtype=dt) if k != 2 else None  # K = 2 both ways below
    w = torch.randn(c, generator=gen, dtype=dt) if affine else None
    b = torch.randn(c, generator=gen, dtype=dt) if affine else None
    gy = torch.randn(n, c, generator=gen, dtype=dt)
    for bias in [gb] if k != 2 else [None, torch.tensor([0.3, -0.4], dtype=dt)]:
        ins = _leaves(x, gw, bias, w, b)
        y = normlab.mode_group_norm(*ins, eps=1e-5, combine=combine)
        y.backward(gy)
        ref_ins = _leaves(x, gw, bias, w, b)
        ref = _oracle_mgn_2d(*ref_ins, combine)
        ref.backward(gy)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(ins, ref_ins):
            if want is not None:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("layer_fn", [
    lambda: ModeNorm(4, k=3),
    lambda: ModeGroupNorm(4, k=2),
    lambda: ModeGroupNorm(4, k=3, combine="gated"),
])  # fmt: skip
def test_2d_double_backward_matches_plain_autograd(layer_fn):
    """(N, C) input stays twice differentiable (the backward replays plain autograd)."""
    torch.manual_seed(17)
    layer = layer_fn().double()
    _randomize(layer, seed=17)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(gx.pow(2).sum(), x)
    w, gb, a, b = (layer.gate.weight, layer.gate.bias, layer.weight, layer.bias)
    if isinstance(layer, ModeNorm):
        ref_fn = lambda t: _oracle_mode_norm_2d(t, w, gb, a, b)[0]  # noqa: E731
    else:
        ref_fn = lambda t: _oracle_mgn_2d(t, w, gb, a, b, layer.combine)  # noqa: E731
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref_fn(xr).pow(2).sum(), xr, create_graph=True)
    (hr,) = torch.autograd.grad(gr.pow(2).sum(), xr)
    torch.testing.assert_close(gx, gr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hvp, hr, rtol=1e-8, atol=1e-8)


def test_mode_norm_2d_collapsed_gates_equal_batch_norm_and_dead_mode_keeps_running_stats():
    torch.manual_seed(18)
    layer = ModeNorm(4, k=2)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([100.0, -100.0]))  # mode 2 gets exactly 0
    x = (torch.randn(16, 4) * 2 + 1).requires_grad_()
    g = torch.randn(16, 4)
    y = layer(x)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    ref = F.batch_norm(x2, None, None, training=True, eps=1e-5)
    ref.backward(g)
    torch.testing.assert_close(y.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(layer.running_mean[1], torch.zeros(4))
    torch.testing.assert_close(layer.running_sqmean[1], torch.ones(4))


@pytest.mark.parametrize("layer_fn", [lambda: ModeNorm(6, k=2), lambda: ModeGroupNorm(6, k=2)])
def test_2d_half_input_float32_statistics(layer_fn):
    torch.manual_seed(19)
    layer = layer_fn()
    x = torch.randn(32, 6) * 2 + 1
    ref = layer(x).detach()
    if isinstance(layer, ModeNorm):
        layer.reset_running_stats()
    xb = x.to(torch.bfloat16).requires_grad_()
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    y.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    assert layer.gate.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# kernels (normlab.nn._kernels.mode) against the plain-autograd reference (use_kernels(False))


def _train_then_eval(layer, x, kernels: bool):
    """One training step's forward/backward, then an eval forward/backward, with the kernels on
    or off: outputs, input and parameter gradients of both, the buffers after the step, and the
    kernel Functions each graph used."""
    layer = copy.deepcopy(layer)
    out = {}
    with normlab.use_kernels(kernels):
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            xr = x.detach().clone().requires_grad_()
            y = layer(xr)
            out[f"{mode} nodes"] = _kernel_nodes(y)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
            y.backward(gy)
            out[f"{mode} y"] = y.detach()
            out[f"{mode} x.grad"] = xr.grad
            for n, p in layer.named_parameters():
                out[f"{mode} {n}.grad"] = p.grad.clone()
                p.grad = None
            if mode == "train":
                out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    return out


_LAYERS = {
    "mode k=1": lambda c: ModeNorm(c, k=1),
    "mode k=3": lambda c: ModeNorm(c, k=3, momentum=0.3),
    "mode k=2 no affine": lambda c: ModeNorm(c, k=2, affine=False),
    "mgn mean k=3": lambda c: ModeGroupNorm(c, k=3),
    "mgn gated k=2": lambda c: ModeGroupNorm(c, k=2, combine="gated"),
    "mgn gated k=3": lambda c: ModeGroupNorm(c, k=3, combine="gated"),
}


@pytest.mark.parametrize("shape", [(10, 5), (6, 5, 3, 4)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_kernels_equal_reference_float64(name, shape):
    """Outputs, input and parameter gradients (train and eval) and the running buffers after a
    step: the kernel path and the plain-autograd reference agree to float64 round-off."""
    torch.manual_seed(21)
    layer = _LAYERS[name](shape[1]).double()
    _randomize(layer, seed=21)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + torch.linspace(
        -1, 1, shape[0], dtype=torch.float64
    ).reshape(-1, *([1] * (len(shape) - 1)))
    ker = _train_then_eval(layer, x, kernels=True)
    ref = _train_then_eval(layer, x, kernels=False)
    assert ker.keys() == ref.keys()
    for key in ker:
        if key.endswith("nodes"):
            continue
        torch.testing.assert_close(ker[key], ref[key], rtol=1e-9, atol=1e-10, msg=key)
    assert not ref["train nodes"] and not ref["eval nodes"]  # the reference runs no kernel
    # the kernel path really ran a kernel (ModeNorm's eval on (N, C) input has none)
    expected = {
        ("mode", 2): ({"_ModeNormTrain2d"}, set()),
        ("mode", 4): ({"_GatedAffine"}, {"_GatedAffine"}),
        ("mgn", 2): ({"_MGNorm2d"}, {"_MGNorm2d"}),
        ("mgn", 4): ({"_GatedAffine"}, {"_GatedAffine"}),
    }[(name.split()[0], len(shape))]
    assert (ker["train nodes"], ker["eval nodes"]) == expected


@pytest.mark.parametrize("shape", [(9, 4, 3, 2), (9, 4)])
@pytest.mark.parametrize("k", [2, 3])
def test_reference_mode_norm_matches_numpy(shape, k):
    """The plain reference on its own against the loop-based numpy statement of Alg. 1–2."""
    torch.manual_seed(22)
    layer = ModeNorm(shape[1], k=k, momentum=0.3).double()
    _randomize(layer, seed=k)
    x = torch.randn(shape, dtype=torch.float64) + torch.linspace(-2, 2, shape[0]).reshape(
        -1, *([1] * (len(shape) - 1))
    )
    gw, gb = _np(layer.gate.weight), _np(layer.gate.bias)
    alpha, beta = _np(layer.weight), _np(layer.bias)
    with normlab.use_kernels(False):
        y = layer(x)
        ref, mu, sq = np_mode_norm_train(x, gw, gb, alpha, beta, 1e-5)
        np.testing.assert_allclose(_np(y).reshape(ref.shape), ref, atol=1e-10, rtol=1e-9)
        np.testing.assert_allclose(_np(layer.running_mean), 0.3 * mu, atol=1e-12, rtol=1e-10)
        np.testing.assert_allclose(_np(layer.running_sqmean), 0.7 + 0.3 * sq, rtol=1e-10)
        layer.eval()
        x2 = torch.randn(shape, dtype=torch.float64)
        ref2 = np_mode_norm_eval(
            x2, gw, gb, alpha, beta, 1e-5, _np(layer.running_mean), _np(layer.running_sqmean)
        )
        np.testing.assert_allclose(_np(layer(x2)).reshape(ref2.shape), ref2, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("combine", ["mean", "gated"])
@pytest.mark.parametrize("shape", [(3, 6, 3, 4), (3, 6)])
def test_reference_mgn_matches_numpy(combine, shape):
    torch.manual_seed(23)
    layer = ModeGroupNorm(6, k=3, combine=combine).double()
    _randomize(layer, seed=3)
    x = torch.randn(shape, dtype=torch.float64) * torch.linspace(
        0.5, 3, 6, dtype=torch.float64
    ).reshape(1, 6, *([1] * (len(shape) - 2)))
    with normlab.use_kernels(False):
        y = layer(x)
    ref = np_mode_group_norm(
        x, _np(layer.gate.weight)[:, 0], _np(layer.gate.bias), _np(layer.weight),
        _np(layer.bias), 1e-5, combine,
    )  # fmt: skip
    np.testing.assert_allclose(_np(y).reshape(ref.shape), ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("layer_fn, training", [
    (lambda: ModeNorm(3, k=2), True),
    (lambda: ModeNorm(3, k=2), False),
    (lambda: ModeGroupNorm(3, k=3), True),
    (lambda: ModeGroupNorm(3, k=2, combine="gated"), True),
], ids=["mode-train", "mode-eval", "mgn-mean", "mgn-gated"])  # fmt: skip
def test_reference_is_twice_differentiable_for_nchw_input(layer_fn, training):
    """With the kernels off, (N, C, *) input supports double backward (plain autograd); checked
    with finite differences of the input gradient (gradgradcheck, float64). (MGN computes the
    same in training and eval.)"""
    torch.manual_seed(24)
    layer = layer_fn().double()
    _randomize(layer, seed=24)
    if isinstance(layer, ModeNorm):
        with torch.no_grad():
            layer.running_sqmean.add_(1.0)
    layer.train(training)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with normlab.use_kernels(False):
        assert torch.autograd.gradgradcheck(layer, (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# empty batches: as torch's BatchNorm (an empty output, statistics untouched, backward works)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3, 4)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("cls", [ModeNorm, ModeGroupNorm])
def test_empty_batch_behaves_like_batch_norm(cls, shape, training, kernels):
    layer = cls(5, k=3)
    _randomize(layer, seed=30)
    bn = torch.nn.BatchNorm2d(5) if len(shape) == 4 else torch.nn.BatchNorm1d(5)
    layer.train(training)
    bn.train(training)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        with normlab.use_kernels(kernels):
            y = layer(x)
        y.float().sum().backward()
        xb = x.detach().float().requires_grad_()
        bn(xb).sum().backward()
        assert y.shape == x.shape and y.dtype == dtype
        assert x.grad.shape == x.shape and x.grad.dtype == dtype
        # torch's BatchNorm gives its affine zero gradients; every parameter here gets zeros too
        torch.testing.assert_close(bn.weight.grad, torch.zeros(5), rtol=0, atol=0)
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=0, msg=n)
        layer.zero_grad(set_to_none=True)
        bn.zero_grad(set_to_none=True)
    for n, b in layer.named_buffers():
        assert torch.equal(b, before[n]), n
    # the next, non-empty batch is normalized as by a layer that never saw the empty one
    fresh = copy.deepcopy(layer)
    x = torch.randn(4, *shape[1:])
    with normlab.use_kernels(kernels):
        torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


_EMPTY_RANK_CASES = {
    f"{name} {'kernels' if kernels else 'reference'}": (shape, kernels)
    for name, shape in [("NC", (6, 4)), ("NCHW", (6, 4, 3, 2))]
    for kernels in (True, False)
}


def _empty_rank_run(shape: tuple[int, ...], kernels: bool, part: slice, synced: bool) -> dict:
    """Two training steps of a float64 ModeNorm on ``x[part]`` (the batch of 6 samples)."""
    layer = ModeNorm(shape[1], k=3).double()
    _randomize(layer, seed=31)
    if synced:
        normlab.sync_stats(layer)
    gen = torch.Generator().manual_seed(32)
    out = {}
    with normlab.use_kernels(kernels):
        for step in range(2):
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
            gy = torch.randn(shape, generator=gen, dtype=torch.float64)
            xr = x[part].clone().requires_grad_()
            y = layer(xr)
            (y * gy[part]).sum().backward()
            out[f"y{step}"], out[f"x.grad{step}"] = y.detach(), xr.grad
    out.update({f"{n}.grad": p.grad.clone() for n, p in layer.named_parameters()})
    out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    return out


def _empty_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    calls = []
    all_reduce_sum = stats.all_reduce_sum

    def counted(tensors, group):
        calls.append(tuple(tuple(t.shape) for t in tensors))
        return all_reduce_sum(tensors, group)

    stats.all_reduce_sum = counted
    try:
        part = slice(0, 6) if rank == 0 else slice(6, 6)  # rank 1 holds no sample
        results = {
            key: _empty_rank_run(*case, part, True) for key, case in _EMPTY_RANK_CASES.items()
        }
        results["calls"] = calls
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_sync_stats_rank_with_an_empty_batch(tmp_path):
    """Under sync_stats a process with no sample joins every collective (the same sequence of
    reductions as the other, forward and backward, so nothing hangs), returns an empty output
    and ends with the global batch's running estimates; the other process matches a single
    process on the whole batch, and the parameter gradients sum to the single process's."""
    torch.multiprocessing.spawn(
        _empty_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["calls"] == ranks[1]["calls"] and len(ranks[0]["calls"]) >= 4 * 2 * 2
    for key, case in _EMPTY_RANK_CASES.items():
        ref = _empty_rank_run(*case, slice(None), False)
        full, empty = ranks[0][key], ranks[1][key]
        for name, want in ref.items():
            if name.startswith(("y", "x.grad")):
                torch.testing.assert_close(full[name], want, rtol=1e-9, atol=1e-11, msg=name)
                assert empty[name].shape == (0, *want.shape[1:]), name
            elif name.startswith("buffer"):
                for res in (full, empty):
                    torch.testing.assert_close(res[name], want, rtol=1e-9, atol=1e-11, msg=name)
            else:  # parameter gradients: the global loss is the sum of the processes' losses
                got = full[name] + empty[name]
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
