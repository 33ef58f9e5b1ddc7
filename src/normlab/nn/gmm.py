r"""Batched k-means++ / k-means / EM for diagonal-covariance Gaussian mixtures (no autograd).

The fitting engine behind :class:`normlab.MixtureNorm` (Kalayeh & Shah, Sec. 3.2 and 4.2), usable
on its own. A mixture is fitted to *points*: the C-dimensional vectors of a channel-first tensor,
one per sample and position, i.e. ``x`` of shape ``(N, C)`` (N points) or ``(N, C, *)``
(N·prod(*) points). The engine never moves channels last: every pass over the points is a
(batched) matrix product on the channel-first layout, e.g. the log-likelihood of all points
under all K components is

    log N(x | μ_k, σ²_k) = -½ [C log 2π + Σ_c log σ²_kc + (1/σ²_k)·x² - 2 (μ_k/σ²_k)·x + Σ_c μ²_kc/σ²_kc]

with the two dot products computed as ``(K, C) @ (C, points)`` products; weighted sums go through
:func:`normlab.nn.stats.weighted_channel_sums`. Posteriors ("responsibilities") therefore have the
layout ``(N, K)`` / ``(N, K, L)`` (component index where the channel index was).

Pieces (all under ``torch.no_grad()``; fixed iteration counts, so no host synchronisation):

* :func:`kmeans_plus_plus` — greedy k-means++ seeding (Kalayeh & Shah, Sec. 4.2: "2 + log(K)
  trials"): each centre after the first is the best of ``2 + ⌊ln K⌋`` candidates drawn by D².
* :func:`kmeans` — Lloyd iterations (an empty cluster keeps its centre).
* :func:`hard_m_step` / :func:`m_step` — maximum-likelihood (λ, μ, σ²) from hard or soft
  responsibilities, with ``reg_covar`` added to every variance (as scikit-learn does).
* :func:`e_step` — posteriors by log-sum-exp; components can be masked out (``keep``), which
  renormalises the posteriors over the remaining ones (Kalayeh & Shah, Sec. 5.3).
* :func:`kmeans_init` — Lloyd iterations, then the hard M-step of the assignment that produced
  the final centres: the initial mixture.
* :func:`fit_from_centers` / :func:`fit_gmm` — (seeding,) k-means, the initial mixture, EM.

Across processes (:func:`normlab.sync_stats`) every sum is all-reduced and the seeding uses the
first process's random draws, so every process ends with the fit a single process holding the
whole batch gets; the points never leave their process. Coordinates are shifted by a per-channel
constant (:class:`PointSet`; by default the points' mean) so that squares do not cancel; squared
distances are clamped at 0, variances floored by ``reg_covar``, and a component that loses all
its points gets weight 0: degenerate data gives duplicate or empty components, never NaN/Inf.
Details: ``docs/methods/mixture.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from normlab.nn._utils import stat_dtype
from normlab.nn.stats import (
    current_group,
    reduce_sums,
    weighted_channel_first_sums,
    weighted_channel_sums,
)

__all__ = [
    "GMMParams",
    "PointSet",
    "assign",
    "e_step",
    "fit_from_centers",
    "fit_gmm",
    "hard_m_step",
    "kmeans",
    "kmeans_init",
    "kmeans_plus_plus",
    "log_joint",
    "m_step",
    "num_seed_candidates",
    "one_hot",
    "split_em_iters",
    "sq_distances",
]

_LOG_2PI = math.log(2.0 * math.pi)


class GMMParams(NamedTuple):
    """Diagonal Gaussian mixture: ``weight`` λ (K,), ``mean`` μ (K, C), ``var`` σ² (K, C)."""

    weight: Tensor
    mean: Tensor
    var: Tensor


def split_em_iters(em_iters: int) -> tuple[int, int]:
    """Split the paper's "EM iter." (Kalayeh & Shah, Sec. 4.2: the same number of k-means and EM
    iterations, reported as their sum) into ``(kmeans_iters, em_iters)`` for
    :func:`fit_from_centers`. An odd total gives the extra iteration to EM (it is EM that refines
    the likelihood; k-means only initialises it): 0 -> (0, 0), 1 -> (0, 1), 2 -> (1, 1),
    3 -> (1, 2), 4 -> (2, 2)."""
    if isinstance(em_iters, bool) or not isinstance(em_iters, int) or em_iters < 0:
        raise ValueError(f"em_iters must be an integer >= 0, got {em_iters!r}")
    km = em_iters // 2
    return km, em_iters - km


def num_seed_candidates(k: int) -> int:
    """Candidates per greedy k-means++ step: ``2 + ⌊ln K⌋`` (Kalayeh & Shah, Sec. 4.2; scikit-learn's rule)."""
    return 2 + int(math.log(k))


class PointSet:
    """The points of a channel-first tensor, prepared once for many passes.

    ``x`` ``(N, C)`` is N points; ``(N, C, *)`` is viewed (not copied) as ``(N, C, L)``: ``raw``.
    The engine works in coordinates shifted by ``shift`` (C,) — by default the points' mean;
    ``center=False`` uses 0 — which keeps every step equivariant but avoids cancellation where it
    hurts: the cached squares ``sq = (x − shift)²`` (the one activation-sized tensor allocated here)
    give variances and squared norms around the shift; dot products and first moments are taken on
    ``raw`` and corrected by the shift (no cancellation of squares there). Every engine function
    given a PointSet takes and returns means/centres in its shifted coordinates (:meth:`unshift`
    maps parameters back); given a plain tensor, it works in the tensor's own coordinates.
    Statistics use float32 for half-precision input.
    """

    def __init__(self, x: Tensor, shift: Tensor | None = None, center: bool = True) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"PointSet: expected (N, C) or (N, C, *) points, got shape {tuple(x.shape)}"
            )
        dt = stat_dtype(x)
        shape = x.shape
        x = x.detach().to(dt)
        if x.dim() > 2:  # an empty set of points is kept flat: (0, C)
            x = x.reshape(x.shape[0], x.shape[1], -1) if x.numel() else x.reshape(0, x.shape[1])
        if shift is None:
            if center:  # the mean of all points (of every process inside a reduction scope)
                n = x.shape[0] * (1 if x.dim() == 2 else x.shape[2])
                # a fill kernel, not a host-to-device copy; n stays symbolic under export
                count = torch.full((), n, dtype=dt, device=x.device)
                count, s1 = reduce_sums(count, x.sum(0) if x.dim() == 2 else x.sum((0, 2)))
                shift = s1 / count.clamp_min(1.0)
            else:
                shift = x.new_zeros(x.shape[1])
        self._set(x, shift.detach().to(dt), shape)

    def _set(self, raw: Tensor, shift: Tensor, shape: torch.Size) -> None:
        self.shape = shape
        self._flat = raw.dim() == 2
        self.raw = raw
        self.shift = shift
        sq = raw - self._cv(shift)
        self.sq: Tensor = sq.mul_(sq)
        self._norms: Tensor | None = None
        self.channels = raw.shape[1]
        self.count = raw.shape[0] * (1 if self._flat else raw.shape[2])

    @property
    def norms(self) -> Tensor:
        """Squared norms of the shifted points, ``(N, 1)`` / ``(N, 1, L)`` (computed once)."""
        if self._norms is None:
            self._norms = self.sq.sum(1, keepdim=True)
        return self._norms

    def subset(
        self, fraction: float, minimum: int = 1, generator: torch.Generator | None = None
    ) -> PointSet:
        """A uniformly random subset (without replacement) of ``ceil(fraction · m)`` points (at
        least ``minimum``, at most m) as a flat ``(n, C)`` point set with the same shift."""
        n = min(self.count, max(minimum, math.ceil(fraction * self.count)))
        idx = torch.randperm(self.count, device=self.device, generator=generator)[:n]
        sub = PointSet.__new__(PointSet)
        pts = self.points_at(idx) + self.shift
        sub._set(pts, self.shift, pts.shape)
        return sub

    @property
    def dtype(self) -> torch.dtype:
        return self.raw.dtype

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def _cv(self, v: Tensor) -> Tensor:
        return v if self._flat else v[..., None]

    def project(self, coef: Tensor) -> Tensor:
        """``coef`` (J, C) times every shifted point: ``(N, J)`` / ``(N, J, L)``."""
        off = coef @ self.shift
        if self._flat:
            return (self.raw @ coef.t()).sub_(off)
        return (coef @ self.raw).sub_(off[:, None])

    def points_at(self, index: Tensor) -> Tensor:
        """The shifted points with flat indices ``index`` (J,) as a (J, C) matrix (zeros if the
        set is empty: a process with no points of its own inside a reduction scope)."""
        if self.count == 0:
            return self.raw.new_zeros(index.shape[0], self.channels)
        if self._flat:
            return self.raw[index] - self.shift
        length = self.raw.shape[2]
        return self.raw[index // length, :, index % length] - self.shift

    def take_squares(self) -> tuple[Tensor]:
        """Hand over the squares' memory (e.g. to become an output): ``(sq,)``; the set keeps
        none afterwards."""
        sq = self.sq
        self.sq = None  # type: ignore[assignment]
        return (sq,)

    def sums(self, resp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Σ r_k, Σ r_k x, Σ r_k x² of the shifted points for responsibilities ``resp`` in the
        points' layout (K in dim 1), via :func:`~normlab.nn.stats.weighted_channel_sums`."""
        cnt, s1, s2 = weighted_channel_sums(self.raw, resp.to(self.dtype), self.sq)
        return cnt, s1 - cnt[:, None] * self.shift, s2

    def first_sums(self, resp: Tensor) -> tuple[Tensor, Tensor]:
        """Σ r_k and Σ r_k x of :meth:`sums` alone (no pass over the squares)."""
        cnt, s1 = weighted_channel_first_sums(self.raw, resp.to(self.dtype))
        return cnt, s1 - cnt[:, None] * self.shift

    def unshift(self, params: GMMParams) -> GMMParams:
        return GMMParams(params.weight, params.mean + self.shift, params.var)

    def as_points(self, t: Tensor) -> Tensor:
        """A per-point tensor in this layout ((N, J) or (N, J, L)) back to ``(N, J, *)``."""
        if t.dim() == 2:
            return t
        return t.reshape(self.shape[0], t.shape[1], *self.shape[2:])


def _as_pointset(x: Tensor | PointSet, center: bool = False) -> PointSet:
    """A tensor is used unshifted (results in its own coordinates) unless ``center``."""
    if isinstance(x, PointSet):
        return x
    return PointSet(x, center=center)


@torch.no_grad()
def sq_distances(points: Tensor | PointSet, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``||x - c_j||²`` of every point to centres (J, C), clamped at 0.
    Shape ``(N, J)`` / ``(N, J, L)``."""
    ps = _as_pointset(points)
    c = centers.to(ps.dtype)
    # ||x_s||² − 2 c·x_s + ||c||² with x_s = x − shift; the constant parts folded into one add
    d = ps.raw @ (-2.0 * c).t() if ps._flat else (-2.0 * c) @ ps.raw
    d.add_(ps._cv((c * c).sum(1) + 2.0 * (c @ ps.shift))).add_(ps.norms)
    return d.clamp_min_(0.0)


def _point_sum(t: Tensor) -> Tensor:
    """Sum over points of a (N, J) / (N, J, L) tensor -> (J,)."""
    return t.sum(0) if t.dim() == 2 else t.sum((0, 2))


@torch.no_grad()
def kmeans_plus_plus(
    points: Tensor | PointSet,
    k: int,
    n_candidates: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding. Returns ``(centers (K, C), indices (K,))`` (flat point indices).

    The first centre is uniform over the points; each next one: draw ``n_candidates`` points
    (default ``2 + ⌊ln K⌋``) with probability ∝ D(x)² (squared distance to the nearest chosen
    centre), keep the candidate that most lowers Σ_x D(x)². ``n_candidates=1`` is plain k-means++.
    If every point already coincides with a centre (fewer distinct points than K), candidates are
    drawn uniformly. Sampling is inverse-CDF: the ``1 + (K − 1)·n_candidates`` uniforms are drawn
    up front with ``torch.rand`` on the points' device, so it is reproducible under
    ``torch.manual_seed`` and needs no host synchronisation.

    **Across processes.** Inside a :func:`~normlab.nn.stats.reduction_scope` over a process group
    (a MixtureNorm synchronised by :func:`normlab.sync_stats`), the seeding is that of the *global*
    point set — the concatenation of every process's points in rank order — and identical on every
    process: the uniforms of the group's first process are used by all (one all-reduce), each
    draw is located in the global cumulative distribution (each process's share of the D² mass
    is all-reduced; the process holding the drawn point contributes it to an all-reduced candidate
    matrix) and the candidates' potentials are all-reduced before the argmin. So the result equals,
    up to rounding, the single-process seeding of the whole batch with the first process's
    generator state, the point data never leaves its process (2K + 1 small collectives in all),
    and ``indices`` are flat indices into that concatenation (carried in the points' dtype:
    exact below 2²⁴ points in all for float32).
    """
    ps = _as_pointset(points)
    if k < 1:
        raise ValueError(f"kmeans_plus_plus: k must be >= 1, got {k}")
    n_cand = num_seed_candidates(k) if n_candidates is None else n_candidates
    if n_cand < 1:
        raise ValueError(f"kmeans_plus_plus: n_candidates must be >= 1, got {n_candidates}")
    dev, dt, m = ps.device, ps.dtype, ps.count
    group = current_group()
    if m < 1 and group is None:  # in a group, a process may hold none of the points
        raise ValueError("kmeans_plus_plus: need at least one point")
    u = torch.rand(1 + (k - 1) * n_cand, device=dev, dtype=dt, generator=generator)
    if group is not None:
        return _kmeans_plus_plus_synced(ps, k, n_cand, u, group)
    first = u[:1].mul(m).long().clamp_max_(m - 1)
    indices = [first]
    centers = [ps.points_at(first)]
    d2 = sq_distances(ps, centers[0])  # (N, 1[, L]); .flatten() is in flat point order
    for step in range(1, k):
        flat = d2.flatten()
        total = flat.sum()
        # all mass zero -> uniform draw (no Python branch on the tensor)
        cdf = torch.cumsum(flat + (total <= 0).to(dt), 0)
        draws = u[1 + (step - 1) * n_cand : 1 + step * n_cand].mul(cdf[-1])
        cand = torch.searchsorted(cdf, draws, right=True).clamp_max_(m - 1)
        new_d2 = torch.minimum(sq_distances(ps, ps.points_at(cand)), d2)  # (N, J[, L])
        best = _point_sum(new_d2).argmin()[None]
        d2 = new_d2.index_select(1, best)
        pick = cand.index_select(0, best)
        indices.append(pick)
        centers.append(ps.points_at(pick))
    return torch.cat(centers, 0), torch.cat(indices, 0)


def _kmeans_plus_plus_synced(
    ps: PointSet, k: int, n_cand: int, u: Tensor, group: object
) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_plus_plus` of the points of every process of ``group`` (see there). Every
    collective is a :func:`~normlab.nn.stats.reduce_sums` of small tensors; the per-process shares
    (counts, D² masses) travel as one-hot rows, so a SUM all-reduce gathers them exactly."""
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev, dt, m = ps.device, ps.dtype, ps.count
    mine_col = torch.arange(world, device=dev) == rank  # (W,) one-hot of this process
    lead = float(rank == 0)
    # the first process's uniforms, every process's point count (exact: 0 + x = x)
    u, counts = reduce_sums(u * lead, mine_col.to(dt) * m)
    count_start = torch.cumsum(counts, 0) - counts  # flat index of each process's first point

    def locate(targets: Tensor, shares: Tensor, cdf: Tensor | None) -> tuple[Tensor, Tensor]:
        """Global inverse-CDF positions ``targets`` (J,) over per-process masses ``shares`` (W,):
        (local flat index (J,), whether this process holds the point (J,))."""
        ends = torch.cumsum(shares, 0)
        owner = torch.searchsorted(ends, targets, right=True).clamp_max_(world - 1)
        local = targets - (ends - shares)[rank]
        # uniform over the points (cdf None): the cdf would be 1, 2, …, m
        idx = local.floor().long() if cdf is None else torch.searchsorted(cdf, local, right=True)
        return idx.clamp_(0, m - 1), owner == rank

    def gather_points(idx: Tensor, held: Tensor) -> tuple[Tensor, Tensor]:
        """The (shifted) points at ``idx`` held by their owners, and their global flat indices."""
        rows = torch.cat([ps.points_at(idx), (idx.to(dt) + count_start[rank])[:, None]], 1)
        (rows,) = reduce_sums(torch.where(held[:, None], rows, 0.0))
        return rows[:, :-1], rows[:, -1].round().long()

    first, held = locate(u[:1] * counts.sum(), counts, None)
    center, index = gather_points(first, held)
    centers, indices = [center], [index]
    d2 = sq_distances(ps, center)  # (N, 1[, L])
    (shares,) = reduce_sums(torch.where(mine_col, d2.sum(), 0.0))  # (W,) D² mass per process
    for step in range(1, k):
        flat = d2.flatten()
        uniform = shares.sum() <= 0  # all mass zero -> uniform draw, as in one process
        cdf = torch.cumsum(flat + uniform.to(dt), 0)
        mass = torch.where(uniform, counts, shares)
        draws = u[1 + (step - 1) * n_cand : 1 + step * n_cand] * mass.sum()
        cand, cand_index = gather_points(*locate(draws, mass, cdf))
        new_d2 = torch.minimum(sq_distances(ps, cand), d2)  # (N, J[, L])
        (pot,) = reduce_sums(torch.where(mine_col, _point_sum(new_d2)[:, None], 0.0))  # (J, W)
        best = pot.sum(1).argmin()[None]
        d2 = new_d2.index_select(1, best)
        shares = pot.index_select(0, best)[0]
        centers.append(cand.index_select(0, best))
        indices.append(cand_index.index_select(0, best))
    return torch.cat(centers, 0), torch.cat(indices, 0)


def assign(points: Tensor | PointSet, centers: Tensor, keep: Tensor | None = None) -> Tensor:
    """Index of the nearest centre (K, C) for every point, ``(N,)`` / ``(N, L)``; components with
    ``keep[k] = False`` are never chosen (at least one must be kept)."""
    ps = _as_pointset(points)
    with torch.no_grad():
        d = sq_distances(ps, centers)
        if keep is not None:
            d = d.masked_fill(~ps._cv(keep), float("inf"))
        return d.min(1).indices  # (faster than argmin over a short strided dim)


def one_hot(labels: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Hard responsibilities in the points' layout: ``(N,)`` -> ``(N, K)``, ``(N, L)`` ->
    ``(N, K, L)``."""
    ar = torch.arange(k, device=labels.device)
    if labels.dim() == 1:
        return (labels[:, None] == ar).to(dtype)
    return (labels[:, None, :] == ar[:, None]).to(dtype)


@torch.no_grad()
def kmeans_init(
    points: Tensor | PointSet, centers: Tensor, iters: int, reg_covar: float
) -> tuple[Tensor, Tensor, GMMParams]:
    """``iters`` Lloyd iterations from ``centers`` (K, C), then the initial mixture.

    Returns ``(centers, labels, params)``: ``labels`` (``(N,)`` / ``(N, L)``) is the assignment
    that produced the returned centres (for ``iters = 0``: the assignment to the given centres) and
    ``params`` its :func:`hard_m_step` (for ``iters >= 1`` its means are the returned centres).
    An empty cluster keeps its centre and gets weight 0.
    """
    ps = _as_pointset(points)
    k = centers.shape[0]
    c = centers.to(ps.dtype)
    labels = assign(ps, c)
    for _ in range(iters - 1):  # Lloyd updates whose mixture is not returned: centroids only
        c = _centroids(ps, labels, k, c)
        labels = assign(ps, c)
    params = hard_m_step(ps, labels, k, reg_covar, c)
    return (params.mean if iters else c), labels, params


def _centroids(ps: PointSet, labels: Tensor, k: int, fallback_mean: Tensor) -> Tensor:
    """The means of :func:`hard_m_step` (the same arithmetic), without the squares' sums."""
    cnt, s1 = ps.first_sums(one_hot(labels, k, ps.dtype))
    return _means_from_sums(cnt, s1, fallback_mean)


def _safe_counts(cnt: Tensor) -> Tensor:
    return cnt.clamp_min(torch.finfo(cnt.dtype).tiny)[:, None]


def _means_from_sums(cnt: Tensor, s1: Tensor, fallback_mean: Tensor) -> Tensor:
    """Σ r x / Σ r per component; ``fallback_mean`` for a component of zero weight."""
    return torch.where((cnt > 0)[:, None], s1 / _safe_counts(cnt), fallback_mean.to(s1.dtype))


def kmeans(points: Tensor | PointSet, centers: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """``iters`` Lloyd iterations from ``centers`` (K, C): ``(centers, labels)``, see
    :func:`kmeans_init`."""
    c, labels, _ = kmeans_init(points, centers, iters, 0.0)
    return c, labels


def _params_from_sums(
    cnt: Tensor, s1: Tensor, s2: Tensor, reg_covar: float, fallback_mean: Tensor
) -> GMMParams:
    mean = _means_from_sums(cnt, s1, fallback_mean)
    var = (s2 / _safe_counts(cnt) - mean * mean).clamp_min(0.0)
    var = torch.where((cnt > 0)[:, None], var, torch.ones_like(var)) + reg_covar
    weight = cnt / cnt.sum()  # counts from the (possibly all-reduced) sums, not local shapes
    return GMMParams(weight, mean, var)


@torch.no_grad()
def hard_m_step(
    points: Tensor | PointSet, labels: Tensor, k: int, reg_covar: float, fallback_mean: Tensor
) -> GMMParams:
    """(λ, μ, σ²) of a hard assignment: cluster fractions, centroids, within-cluster variances
    (+ ``reg_covar``). An empty cluster gets λ = 0, μ = ``fallback_mean[k]``, σ² = 1 + reg."""
    ps = _as_pointset(points)
    cnt, s1, s2 = ps.sums(one_hot(labels, k, ps.dtype))
    return _params_from_sums(cnt, s1, s2, reg_covar, fallback_mean)


@torch.no_grad()
def m_step(
    points: Tensor | PointSet, resp: Tensor, reg_covar: float, fallback_mean: Tensor
) -> GMMParams:
    """Maximum-likelihood (λ, μ, σ²) from responsibilities ``resp`` (points' layout, K in dim 1):
    λ_k = Σ_i r_ik / m, μ_k = Σ_i r_ik x_i / Σ_i r_ik, σ²_k = Σ_i r_ik (x_i - μ_k)² / Σ_i r_ik +
    reg_covar (computed from the sums, clamped at 0). Zero-weight components keep
    ``fallback_mean``."""
    ps = _as_pointset(points)
    cnt, s1, s2 = ps.sums(resp)
    return _params_from_sums(cnt, s1, s2, reg_covar, fallback_mean)


@torch.no_grad()
def log_joint(
    points: Tensor | PointSet,
    log_weight: Tensor,
    mean: Tensor,
    var: Tensor,
) -> Tensor:
    """``log λ_k + log N(x | μ_k, diag σ²_k)`` for every point and component, shape ``(N, K)`` /
    ``(N, K, L)``; ``log_weight`` may hold -inf (masked or empty components). The Mahalanobis
    term is computed by the expansion above and clamped at 0."""
    ps = _as_pointset(points)
    dt = ps.dtype
    var = var.to(dt)
    mean = mean.to(dt)
    inv = 1.0 / var
    # Σ_c (x_s − μ)²/σ² = (1/σ²)·x_s² − 2 (μ/σ²)·x_s + Σ μ²/σ², x_s = x − shift = raw − shift
    lin = -2.0 * mean * inv
    maha = ps.sq @ inv.t() if ps._flat else inv @ ps.sq
    maha.add_(ps.raw @ lin.t() if ps._flat else lin @ ps.raw)
    maha.add_(ps._cv((mean * mean * inv).sum(1) - lin @ ps.shift))
    norm = log_weight.to(dt) - 0.5 * (ps.channels * _LOG_2PI + torch.log(var).sum(1))
    return maha.clamp_min_(0.0).mul_(-0.5).add_(ps._cv(norm))


@torch.no_grad()
def e_step(
    points: Tensor | PointSet, params: GMMParams, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Posteriors ν_ik = λ_k p_k(x_i) / Σ_j λ_j p_j(x_i) (Kalayeh & Shah, Eq. 31) and the per-point
    log-likelihood log p(x_i). Components with ``keep[k] = False`` (and components of weight 0)
    get posterior exactly 0; the others are renormalised among themselves. At least one component
    must be kept. Shapes ``(N, K[, L])`` and ``(N[, L])``.

    A posterior that would be subnormal (below the dtype's smallest normal number, about 1e-38
    in float32) is exactly 0: subnormal operands slow every later product with ν on x86 CPUs by
    orders of magnitude (they made up 5 % of the posteriors of a CIFAR network's activations and
    tripled the layer's time), and they change no sum by more than their own size."""
    ps = _as_pointset(points)
    logw = torch.log(params.weight.to(ps.dtype))
    if keep is not None:
        logw = logw.masked_fill(~keep, float("-inf"))
    lj = log_joint(ps, logw, params.mean, params.var)
    top = lj.max(1, keepdim=True).values  # finite: a kept component has finite log-density
    # below this log-ratio exp(·)/total (total ≤ K) could fall under the smallest normal number
    floor = math.log(torch.finfo(lj.dtype).tiny) + math.log(lj.shape[1]) + 1.0
    lj.sub_(top)
    resp = lj.masked_fill_(lj < floor, float("-inf")).exp_()  # log-sum-exp in place
    total = resp.sum(1, keepdim=True)
    return resp.div_(total), (top + torch.log(total)).squeeze(1)


@torch.no_grad()
def fit_from_centers(
    points: Tensor | PointSet, centers: Tensor, kmeans_iters: int, em_iters: int, reg_covar: float
) -> GMMParams:
    """The fit from given centres (K, C): ``kmeans_iters`` Lloyd iterations, the initial mixture
    from the assignment to the final centres (:func:`hard_m_step`, as scikit-learn's
    ``GaussianMixture`` starts from k-means labels; with ``kmeans_iters = 0`` the assignment to
    ``centers``), then ``em_iters`` EM iterations (E-step, M-step). Centres and result in the
    points' (shifted) coordinates. Every increment of either count does work."""
    ps = _as_pointset(points)
    # kmeans_init(n + 1): n Lloyd updates, then the M-step of the assignment to their result
    _, _, params = kmeans_init(ps, centers, kmeans_iters + 1, reg_covar)
    for _ in range(em_iters):
        resp, _ = e_step(ps, params)
        params = m_step(ps, resp, reg_covar, params.mean)
    return params


def fit_gmm(
    points: Tensor | PointSet,
    k: int,
    kmeans_iters: int,
    em_iters: int,
    reg_covar: float = 1e-6,
    n_candidates: int | None = None,
    init_means: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GMMParams:
    """Fit a K-component diagonal GMM to the points of ``points`` (Kalayeh & Shah, Sec. 3.2, 4.2).

    k-means++ seeding (skipped if ``init_means`` (K, C), in the points' original coordinates, is
    given), then :func:`fit_from_centers`: ``kmeans_iters`` Lloyd iterations, the initial mixture
    from the assignment to the final centres, ``em_iters`` EM iterations — scikit-learn's
    ``KMeans(max_iter=kmeans_iters)`` labels, their M-step, ``GaussianMixture(max_iter=em_iters)``.
    Returns the parameters in the points' original coordinates.
    """
    ps = _as_pointset(points, center=True)
    if init_means is None:
        centers, _ = kmeans_plus_plus(ps, k, n_candidates, generator)
    else:
        if init_means.shape != (k, ps.channels):
            raise ValueError(
                f"fit_gmm: init_means must have shape ({k}, {ps.channels}), got {tuple(init_means.shape)}"
            )
        centers = init_means.to(ps.dtype) - ps.shift
    return ps.unshift(fit_from_centers(ps, centers, kmeans_iters, em_iters, reg_covar))
