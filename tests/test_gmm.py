"""Tests for normlab.nn.gmm: the batched k-means++ / k-means / EM engine of MixtureNorm.

Oracles: scikit-learn's GaussianMixture and KMeans (same initialisation), scipy's chi-square test
for the D² sampling rule, scipy's log-sum-exp for posteriors, hand-computed small cases.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from normlab.nn import gmm
from normlab.nn.gmm import GMMParams, PointSet


def _blobs(seed: int = 0, c: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            rng.normal(0.0, 1.0, (300, c)),
            rng.normal(3.0, 0.5, (200, c)),
            rng.normal(-2.5, 1.5, (150, c)) * np.linspace(0.5, 2.0, c),
        ]
    )


def _sklearn_gmm(x: np.ndarray, init: GMMParams, n_iter: int, reg: float) -> GaussianMixture:
    k = init.weight.shape[0]
    gm = GaussianMixture(
        k,
        covariance_type="diag",
        max_iter=n_iter,
        tol=0.0,
        reg_covar=reg,
        weights_init=init.weight.numpy(),
        means_init=init.mean.numpy(),
        precisions_init=1.0 / init.var.numpy(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x)
    return gm


@pytest.mark.parametrize("n_em", [1, 3])
@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_em_matches_sklearn_from_same_init(n_em: int, reg: float) -> None:
    x = _blobs()
    xt = torch.from_numpy(x)
    torch.manual_seed(0)
    centers, _ = gmm.kmeans_plus_plus(xt, 3)
    # the engine's initial mixture (k-means, then the M-step of the hard assignment) ...
    init = gmm.fit_gmm(xt, 3, kmeans_iters=1, em_iters=0, reg_covar=reg, init_means=centers)
    assert torch.allclose(init.weight.sum(), torch.tensor(1.0, dtype=torch.float64))
    # ... then EM steps, against scikit-learn started from exactly that mixture
    ours = gmm.fit_gmm(xt, 3, kmeans_iters=1, em_iters=n_em, reg_covar=reg, init_means=centers)
    ref = _sklearn_gmm(x, init, n_em, reg)
    np.testing.assert_allclose(ours.weight.numpy(), ref.weights_, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.mean.numpy(), ref.means_, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.var.numpy(), ref.covariances_, atol=1e-4, rtol=0)
    # and it really moved: EM changed the parameters
    assert (ours.mean - init.mean).abs().max() > 1e-4


def test_em_layout_independent_and_matches_sklearn_on_4d_input() -> None:
    """(N, C, H, W) input is the same point set as its (N·H·W, C) matrix."""
    rng = np.random.default_rng(1)
    x4 = torch.from_numpy(rng.normal(size=(6, 3, 5, 4)))
    x4[:3] += 4.0
    pts = x4.movedim(1, -1).reshape(-1, 3)
    init_means = pts[[0, 70, 119]].clone()
    a = gmm.fit_gmm(x4, 3, 2, 2, reg_covar=1e-6, init_means=init_means)
    b = gmm.fit_gmm(pts, 3, 2, 2, reg_covar=1e-6, init_means=init_means)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)
    init = gmm.fit_gmm(pts, 3, 2, 0, reg_covar=1e-6, init_means=init_means)
    ref = _sklearn_gmm(pts.numpy(), init, 2, 1e-6)
    np.testing.assert_allclose(a.mean.numpy(), ref.means_, atol=1e-4)
    np.testing.assert_allclose(a.var.numpy(), ref.covariances_, atol=1e-4)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_kmeans_matches_sklearn_lloyd(iters: int) -> None:
    x = _blobs(2)
    init = x[[0, 1, 2]]  # deliberately poor: all from the first blob
    ours, labels = gmm.kmeans(torch.from_numpy(x), torch.from_numpy(init), iters)
    ref = KMeans(3, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
    np.testing.assert_allclose(ours.numpy(), ref.cluster_centers_, atol=1e-10)
    # the returned labels produced the returned centres
    for k in range(3):
        np.testing.assert_allclose(x[labels.numpy() == k].mean(0), ours[k].numpy(), atol=1e-10)


@pytest.mark.parametrize("iters", [0, 1, 2, 3])
def test_fit_gmm_starts_from_the_labels_of_the_final_centres(iters: int) -> None:
    """fit_gmm(kmeans_iters=n, em_iters=0) is the M-step of scikit-learn's KMeans(max_iter=n)
    labels — the assignment to the final centres (n = 0: to the seeds) — so every k-means
    iteration changes the initial mixture (n = 0 and n = 1 used to coincide)."""
    x = _blobs(6)
    seeds = x[[0, 1, 2]]  # all from the first blob: k-means keeps moving for a few iterations
    reg = 1e-3
    ours = gmm.fit_gmm(torch.from_numpy(x), 3, iters, 0, reg, init_means=torch.from_numpy(seeds))
    if iters:
        km = KMeans(3, init=seeds, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
        labels = km.labels_
    else:
        labels = ((x[:, None, :] - seeds[None]) ** 2).sum(-1).argmin(1)
    for k in range(3):
        sel = x[labels == k]
        np.testing.assert_allclose(ours.weight[k].item(), len(sel) / len(x), atol=1e-12)
        np.testing.assert_allclose(ours.mean[k].numpy(), sel.mean(0), atol=1e-10)
        np.testing.assert_allclose(ours.var[k].numpy(), sel.var(0) + reg, atol=1e-10)
    if iters:
        before = gmm.fit_gmm(
            torch.from_numpy(x), 3, iters - 1, 0, reg, init_means=torch.from_numpy(seeds)
        )
        assert (ours.mean - before.mean).abs().max() > 1e-3


def test_kmeans_init_params_are_hard_assignment_statistics() -> None:
    x = torch.from_numpy(_blobs(3))
    centers = x[[0, 400, 600]]
    c, labels, p = gmm.kmeans_init(x, centers, 2, reg_covar=0.5)
    for k in range(3):
        sel = x[labels == k]
        torch.testing.assert_close(p.weight[k], torch.tensor(len(sel) / len(x), dtype=x.dtype))
        torch.testing.assert_close(p.mean[k], sel.mean(0))
        torch.testing.assert_close(p.var[k], sel.var(0, unbiased=False) + 0.5)
    torch.testing.assert_close(c, p.mean)


def test_kmeans_plus_plus_d2_rule_chi_square() -> None:
    """Plain k-means++ (one candidate): P(first) uniform, P(second | first) ∝ D²."""
    pts = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    torch.manual_seed(1234)
    n = 3000
    pairs = np.array([gmm.kmeans_plus_plus(pts, 2, n_candidates=1)[1].numpy() for _ in range(n)])
    first_counts = np.bincount(pairs[:, 0], minlength=3)
    assert stats.chisquare(first_counts).pvalue > 1e-3
    vals = pts[:, 0].numpy()
    for f in range(3):
        d2 = (vals - vals[f]) ** 2
        second = pairs[pairs[:, 0] == f, 1]
        assert not np.any(second == f)  # D² = 0 is never drawn
        others = [j for j in range(3) if j != f]
        observed = np.array([np.sum(second == j) for j in others])
        expected = d2[others] / d2[others].sum() * len(second)
        assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_kmeans_plus_plus_greedy_keeps_best_candidate() -> None:
    """2 + ⌊ln 2⌋ = 2 candidates: from first centre 0, the candidates are iid ∝ D² = (1, 9) on
    points (1, 3); 3 lowers the potential more (1 vs 4), so it wins unless both draws are 1:
    P(second = 1) = 0.1² = 0.01."""
    assert gmm.num_seed_candidates(2) == 2
    pts = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    torch.manual_seed(99)
    pairs = np.array([gmm.kmeans_plus_plus(pts, 2)[1].numpy() for _ in range(4000)])
    second = pairs[pairs[:, 0] == 0, 1]
    p_hat = np.mean(second == 1)
    p_single = 0.1  # what plain k-means++ would give
    n = len(second)
    assert abs(p_hat - 0.01) < 4 * math.sqrt(0.01 * 0.99 / n)
    assert p_hat < p_single / 3


def test_kmeans_plus_plus_returns_points_and_is_deterministic() -> None:
    x = torch.randn(4, 3, 5, 5)
    torch.manual_seed(7)
    c1, i1 = gmm.kmeans_plus_plus(x, 4)
    torch.manual_seed(7)
    c2, i2 = gmm.kmeans_plus_plus(x, 4)
    assert torch.equal(c1, c2) and torch.equal(i1, i2)
    pts = x.movedim(1, -1).reshape(-1, 3)
    torch.testing.assert_close(c1, pts[i1])
    assert len(set(i1.tolist())) == 4  # distinct points have D² > 0 and are picked once


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 20, 21])
def test_num_seed_candidates(k: int) -> None:
    assert gmm.num_seed_candidates(k) == 2 + math.floor(math.log(k))


@pytest.mark.parametrize(
    ("total", "split"), [(0, (0, 0)), (1, (0, 1)), (2, (1, 1)), (3, (1, 2)), (4, (2, 2))]
)
def test_split_em_iters(total: int, split: tuple[int, int]) -> None:
    assert gmm.split_em_iters(total) == split
    assert sum(gmm.split_em_iters(total)) == total


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_split_em_iters_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="em_iters"):
        gmm.split_em_iters(bad)  # type: ignore[arg-type]


def _np_posteriors(x: np.ndarray, w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    ll = np.stack(
        [
            np.log(w[k]) + stats.norm.logpdf(x, loc=mu[k], scale=np.sqrt(var[k])).sum(1)
            for k in range(len(w))
        ],
        1,
    )
    return np.exp(ll - logsumexp(ll, axis=1, keepdims=True))


def test_e_step_matches_scipy_and_masking_renormalises() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 3)) * 2
    p = GMMParams(
        torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        torch.from_numpy(rng.normal(size=(3, 3))),
        torch.from_numpy(rng.uniform(0.5, 2.0, size=(3, 3))),
    )
    # the engine works in shifted coordinates: check it is shift-equivariant too
    ps = PointSet(torch.from_numpy(x))
    resp, ll = gmm.e_step(ps, GMMParams(p.weight, p.mean - ps.shift, p.var))
    ref = _np_posteriors(x, p.weight.numpy(), p.mean.numpy(), p.var.numpy())
    np.testing.assert_allclose(resp.numpy(), ref, atol=1e-10)
    keep = torch.tensor([True, False, True])
    resp_m, _ = gmm.e_step(torch.from_numpy(x), p, keep)
    assert torch.all(resp_m[:, 1] == 0)
    torch.testing.assert_close(resp_m.sum(1), torch.ones(200, dtype=torch.float64))
    ref_m = ref[:, [0, 2]] / ref[:, [0, 2]].sum(1, keepdims=True)
    np.testing.assert_allclose(resp_m[:, [0, 2]].numpy(), ref_m, atol=1e-10)
    # log-likelihood per point
    lref = logsumexp(
        np.stack(
            [
                np.log(p.weight[k].item())
                + stats.norm.logpdf(x, p.mean[k].numpy(), np.sqrt(p.var[k].numpy())).sum(1)
                for k in range(3)
            ],
            1,
        ),
        axis=1,
    )
    np.testing.assert_allclose(ll.numpy(), lref, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posteriors_are_never_subnormal(dtype: torch.dtype) -> None:
    """Points between two far-apart components get posteriors from 1 down to far below the
    smallest normal number: each is either exactly 0 or a normal number, and equals the
    log-sum-exp posterior (scipy, float64) to within that smallest normal number."""
    tiny = torch.finfo(dtype).tiny
    span = (
        2.0 * math.sqrt(-2.0 * math.log(tiny)) + 4.0
    )  # the far posterior reaches exp(-2 ln 1/tiny)
    x = torch.linspace(-2.0, span + 2.0, 4001, dtype=torch.float64)[:, None]
    p = GMMParams(
        torch.tensor([0.5, 0.5], dtype=dtype),
        torch.tensor([[0.0], [span]], dtype=dtype),
        torch.ones(2, 1, dtype=dtype),
    )
    resp, _ = gmm.e_step(x.to(dtype), p)
    assert ((resp == 0) | (resp >= tiny)).all()
    ref = _np_posteriors(
        x.numpy(), np.array([0.5, 0.5]), np.array([[0.0], [span]]), np.ones((2, 1))
    )
    assert (ref < tiny).any() and (ref > 0).any()  # the range really crosses the normal floor
    err = np.abs(resp.double().numpy() - ref)
    rtol = 1e-3 if dtype == torch.float32 else 1e-9  # exp of a ~500-size Mahalanobis term
    assert (err <= rtol * ref + 10 * tiny).all()


def test_zero_weight_component_gets_zero_posterior() -> None:
    x = torch.randn(50, 2)
    p = GMMParams(torch.tensor([1.0, 0.0]), torch.zeros(2, 2), torch.ones(2, 2))
    resp, ll = gmm.e_step(x, p)
    assert torch.all(resp[:, 1] == 0) and torch.all(resp[:, 0] == 1)
    assert torch.isfinite(ll).all()


def test_distances_and_sums_in_shifted_coordinates() -> None:
    x = torch.randn(3, 4, 6, dtype=torch.float64) + 100.0
    ps = PointSet(x)
    pts = x.movedim(1, -1).reshape(-1, 4)
    c = pts[[2, 9]]
    d = gmm.sq_distances(ps, c - ps.shift)
    ref = torch.cdist(pts, c) ** 2
    torch.testing.assert_close(d.transpose(1, 2).reshape(-1, 2), ref)
    r = torch.rand(3, 2, 6, dtype=torch.float64)
    cnt, s1, s2 = ps.sums(r)
    rp = r.movedim(1, -1).reshape(-1, 2)
    xs = pts - ps.shift
    torch.testing.assert_close(cnt, rp.sum(0))
    torch.testing.assert_close(s1, rp.t() @ xs)
    torch.testing.assert_close(s2, rp.t() @ xs**2)


def test_subset_draws_distinct_points() -> None:
    x = torch.arange(40.0).reshape(2, 1, 20)  # point value = its flat index
    ps = PointSet(x)
    torch.manual_seed(0)
    sub = ps.subset(0.25, minimum=3)
    assert sub.count == 10
    vals = (sub.raw[:, 0]).tolist()
    assert len(set(vals)) == 10 and all(v in range(40) for v in vals)
    assert ps.subset(0.01, minimum=3).count == 3


def test_degenerate_data_stays_finite() -> None:
    # all points identical: fewer distinct points than K
    same = torch.ones(10, 3)
    torch.manual_seed(0)
    c, idx = gmm.kmeans_plus_plus(same, 3)
    assert torch.isfinite(c).all() and idx.min() >= 0 and idx.max() < 10
    p = gmm.fit_gmm(same, 3, 1, 2, reg_covar=1e-5)
    for t in p:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(p.weight.sum(), torch.tensor(1.0))
    # two distinct points, K = 4; a constant channel; a single point
    for x in (
        torch.tensor([[0.0, 1.0], [5.0, 1.0]]).repeat(4, 1),
        torch.cat([torch.randn(30, 2), torch.full((30, 1), 3.0)], 1),
        torch.randn(1, 3),
    ):
        p = gmm.fit_gmm(x, 4, 1, 3, reg_covar=1e-5)
        for t in p:
            assert torch.isfinite(t).all()
        assert torch.all(p.var >= 1e-5)
        resp, ll = gmm.e_step(x, p)
        assert torch.isfinite(resp).all() and torch.isfinite(ll).all()
        torch.testing.assert_close(resp.sum(1), torch.ones(len(x)))


def test_half_precision_points_use_float32() -> None:
    x = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    p = gmm.fit_gmm(x, 2, 1, 1)
    assert p.mean.dtype == torch.float32 and torch.isfinite(p.mean).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be"):
        gmm.kmeans_plus_plus(torch.randn(5, 2), 0)
    with pytest.raises(ValueError, match="n_candidates"):
        gmm.kmeans_plus_plus(torch.randn(5, 2), 2, n_candidates=0)
    with pytest.raises(ValueError, match="init_means"):
        gmm.fit_gmm(torch.randn(5, 2), 2, 1, 1, init_means=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="PointSet"):
        PointSet(torch.randn(5))
