"""Tests for MixtureNorm (Kalayeh & Shah, Sec. 3.2) and its functional core.

Oracles: torch's F.batch_norm (K = 1), numpy implementations of Eq. 34–36 and Eq. 38–39 written
from the paper, torch.autograd.gradcheck in float64, the plain-autograd references against the
kernels of normlab.nn._kernels.mixture (closed-form backward, coefficient form), synthetic data
with known modes, state_dict round trips, a fresh nn.BatchNorm2d.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import nn

import normlab
from normlab.nn import gmm
from normlab.nn import mixture as mx
from normlab.nn._kernels import mixture as kx
from normlab.nn.gmm import GMMParams, e_step, fit_gmm


def _points(t: torch.Tensor) -> np.ndarray:
    """(N, C, *) -> (m, C) numpy, the paper's point matrix."""
    return t.detach().movedim(1, -1).reshape(-1, t.shape[1]).double().numpy()


def _np_mixture_norm(x, nu, eps, gamma=None, beta=None, relu=False):
    """Eq. 34–36 (and the per-component Eq. 40 reading) on point matrices, float64."""
    c = x.shape[1]
    gamma = np.ones(c) if gamma is None else gamma
    beta = np.zeros(c) if beta is None else beta
    lam = nu.mean(0)
    nuh = nu / nu.sum(0, keepdims=True)
    out = np.zeros_like(x)
    for k in range(nu.shape[1]):
        mu = nuh[:, k] @ x
        var = nuh[:, k] @ (x - mu) ** 2
        z = gamma * (x - mu) / np.sqrt(var + eps) / np.sqrt(lam[k]) + beta
        out += nu[:, [k]] * (np.maximum(z, 0) if relu else z)
    return out


def _np_queue_inference(x, qw, qm, qv, valid, zeta, eps, gamma, beta, literal, fit=None):
    """Eq. 38–39 on a point matrix: T·K components; posteriors under the fitted mixtures ``fit`` =
    (weights, means, variances) with prior τ^t λ_k^t (default: the statistics themselves, with
    densities N(μ, σ² + ε)); each component normalizes with its statistics λ, μ, σ²."""
    t_len, k = qw.shape
    fw, fm, fv = (qw, qm, qv + eps) if fit is None else fit
    idx = [t for t in range(t_len) if valid[t]]
    tau = np.array([zeta ** (t_len - 1 - t) for t in idx])
    tau = tau / tau.sum()
    comps = [(tau[i], t, j) for i, t in enumerate(idx) for j in range(k) if fw[t, j] > 0]
    logp = np.stack(
        [
            np.log(ta * fw[t, j])
            - 0.5 * np.sum(np.log(2 * np.pi * fv[t, j]))
            - 0.5 * np.sum((x - fm[t, j]) ** 2 / fv[t, j], 1)
            for ta, t, j in comps
        ],
        1,
    )
    post = np.exp(logp - logsumexp(logp, 1, keepdims=True))
    out = np.zeros_like(x)
    for i, (ta, t, j) in enumerate(comps):
        s = ta * qw[t, j] if literal else qw[t, j]
        out += post[:, [i]] * (x - qm[t, j]) / np.sqrt(qv[t, j] + eps) / np.sqrt(s)
    return gamma * out + beta


def _modes(n_per=(600, 300, 100), c=4, seed=0, dtype=torch.float32):
    """Points of 3 well-separated Gaussian modes as an (N, C) tensor, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * c, [12.0] * c, [-12.0, 12.0] * (c // 2)], dtype=dtype)
    scales = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
    xs, labels = [], []
    for i, n in enumerate(n_per):
        spread = scales[i] * torch.linspace(0.5, 1.5, c, dtype=dtype)
        xs.append(centres[i] + spread * torch.randn(n, c, generator=g, dtype=dtype))
        labels.append(torch.full((n,), i))
    return torch.cat(xs), torch.cat(labels)


# --- K = 1 is batch normalization -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 5), (4, 5, 3, 6), (3, 5, 7)])
def test_k1_reproduces_batch_norm_forward_and_backward(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3 + 2).requires_grad_()
    m = normlab.MixtureNorm(5, k=1)
    with torch.no_grad():
        m.weight.copy_(torch.randn(5))
        m.bias.copy_(torch.randn(5))
    y = m(x)
    x2 = x.detach().clone().requires_grad_()
    w2 = m.weight.detach().clone().requires_grad_()
    b2 = m.bias.detach().clone().requires_grad_()
    ref = F.batch_norm(x2, None, None, w2, b2, training=True, eps=1e-5)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.weight.grad, w2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bias.grad, b2.grad, atol=1e-4, rtol=1e-4)
    assert int(m.last_num_components) == 1
    torch.testing.assert_close(m.last_weight, torch.ones(1))


# --- the transform (Eq. 34-36) -----------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
def test_mixture_norm_matches_numpy_eq_34_36(relu: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64) * 2 + 1
    nu = torch.softmax(torch.randn(4, 4, 5, 2, dtype=torch.float64) * 3, 1)
    gamma = torch.randn(3, dtype=torch.float64)
    beta = torch.randn(3, dtype=torch.float64)
    act = "relu" if relu else None
    y, st = mx.mixture_norm(x, nu, gamma, beta, eps=1e-3, activation=act, return_stats=True)
    ref = _np_mixture_norm(_points(x), _points(nu), 1e-3, gamma.numpy(), beta.numpy(), relu=relu)
    np.testing.assert_allclose(_points(y), ref, atol=1e-10)
    np.testing.assert_allclose(st.weight.numpy(), _points(nu).mean(0), atol=1e-12)


def test_fused_relu_is_eq_40_at_identity_affine_and_relu_of_mn_for_hard_posteriors() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 3, dtype=torch.float64)
    nu = torch.softmax(torch.randn(64, 3, dtype=torch.float64), 1)
    # Eq. 40 literally: Σ_k ν_k/√λ_k · ReLU(x̂ᵏ)
    lam = nu.mean(0)
    nuh = nu / nu.sum(0)
    eq40 = torch.zeros_like(x)
    for k in range(3):
        mu = nuh[:, k] @ x
        var = nuh[:, k] @ (x - mu) ** 2
        eq40 += nu[:, k : k + 1] / lam[k].sqrt() * torch.relu((x - mu) / (var + 1e-5).sqrt())
    torch.testing.assert_close(mx.mixture_norm(x, nu, activation="relu"), eq40)
    # one-hot posteriors: fused == ReLU(unfused), with a non-trivial affine
    hard = F.one_hot(torch.arange(64) % 3, 3).double()
    g, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    fused = mx.mixture_norm(x, hard, g, b, activation="relu")
    torch.testing.assert_close(fused, torch.relu(mx.mixture_norm(x, hard, g, b)))


@pytest.mark.parametrize("shape", [(7, 3), (3, 3, 2, 3)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_with_posteriors_fixed(shape: tuple[int, ...], activation: str | None) -> None:
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    nu_shape = (shape[0], 4, *shape[2:])
    nu = torch.softmax(torch.randn(*nu_shape, dtype=torch.float64) * 2, 1)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return mx.mixture_norm(x, nu, w, b, eps=1e-3, activation=activation)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_closed_form_backward_equals_autograd_reference() -> None:
    """The custom Function (no activation) against the plain-autograd path, float64."""
    torch.manual_seed(4)
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64) * 2 + 3
    nu = torch.softmax(torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2, 1)
    w = torch.randn(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    g = torch.randn_like(x)
    outs = []
    for use_fn in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        xl = mx._layout(xi)
        if use_fn:
            y = mx.mixture_norm(xi, nu, wi, bi)
        else:
            y, _ = mx._normalize_autograd(
                xl, mx._layout(nu), wi, bi, 1e-5, None, xl.detach().mean((0, 2))
            )
            y = y.reshape(x.shape)
        y.backward(g)
        outs.append((y.detach(), xi.grad, wi.grad, bi.grad))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_no_gradient_through_posteriors() -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    nu = torch.softmax(torch.randn(20, 2, dtype=torch.float64), 1).requires_grad_()
    y = mx.mixture_norm(x, nu)
    assert not y.requires_grad


# --- kernels (normlab.nn._kernels.mixture) against the plain-autograd references ----------------

_LAYER_CONFIGS = {
    "default": {},
    "no-affine": {"affine": False},
    "k1": {"k": 1},
    "relu": {"activation": "relu"},
    "em0-literal": {"k": 4, "em_iters": 0, "inference": "literal"},
    "warm-subsample": {"init": "warm", "em_iters": 3, "sample_fraction": 0.5},
}


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the two kernels of normlab.nn._kernels.mixture from now on."""
    calls = {"MixtureNormFn": 0, "mixture_transform_fused": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        kx,
        "mixture_transform_fused",
        counted("mixture_transform_fused", kx.mixture_transform_fused),
    )
    monkeypatch.setattr(
        kx.MixtureNormFn, "apply", staticmethod(counted("MixtureNormFn", kx.MixtureNormFn.apply))
    )
    return calls


def _layer_pass(layer: nn.Module, xs: list[torch.Tensor], kernels: bool, mode: str) -> dict:
    """A forward/backward on each batch of ``xs`` from the same RNG state — all in training, or
    (``mode="eval"``) the last one in eval; the outputs, gradients and buffers of the last one."""
    layer = copy.deepcopy(layer)
    torch.manual_seed(11)
    with normlab.use_kernels(kernels):
        for i, x in enumerate(xs):
            last = i == len(xs) - 1
            layer.train(not (last and mode == "eval"))
            for p in layer.parameters():
                p.grad = None
            xi = x.clone().requires_grad_()
            y = layer(xi)
            g = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)
            (y * g).sum().backward()
    return {
        "output": y.detach(),
        "input grad": xi.grad,
        **{f"grad {n}": p.grad for n, p in layer.named_parameters()},
        **{f"buffer {n}": b.clone() for n, b in layer.named_buffers()},
    }


def _layer_and_batches(
    c: int, kwargs: dict, shape: tuple[int, ...]
) -> tuple[nn.Module, list[torch.Tensor]]:
    """A float64 MixtureNorm with a non-trivial affine and two positive batches of ``shape``."""
    torch.manual_seed(0)
    layer = normlab.MixtureNorm(c, **kwargs).double()
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
            layer.bias.add_(0.3 * torch.randn_like(layer.bias))
    g = torch.Generator().manual_seed(1)
    return layer, [torch.randn(*shape, generator=g, dtype=torch.float64).exp() for _ in range(2)]


def _assert_passes_equal(ker: dict, ref: dict) -> None:
    """Kernel and reference passes of :func:`_layer_pass` agree to float64 rounding."""
    assert ker.keys() == ref.keys()
    for what in ker:
        if ref[what] is None:
            assert ker[what] is None, what
            continue
        assert ref[what].dtype == ker[what].dtype, what
        torch.testing.assert_close(ker[what], ref[what], atol=1e-11, rtol=1e-11, msg=what)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(48, 5), (6, 5, 4, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("config", sorted(_LAYER_CONFIGS))
def test_layer_kernel_equals_reference_float64(
    config: str, shape: tuple[int, ...], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With kernels enabled (default) and with ``normlab.use_kernels(False)`` the layer gives the
    same outputs, input and parameter gradients and buffers: two training steps (the second one
    warm-started for init="warm"), or one and then an eval pass. The switch really changes the
    path where a kernel exists (without the fused activation)."""
    kwargs = _LAYER_CONFIGS[config]
    layer, xs = _layer_and_batches(5, kwargs, shape)
    calls = _count_kernel_calls(monkeypatch)
    ker = _layer_pass(layer, xs, True, mode)
    kernel_calls = dict(calls)
    ref = _layer_pass(layer, xs, False, mode)
    _assert_passes_equal(ker, ref)
    assert calls == kernel_calls  # the reference runs no kernel ...
    expected = {"MixtureNormFn": 2 if mode == "train" else 1, "mixture_transform_fused": 0}
    if mode == "eval":
        expected["mixture_transform_fused"] = 1
    if kwargs.get("activation") is not None:  # ... nor does the fused activation
        expected = dict.fromkeys(expected, 0)
    assert kernel_calls == expected


@pytest.mark.parametrize(
    ("shape", "block_bytes", "blocks"),
    [((6, 5, 4, 3), 2000, 2), ((6, 5, 4, 3), 480, 6), ((8, 32, 32, 32), None, 2)],
    ids=["uneven-blocks", "one-sample-blocks", "default-block-size"],
)
@pytest.mark.parametrize("config", ["default", "no-affine", "k1"])
def test_blocked_cpu_backward_equals_reference_float64(
    config: str,
    shape: tuple[int, ...],
    block_bytes: int | None,
    blocks: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager CPU forward and backward of the training kernel run in blocks of samples once
    the input exceeds a block; blocked, they give the reference's outputs, input and parameter
    gradients and buffers, with the number of blocks the block size implies."""
    if block_bytes is not None:
        monkeypatch.setattr(kx, "_BLOCK_BYTES", block_bytes)
    seen: list[int] = []
    plain_blocks = kx._blocks

    def counted(n: int, per_sample: int) -> list[slice]:
        out = plain_blocks(n, per_sample)
        seen.append(len(out))
        return out

    monkeypatch.setattr(kx, "_blocks", counted)
    layer, xs = _layer_and_batches(shape[1], _LAYER_CONFIGS[config], shape)
    ker = _layer_pass(layer, xs, True, "train")
    assert seen == [blocks] * 6  # two steps: a blocked forward, two blocked loops in backward
    _assert_passes_equal(ker, _layer_pass(layer, xs, False, "train"))


def test_blocked_kernel_only_where_it_helps() -> None:
    """Blocks are for eager CPU passes over (B, C, L) points larger than one block:
    not for (N, C) points, small inputs or non-contiguous gradients."""
    big = torch.zeros(4, 8, kx._BLOCK_BYTES // 16)  # 2 blocks' worth of float32
    assert kx._blocked(big, big)
    assert not kx._blocked(big[:1, :, :1000], big[:1, :, :1000])
    assert not kx._blocked(big.reshape(-1, 8), big.reshape(-1, 8))
    assert not kx._blocked(big, big.transpose(0, 1).contiguous().transpose(0, 1))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(7, 3), (3, 3, 2, 3)])
def test_reference_functionals_gradcheck(shape: tuple[int, ...], activation: str | None) -> None:
    """The plain-autograd references of the transform: gradcheck in float64, with the
    posteriors fixed (training, Eq. 34–36) and with given statistics (inference, Eq. 38)."""
    torch.manual_seed(5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    nu = torch.softmax(torch.randn(shape[0], 4, *shape[2:], dtype=torch.float64) * 2, 1)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.4, 0.3, 0.0, 0.3], dtype=torch.float64)  # one component contributes 0
    stats = (lam, torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64))

    def train(x, w, b):
        return mx.mixture_norm(x, nu, w, b, eps=1e-3, activation=activation)

    def infer(x, w, b):
        return mx.mixture_transform(x, nu, stats, w, b, eps=1e-3, activation=activation)

    with normlab.use_kernels(False):
        assert torch.autograd.gradcheck(train, (x, w, b))
        assert torch.autograd.gradcheck(infer, (x, w, b))


@pytest.mark.parametrize("shape", [(40, 3), (4, 3, 5, 2)])
def test_functional_kernels_equal_references(shape: tuple[int, ...]) -> None:
    """mixture_norm (closed-form backward) and mixture_transform (coefficient form) against
    their references, float64: outputs, statistics and gradients of x, γ, β."""
    torch.manual_seed(6)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    nu = torch.softmax(torch.randn(shape[0], 3, *shape[2:], dtype=torch.float64) * 2, 1)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    stats = (
        torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64),  # a component with weight 0
        torch.randn(3, 3, dtype=torch.float64),
        torch.rand(3, 3, dtype=torch.float64) + 0.1,
    )
    outs = {}
    for kernels in (True, False):
        got = []
        for fn in ("train", "infer"):
            xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
            with normlab.use_kernels(kernels):
                if fn == "train":
                    y, st = mx.mixture_norm(xi, nu, wi, bi, return_stats=True)
                    got += list(st)
                else:
                    y = mx.mixture_transform(xi, nu, stats, wi, bi)
            (y * torch.cos(y.detach())).sum().backward()
            got += [y.detach(), xi.grad, wi.grad, bi.grad]
        outs[kernels] = got
    for a, r in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


# --- the layer in training --------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 3e-3)])
def test_well_separated_modes_are_each_standardized(dtype: torch.dtype, tol: float) -> None:
    """With one-hot posteriors Eq. 34 gives x̂ = (x − μ_k)/(√λ_k √(σ²_k + ε)) on mode k, μ_k and
    σ²_k the mode's own sample statistics: so √λ_k · x̂ has exactly mean 0 and variance
    σ²/(σ² + ε) per channel on each mode (posteriors of modes ≥ 8σ apart in 4-D are one-hot to
    float precision). In float32 the variances come from one-pass sums around the batch mean,
    accurate to ~1e-7·((μ_k − mean)/σ_k)²."""
    x, labels = _modes(dtype=dtype)
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, affine=False).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    lam_true = torch.bincount(labels).to(dtype) / len(labels)
    torch.testing.assert_close(
        m.last_weight.sort().values, lam_true.sort().values, atol=tol, rtol=0
    )
    assert int(m.last_num_components) == 3
    for i in range(3):
        z = y[labels == i] * lam_true[i].sqrt()
        var = x[labels == i].var(0, unbiased=False)
        torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=dtype), atol=tol, rtol=0)
        torch.testing.assert_close(z.var(0, unbiased=False), var / (var + 1e-5), atol=tol, rtol=0)
    # so the output variance is Σ_k λ_k · (1/λ_k) ≈ K (Eq. 34's 1/√λ_k), see docs/methods/mixture.md
    assert abs(y.var(0, unbiased=False).mean().item() - 3.0) < 0.01


def test_modes_in_4d_layout_and_sample_fraction() -> None:
    x2, labels = _modes(n_per=(512, 256, 256))
    x4 = x2.reshape(16, 64, 4).permute(0, 2, 1).reshape(16, 4, 8, 8)  # same points, 4-D
    for frac in (1.0, 0.25):
        torch.manual_seed(0)
        m = normlab.MixtureNorm(4, k=3, affine=False, sample_fraction=frac)
        y4 = m(x4)
        y2 = y4.reshape(16, 4, 64).permute(0, 2, 1).reshape(-1, 4)
        for i in range(3):
            z = y2[labels == i] * math.sqrt((labels == i).float().mean())
            torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
            assert torch.allclose(z.var(0, unbiased=False), torch.ones(4), atol=1e-3)


def test_posteriors_of_the_layer_and_em_iters_variants() -> None:
    x, labels = _modes()
    for em_iters in (0, 1, 2, 3, 5):
        torch.manual_seed(0)
        nu, keep = mx.mixture_posteriors(x, k=3, em_iters=em_iters)
        assert nu.shape == (len(x), 3) and keep.all()
        torch.testing.assert_close(nu.sum(1), torch.ones(len(x)))
        # every mode lands in one component
        for i in range(3):
            assert nu[labels == i].mean(0).max() > 0.999
        if em_iters == 0:  # hard k-means posteriors
            assert torch.all((nu == 0) | (nu == 1))


def _overlapping_blobs(seed: int = 4) -> np.ndarray:
    """Generic data: three overlapping Gaussian blobs in 4-D, where every k-means and EM
    iteration still moves the fit."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            rng.normal(0.0, 1.0, (200, 4)),
            rng.normal(1.5, 0.7, (150, 4)),
            rng.normal(-1.5, 1.3, (100, 4)) * np.linspace(0.5, 1.5, 4),
        ]
    )


@pytest.mark.parametrize("em_iters", [1, 2, 3, 4])
def test_em_iters_is_kmeans_then_em_as_in_sklearn(em_iters: int) -> None:
    """The fit budget read literally (Kalayeh & Shah, Sec. 4.2: "EM iter." is the total of k-means
    and EM iterations, split equally, the extra one to EM): em_iters = 2 is one k-means iteration
    from the k-means++ seeds, one EM iteration from the mixture of its labels, then the posteriors
    — scikit-learn's KMeans(init=seeds, max_iter=1) labels, their M-step, GaussianMixture(
    max_iter=1) from there, predict_proba. Odd totals: em_iters = 1 is no k-means iteration (the
    labels of the nearest seed) and one EM iteration; 3 is one k-means and two EM iterations."""
    x = _overlapping_blobs()
    xt = torch.from_numpy(x)
    reg = 1e-3
    torch.manual_seed(0)
    nu, keep = mx.mixture_posteriors(xt, k=3, em_iters=em_iters, eps=reg, min_weight=0.0)
    torch.manual_seed(0)  # the same draws, so the same k-means++ seeds
    _, seed_index = gmm.kmeans_plus_plus(xt, 3)
    seeds = x[seed_index.numpy()]
    n_km = em_iters // 2
    if n_km:
        km = KMeans(3, init=seeds, n_init=1, max_iter=n_km, tol=0.0, algorithm="lloyd").fit(x)
        labels = km.labels_
    else:
        labels = ((x[:, None, :] - seeds[None]) ** 2).sum(-1).argmin(1)
    resp = np.eye(3)[labels]
    cnt = resp.sum(0)
    means = resp.T @ x / cnt[:, None]
    var = resp.T @ x**2 / cnt[:, None] - means**2 + reg
    gm = GaussianMixture(
        3,
        covariance_type="diag",
        max_iter=em_iters - n_km,
        tol=0.0,
        reg_covar=reg,
        weights_init=cnt / len(x),
        means_init=means,
        precisions_init=1.0 / var,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x)
    assert keep.all()
    np.testing.assert_allclose(nu.numpy(), gm.predict_proba(x), atol=1e-8)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("shape", [(450, 4), (9, 4, 5, 10)], ids=["2d", "4d"])
def test_em_iters_has_no_dead_values(shape: tuple[int, ...], fraction: float) -> None:
    """Every increment of em_iters does work: on generic data consecutive budgets give different
    posteriors (from the same seeds and the same sub-sample)."""
    pts = torch.from_numpy(_overlapping_blobs())
    x = pts if len(shape) == 2 else pts.reshape(9, 5, 10, 4).permute(0, 3, 1, 2)
    nus = []
    for em_iters in range(7):
        torch.manual_seed(0)
        nus.append(mx.mixture_posteriors(x, k=3, em_iters=em_iters, sample_fraction=fraction)[0])
    for n, (a, b) in enumerate(itertools.pairwise(nus)):
        assert (a - b).abs().max() > 1e-3, f"em_iters={n} and {n + 1} give the same posteriors"


def test_pruning_removes_light_component_and_renormalises() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(1000, 2, generator=g),
            torch.randn(1000, 2, generator=g) + 20.0,
            torch.randn(5, 2, generator=g) - 200.0,  # λ ≈ 0.0025 < 0.01; far, so seeded
        ]
    )
    torch.manual_seed(0)
    nu, keep = mx.mixture_posteriors(x, k=3, em_iters=2, min_weight=0.01)
    assert keep.sum() == 2
    assert torch.all(nu[:, ~keep] == 0)
    torch.testing.assert_close(nu.sum(1), torch.ones(len(x)))
    assert torch.isfinite(nu).all()
    # without pruning the light component survives
    torch.manual_seed(0)
    nu0, keep0 = mx.mixture_posteriors(x, k=3, em_iters=2, min_weight=0.0)
    assert keep0.all() and nu0[-5:].max(1).values.min() > 0.99
    # the layer reports it, and its output stays finite
    torch.manual_seed(0)
    m = normlab.MixtureNorm(2, k=3)
    y = m(x)
    assert int(m.last_num_components) == 2 and torch.isfinite(y).all()
    assert (m.last_weight == 0).sum() == 1


def test_queue_and_diagnostics_after_training_steps() -> None:
    m = normlab.MixtureNorm(3, k=2, queue_size=3)
    assert not m.queue_valid.any() and int(m.num_batches_tracked) == 0
    for step in range(1, 5):
        x = torch.randn(10, 3, 4) + step
        m(x)
        assert int(m.num_batches_tracked) == step
        assert int(m.queue_valid.sum()) == min(step, 3)
        torch.testing.assert_close(m.queue_weight[-1], m.last_weight)
        torch.testing.assert_close(m.queue_mean[-1], m.last_mean)
        torch.testing.assert_close(m.queue_var[-1], m.last_var)
        torch.testing.assert_close(m.last_weight.sum(), torch.tensor(1.0))
        # overall mean of the fit is the batch mean
        torch.testing.assert_close(m.last_weight @ m.last_mean, x.mean((0, 2)), atol=1e-4, rtol=0)
    assert m.queue_valid.all()
    assert not m.last_weight.requires_grad and not m.queue_mean.requires_grad


def test_channels_last_and_non_contiguous_input() -> None:
    x = torch.randn(4, 6, 5, 5)
    outs = []
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        t = t.clone().requires_grad_()
        torch.manual_seed(0)
        y = normlab.MixtureNorm(6)(t)
        y.backward(torch.ones_like(y) + torch.linspace(0, 1, 25).view(1, 1, 5, 5))
        outs.append((y.detach(), t.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


def test_deterministic_under_manual_seed() -> None:
    x = torch.randn(8, 6, 5, 5)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = normlab.MixtureNorm(6, k=4)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])


def test_warm_init_seeds_each_fit_from_the_moving_average_of_the_means() -> None:
    """init="warm": the first batch is seeded by k-means++ (as the default) and its Eq. 35 means
    are copied into warm_mean; every later batch is seeded by warm_mean — no random draws, and
    components keep their identity — which then moves by warm_momentum towards the new means."""
    x, _ = _modes(seed=0)
    torch.manual_seed(5)
    ref = normlab.MixtureNorm(4, k=3)(x)
    m = normlab.MixtureNorm(4, k=3, init="warm", warm_momentum=0.3)
    torch.manual_seed(5)
    torch.testing.assert_close(m(x), ref)  # first batch: k-means++, the same draws
    assert torch.equal(m.warm_mean, m.queue_mean[-1])  # first fit: copied
    lam0 = m.last_weight.clone()
    for seed in (1, 2, 3):
        x, _ = _modes(seed=seed)
        prev = m.warm_mean.clone()
        rng = torch.get_rng_state()
        y = m(x)
        assert torch.equal(torch.get_rng_state(), rng)  # no seeding draws
        # oracle (em_iters = 2): one Lloyd iteration from the seed, the M-step of the assignment
        # to its centres, one EM iteration, the E-step
        params = fit_gmm(x, 3, kmeans_iters=1, em_iters=1, reg_covar=m.eps, init_means=prev)
        nu, _ = e_step(x, params)
        y_ref, st = mx.mixture_norm(x, nu, m.weight, m.bias, return_stats=True)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(m.last_weight, lam0, atol=0.02, rtol=0)  # same order
        torch.testing.assert_close(m.warm_mean, 0.7 * prev + 0.3 * st.mean)
        assert not torch.allclose(m.warm_mean, m.queue_mean[-1], atol=1e-3)  # not the last fit
    # a reset (or a fresh module) seeds by k-means++ again; a loaded state dict warm-starts
    m2 = normlab.MixtureNorm(4, k=3, init="warm")
    m2.load_state_dict(m.state_dict())
    rng = torch.get_rng_state()
    m2(x)
    assert torch.equal(torch.get_rng_state(), rng)
    m2.reset_running_stats()
    m2(x)
    assert not torch.equal(torch.get_rng_state(), rng)
    assert "init='warm'" in repr(m2)


def test_warm_momentum_one_seeds_from_the_previous_batch() -> None:
    """warm_momentum = 1: warm_mean is the previous batch's Eq. 35 means (the pre-EMA behaviour);
    init="kmeans++" keeps the latest means in warm_mean too (no component identity to average)."""
    for kwargs in ({"init": "warm", "warm_momentum": 1.0}, {"init": "kmeans++"}):
        m = normlab.MixtureNorm(4, k=3, **kwargs)
        for seed in range(3):
            m(_modes(seed=seed)[0])
            assert torch.equal(m.warm_mean, m.queue_mean[-1])


def test_warm_absent_component_restarts_at_the_batch_mean() -> None:
    """A component absent from a warm fit (pruned: λ < min_weight) gets its seed replaced by its
    Eq. 35 mean — the batch mean — instead of averaged; the present ones are averaged."""
    n_per = (500, 400, 100)  # the third mode (λ = 0.1) is below min_weight
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, init="warm", min_weight=0.2)
    m(_modes(n_per, seed=0)[0])
    x, _ = _modes(n_per, seed=1)
    prev = m.warm_mean.clone()
    m(x)
    absent = m.last_weight == 0
    assert absent.sum() == 1 and m.last_num_components == 2
    torch.testing.assert_close(m.warm_mean[absent][0], x.mean(0))
    torch.testing.assert_close(
        m.warm_mean[~absent], 0.9 * prev[~absent] + 0.1 * m.last_mean[~absent]
    )


def test_warm_moving_average_steadies_the_fit_under_batch_noise() -> None:
    """Regression: seeding from the last batch's means alone (warm_momentum = 1) makes the seed a
    state updated with weight 1 per batch, which random-walks under batch noise. Points on a ring
    (a continuum of equally good 3-component fits), fresh batches, fixed layer: the output of a
    fixed probe under each step's fit (eval with a 1-slot queue) varies clearly less over the
    steps with the moving average (measured: 0.35–0.42 vs 0.57–0.96 mean std over 12 seeds)."""

    def ring(g: torch.Generator, n: int) -> torch.Tensor:
        a = torch.rand(n, generator=g) * (2 * math.pi)
        return 3.0 * torch.stack([a.cos(), a.sin()], 1) + 0.3 * torch.randn(n, 2, generator=g)

    def spread(momentum: float, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the first (k-means++) seeding
        m = normlab.MixtureNorm(
            2, k=3, init="warm", warm_momentum=momentum, queue_size=1, affine=False
        )
        probe = ring(torch.Generator().manual_seed(99), 256)
        ys = []
        for _ in range(100):
            m.train()(ring(g, 128))
            with torch.no_grad():
                ys.append(m.eval()(probe))
        return torch.stack(ys[20:]).std(0).mean().item()

    last = [spread(1.0, seed) for seed in (0, 1)]
    ema = [spread(0.1, seed) for seed in (0, 1)]
    assert sum(ema) < 0.75 * sum(last), (ema, last)


# --- inference (Eq. 38-39) --------------------------------------------------------------------


def _hand_queue(t=4, k=3, c=3, valid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.rand(t, k, generator=g) + 0.1
    if t > 1:
        qw[1, 2] = 0.0  # a pruned component
    qw = qw / qw.sum(1, keepdim=True)
    qm = torch.randn(t, k, c, generator=g) * 2
    qv = torch.rand(t, k, c, generator=g) + 0.3
    valid = torch.ones(t, dtype=torch.bool) if valid is None else torch.tensor(valid)
    return qw, qm, qv, valid


def _hand_fit(qw, qm, qv, seed=1):
    """Fitted mixtures near, but not equal to, the statistics (as after 1–2 EM iterations)."""
    g = torch.Generator().manual_seed(seed)
    fw = torch.where(qw > 0, qw * (0.5 + torch.rand(qw.shape, generator=g)), 0.0)
    fw = fw / fw.sum(1, keepdim=True)
    fm = qm + 0.7 * torch.randn(qm.shape, generator=g)
    fv = qv * (0.5 + torch.rand(qv.shape, generator=g))
    return fw, fm, fv


def _load_queue(m: mx.MixtureNorm, qw, qm, qv, valid, fit=None) -> None:
    """Queue the statistics; the fitted mixtures are ``fit`` or (default) the statistics."""
    fw, fm, fv = (qw, qm, qv + m.eps) if fit is None else fit
    with torch.no_grad():
        m.queue_weight.copy_(qw)
        m.queue_mean.copy_(qm)
        m.queue_var.copy_(qv)
        m.queue_fit_weight.copy_(fw)
        m.queue_fit_mean.copy_(fm)
        m.queue_fit_var.copy_(fv)
        m.queue_valid.copy_(valid)


@pytest.mark.parametrize("reading", ["consistent", "literal"])
@pytest.mark.parametrize("valid", [None, [False, True, False, True]])
@pytest.mark.parametrize("separate_fit", [False, True])
def test_inference_matches_numpy_eq_38(
    reading: str, valid: list[bool] | None, separate_fit: bool
) -> None:
    qw, qm, qv, vmask = _hand_queue(valid=valid)
    fit = _hand_fit(qw, qm, qv) if separate_fit else None
    m = normlab.MixtureNorm(3, k=3, queue_size=4, queue_decay=0.8, inference=reading, eps=1e-3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        m.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    _load_queue(m, qw, qm, qv, vmask, fit)
    m.eval()
    x = torch.randn(5, 3, 4, 2) * 2
    y = m(x)
    ref = _np_queue_inference(
        _points(x),
        qw.double().numpy(),
        qm.double().numpy(),
        qv.double().numpy(),
        vmask.numpy(),
        0.8,
        1e-3,
        m.weight.detach().double().numpy(),
        m.bias.detach().double().numpy(),
        literal=reading == "literal",
        fit=None if fit is None else tuple(t.double().numpy() for t in fit),
    )
    np.testing.assert_allclose(_points(y), ref, atol=2e-5, rtol=1e-5)


def test_decay_weights_eq_39() -> None:
    t, z = 10, 0.9
    tau = mx.queue_decay_weights(torch.ones(t, dtype=torch.bool), z, torch.float64)
    ref = [(1 - z) / (1 - z**t) * z ** (t - i - 1) for i in range(t)]
    np.testing.assert_allclose(tau.numpy(), ref, rtol=1e-12)
    part = mx.queue_decay_weights(torch.tensor([False] * 7 + [True] * 3), z, torch.float64)
    np.testing.assert_allclose(part[-3:].numpy(), np.array([z**2, z, 1]) / (1 + z + z**2))
    assert torch.all(part[:7] == 0)


def test_identical_queued_fits_reproduce_the_training_transform() -> None:
    """Consistent reading: a queue of T copies of one fit = that fit's Eq. 34 transform (with ν its
    posteriors); the literal reading multiplies the normalized part by Σ_t √τ^t."""
    qw, qm, qv, _ = _hand_queue(t=1)
    t = 10
    x = torch.randn(6, 3, 5)
    out = {}
    for reading in ("consistent", "literal"):
        m = normlab.MixtureNorm(3, k=3, queue_size=t, inference=reading)
        with torch.no_grad():
            m.bias.fill_(0.7)
        _load_queue(
            m,
            qw.expand(t, -1),
            qm.expand(t, -1, -1),
            qv.expand(t, -1, -1),
            torch.ones(t, dtype=torch.bool),
        )
        out[reading] = m.eval()(x)
    params = GMMParams(qw[0], qm[0], qv[0] + 1e-5)
    nu, _ = e_step(x, params)
    single = mx.mixture_transform(x, nu, (qw[0], qm[0], qv[0]), bias=torch.full((3,), 0.7))
    torch.testing.assert_close(out["consistent"], single, atol=1e-5, rtol=1e-5)
    tau = mx.queue_decay_weights(torch.ones(t, dtype=torch.bool), 0.9)
    factor = tau.sqrt().sum().item()
    assert abs(factor - 3.13) < 0.01
    torch.testing.assert_close(out["literal"] - 0.7, factor * (single - 0.7), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("em_iters", "fraction", "shape"),
    [(2, 1.0, (8, 5, 6, 6)), (1, 1.0, (300, 5)), (3, 1.0, (6, 5, 9)), (4, 0.5, (8, 5, 6, 6))],
)
def test_queue_of_a_batchs_own_fit_reproduces_its_training_output(
    em_iters: int, fraction: float, shape: tuple[int, ...]
) -> None:
    """Regression: eval with a queue holding only this batch's fit must give the batch its
    training output. The statistics of Eq. 35–36 are one M-step beyond the fitted mixture whose
    posteriors ν normalized the batch, so with the paper's 1–2 EM iterations taking the eval
    posteriors under the statistics reassigns points (on real CNN activations 9–16 % of them,
    ~20 % relative output error); the queue keeps the fitted mixture for that."""
    g = torch.Generator().manual_seed(0)
    # skewed like rectified activations; float64, as tiny components make float32 posteriors of
    # points between them sensitive to rounding (the shift of the coordinates differs)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).exp()
    m = normlab.MixtureNorm(5, k=3, em_iters=em_iters, sample_fraction=fraction, queue_size=4)
    m = m.double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(5, generator=g) + 0.5)
        m.bias.copy_(torch.randn(5, generator=g))
    for _ in range(4):  # four identical fits (same seeding draws)
        torch.manual_seed(1)
        y_train = m(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_eval, y_train, atol=1e-9, rtol=1e-9)
    # guard: posteriors under the statistics alone would not reproduce the training output
    stats_only = mx.mixture_norm_inference(
        x, m.queue_weight, m.queue_mean, m.queue_var, m.queue_valid, 0.9, m.eps, m.weight, m.bias
    )
    assert (stats_only - y_train).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(32, 3), (4, 3, 6, 5)])
def test_k1_eval_after_repeated_steps_equals_training_output(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape) * 2 + 1
    m = normlab.MixtureNorm(3, k=1, queue_size=10)
    with torch.no_grad():
        m.bias.fill_(0.3)
    for _ in range(4):  # fewer than T fits: τ renormalised over those present
        y_train = m(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_eval, y_train, atol=1e-4, rtol=1e-4)
    m.inference = "literal"
    tau = mx.queue_decay_weights(m.queue_valid, 0.9)
    factor = tau.sqrt().sum().item()
    torch.testing.assert_close(m(x) - 0.3, factor * (y_train - 0.3), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("em_iters", [2, 0])
def test_modes_eval_after_training_close_to_training_output(em_iters: int) -> None:
    x, _ = _modes()
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, em_iters=em_iters, queue_size=5)
    for _ in range(5):
        y_train = m(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_eval, y_train, atol=1e-3, rtol=1e-3)


def test_state_dict_round_trip_gives_identical_eval_outputs() -> None:
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, queue_size=4)
    for _ in range(3):
        m(torch.randn(8, 4, 3, 3))
    with torch.no_grad():
        m.weight.mul_(1.5)
    sd = m.state_dict()
    for key in ("queue_weight", "queue_mean", "queue_var", "queue_valid", "last_weight"):
        assert key in sd
    m2 = normlab.MixtureNorm(4, k=3, queue_size=4)
    m2.load_state_dict(sd)
    x = torch.randn(5, 4, 3, 3)
    assert torch.equal(m.eval()(x), m2.eval()(x))
    assert int(m2.last_num_components) == int(m.last_num_components)


def test_state_dict_without_fitted_mixtures_loads_with_the_old_eval() -> None:
    """A checkpoint from before the queue kept the fitted mixtures (module version 1) loads; its
    eval takes the posteriors under the statistics, as that version did."""
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, queue_size=4)
    for _ in range(3):
        m(torch.randn(8, 4, 3, 3).exp())
    sd = m.state_dict()
    old = type(sd)((k, v) for k, v in sd.items() if "queue_fit" not in k)
    old._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    m2 = normlab.MixtureNorm(4, k=3, queue_size=4)
    m2.load_state_dict(old)
    x = torch.randn(5, 4, 3, 3).exp()
    ref = mx.mixture_norm_inference(
        x, m.queue_weight, m.queue_mean, m.queue_var, m.queue_valid, 0.9, m.eps, m.weight, m.bias
    )
    torch.testing.assert_close(m2.eval()(x), ref)
    assert not torch.allclose(m.eval()(x), ref, atol=1e-3)  # the new eval differs (guard)


def test_state_dict_without_warm_mean_seeds_from_the_newest_means() -> None:
    """A checkpoint from before warm_mean (module version 2) loads; init="warm" continues from
    the newest queued Eq. 35 means, as that version seeded."""
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, queue_size=4, init="warm")
    for seed in range(3):
        m(_modes(seed=seed)[0])
    assert not torch.equal(m.warm_mean, m.queue_mean[-1])
    sd = m.state_dict()
    old = type(sd)((k, v) for k, v in sd.items() if k != "warm_mean")
    old._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    m2 = normlab.MixtureNorm(4, k=3, queue_size=4, init="warm")
    m2.load_state_dict(old)
    assert torch.equal(m2.warm_mean, m.queue_mean[-1])
    x = _modes(seed=5)[0]
    rng = torch.get_rng_state()
    y = m2(x)
    assert torch.equal(torch.get_rng_state(), rng)  # warm-started, no seeding draws
    params = fit_gmm(
        x, 3, kmeans_iters=1, em_iters=1, reg_covar=m.eps, init_means=sd["queue_mean"][-1]
    )
    torch.testing.assert_close(y, mx.mixture_norm(x, e_step(x, params)[0], m.weight, m.bias))
    old._metadata = sd._metadata  # type: ignore[attr-defined]  # a current one must carry it
    with pytest.raises(RuntimeError, match="warm_mean"):
        normlab.MixtureNorm(4, k=3, queue_size=4).load_state_dict(old)


@pytest.mark.parametrize("shape", [(7, 4), (3, 4, 5, 5)])
def test_fresh_module_eval_equals_fresh_batchnorm_eval(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape) * 3 + 1
    m = normlab.MixtureNorm(4).eval()
    bn = nn.BatchNorm1d(4).eval() if len(shape) == 2 else nn.BatchNorm2d(4).eval()
    torch.testing.assert_close(m(x), bn(x))
    with torch.no_grad():
        for p, q in ((m.weight, bn.weight), (m.bias, bn.bias)):
            p.copy_(torch.randn(4))
            q.copy_(p)
    torch.testing.assert_close(m(x), bn(x))


def test_eval_with_activation_and_gradients() -> None:
    m = normlab.MixtureNorm(3, k=2, activation="relu")
    m(torch.randn(16, 3))
    m.eval()
    x = torch.randn(9, 3, requires_grad=True)
    y = m(x)
    assert (y >= 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


@pytest.mark.parametrize("activation", [None, "relu"])
def test_eval_gradient_reaches_affine_when_input_dtype_differs(activation: str | None) -> None:
    """Regression: float64 input into a float32 layer is normalized in float64; γ and β still
    get their gradients in eval, equal to those of a float64 copy of the layer."""
    torch.manual_seed(0)
    m = normlab.MixtureNorm(3, k=2, activation=activation)
    m(torch.randn(16, 3))
    with torch.no_grad():
        m.weight.add_(torch.randn(3))
    m64 = copy.deepcopy(m).double().eval()
    x = torch.randn(9, 3, dtype=torch.float64)
    m.eval()(x).square().sum().backward()
    m64(x).square().sum().backward()
    for p, q in ((m.weight, m64.weight), (m.bias, m64.bias)):
        assert p.grad is not None and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad.float())


def test_reset_running_stats_empties_queue() -> None:
    m = normlab.MixtureNorm(3)
    m(torch.randn(10, 3))
    m.reset_running_stats()
    assert not m.queue_valid.any() and int(m.num_batches_tracked) == 0
    x = torch.randn(5, 3)
    torch.testing.assert_close(m.eval()(x), nn.BatchNorm1d(3).eval()(x))


# --- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.full((8, 4, 3, 3), 2.5),  # constant input
        lambda: torch.zeros(2, 4),  # two identical points, K = 3
        lambda: torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]]),  # 2 points < K
        lambda: torch.randn(1, 4),  # a single point
        lambda: torch.cat([torch.randn(6, 3, 4), torch.full((6, 1, 4), 7.0)], 1),  # const channel
        lambda: torch.randn(16, 4) * 1e-4 + 1e4,  # huge offset, tiny spread
        lambda: torch.randn(16, 4) * 1e4,  # large values
    ],
)
@pytest.mark.parametrize("k", [3, 5])
def test_degenerate_batches_stay_finite(make, k: int) -> None:
    torch.manual_seed(0)
    x = make().requires_grad_()
    for act in (None, "relu"):
        m = normlab.MixtureNorm(4, k=k, activation=act)
        y = m(x)
        assert torch.isfinite(y).all()
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()
        x.grad = None
        for buf in (m.last_weight, m.last_mean, m.last_var):
            assert torch.isfinite(buf).all()
        assert torch.isfinite(m.eval()(x)).all()


def test_constant_input_maps_to_bias() -> None:
    m = normlab.MixtureNorm(4, k=3)
    with torch.no_grad():
        m.bias.copy_(torch.arange(4.0))
    y = m(torch.full((8, 4, 2, 2), -3.0))
    torch.testing.assert_close(y, torch.arange(4.0).view(1, 4, 1, 1).expand_as(y))


@pytest.mark.parametrize("shape", [(4096, 3), (16, 3, 16, 16)])
def test_offset_data_normalizes_as_accurately_as_batch_norm(shape: tuple[int, ...]) -> None:
    """A large common offset must not cancel the variance: statistics are taken around the batch
    mean, so the float32 error stays at the level of F.batch_norm's (one-pass sums of x² would
    lose the variance entirely at offset 3000 in float32)."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    ref = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    for offset in (300.0, 3000.0):
        bn_err = (F.batch_norm(x + offset, None, None, training=True) - ref).abs().max()
        mn_err = (normlab.MixtureNorm(3, k=1)(x + offset) - ref).abs().max()
        assert mn_err <= 3 * bn_err + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_and_autocast(dtype: torch.dtype) -> None:
    x = torch.randn(8, 4, 3, 3).to(dtype).requires_grad_()
    m = normlab.MixtureNorm(4)
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    assert m.last_mean.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = m(torch.randn(8, 4, 3, 3))
    assert y2.dtype == torch.float32 and m.last_var.dtype == torch.float32


# --- configuration, registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"em_iters": -1}, "em_iters"),
        ({"sample_fraction": 0.0}, "sample_fraction"),
        ({"sample_fraction": 1.5}, "sample_fraction"),
        ({"queue_size": 0}, "queue_size"),
        ({"queue_decay": 1.5}, "queue_decay"),
        ({"min_weight": 1.0}, "min_weight"),
        ({"min_weight": -0.1}, "min_weight"),
        ({"eps": 0.0}, "eps"),
        ({"activation": "tanh"}, "activation"),
        ({"inference": "average"}, "inference"),
        ({"init": "random"}, "init"),
        ({"warm_momentum": 0.0}, "warm_momentum"),
        ({"warm_momentum": 1.5}, "warm_momentum"),
        ({"affine": "yes"}, "affine"),
    ],
)
def test_bad_configuration_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normlab.MixtureNorm(4, **kwargs)


def test_bad_input_raises() -> None:
    m = normlab.MixtureNorm(4)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(8, 3, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(8))
    with pytest.raises(ValueError, match="empty"):  # the layer takes empty batches (see below)
        mx.mixture_posteriors(torch.randn(0, 4))
    with pytest.raises(ValueError, match="nu must"):
        mx.mixture_norm(torch.randn(8, 4, 2), torch.rand(8, 2, 3))
    with pytest.raises(ValueError, match="sample_fraction"):
        mx.mixture_posteriors(torch.randn(8, 4), sample_fraction=0.0)
    with pytest.raises(ValueError, match="k must"):
        mx.mixture_posteriors(torch.randn(8, 4), k=0)


@pytest.mark.parametrize(
    "spec", ["mixture", "mixture(k=5, em_iters=2)", "mixture(activation=relu)"]
)
@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 5, 5)])
def test_registry_specs_build_and_run(spec: str, shape: tuple[int, ...]) -> None:
    m = normlab.make_norm(spec, 6)
    assert isinstance(m, normlab.MixtureNorm)
    x = torch.randn(*shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert m.weight.grad is not None and m.bias.grad is not None
    assert m.eval()(x).shape == x.shape
    if "k=5" in spec:
        assert m.k == 5 and m.queue_mean.shape == (10, 5, 6)
    if "relu" in spec:
        assert m.activation == "relu"
    assert "k=" in repr(m)


def test_spec_with_all_options() -> None:
    m = normlab.make_norm(
        "mixture(k=2, em_iters=3, sample_fraction=0.5, min_weight=0.05, inference=literal, "
        "queue_size=4, queue_decay=0.5, affine=false, init=warm)",
        3,
    )
    assert m.inference == "literal" and m.weight is None and m.queue_size == 4
    assert m.init == "warm"
    y = m(torch.randn(20, 3))
    assert torch.isfinite(y).all()


# --- empty batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3, 3), (2, 4, 0, 3)])
def test_empty_batch_behaves_like_batch_norm(
    shape: tuple[int, ...], train: bool, activation: str | None, kernels: bool
) -> None:
    """An empty batch gives an empty output of the input's shape and dtype, leaves every buffer
    untouched (torch's BatchNorm leaves its running statistics alone too) and backpropagates:
    an empty input gradient, zero γ/β gradients, as nn.BatchNorm gives. The next batch is
    normalized exactly as by a layer that never saw the empty one."""
    torch.manual_seed(0)
    m = normlab.MixtureNorm(4, k=3, activation=activation, init="warm")
    m(torch.randn(6, 4, 3, 3))  # one fit queued, so eval uses the queue
    m.train(train)
    twin = copy.deepcopy(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bn = (nn.BatchNorm1d(4) if len(shape) == 2 else nn.BatchNorm2d(4)).train(train)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        xb = x.detach().clone().requires_grad_()
        with normlab.use_kernels(kernels):
            y = m(x)
        yb = bn(xb.float()).to(dtype)
        assert y.shape == yb.shape == x.shape and y.dtype == dtype
        y.float().sum().backward()
        yb.float().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        for p, q in ((m.weight, bn.weight), (m.bias, bn.bias)):
            assert p.grad is not None and torch.equal(p.grad, q.grad)
            assert torch.equal(p.grad, torch.zeros(4))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(6, 4, 3, 3)
    rng = torch.get_rng_state()
    y = m(x)
    torch.set_rng_state(rng)
    assert torch.equal(y, twin(x))


_EMPTY_SHARE_CASES = {
    "default": {},  # the kernel: its backward reduces over the forward's group
    "relu": {"activation": "relu"},  # the reference: autograd through the all-reduce
    "subset": {"em_iters": 3, "sample_fraction": 0.5},
    "hard": {"k": 4, "em_iters": 0, "min_weight": 0.05},
    "warm": {"init": "warm", "em_iters": 4},
    "k1": {"k": 1},
}


def _empty_share_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return [torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64).exp() * 2.0 for _ in range(3)]


def _empty_share_run(name: str, xs: list[torch.Tensor], synced: bool) -> dict:
    """Three training steps (forward, backward) of a float64 MixtureNorm, then its buffers."""
    torch.manual_seed(3)
    layer = normlab.MixtureNorm(4, **_EMPTY_SHARE_CASES[name]).double()
    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn(4, dtype=torch.float64))
        layer.bias.add_(0.2 * torch.randn(4, dtype=torch.float64))
    if synced:
        normlab.sync_stats(layer)
    torch.manual_seed(5)
    out: dict = {}
    for i, x in enumerate(xs):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * y).sum().backward()
        out[f"out {i}"], out[f"input grad {i}"] = y.detach(), xi.grad
    out.update({f"grad {n}": p.grad for n, p in layer.named_parameters()})
    out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    return out


def _empty_share_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    calls: list[list[int]] = []  # every all-reduce: [number of elements, dtype's item size]
    all_reduce = dist.all_reduce

    def logged(tensor: torch.Tensor, *args, **kwargs):
        calls.append([tensor.numel(), tensor.element_size()])
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = logged
    try:
        results = {}
        for holder in (0, 1):
            for name in _EMPTY_SHARE_CASES:
                if name == "subset" and holder == 1:  # rank 0 seeds; its draws follow its subset
                    continue
                xs = [x if rank == holder else x[:0] for x in _empty_share_data()]
                start = len(calls)
                res = _empty_share_run(name, xs, synced=True)
                res["calls"] = torch.tensor(calls[start:])
                results[f"{holder} {name}"] = res
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.distributed
def test_synced_process_with_an_empty_share_joins_every_collective(tmp_path) -> None:
    """Under sync_stats a process holding 0 samples runs the whole step — the same all-reduces
    in the same order as the other process, seeding, k-means and EM loops and backward
    included (counts of 0 contribute nothing) — so nothing hangs; both processes end with the
    single-process fit of the whole batch, the holder's output and gradients are the single
    process's, the empty process's output is empty."""
    mp.spawn(_empty_share_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]:
        holder, name = int(key.split()[0]), key.split()[1]
        ref = _empty_share_run(name, _empty_share_data(), synced=False)
        full, empty = ranks[holder][key], ranks[1 - holder][key]
        assert torch.equal(full["calls"], empty["calls"]), key
        assert len(full["calls"]) >= 9, key  # 3 steps: forward and backward
        for what, v in ref.items():
            if what.startswith("buffer"):
                for res in (full, empty):
                    torch.testing.assert_close(res[what], v, atol=1e-10, rtol=1e-10, msg=key)
            elif what.startswith("grad"):
                torch.testing.assert_close(full[what] + empty[what], v, atol=1e-9, rtol=1e-9)
            else:
                torch.testing.assert_close(full[what], v, atol=1e-9, rtol=1e-9, msg=key)
                assert empty[what].shape == (0, *v.shape[1:]), key
