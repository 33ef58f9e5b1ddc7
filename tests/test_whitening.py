"""IterNorm and DBN (Huang et al., Sec. 3): whitening against numpy/scipy ZCA, reductions to batch norm,
gradients, running statistics, folding, grouping edge cases, ill-conditioning, arguments. The
hand-written kernels (normlab.nn._kernels.whitening) are checked against the plain-autograd
reference that normlab.use_kernels(False) selects, and the reference on its own against the
numpy oracles. Then the deployment properties, on both paths: empty batches (like torch's
BatchNorm; an empty share under sync_stats joins every reduction), torch.compile(fullgraph=True)
against eager without recompiles, and ONNX export with a dynamic batch against onnxruntime."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import normlab
from normlab.nn.stats import covariance_sums, reduction_scope
from normlab.nn.whitening import (
    DBN,
    IterNorm,
    decorrelated_batch_norm,
    group_layout,
    iterative_normalization,
    iternorm_whitening_matrix,
    newton_inverse_sqrt,
    zca_whitening_matrix,
)
from test_compile import compiled_equals_eager  # the project-wide compile check
from test_kernels import _kernel_nodes  # the kernel Functions in a graph
from test_onnx import check_onnx_round_trip  # the project-wide ONNX check

# ---------------------------------------------------------------------------------------------
# independent oracles (numpy / scipy)
# ---------------------------------------------------------------------------------------------


def _points(x: torch.Tensor) -> np.ndarray:
    """(N, C, *) -> (C, m) numpy data matrix, one column per position (Huang et al., Sec. 3.3)."""
    a = x.detach().double().numpy()
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]).T


def _unpoints(p: np.ndarray, shape) -> np.ndarray:
    n, c, *rest = shape
    return np.moveaxis(p.T.reshape(n, *rest, c), -1, 1)


def _groups(c: int, d: int) -> list[slice]:
    d = min(d, c)
    return [slice(s, min(s + d, c)) for s in range(0, c, d)]


def _group_cov(xg: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    mu = xg.mean(1, keepdims=True)
    xc = xg - mu
    return mu[:, 0], xc @ xc.T / xg.shape[1] + eps * np.eye(xg.shape[0])


def _zca(sigma: np.ndarray) -> np.ndarray:
    lam, vec = scipy.linalg.eigh(sigma)
    return (vec / np.sqrt(lam)) @ vec.T


def _newton_literal(a: np.ndarray, iters: int) -> np.ndarray:
    """Eq. 3 exactly as printed."""
    p = np.eye(a.shape[0])
    for _ in range(iters):
        p = 0.5 * (3 * p - p @ p @ p @ a)
    return p


def _iternorm_matrix(sigma: np.ndarray, iters: int) -> np.ndarray:
    tr = np.trace(sigma)
    return _newton_literal(sigma / tr, iters) / np.sqrt(tr)


def _reference(x, d, eps, matrix, weight=None, bias=None):
    """Group whitening by numpy: returns output array and per-group (mean, W)."""
    p = _points(x)
    out = np.empty_like(p)
    stats = []
    for sl in _groups(p.shape[0], d):
        mu, sigma = _group_cov(p[sl], eps)
        w = matrix(sigma)
        out[sl] = w @ (p[sl] - mu[:, None])
        stats.append((mu, w))
    if weight is not None:
        out = (
            out * weight.detach().double().numpy()[:, None]
            + bias.detach().double().numpy()[:, None]
        )
    return _unpoints(out, tuple(x.shape)), stats


def _correlated(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n, c, *rest = shape
    base = torch.randn(n, c, *rest, generator=g, dtype=dtype)
    mix = torch.eye(c, dtype=dtype) + 0.6 * torch.randn(c, c, generator=g, dtype=dtype)
    y = torch.einsum("ij,nj...->ni...", mix, base)
    shift = torch.randn(c, generator=g, dtype=dtype).reshape((1, c) + (1,) * len(rest))
    return y + shift


def _randomize_affine(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    return m


# ---------------------------------------------------------------------------------------------
# whitening against the ZCA oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 10, 3, 3), (200, 10)])
def test_iternorm_many_iterations_is_zca(shape):
    x = _correlated(shape)
    m = IterNorm(10, group_size=4, iters=30).double().train()
    y = m(x)
    ref, _ = _reference(x, 4, m.eps, _zca)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-7, atol=1e-8)
    p = _points(y)
    for sl in _groups(10, 4):
        cov = np.cov(p[sl], bias=True)
        np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=1e-3)


def test_dbn_is_zca_and_whitens():
    x = _correlated((8, 20, 4, 4), seed=3)
    m = _randomize_affine(DBN(20, group_size=8).double())
    y = m(x)
    ref, _ = _reference(x, 8, m.eps, _zca, m.weight, m.bias)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-9, atol=1e-9)
    m2 = DBN(20, group_size=8, affine=False).double()
    p = _points(m2(x))
    for sl in _groups(20, 8):
        cov = np.cov(p[sl], bias=True)
        np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=1e-3)
        # the off-diagonal correlations really were there before whitening
        assert np.abs(np.corrcoef(_points(x)[sl]) - np.eye(cov.shape[0])).max() > 0.2


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_iternorm_few_iterations_follow_eq3_literally(iters):
    x = _correlated((12, 6, 5, 5), seed=5)
    m = _randomize_affine(IterNorm(6, group_size=6, iters=iters).double())
    y = m(x)
    ref, _ = _reference(x, 6, m.eps, lambda s: _iternorm_matrix(s, iters), m.weight, m.bias)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    # T = 5 only partially whitens: output covariance is not the identity (Sec. 3.1)
    if iters <= 3:
        m0 = IterNorm(6, group_size=6, iters=iters, affine=False).double()
        cov = np.cov(_points(m0(x)), bias=True)
        assert np.abs(cov - np.eye(6)).max() > 0.05


def test_newton_coupled_form_is_stable_where_eq3_diverges():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    lam = np.logspace(0, -3, 8)
    a = (q * lam) @ q.T
    a /= np.trace(a)
    with np.errstate(all="ignore"):
        literal = _newton_literal(a, 60)
    assert not np.allclose(literal, _zca(a), atol=1e-3)  # Eq. 3 as printed blows up
    p = newton_inverse_sqrt(torch.from_numpy(a), 60).numpy()
    np.testing.assert_allclose(p, _zca(a), rtol=1e-8, atol=1e-8)
    t = iternorm_whitening_matrix(torch.from_numpy(a * 7.0), 60).numpy()
    np.testing.assert_allclose(t, _zca(a * 7.0), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [IterNorm, DBN])
@pytest.mark.parametrize("shape", [(8, 5, 3, 4), (32, 5)])
def test_group_size_one_is_batch_norm(cls, shape):
    x = _correlated(shape, seed=7)
    m = _randomize_affine(cls(5, group_size=1).double())
    ref = F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_iters_zero_is_trace_normalization():
    x = _correlated((10, 6, 3, 3), seed=2)
    m = IterNorm(6, group_size=3, iters=0, affine=False).double()
    p = _points(x)
    out = np.empty_like(p)
    for sl in _groups(6, 3):
        xc = p[sl] - p[sl].mean(1, keepdims=True)
        tr = (xc**2).sum() / xc.shape[1] + 3 * m.eps
        out[sl] = xc / np.sqrt(tr)
    np.testing.assert_allclose(m(x).detach().numpy(), _unpoints(out, x.shape), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(IterNorm, {"iters": 4}), (IterNorm, {"iters": 0}), (IterNorm, {"iters": 12}), (DBN, {})],
)
@pytest.mark.parametrize("shape", [(3, 5, 2, 2), (9, 5)])
def test_gradcheck(cls, kw, shape):
    torch.manual_seed(0)
    m = _randomize_affine(cls(5, group_size=3, **kw).double())  # groups of 3 and 2
    x = _correlated(shape, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: m(x), (x, m.weight, m.bias))
    assert torch.autograd.gradcheck(
        lambda w, b: F.linear(m(x.detach()).flatten(), torch.ones(1, x.numel(), dtype=x.dtype)),
        (m.weight, m.bias),
    )


def test_gradcheck_iternorm_through_trace_vs_literal_autograd():
    """Autograd through the coupled form equals autograd through Eq. 3–5 as printed (float64)."""
    x = _correlated((20, 4), seed=4).requires_grad_(True)
    g = torch.randn(20, 4, dtype=torch.float64)
    m = IterNorm(4, group_size=4, iters=5, affine=False).double()
    (gx,) = torch.autograd.grad(m(x), x, g)

    def literal(x):
        xc = x - x.mean(0)
        sigma = xc.T @ xc / x.shape[0] + m.eps * torch.eye(4, dtype=x.dtype)
        tr = sigma.trace()
        p = torch.eye(4, dtype=x.dtype)
        for _ in range(5):
            p = 0.5 * (3 * p - p @ p @ p @ (sigma / tr))
        return xc @ (p / tr.sqrt()).T

    (gref,) = torch.autograd.grad(literal(x), x, g)
    torch.testing.assert_close(gx, gref, rtol=1e-10, atol=1e-10)


def test_zca_backward_matches_eigh_autograd_and_handles_repeated_eigenvalues():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    sigma = (a @ a.mT + 0.5 * torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    g = torch.randn(2, 5, 5, dtype=torch.float64)

    def via_eigh(s):
        lam, vec = torch.linalg.eigh(s)
        return (vec / lam.sqrt().unsqueeze(-2)) @ vec.mT

    (g1,) = torch.autograd.grad(zca_whitening_matrix(sigma), sigma, g)
    (g2,) = torch.autograd.grad(via_eigh(sigma), sigma, g)
    torch.testing.assert_close(0.5 * (g1 + g1.mT), 0.5 * (g2 + g2.mT), rtol=1e-10, atol=1e-10)
    # exactly repeated eigenvalues (Σ = 2I plus a rank-one term): the eigenvector backward of
    # eigh divides by zero, the Loewner backward does not and matches finite differences
    u = torch.randn(5, 1, dtype=torch.float64)
    s0 = 2 * torch.eye(5, dtype=torch.float64) + u @ u.T
    x0 = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: zca_whitening_matrix(s0 + e + e.mT), (x0,))
    x1 = torch.zeros(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e: zca_whitening_matrix(torch.eye(5, dtype=torch.float64) + e + e.mT), (x1,)
    )
    # Σ = cI (all eigenvalues equal): W = c^{-1/2} I, so dW = -½ c^{-3/2} dΣ for symmetric dΣ
    s_rep = (2 * torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    (gz,) = torch.autograd.grad(zca_whitening_matrix(s_rep), s_rep, g[0])
    expected = -0.5 * 2.0**-1.5 * 0.5 * (g[0] + g[0].T)
    torch.testing.assert_close(gz, expected, rtol=1e-12, atol=1e-12)


def test_covariance_sums_against_numpy_and_gradcheck():
    x = _correlated((3, 6, 2, 5), seed=9)
    count, s1, outer = covariance_sums(x, 3)
    p = _points(x)
    assert float(count) == p.shape[1]
    for gi, sl in enumerate(_groups(6, 3)):
        np.testing.assert_allclose(s1[gi].numpy(), p[sl].sum(1), rtol=1e-12)
        np.testing.assert_allclose(outer[gi].numpy(), p[sl] @ p[sl].T, rtol=1e-12)
    x2 = _correlated((7, 4), seed=1)
    _, s1, outer = covariance_sums(x2, 2)
    p = _points(x2)
    np.testing.assert_allclose(outer[1].numpy(), p[2:] @ p[2:].T, rtol=1e-12)
    xr = x.clone().requires_grad_(True)
    for outputs in (lambda s: s.outer, lambda s: s.s1, lambda s: (s.s1, s.outer)):
        fn = lambda t, outputs=outputs: outputs(covariance_sums(t, 3))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (xr,))
        assert torch.autograd.gradgradcheck(fn, (xr,))
    x2r = x2.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: covariance_sums(t, 2)[1:], (x2r,))
    with pytest.raises(ValueError, match="group_size"):
        covariance_sums(x, 4)


# ---------------------------------------------------------------------------------------------
# running statistics, eval, state_dict, folding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kw", "matrix"),
    [
        (IterNorm, {"iters": 5}, lambda s: _iternorm_matrix(s, 5)),
        (DBN, {}, _zca),
    ],
)
def test_running_stats_two_steps_eval_and_state_dict(cls, kw, matrix):
    c, d, mom = 7, 4, 0.3
    m = _randomize_affine(cls(c, group_size=d, momentum=mom, **kw).double())
    x1, x2 = _correlated((6, c, 3, 3), seed=1), _correlated((6, c, 3, 3), seed=2) * 2
    m(x1)
    m(x2)
    _, st1 = _reference(x1, d, m.eps, matrix)
    _, st2 = _reference(x2, d, m.eps, matrix)
    mean_ref = np.concatenate([(1 - mom) * mom * a[0] + mom * b[0] for a, b in zip(st1, st2)])
    np.testing.assert_allclose(m.running_mean.numpy(), mean_ref, rtol=1e-10)
    for gi, (a, b) in enumerate(zip(st1, st2)):
        k = a[1].shape[0]
        eye = np.eye(k)
        wm_ref = (1 - mom) * ((1 - mom) * eye + mom * a[1]) + mom * b[1]
        np.testing.assert_allclose(m.running_wm[gi, :k, :k].numpy(), wm_ref, rtol=1e-9, atol=1e-12)
    # the unused padding of the smaller last group stays at the identity
    torch.testing.assert_close(m.running_wm[-1, 3:, 3:], torch.eye(1, dtype=torch.float64))
    torch.testing.assert_close(m.running_wm[-1, :3, 3:], torch.zeros(3, 1, dtype=torch.float64))

    m.eval()
    x3 = _correlated((5, c, 2, 2), seed=3)
    p = _points(x3)
    out = np.empty_like(p)
    wm, mu = m.running_wm.numpy(), m.running_mean.numpy()
    for gi, sl in enumerate(_groups(c, d)):
        k = sl.stop - sl.start
        out[sl] = wm[gi, :k, :k] @ (p[sl] - mu[sl, None])
    out = out * m.weight.detach().numpy()[:, None] + m.bias.detach().numpy()[:, None]
    y3 = m(x3)
    np.testing.assert_allclose(y3.detach().numpy(), _unpoints(out, x3.shape), rtol=1e-10)
    before = m.running_wm.clone()
    m(x3)
    torch.testing.assert_close(m.running_wm, before)  # eval does not update

    fresh = cls(c, group_size=d, momentum=mom, **kw).double().eval()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x3), y3)
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_wm"}
    m.reset_running_stats()
    assert m.running_mean.abs().max() == 0
    torch.testing.assert_close(m.running_wm, torch.eye(d, dtype=torch.float64).expand(2, d, d))


@pytest.mark.parametrize("cls", [IterNorm, DBN])
@pytest.mark.parametrize(
    ("c", "d", "shape_tail", "kind"),
    [
        (8, 4, (5, 5), "conv2d"),  # grouped conv
        (7, 4, (5, 5), "conv2d"),  # dense (unequal groups)
        (8, 4, (), "linear"),
        (6, 4, (9,), "conv1d"),
        (6, 3, (2, 3, 2), "conv3d"),
    ],
)
def test_fold_equals_eval(cls, c, d, shape_tail, kind):
    m = _randomize_affine(cls(c, group_size=d).double())
    for s in range(3):
        m(_correlated((6, c, *shape_tail), seed=s))
    m.eval()
    x = _correlated((4, c, *shape_tail), seed=10)
    y = m(x)
    folded = m.fold()  # inferred from the last input's rank
    explicit = m.fold(kind)
    assert type(folded) is type(explicit)
    expected = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}
    assert type(folded).__name__ == expected[kind]
    if kind.startswith("conv"):
        assert folded.groups == (c // d if c % d == 0 else 1)
    torch.testing.assert_close(folded(x), y, rtol=1e-10, atol=1e-10)


def test_fold_requires_kind_before_any_input():
    m = IterNorm(8, group_size=4)
    with pytest.raises(ValueError, match="kind"):
        m.fold()
    with pytest.raises(ValueError, match="kind"):
        m.fold("conv4d")
    assert isinstance(m.fold("linear"), torch.nn.Linear)


# ---------------------------------------------------------------------------------------------
# grouping edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [IterNorm, DBN])
@pytest.mark.parametrize("shape", [(4, 80, 4, 4), (300, 80)])
def test_non_divisible_channels_are_two_independent_layers(cls, shape):
    x = _correlated(shape, seed=6)
    m = _randomize_affine(cls(80, group_size=64).double())
    assert m.layout == group_layout(80, 64) and m.num_groups == 2
    y = m(x)
    a = cls(64, group_size=64).double()
    b = cls(16, group_size=64).double()  # clamped to one group of 16
    assert b.group_size == 16
    with torch.no_grad():
        for part, sl in ((a, slice(0, 64)), (b, slice(64, 80))):
            part.weight.copy_(m.weight[sl])
            part.bias.copy_(m.bias[sl])
    ref = torch.cat([a(x[:, :64]), b(x[:, 64:])], 1)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.running_wm[1, :16, :16], b.running_wm[0])
    y.square().sum().backward()
    assert torch.isfinite(m.weight.grad).all()


def test_group_size_is_clamped_to_channels():
    m = normlab.make_norm("iternorm", 3)
    assert m.group_size == 3 and m.num_groups == 1 and m.running_wm.shape == (1, 3, 3)


# ---------------------------------------------------------------------------------------------
# degenerate and ill-conditioned input
# ---------------------------------------------------------------------------------------------


def _ill_conditioned(dtype=torch.float32):
    """Duplicated, constant and nearly-collinear channels; fewer positions than channels in one
    layout."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, 3, 3, dtype=dtype)
    x[:, 1] = x[:, 0]  # exactly collinear
    x[:, 2] = 5.0  # constant
    x[:, 3] = 1e3 * x[:, 4] + 1e-4 * torch.randn(16, 3, 3, dtype=dtype)  # huge spread of scales
    return x


@pytest.mark.parametrize("x", [_ill_conditioned(), torch.randn(3, 8), torch.randn(1, 8)])
@pytest.mark.parametrize("spec", ["dbn(group_size=8)", "iternorm(group_size=8, iters=5)"])
def test_ill_conditioned_and_degenerate_batches_stay_finite(x, spec):
    m = normlab.make_norm(spec, 8)
    xr = x.clone().requires_grad_(True)
    y = m(xr)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(xr.grad).all() and torch.isfinite(m.weight.grad).all()
    assert torch.isfinite(m.running_wm).all()


def _large_collinear():
    """Collinear channels at a large scale in float32: rounding in Σ exceeds ε, so Σ's computed
    smallest eigenvalues can be negative."""
    torch.manual_seed(0)
    x = torch.randn(64, 64, 4, 4) * 1e3 + 1e3
    x[:, 5] = x[:, 6]
    x[:, 7] = 2 * x[:, 8]
    return x.requires_grad_(True)


def test_dbn_rounding_negative_eigenvalues_are_clamped():
    x = _large_collinear()
    m = DBN(64, group_size=64)
    count, s1, outer = covariance_sums(x.detach(), 64)
    mu = s1 / count
    sigma = outer / count - mu.unsqueeze(-1) * mu.unsqueeze(-2) + m.eps * torch.eye(64)
    _, lam = zca_whitening_matrix(sigma, return_eigenvalues=True)
    assert lam.min() < m.eps  # rounding pushed eigenvalues below the exact bound ε: clamp needed
    y = m(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("iters", [30, 200])
def test_iternorm_many_iterations_float32_rank_deficient_stays_finite(iters):
    """Rounding makes an eigenvalue of Σ_N negative, for which Newton's iteration overflows unless
    guarded."""
    x = _large_collinear()
    m = IterNorm(64, group_size=64, iters=iters)
    y = m(x)
    assert torch.isfinite(y).all() and y.abs().max() < 100
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dbn_clamps_eigenvalues_and_whitens_the_rest():
    x = _ill_conditioned(torch.float64)
    m = DBN(8, group_size=8, affine=False).double()
    y = m(x)
    p = _points(y)
    # the well-determined channels (5, 6, 7) are whitened as usual
    np.testing.assert_allclose(np.cov(p[5:], bias=True), np.eye(3), atol=1e-4)
    # the constant channel maps to 0, not to an amplified rounding error
    assert np.abs(p[2]).max() < 1e-6


def test_dbn_max_condition_check_raises():
    x = _ill_conditioned()
    with pytest.raises(ValueError, match="ill-conditioned"):
        DBN(8, group_size=8, max_condition=1e4)(x)
    DBN(8, group_size=8, max_condition=1e12)(torch.randn(32, 8, 2, 2))  # well-conditioned: fine
    bad = torch.randn(32, 8)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        DBN(8, group_size=8, max_condition=1e12)(bad)


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["iternorm(group_size=4)", "dbn(group_size=4)"])
def test_half_input_uses_float32_statistics_and_autocast(spec):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 4, 4)
    m = normlab.make_norm(spec, 8)
    ref = m(x)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(x)
    assert ya.dtype == torch.float32
    torch.testing.assert_close(ya, ref, rtol=1e-5, atol=1e-5)  # autocast is off inside
    m64 = normlab.make_norm(spec.replace(")", ", stat_dtype=float64)"), 8)
    assert m64.stat_dtype == "float64" and "stat_dtype=float64" in repr(m64)
    y64 = m64(x)
    ref64 = normlab.make_norm(spec, 8).double()(x.double())
    assert y64.dtype == torch.float32
    torch.testing.assert_close(y64.double(), ref64, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# configuration, registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (IterNorm, {"group_size": 0}, "group_size"),
        (IterNorm, {"group_size": 2.5}, "group_size"),
        (IterNorm, {"iters": -1}, "iters"),
        (IterNorm, {"iters": 1.5}, "iters"),
        (IterNorm, {"eps": 0}, "eps"),
        (IterNorm, {"momentum": 1.5}, "momentum"),
        (IterNorm, {"affine": "yes"}, "affine"),
        (IterNorm, {"stat_dtype": "float16"}, "stat_dtype"),
        (DBN, {"group_size": -4}, "group_size"),
        (DBN, {"max_condition": 0.5}, "max_condition"),
        (DBN, {"eps": -1e-5}, "eps"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(8, **kwargs)


@pytest.mark.parametrize("cls", [IterNorm, DBN])
def test_bad_input(cls):
    m = cls(8, group_size=4)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(4, 6, 3, 3))
    with pytest.raises(ValueError, match="1-D"):
        m(torch.randn(8))
    with pytest.raises(ValueError, match="num_features"):
        cls(0)


@pytest.mark.parametrize(
    "spec", ["iternorm", "iternorm(group_size=8, iters=3)", "dbn(group_size=4)", "dbn"]
)
@pytest.mark.parametrize("shape", [(16, 12), (4, 12, 5, 5), (4, 3, 5, 5), (16, 3)])
def test_registry_specs_forward_backward(spec, shape):
    m = normlab.make_norm(spec, shape[1])
    x = torch.randn(*shape, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert m.group_size == min(m.requested_group_size, shape[1])
    assert "group_size" in repr(m)
    m.eval()
    assert torch.isfinite(m(x)).all()


def test_exported_names():
    assert normlab.IterNorm is IterNorm and normlab.DBN is DBN
    assert "iternorm" in normlab.available_norms() and "dbn" in normlab.available_norms()


# ---------------------------------------------------------------------------------------------
# hand-written Newton backward, twice differentiability, (N, C) row layout
# ---------------------------------------------------------------------------------------------


def _coupled_newton_reference(a: torch.Tensor, iters: int) -> torch.Tensor:
    """The coupled iteration (Y_0 = A, Z_0 = I, S = (3I − Z Y)/2, Y ← Y S, Z ← S Z), autograd."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    y, z = a, eye.expand_as(a)
    for _ in range(iters):
        s = 0.5 * (3 * eye - z @ y)
        y, z = y @ s, s @ z
    return z


@pytest.mark.parametrize("iters", [1, 2, 5, 8])
def test_newton_backward_equals_autograd_of_the_coupled_iteration(iters):
    torch.manual_seed(iters)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    a = x @ x.mT / 12 + 0.1 * torch.eye(5, dtype=torch.float64)
    a = a / a.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    a = a + 0.01 * torch.randn(3, 5, 5, dtype=torch.float64)  # not symmetric: exact transposes
    g = torch.randn(3, 5, 5, dtype=torch.float64)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    z = newton_inverse_sqrt(a1, iters)
    ref = _coupled_newton_reference(a2, iters)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    (z * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-11, atol=1e-12)
    a3 = a.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: newton_inverse_sqrt(t, iters), (a3,))


@pytest.mark.parametrize("shape", [(9, 5), (3, 5, 2)])
def test_iternorm_is_twice_differentiable(shape):
    m = _randomize_affine(IterNorm(5, group_size=3, iters=3).double())  # groups of 3 and 2
    x = _correlated(shape, seed=12).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))


@pytest.mark.parametrize("spec", ["iternorm(group_size=4, iters=5)", "dbn(group_size=3)"])
@pytest.mark.parametrize("c", [12, 10])
def test_2d_output_and_input_gradient_are_contiguous_and_match_4d(spec, c):
    """(N, C) input runs on row batches; it equals the same data as (N, C, 1, 1)."""
    x = _correlated((40, c), seed=13).requires_grad_(True)
    m = _randomize_affine(normlab.make_norm(spec, c).double())
    y = m(x)
    assert y.is_contiguous()
    g = torch.randn(40, c, dtype=torch.float64)
    y.backward(g)
    assert x.grad.is_contiguous()
    m4 = _randomize_affine(normlab.make_norm(spec, c).double())
    x4 = x.detach().clone().reshape(40, c, 1, 1).requires_grad_(True)
    y4 = m4(x4)
    y4.backward(g.reshape(40, c, 1, 1))
    torch.testing.assert_close(y, y4.reshape(40, c), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, x4.grad.reshape(40, c), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(m.weight.grad, m4.weight.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(m.running_wm, m4.running_wm, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.running_mean, m4.running_mean, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# hand-written kernels against the plain-autograd reference (normlab.use_kernels(False))
# ---------------------------------------------------------------------------------------------


def _step(m, x, g, kernels: bool):
    """A training forward/backward, then an eval forward/backward, with or without kernels:
    everything that comes out (outputs, input and parameter gradients, buffers)."""
    out = {}
    with normlab.use_kernels(kernels):
        for mode in ("train", "eval"):
            m.train(mode == "train")
            for p in m.parameters():
                p.grad = None
            xr = x.clone().requires_grad_(True)
            y = m(xr)
            out[f"{mode} functions"] = _kernel_nodes(y)
            y.backward(g)
            out[f"{mode} output"] = y.detach()
            out[f"{mode} input grad"] = xr.grad
            for name, p in m.named_parameters():
                out[f"{mode} {name} grad"] = p.grad
            if mode == "train":
                for name, b in m.named_buffers():
                    out[f"{name} after a step"] = b.clone()
    return out


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (IterNorm, {"iters": 5}),
        (IterNorm, {"iters": 0}),
        (IterNorm, {"iters": 1}),
        (IterNorm, {"iters": 12}),  # with the divergence guard
        (DBN, {}),
        (DBN, {"max_condition": 1e12}),
    ],
)
@pytest.mark.parametrize("c", [8, 10])  # groups of 4, 4 / of 4, 4 and 2
@pytest.mark.parametrize("shape_tail", [(), (3, 5)], ids=["2d", "4d"])
def test_kernel_equals_reference_float64(cls, kw, c, shape_tail):
    x = _correlated((12, c, *shape_tail), seed=c + len(shape_tail))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layer = _randomize_affine(cls(c, group_size=4, momentum=0.3, **kw).double())
    with torch.no_grad():  # start away from (0, I), so the eval step uses non-trivial buffers
        layer.running_mean.copy_(torch.linspace(-1, 1, c, dtype=torch.float64))
        wm = layer.running_wm.mul_(0.8).add_(0.05)
        k = c - 4 * (layer.num_groups - 1)  # real channels of the last group; its padding stays I
        wm[-1, k:], wm[-1, :, k:] = 0.0, 0.0
        wm[-1, k:, k:] = torch.eye(4 - k, dtype=torch.float64)
    ker = _step(copy.deepcopy(layer), x, g, kernels=True)
    ref = _step(copy.deepcopy(layer), x, g, kernels=False)
    assert ker.keys() == ref.keys()
    # (N, C, *) IterNorm without Newton kernel (T = 0, or T > 10 with the guard) is all autograd
    newton = cls is DBN or 1 <= kw["iters"] <= 10
    assert bool(ker["train functions"]) is (newton or not shape_tail), ker["train functions"]
    assert not ref["train functions"] and not ref["eval functions"], ref
    for what in ker:
        if not what.endswith("functions"):
            torch.testing.assert_close(ker[what], ref[what], rtol=1e-9, atol=1e-10, msg=what)
    # the step really moved the buffers (so the comparison above is not of two initial values)
    assert not torch.allclose(ker["running_wm after a step"], layer.running_wm)


@pytest.mark.parametrize("kernels", [True, False])
def test_reference_matches_the_numpy_oracles(kernels):
    """The plain reference (and the kernels) against numpy/scipy: ZCA, Eq. 3 as printed, and the
    two-step running estimates."""
    x = _correlated((8, 10, 3, 3), seed=21)
    with normlab.use_kernels(kernels):
        dbn = _randomize_affine(DBN(10, group_size=4).double())
        ref, _ = _reference(x, 4, dbn.eps, _zca, dbn.weight, dbn.bias)
        np.testing.assert_allclose(dbn(x).detach().numpy(), ref, rtol=1e-9, atol=1e-9)
        it = _randomize_affine(IterNorm(10, group_size=4, iters=3, momentum=0.5).double())
        matrix = lambda s: _iternorm_matrix(s, 3)  # noqa: E731
        ref, st1 = _reference(x, 4, it.eps, matrix, it.weight, it.bias)
        np.testing.assert_allclose(it(x).detach().numpy(), ref, rtol=1e-10, atol=1e-10)
        _, st2 = _reference(2 * x, 4, it.eps, matrix)
        it(2 * x)
    for gi, (a, b) in enumerate(zip(st1, st2)):
        k = a[1].shape[0]
        wm_ref = 0.5 * (0.5 * np.eye(k) + 0.5 * a[1]) + 0.5 * b[1]
        np.testing.assert_allclose(it.running_wm[gi, :k, :k].numpy(), wm_ref, rtol=1e-9)
        mean_ref = 0.25 * a[0] + 0.5 * b[0]
        np.testing.assert_allclose(it.running_mean[4 * gi : 4 * gi + k].numpy(), mean_ref)
    torch.testing.assert_close(it.running_wm[-1, 2:, 2:], torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("kernels", [True, False])
def test_gradcheck_reference_and_kernels(kernels):
    m = _randomize_affine(IterNorm(5, group_size=3, iters=3).double())  # groups of 3 and 2
    d = _randomize_affine(DBN(5, group_size=3).double())
    x = _correlated((4, 5, 2), seed=22).requires_grad_(True)
    with normlab.use_kernels(kernels):
        assert torch.autograd.gradcheck(lambda x, w, b: m(x), (x, m.weight, m.bias))
        assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))
        assert torch.autograd.gradcheck(lambda x, w, b: d(x), (x, d.weight, d.bias))


def test_second_derivatives_of_kernel_and_reference_agree():
    x = _correlated((9, 5), seed=23).requires_grad_(True)
    m = _randomize_affine(IterNorm(5, group_size=3, iters=4).double())
    out = []
    for kernels in (True, False):
        with normlab.use_kernels(kernels):
            (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        out.append((gx.detach(), ggx))
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-10)


def test_matrix_functions_kernel_equals_reference():
    torch.manual_seed(3)
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    sigma = a @ a.mT / 5 + 0.1 * torch.eye(5, dtype=torch.float64)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fns = {
        "newton": lambda s: newton_inverse_sqrt(s / 20, 6),
        "iternorm": lambda s: iternorm_whitening_matrix(s, 5),
        "iternorm guarded": lambda s: iternorm_whitening_matrix(s, 14, eps=1e-5),
        "zca": lambda s: zca_whitening_matrix(s, 1e-5),
    }
    for name, fn in fns.items():
        res = []
        for kernels in (True, False):
            s = sigma.clone().requires_grad_(True)
            with normlab.use_kernels(kernels):
                w = fn(s)
                (w * g).sum().backward()
            res.append((w.detach(), s.grad))
        torch.testing.assert_close(res[0], res[1], rtol=1e-10, atol=1e-11, msg=name)
    with normlab.use_kernels(False):
        _, lam = zca_whitening_matrix(sigma[0], return_eigenvalues=True)
    np.testing.assert_allclose(lam.numpy(), np.linalg.eigvalsh(sigma[0].numpy()), rtol=1e-12)


@pytest.mark.parametrize("kernels", [True, False])
def test_functional_forms_and_their_errors_in_both_paths(kernels):
    x = _correlated((20, 6), seed=24)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    with normlab.use_kernels(kernels):
        y = iterative_normalization(x, group_size=4, iters=5, weight=w)  # weight, no bias
        y0 = iterative_normalization(x, group_size=4, iters=5)
        torch.testing.assert_close(y, y0 * w)
        z = decorrelated_batch_norm(x, group_size=4, bias=w)  # bias, no weight
        ref, _ = _reference(x, 4, 1e-5, _zca)
        np.testing.assert_allclose((z - w).numpy(), ref, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="running_mean and running_wm"):
            iterative_normalization(x, 4, training=False)
        # group 1 (channels 4, 5) of the layout 4 + 2 is singular: its index is reported
        bad = x.clone()
        bad[:, 5] = bad[:, 4]
        with pytest.raises(ValueError, match=r"group\(s\) \[1\]"):
            decorrelated_batch_norm(bad, group_size=4, max_condition=1e3)


@pytest.mark.parametrize("kernels", [True, False])
def test_both_paths_take_their_sums_through_reduce_sums(kernels, monkeypatch):
    """The seam of normlab.sync_stats: inside a reduction scope every batch sum (count, Σx,
    Σxxᵀ) is all-reduced, in both paths; outside one, nothing is."""
    calls = []

    def all_reduce(tensors, group):
        calls.append((len(tensors), group))
        return tuple(tensors)

    monkeypatch.setattr(normlab.nn.stats, "all_reduce_sum", all_reduce)
    for shape in [(12, 10), (4, 10, 3, 3)]:
        for cls in (IterNorm, DBN):
            m = cls(10, group_size=4)
            with normlab.use_kernels(kernels):
                calls.clear()
                m(torch.randn(shape))
                assert not calls
                with reduction_scope("group"):
                    m(torch.randn(shape))
            # one call per uniform part of the groups (4 + 4 and 2) or one for (N, C) row batches
            expected = 1 if kernels and len(shape) == 2 else 2
            assert calls == [(3, "group")] * expected, (cls, shape, calls)


def test_reference_dbn_gradient_needs_distinct_eigenvalues():
    """Documented limit of the plain reference: autograd's eigenvector backward divides by
    λ_i − λ_j, so a batch with exactly repeated eigenvalues (here N = 1, Σ = εI) has a NaN input
    gradient without the kernels and a finite one (the closed-form backward) with them."""
    x = torch.randn(1, 8, dtype=torch.float64)
    for kernels, finite in ((True, True), (False, False)):
        xr = x.clone().requires_grad_(True)
        with normlab.use_kernels(kernels):
            y = DBN(8, group_size=8).double()(xr)
            (y * torch.arange(8.0, dtype=torch.float64)).sum().backward()
        assert torch.isfinite(y).all()
        assert bool(torch.isfinite(xr.grad).all()) is finite


def test_matrix_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        newton_inverse_sqrt(torch.ones(3, 4), 2)
    with pytest.raises(ValueError, match="iters"):
        newton_inverse_sqrt(torch.eye(3), -1)
    with pytest.raises(ValueError, match="iters"):
        iternorm_whitening_matrix(torch.eye(3), 2.5)
    with pytest.raises(ValueError, match="square"):
        zca_whitening_matrix(torch.ones(3))
    with pytest.raises(ValueError, match="min_eigenvalue"):
        zca_whitening_matrix(torch.eye(3), 0.0)


# ---------------------------------------------------------------------------------------------
# max_condition reads the real block of a smaller last group (both paths)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("shape", [(64, 10), (16, 10, 2, 2)])
def test_max_condition_checks_the_real_block_of_the_last_group(kernels, shape):
    """Data of standard deviation 100: every group's Σ has eigenvalues ≈ 10⁴, condition ≈ 1–10.
    The identity padding of the last group (2 channels of 4) must not count as eigenvalues 1
    (which would read as a condition number ≈ 10⁴); an ill-conditioned last group still raises,
    and is reported under its own index."""
    x = 100 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with normlab.use_kernels(kernels):
        DBN(10, group_size=4, max_condition=50)(x)
        bad = x.clone()
        bad[:, 9] = bad[:, 8] + 1e-3 * torch.randn(bad[:, 8].shape)
        with pytest.raises(ValueError, match=r"group\(s\) \[2\]"):
            DBN(10, group_size=4, max_condition=50)(bad)


# ---------------------------------------------------------------------------------------------
# empty batches: like torch's BatchNorm, alone and as an empty share under sync_stats
# ---------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 10), (0, 10, 4, 4), (3, 10, 0, 2)]


def _warm(m, shape_tail):
    with torch.no_grad():
        for s in range(2):
            m(_correlated((6, 10, *[max(k, 1) for k in shape_tail]), seed=s, dtype=torch.float32))
    return m


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "spec", ["iternorm(group_size=4)", "iternorm(group_size=4, iters=12)", "dbn(group_size=4)"]
)
def test_empty_batch_gives_an_empty_output_and_keeps_the_buffers(spec, shape, kernels):
    m = _warm(_randomize_affine(normlab.make_norm(spec, 10)), shape[2:])
    before = copy.deepcopy(m.state_dict())
    with normlab.use_kernels(kernels):
        for training in (True, False):
            m.train(training)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(shape, dtype=dtype, requires_grad=True)
                y = m(x)
                assert y.shape == x.shape and y.dtype == dtype
                y.sum().backward()
                assert x.grad.shape == x.shape
                assert torch.equal(m.weight.grad, torch.zeros(10)), m.weight.grad
                assert torch.equal(m.bias.grad, torch.zeros(10))
                m.zero_grad()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the functional forms too, with and without running buffers
    rm, rw = torch.zeros(10), torch.eye(4).repeat(3, 1, 1)
    x = torch.randn(shape)
    assert iterative_normalization(x, 4, running_mean=rm, running_wm=rw).shape == shape
    assert decorrelated_batch_norm(x, 4).shape == shape
    assert torch.equal(rm, torch.zeros(10)) and torch.equal(rw, torch.eye(4).repeat(3, 1, 1))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("shape", [(12, 10), (4, 10, 3, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("cls", [IterNorm, DBN])
def test_empty_share_joins_every_reduction_and_uses_the_others_statistics(
    cls, shape, kernels, monkeypatch
):
    """In-process stand-in for two processes, one without samples: the all-reduce is replaced by
    "add what the process with samples contributed". The empty share must make the same calls
    (same number, shapes and dtypes) and end with the same running statistics as a process that
    held the whole batch; with no samples anywhere (count 0) its buffers stay untouched and
    finite. (tests/test_empty.py runs the real two-process version.)"""
    x = _correlated(shape, seed=30, dtype=torch.float32)
    full = _randomize_affine(cls(10, group_size=4))
    empty = copy.deepcopy(full)
    calls: list[list[torch.Tensor]] = []
    mode = {"record": True}

    def all_reduce(tensors, group):
        if mode["record"]:
            calls.append([t.detach().clone() for t in tensors])
            return tuple(tensors)
        other = calls[len(replayed)]
        replayed.append([t.detach().clone() for t in tensors])
        assert [(t.shape, t.dtype) for t in tensors] == [(t.shape, t.dtype) for t in other]
        return tuple(t + o for t, o in zip(tensors, other))

    replayed: list[list[torch.Tensor]] = []
    monkeypatch.setattr(normlab.nn.stats, "all_reduce_sum", all_reduce)
    with normlab.use_kernels(kernels):
        with reduction_scope("group"):
            full(x).sum().backward()
        mode["record"] = False
        with reduction_scope("group"):
            xe = x[:0].clone().requires_grad_(True)
            y = empty(xe)
            y.sum().backward()
    assert y.shape == xe.shape and len(replayed) == len(calls) >= 1
    assert all(float(r[0]) == 0 for r in replayed)  # the empty share's count
    for (name, b_full), b_empty in zip(full.named_buffers(), empty.buffers()):
        torch.testing.assert_close(b_empty, b_full, rtol=1e-6, atol=1e-6, msg=name)
    # nobody had samples: the reduced count is 0
    alone = cls(10, group_size=4)
    init = copy.deepcopy(alone.state_dict())
    monkeypatch.setattr(normlab.nn.stats, "all_reduce_sum", lambda t, g: tuple(t))
    with normlab.use_kernels(kernels), reduction_scope("group"):
        alone(x[:0].clone().requires_grad_(True)).sum().backward()
    assert all(torch.equal(v, init[k]) for k, v in alone.state_dict().items())
    assert torch.isfinite(alone.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# torch.compile (one graph, forward and backward, no recompiles) and ONNX export
# ---------------------------------------------------------------------------------------------

COMPILE_SHAPES = {"NC": (16, 10), "NCHW": (4, 10, 3, 3)}  # groups of 4, 4 and 2
COMPILE_CASES = [
    (spec, sid, kernels)
    for spec in ("iternorm(group_size=4, iters=5)", "dbn(group_size=4)")
    for sid in COMPILE_SHAPES
    for kernels in (True, False)
] + [("iternorm(group_size=4, iters=12)", "NCHW", True)]  # the divergence guard


def _compile_case(spec: str, shape_id: str, kernels: bool, backend: str) -> None:
    shape = COMPILE_SHAPES[shape_id]
    eager = _randomize_affine(normlab.make_norm(spec, shape[1]))
    with normlab.use_kernels(kernels):
        twin, graphs = compiled_equals_eager(eager, shape, backend, no_grad_step=True)
    assert graphs == 3, dict(counters["stats"])  # train, eval, eval without autograd
    assert not torch.allclose(twin.running_wm, torch.eye(4))  # the updates were compiled in


def _case_id(case) -> str:
    spec, sid, kernels = case
    return f"{spec}-{sid}-{'kernels' if kernels else 'reference'}"


@pytest.mark.parametrize("case", COMPILE_CASES, ids=_case_id)
def test_compiled_equals_eager_without_recompiles(case):
    """torch.compile(fullgraph=True) with aot_eager: forward and backward, train and eval, both
    paths, (N, C) and (N, C, H, W) with a smaller last group; no recompiles; running buffers
    updated inside the graph."""
    _compile_case(*case, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILE_CASES[:-1], ids=_case_id)
def test_inductor_equals_eager_without_recompiles(case):
    _compile_case(*case, backend="inductor")


def test_newton_kernel_is_traced_whole_and_stays_twice_differentiable():
    """The hand-written Newton backward has no torch.autograd.grad inside: dynamo captures
    forward and backward in one graph, and a second derivative (autograd through the written-out
    reverse pass, with the iterates recomputed) equals that of the plain iteration."""
    torch._dynamo.reset()
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    a = a @ a.mT / 4 + torch.eye(4, dtype=torch.float64)
    a = a / a.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    fn = torch.compile(lambda t: newton_inverse_sqrt(t, 5), fullgraph=True, backend="aot_eager")
    a1 = a.clone().requires_grad_(True)
    fn(a1).square().sum().backward()
    a2 = a.clone().requires_grad_(True)
    newton_inverse_sqrt(a2, 5).square().sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-12, atol=1e-12)
    res = []
    for kernels in (True, False):
        t = a.clone().requires_grad_(True)
        with normlab.use_kernels(kernels):
            (g,) = torch.autograd.grad(
                newton_inverse_sqrt(t, 5).square().sum(), t, create_graph=True
            )
            (gg,) = torch.autograd.grad(g.square().sum(), t)
        res.append(gg)
    torch.testing.assert_close(res[0], res[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("spec", "shape", "kernels"),
    [
        (spec, shape, kernels)
        for spec in ("iternorm(group_size=4)", "dbn(group_size=4)")
        for shape, kernels in (((6, 10), True), ((3, 10, 4, 4), True), ((3, 10, 4, 4), False))
    ],
)
def test_onnx_round_trip_at_a_new_batch_size(spec, shape, kernels):
    """The eval-mode layer (smaller last group, trained buffers) exported with a dynamic batch;
    onnxruntime at other batch sizes equals eager."""
    m = _warm(_randomize_affine(normlab.make_norm(spec, 10)), shape[2:]).eval()
    with normlab.use_kernels(kernels):
        check_onnx_round_trip(m, shape)
