r"""Mixture Normalization (Kalayeh & Shah, Sec. 3.2, Eq. 26–40; Sec. 4.2, 5.1, 5.3).

Points are the C-dimensional vectors x_i of a channel-first input, one per sample and position
(m = N·H·W; (N, C) input is N points). Per training batch a K-component Gaussian mixture with
diagonal covariances is fitted to them outside autograd (:mod:`normlab.nn.gmm`), giving posteriors
ν (m × K, Eq. 31). The *mixture normalizing transform* (Eq. 34–36) is then

.. math::

    λ_k = \tfrac1m \textstyle\sum_i ν_{ik},\quad \hat ν_{ik} = ν_{ik} / \sum_j ν_{jk},\quad
    μ_k = \sum_i \hat ν_{ik} x_i,\quad σ^2_k = \sum_i \hat ν_{ik} (x_i - μ_k)^2,

    \hat x_i = \sum_k \frac{ν_{ik}}{\sqrt{λ_k}}\,\frac{x_i - μ_k}{\sqrt{σ^2_k + ε}}, \qquad
    y_i = γ \odot \hat x_i + β,

with ν detached: gradients flow through μ_k, σ²_k and the transform (Sec. 3.2 "Differentiability
and Gradient Propagation"). K = 1 is batch normalization. Note that the 1/√λ_k factor (from the
GMM Fisher vector, Eq. 33) makes the output variance ≈ K rather than 1; the affine can absorb it.

Choices where the paper is open (see also :mod:`normlab.nn.gmm`):

* **Fit schedule.** "EM iter." (Tables 2, 4) is the sum of k-means and EM iterations, split
  equally (Sec. 4.2); an odd total gives the extra one to EM (:func:`~normlab.nn.gmm.split_em_iters`).
  Seeding is greedy k-means++ with 2 + ⌊ln K⌋ candidates; the mixture is initialised from the
  assignment that produced the final k-means centres. The normalization statistics of Eq. 35–36
  *are* an M-step on ν, so with the full batch the last EM iteration's M-step is the normalization
  itself: ``n_em`` EM iterations = (n_em − 1) full E/M iterations, then the E-step that gives ν.
  With ``sample_fraction < 1`` (Sec. 5.1) all ``n_em`` iterations run on a random subset of the
  points and one more E-step gives ν for every point. ``em_iters = 0`` uses hard k-means
  posteriors (one-hot assignment to the nearest centre). The mixture whose E-step gave ν is "the
  fit" of the batch; Eq. 35–36's statistics are one M-step further (they coincide only at EM
  convergence).
* **Seeding** (``init``). ``"kmeans++"`` (default, the paper's Sec. 3.2): every batch is seeded
  afresh. ``"warm"`` (an option, not in the paper): every batch after the first is seeded with
  ``warm_mean``, an exponential moving average of the past batches' Eq. 35 means,
  ``warm_mean_k ← (1 − m)·warm_mean_k + m·μ_k`` with m = ``warm_momentum`` (the first fit is
  copied), so k-means/EM continue from the recent fits instead of restarting. Component k of a
  warm-started fit starts from seed k, so the components keep their identity and averaging them
  per k is meaningful. A component that is absent from a batch's fit (pruned, or lost its
  points; its Eq. 35 mean is the batch mean) is a new one: its seed is *replaced* by the batch
  mean (momentum 1 for that component), i.e. it restarts at the data mean as with m = 1, rather
  than averaging a dead component's old place with the data mean. With ``"kmeans++"`` components
  have no identity across batches, so ``warm_mean`` just holds the latest Eq. 35 means (what a
  switch to ``"warm"`` would seed from). ``warm_momentum = 1`` seeds from the previous batch's
  means alone; that makes the seed a state updated with weight 1 per batch, which under batch
  noise random-walks and now and then hops to another local optimum of the likelihood, late in
  training when the network can no longer re-adapt (with a small-lr quickstart model's weights
  frozen: training loss 0.081 → 0.142 over the steps with m = 1, flat 0.054–0.060 with m = 0.1;
  quickstart, 3 seeds: final test accuracy 96.7 ± 1.6 % with m = 1, 97.5 ± 0.7 % with m = 0.1,
  whose test error no longer rises late but plateaus at 2.5–3 % — m = 1 touches 1–1.5 % mid-run,
  best 99.1 ± 0.2 % against 98.3 ± 0.7 %). Why ``"warm"`` exists: with the paper's 1–2
  iterations a fit from fresh seeds is far from converged and differs from seed to seed — on
  small_cnn's activations (normlab quickstart) the same batch normalized under different seeds
  differs by 28–38 % of the output's standard deviation, and the fits of 10 consecutive batches
  change a fixed probe's normalized output by 30–39 % (BN: 1.5–7 %; ``"warm"`` with m = 1:
  15–24 %). That noise is the paper's transform with the paper's fit budget (converged fits of
  the deeper layers' batches are unique), not a defect, but it costs: in the quickstart (SGD,
  every norm slot, 5 seeds) the final test accuracy is 93.4 ± 2.5 % with ``"kmeans++"`` and
  97.1 ± 1.3 % with ``"warm"``, m = 1 (em_iters = 4: 96.9 ± 1.4 % and 98.7 ± 0.6 %; BN 99.3 ± 0.3 %).
  ``"warm"`` also skips the seeding's random draws and cost. Under :func:`normlab.sync_stats` it
  stays exact: the Eq. 35 means and the absent mask are the shared fit's, so ``warm_mean`` is the
  same on every process.
* **Pruning** (Sec. 5.3): components whose fitted λ_k < ``min_weight`` (always those with
  λ_k < 1e-6; never the largest) get posterior 0 and the posteriors of their points are
  renormalised over the remaining components (a mask — K keeps its shape, no host sync).
* **Affine.** Eq. 37 moves γ, β into the statistics; we use a per-channel affine after
  normalization as in BN. Written per component, y_i = Σ_k ν_ik (γ ⊙ x̂ᵏ_i/√λ_k + β) (the same
  thing, as Σ_k ν_ik = 1).
* **Fused activation** (Eq. 40): ``activation="relu"`` gives y_i = Σ_k ν_ik · ReLU(γ ⊙ x̂ᵏ_i/√λ_k
  + β): the rectifier acts on each component's normalized, 1/√λ_k-scaled and affine-transformed
  value. With γ = 1, β = 0 this is Eq. 40 exactly (ReLU commutes with the positive 1/√λ_k); with
  one-hot posteriors it is ReLU(γ ⊙ x̂ + β), the unfused layer followed by ReLU (Eq. 41); and
  without the rectifier it is the unfused layer. Rectifying γ ⊙ x̂ᵏ + β and *then* weighting by
  ν_ik/√λ_k (Eq. 40 with the affine inside literally) would instead scale β by Σ_k ν_ik/√λ_k, a
  point-dependent factor, and not reduce to the unfused layer.
* **Inference** (Eq. 38–39): for each of the last T = ``queue_size`` training batches two things
  are kept in buffers: the statistics (λ, μ, σ²) of Eq. 35–36 that normalized the batch (σ²
  biased, without ε) and the fit whose posteriors ν were used (weights over the kept components,
  means, variances). Eval takes posteriors r under the mixture of all T·K queued *fits*, component
  (t, k) having prior weight τ^t λ_k^t with τ^t ∝ ζ^{T−1−t} (slot T−1 is the newest; ζ =
  ``queue_decay``), normalised over the fits present (fewer than T early in training), and
  normalizes with the *statistics*. ``inference="consistent"`` (default):
  x̂_i = Σ_{t,k} r_{i,tk} (x_i − μ_k^t) / (√λ_k^t √(σ²_k^t + ε)) — τ^t weights the posteriors r
  only, so a queue of T copies of a batch's fit gives that batch exactly its training output.
  Eq. 38 writes one θ^t for both the densities and the normalization: the same at EM
  convergence; with 1–2 iterations, posteriors under the statistics reassign 9–16 % of the points
  of a batch of small_cnn's activations (15–30 % relative output error against training for the
  batch's own fit), which is why the fit is queued too (checkpoints from before it was load with
  the old behaviour). With ``em_iters = 0`` the fit is the nearest-centre rule written as a
  mixture (equal weights, one pooled isotropic variance): a soft version of the hard assignment
  with the same boundaries. ``inference="literal"``: Eq. 38 as printed, with
  1/√(τ^t λ_k^t); it multiplies the normalized part by Σ_t √τ^t (≈ 3.13 for T = 10, ζ = 0.9)
  relative to training even when all queued fits agree. Before any training step the queue is
  empty and eval is a freshly constructed BatchNorm's (μ = 0, σ² = 1). The queue mixes T fits, so
  with fresh seeding (which makes consecutive fits disagree) eval accuracy depends on which fits
  are queued: on a trained quickstart model ±1–2 points (std) between queue refreshes, see
  ``init``.

Implementation. Everything is computed channel-first — points are never moved channels-last;
(K, C) × points products replace (m, K, C) intermediates — in float32 for half-precision input,
with autocast disabled inside. Without activation the normalization is a custom autograd Function
with a closed-form backward (a weighted BN per component, :class:`_MixtureNormFn`); the fused
activation uses plain autograd (one pass per component). On CPU the cost is dominated by
allocating activation-sized tensors; a training step allocates three (the points' squares, which
become the output, and two in backward) against BatchNorm's two. Variances come from one-pass
sums taken around the batch mean (as Sec. 3.2 writes them, σ² = ν̂ᵀx² − μ²), accurate in float32
to ~1e-7·((μ_k − mean)/σ_k)² relative. A component with (near-)zero total posterior mass is
treated as absent (its 1/√λ_k is 0), so nothing divides by zero.

Distributed training (:func:`normlab.sync_stats`). Inside a reduction scope the mixture is fitted
to, and normalizes with, the points of *all* processes, and every process ends with the same fit
(hence the same queue): every sum goes through :mod:`normlab.nn.stats` and follows its rules —
the shift of the points is the global mean, the M-steps' λ come from all-reduced counts, k-means
and EM iterate on all-reduced sufficient statistics, Eq. 35–36 use all-reduced sums, and the
backward re-enters the forward's scope (input gradient of the global-batch computation, γ/β
gradients from local sums, as ``nn.SyncBatchNorm``). The k-means++ seeding is that of the global
point set with the first process's random draws (:func:`normlab.nn.gmm.kmeans_plus_plus`), so it
equals the single-process seeding of the whole batch under that generator state; the points
themselves are never gathered. Posteriors, pruning masks and E-steps are per point (local). With
``sample_fraction < 1`` each process draws its own random subset of its own points (a
per-process stratified sample of the global batch, at least K points each) — the fit on the
union of the subsets is still shared, but it is not the single-process fit of one global subset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from normlab.nn import gmm
from normlab.nn._utils import (
    add_channel_affine,
    check_eps,
    check_input,
    check_positive_int,
    reset_channel_affine,
    stat_dtype,
)
from normlab.nn.gmm import GMMParams, PointSet
from normlab.nn.registry import register_norm
from normlab.nn.stats import current_group, reduce_sums, reduction_scope, weighted_channel_sums

__all__ = [
    "MixtureNorm",
    "mixture_norm",
    "mixture_norm_inference",
    "mixture_posteriors",
    "mixture_transform",
    "queue_decay_weights",
]

_LAYER = "MixtureNorm"
_ACTIVATIONS = (None, "relu")
_READINGS = ("consistent", "literal")
_INITS = ("kmeans++", "warm")
_WEIGHT_FLOOR = 1e-6  # components below this fitted weight are always pruned


def _check_activation(activation: object, where: str) -> str | None:
    if isinstance(activation, str) and activation.lower() in ("none", "identity", "linear"):
        return None
    if isinstance(activation, str):
        activation = activation.lower()
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation must be None or 'relu', got {activation!r}")
    return activation  # type: ignore[return-value]


def _check_reading(inference: object, where: str) -> str:
    if not isinstance(inference, str) or inference.lower() not in _READINGS:
        raise ValueError(f"{where}: inference must be 'consistent' or 'literal', got {inference!r}")
    return inference.lower()


def _check_init(init: object, where: str = _LAYER) -> str:
    if not isinstance(init, str) or init.lower() not in _INITS:
        raise ValueError(f"{where}: init must be 'kmeans++' or 'warm', got {init!r}")
    return init.lower()


def _check_unit(
    value: object,
    name: str,
    lo: float,
    hi: float,
    lo_closed: bool,
    hi_closed: bool,
    where: str = _LAYER,
) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= lo if lo_closed else value > lo)
        and (value <= hi if hi_closed else value < hi)
    )
    if not ok:
        interval = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
        raise ValueError(f"{where}: {name} must be a number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _cv(v: Tensor, ndim: int) -> Tensor:
    """(J,) or (J, C)-indexed per-channel values against points of layout (N, C) / (B, C, L)."""
    return v if ndim == 2 else v.unsqueeze(-1)


def _spread(coef: Tensor, nu: Tensor, out: Tensor | None = None, add: bool = False) -> Tensor:
    """Σ_k ν_ik coef_kc for every point: coef (K, C), ν (N, K) / (B, K, L) -> (N, C) / (B, C, L).

    ``out`` receives the result (``add=True``: is incremented by it) without a new full-size
    allocation — what dominates the cost of this layer on CPU is allocating (page-faulting)
    activation-sized tensors, so the hot path reuses buffers."""
    if nu.dim() == 2:
        if out is None:
            return nu @ coef
        return out.addmm_(nu, coef) if add else torch.mm(nu, coef, out=out)
    ct = coef.t().expand(nu.shape[0], -1, -1)
    if out is None:
        return torch.bmm(ct, nu)
    return out.baddbmm_(ct, nu) if add else torch.bmm(ct, nu, out=out)


def _layout(x: Tensor) -> Tensor:
    """(N, C) stays; (N, C, *) -> (N, C, L) (a view for contiguous input)."""
    return x if x.dim() <= 3 else x.reshape(x.shape[0], x.shape[1], -1)


class _Stats(NamedTuple):
    lam: Tensor  # (K,)
    mean: Tensor  # (K, C)
    var: Tensor  # (K, C) biased, without eps
    rstd: Tensor  # (K, C) 1/sqrt(var + eps)
    alpha: Tensor  # (K,) 1/sqrt(lam) (0 where lam = 0)
    cnt: Tensor  # (K,) Σ_i ν_ik, 1 for absent components (a safe divisor)


def _stats_from_sums(cnt: Tensor, s1: Tensor, s2c: Tensor, shift: Tensor, eps: float) -> _Stats:
    """Eq. 35–36 from W_k = Σ_i ν_ik, s1 = Σ_i ν_ik x_i and s2c = Σ_i ν_ik (x_i − shift)²: the
    variance is taken around the shift, σ²_k = s2c/W_k − (μ_k − shift)² (clamped at 0), so a large
    common offset of the data does not cancel catastrophically. A component whose total posterior
    mass W_k is below √tiny of the dtype (~1e-19 in float32; pruned ones have exactly 0) is absent:
    λ_k = 0, 1/√λ_k := 0, μ_k = shift, σ²_k = 0 — no division by (near) zero anywhere."""
    tiny = torch.finfo(cnt.dtype).tiny
    present = cnt >= math.sqrt(tiny)
    w = torch.where(present, cnt, torch.ones_like(cnt))
    mean = torch.where(present[:, None], s1 / w[:, None], shift)
    d = mean - shift
    var = torch.where(present[:, None], s2c / w[:, None] - d * d, 0.0).clamp_min(0.0)
    lam = torch.where(present, cnt, 0.0) / cnt.sum().clamp_min(tiny)
    alpha = torch.where(present, torch.rsqrt(torch.where(present, lam, 1.0)), 0.0)
    return _Stats(lam, mean, var, torch.rsqrt(var + eps), alpha, w)


class _MixtureNormFn(torch.autograd.Function):
    r"""Eq. 34–36 + affine with ν fixed, closed-form backward.

    Forward: y_i = x_i ⊙ Σ_k ν_ik a_k + Σ_k ν_ik b_k with a_k = γ/(√λ_k s_k), b_k = β − a_k ⊙ μ_k,
    s_k = √(σ²_k + ε) (two (C, K) × ν products). Backward: per component this is a BN with point
    weights ν̂_ik (Σ_i ν̂_ik = 1) scaled per point by w_ik = ν_ik/√λ_k. With G^k_i = γ w_ik g_i (the
    gradient reaching x̂ᵏ_i), S1_k = Σ_i G^k_i and S2_k = Σ_i G^k_i x̂ᵏ_i:

        ∂L/∂x_i = Σ_k [G^k_i − ν̂_ik (S1_k + x̂ᵏ_i S2_k)] / s_k
                = g_i Σ_k ν_ik a_k − x_i Σ_k ν_ik S2_k/(W_k s_k²)
                  − Σ_k ν_ik (S1_k − μ_k S2_k/s_k)/(W_k s_k),       W_k = Σ_i ν_ik,

    again (C, K) × ν products; ∂L/∂γ = Σ_k S2_k/γ and ∂L/∂β = Σ_k Σ_i ν_ik g_i. The sums over
    points go through :func:`weighted_channel_sums` (the cross-process seam) in both passes; as
    :mod:`normlab.nn.stats` prescribes, the backward re-enters the forward's reduction scope for
    the input gradient and takes parameter gradients from the local sums.

    Inputs: ``x`` in point layout ((N, C) or (B, C, L)), ``nu`` (N, K) / (B, K, L), ``weight``,
    ``bias`` (C,) or None, the :class:`~normlab.nn.gmm.PointSet` ``ps`` of ``x`` (its squares
    ``ps.sq`` are consumed: their memory becomes the output) and ``eps``. Outputs ``y`` and the
    (non-differentiable) λ, μ, σ². On CPU the cost of this layer is dominated by allocating
    activation-sized tensors, so forward allocates none beyond ``ps`` and backward two.
    """

    @staticmethod
    def forward(ctx, x, nu, weight, bias, ps, eps):  # type: ignore[override]
        xr, y = ps.raw, ps.sq
        ps.sq = None  # consumed below
        cnt, s1, s2c = weighted_channel_sums(xr, nu, y)
        st = _stats_from_sums(cnt, s1, s2c, ps.shift, eps)
        gamma = weight if weight is not None else torch.ones_like(st.mean[0])
        coef_a = st.alpha[:, None] * st.rstd * gamma
        coef_b = -coef_a * st.mean
        if bias is not None:
            coef_b = coef_b + bias
        _spread(coef_a, nu, out=y)
        y.mul_(xr)
        _spread(coef_b, nu, out=y, add=True)
        ctx.save_for_backward(xr, nu, gamma, st.mean, st.rstd, st.alpha, st.cnt)
        ctx.mark_non_differentiable(st.lam, st.mean, st.var)
        ctx.group = current_group()  # the backward's sums are reduced over the same group
        return y, st.lam, st.mean, st.var

    @staticmethod
    def backward(ctx, gy, _gl, _gm, _gv):  # type: ignore[override]
        xr, nu, gamma, mean, rstd, alpha, cnt = ctx.saved_tensors
        gy = gy.to(xr.dtype)
        r = gy * xr
        with reduction_scope(None):  # local sums: T1_k = Σ_i ν_ik g_i, U_k = Σ_i ν_ik g_i x_i
            _, t1, u = weighted_channel_sums(gy, nu, r)
        # parameter gradients from the local sums (the data-parallel wrapper averages them) ...
        t2 = alpha[:, None] * rstd * (u - mean * t1)  # Σ_i w_ik g_i x̂ᵏ_i
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_w = t2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_b = t1.sum(0)
        if ctx.needs_input_grad[0]:
            if ctx.group is not None:  # ... the input gradient from the global ones
                with reduction_scope(ctx.group):
                    t1, u = reduce_sums(t1, u)
                t2 = alpha[:, None] * rstd * (u - mean * t1)
            s1 = alpha[:, None] * gamma * t1
            s2 = gamma * t2
            coef_a = alpha[:, None] * rstd * gamma
            s1w, s2w = s1 / cnt[:, None], s2 / cnt[:, None]  # divide first: no overflow
            coef_p = rstd * rstd * s2w
            coef_q = -rstd * (s1w - rstd * mean * s2w)
            grad_x = _spread(coef_a, nu, out=r)  # reuse the buffer: r is no longer needed
            grad_x.mul_(gy)
            grad_x.addcmul_(xr, _spread(coef_p, nu), value=-1.0)
            _spread(coef_q, nu, out=grad_x, add=True)
        return grad_x, None, grad_w, grad_b, None, None


def _normalize_autograd(
    x: Tensor,
    nu: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
    shift: Tensor,
) -> tuple[Tensor, _Stats]:
    """Eq. 34–36 (+ Eq. 40) with plain autograd, one pass per component (``x`` in point layout,
    differentiable; ``shift`` a constant used for the variance, see :func:`_stats_from_sums`)."""
    nd = x.dim()
    xc = x - _cv(shift, nd)
    cnt, s1, s2c = weighted_channel_sums(x, nu, xc * xc)
    st = _stats_from_sums(cnt, s1, s2c, shift, eps)
    gamma = weight if weight is not None else torch.ones_like(st.mean[0])
    out = None
    for k in range(nu.shape[1]):
        z = (x - _cv(st.mean[k], nd)) * _cv(st.alpha[k] * st.rstd[k] * gamma, nd)
        if bias is not None:
            z = z + _cv(bias, nd)
        if activation == "relu":
            z = torch.relu(z)
        z = z * nu[:, k : k + 1]
        out = z if out is None else out + z
    assert out is not None
    return out, st


class MixtureStats(NamedTuple):
    """Statistics of a mixture normalization: λ (K,), μ (K, C), σ² (K, C) (biased, no ε)."""

    weight: Tensor
    mean: Tensor
    var: Tensor


def mixture_norm(
    x: Tensor,
    nu: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, MixtureStats]:
    r"""The mixture normalizing transform with the posteriors given (Kalayeh & Shah, Eq. 34–36, Eq. 40).

    ``y_i = Σ_k ν_ik · φ(γ ⊙ (x_i − μ_k) / (√λ_k √(σ²_k + ε)) + β)`` with λ_k = Σ_i ν_ik / Σ_ij ν_ij
    (= mean_i ν_ik for posteriors), μ_k, σ²_k the ν̂-weighted mean and biased variance (Eq. 35–36),
    φ the identity or ReLU. ν is treated as a constant (no gradient); the result is differentiable
    in ``x``, ``weight`` (γ) and ``bias`` (β). See the module docstring for the reading of Eq. 40.

    Shape: ``x`` (N, C) or (N, C, *); ``nu`` (N, K) or (N, K, *) — the posterior of the point
    ``x[n, :, h, w]`` is ``nu[n, :, h, w]`` (``to_points(nu)`` is the paper's m × K matrix);
    output like ``x``. With ``return_stats`` also returns :class:`MixtureStats` (detached).
    """
    activation = _check_activation(activation, "mixture_norm")
    if (
        x.dim() < 2
        or nu.dim() != x.dim()
        or nu.shape[0] != x.shape[0]
        or nu.shape[2:] != x.shape[2:]
    ):
        raise ValueError(
            f"mixture_norm: nu must have shape (N, K, *) matching x {tuple(x.shape)}, "
            f"got {tuple(nu.shape)}"
        )
    check_eps(eps, "mixture_norm")
    dt = stat_dtype(x)
    xl = _layout(x).to(dt)
    nul = _layout(nu).detach().to(dt)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    ps = PointSet(xl)
    if activation is None:
        y, lam, mean, var = _MixtureNormFn.apply(xl, nul, w, b, ps, float(eps))
    else:
        y, st = _normalize_autograd(xl, nul, w, b, float(eps), activation, ps.shift)
        lam, mean, var = st.lam.detach(), st.mean.detach(), st.var.detach()
    y = y.reshape(x.shape).to(x.dtype)
    if return_stats:
        return y, MixtureStats(lam, mean, var)
    return y


def mixture_transform(
    x: Tensor,
    nu: Tensor,
    stats: MixtureStats | GMMParams | tuple[Tensor, Tensor, Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    scale_weight: Tensor | None = None,
) -> Tensor:
    r"""Eq. 34 with *given* statistics (no gradient to them): y_i = Σ_j ν_ij · φ(γ ⊙ (x_i − μ_j) /
    (√s_j √(σ²_j + ε)) + β), where s_j = ``scale_weight`` (default λ_j, the ``stats`` weight); a
    component with s_j = 0 contributes nothing. This is the inference transform (Eq. 38) once ν
    holds the queue posteriors. Shapes as in :func:`mixture_norm`; ``stats`` holds λ (J,),
    μ (J, C), σ² (J, C)."""
    activation = _check_activation(activation, "mixture_transform")
    lam, mean, var = stats
    dt = stat_dtype(x)
    xl = _layout(x).to(dt)
    nd = xl.dim()
    nul = _layout(nu).detach().to(dt)
    s = (lam if scale_weight is None else scale_weight).detach().to(dt)
    with torch.no_grad():
        tiny = torch.finfo(dt).tiny
        alpha = torch.where(s > 0, torch.rsqrt(s.clamp_min(tiny)), torch.zeros_like(s))
        mean = mean.detach().to(dt)
        rstd = torch.rsqrt(var.detach().to(dt).clamp_min(0.0) + eps)
        gamma = torch.ones_like(mean[0]) if weight is None else weight.to(dt)
    if activation is None:
        coef_a = alpha[:, None] * rstd * gamma
        coef_b = -coef_a * mean
        if bias is not None:
            coef_b = coef_b + bias.to(dt)
        y = torch.addcmul(_spread(coef_b, nul), xl, _spread(coef_a, nul))
    else:
        y = None
        for j in range(nul.shape[1]):
            z = (xl - _cv(mean[j], nd)) * _cv(alpha[j] * rstd[j] * gamma, nd)
            if bias is not None:
                z = z + _cv(bias.to(dt), nd)
            z = torch.relu(z) * nul[:, j : j + 1]
            y = z if y is None else y + z
    assert y is not None
    return y.reshape(x.shape).to(x.dtype)


def _keep_mask(weight: Tensor, min_weight: float) -> Tensor:
    floor = max(float(min_weight), _WEIGHT_FLOOR)
    return (weight >= floor) | (weight == weight.max())


def _fit_posteriors(
    ps: PointSet,
    k: int,
    em_iters: int,
    reg_covar: float,
    min_weight: float,
    sample_fraction: float,
    generator: torch.Generator | None = None,
    init_centers: Tensor | None = None,
) -> tuple[Tensor, Tensor, GMMParams | None]:
    """Posteriors ν (points' layout), the kept-component mask (K,) and the mixture whose posteriors
    ν are (in ``ps``'s shifted coordinates; pruned components have weight 0, the kept ones' weights
    sum to 1; ``None`` for K = 1, where it is the batch's Gaussian) — see the module docstring.
    ``init_centers`` (K, C), shifted, replaces the k-means++ seeding (``init="warm"``)."""
    if k == 1:  # no fit: the mixture is the batch's Gaussian, i.e. the normalization statistics
        shape = (ps.raw.shape[0], 1, *ps.raw.shape[2:])
        nu = torch.ones(shape, dtype=ps.dtype, device=ps.device)
        return nu, torch.ones(1, dtype=torch.bool, device=ps.device), None
    n_km, n_em = gmm.split_em_iters(em_iters)
    full = sample_fraction >= 1.0
    fit_ps = ps if full else ps.subset(sample_fraction, minimum=k, generator=generator)
    if init_centers is None:
        centers, _ = gmm.kmeans_plus_plus(fit_ps, k, generator=generator)
    else:
        centers = init_centers.to(ps.dtype)
    centers, labels, params = gmm.kmeans_init(fit_ps, centers, n_km, reg_covar)
    if n_em == 0:
        keep = _keep_mask(params.weight, min_weight)
        labels = gmm.assign(ps, centers, keep)
        # the nearest-centre rule as a mixture: equal weights over the kept centres and one
        # isotropic variance (the pooled within-cluster variance), so its posteriors are a soft
        # version of the hard assignment with the same decision boundaries
        kept = keep.to(ps.dtype)
        pooled = (params.weight[:, None] * params.var).sum() / ps.channels
        fit = GMMParams(kept / kept.sum(), centers, pooled.expand_as(centers).clone())
        return gmm.one_hot(labels, k, ps.dtype), keep, fit
    for _ in range(n_em - 1 if full else n_em):
        resp, _ = gmm.e_step(fit_ps, params)
        params = gmm.m_step(fit_ps, resp, reg_covar, params.mean)
    keep = _keep_mask(params.weight, min_weight)
    nu, _ = gmm.e_step(ps, params, keep)
    w = torch.where(keep, params.weight, 0.0)
    fit = GMMParams(w / w.sum().clamp_min(torch.finfo(w.dtype).tiny), params.mean, params.var)
    return nu, keep, fit


@torch.no_grad()
def mixture_posteriors(
    x: Tensor,
    k: int = 3,
    em_iters: int = 2,
    eps: float = 1e-5,
    min_weight: float = 0.01,
    sample_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The posteriors MixtureNorm uses in training: fit a K-component diagonal GMM to the points of
    ``x`` (variance floor ``eps``) as described in the module docstring and return
    ``(nu (N, K, *), keep (K,) bool)``; pruned components have ν = 0 and Σ_k ν_ik = 1."""
    where = "mixture_posteriors"
    check_input(x, x.shape[1] if x.dim() >= 2 else 0, where)
    check_positive_int(k, "k", where)
    check_positive_int(em_iters, "em_iters", where, minimum=0)
    check_eps(eps, where)
    _check_unit(min_weight, "min_weight", 0.0, 1.0, True, False, where)
    _check_unit(sample_fraction, "sample_fraction", 0.0, 1.0, False, True, where)
    if x.numel() == 0:
        raise ValueError(f"{where}: got an empty input of shape {tuple(x.shape)}")
    ps = PointSet(x)
    nu, keep, _ = _fit_posteriors(ps, k, em_iters, eps, min_weight, sample_fraction, generator)
    return ps.as_points(nu), keep


def queue_decay_weights(valid: Tensor, decay: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """τ^t of Kalayeh & Shah, Eq. 39 for a queue of T slots (slot T−1 newest): τ^t ∝ ζ^{T−1−t}, normalised
    over the valid slots (for a full queue that is (1−ζ)/(1−ζ^T)·ζ^{T−1−t}); all 0 if none."""
    t = valid.shape[0]
    age = torch.arange(t - 1, -1, -1, device=valid.device, dtype=dtype)
    raw = torch.where(valid.to(torch.bool), torch.pow(float(decay), age), 0.0)
    return raw / raw.sum().clamp_min(torch.finfo(dtype).tiny)


def mixture_norm_inference(
    x: Tensor,
    queue_weight: Tensor,
    queue_mean: Tensor,
    queue_var: Tensor,
    queue_valid: Tensor,
    decay: float = 0.9,
    eps: float = 1e-5,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    activation: str | None = None,
    inference: str = "consistent",
    fit_weight: Tensor | None = None,
    fit_mean: Tensor | None = None,
    fit_var: Tensor | None = None,
) -> Tensor:
    """Eval-mode mixture normalization with a queue of fits (Kalayeh & Shah, Eq. 38–39).

    ``queue_weight`` (T, K), ``queue_mean`` / ``queue_var`` (T, K, C): the normalization statistics
    λ, μ, σ² (Eq. 35–36) of the queued batches; ``queue_valid`` (T,) bool (slot T−1 newest);
    ``fit_weight`` (T, K), ``fit_mean`` / ``fit_var`` (T, K, C): the fitted mixtures whose
    posteriors normalized those batches (the variances used as they are). Posteriors r are taken
    (detached) under the mixture of the T·K fitted components with prior weights τ^t λ_k^t
    (:func:`queue_decay_weights`), and :func:`mixture_transform` is applied with the statistics and
    scale 1/√λ_k^t (``"consistent"``) or 1/√(τ^t λ_k^t) (``"literal"``, Eq. 38 as printed). Without
    the ``fit_*`` tensors the posteriors are taken under the statistics themselves (λ, N(μ, σ² + ε))
    — what a fully converged fit would give. An empty queue acts as a single component (λ = 1,
    μ = 0, σ² = 1): a freshly constructed BatchNorm in eval. Differentiable in x, γ, β.
    """
    reading = _check_reading(inference, "mixture_norm_inference")
    given = [t is not None for t in (fit_weight, fit_mean, fit_var)]
    if any(given) and not all(given):
        raise ValueError(
            "mixture_norm_inference: give all of fit_weight, fit_mean and fit_var, or none of them"
        )
    dt = stat_dtype(x)
    t, k = queue_weight.shape
    c = x.shape[1]
    dev = x.device
    with torch.no_grad():
        tau = queue_decay_weights(queue_valid, decay, dt)  # (T,)
        empty = (~queue_valid.to(torch.bool).any()).to(dt)
        one = torch.ones(1, dtype=dt, device=dev)
        zero_c = torch.zeros(1, c, dtype=dt, device=dev)
        lam = torch.cat([queue_weight.to(dt).reshape(-1), one])
        tau_j = torch.cat([tau.repeat_interleave(k), one])
        mean = torch.cat([queue_mean.to(dt).reshape(t * k, c), zero_c])
        var = torch.cat(
            [queue_var.to(dt).reshape(t * k, c), torch.ones(1, c, dtype=dt, device=dev)]
        )
        var = var.clamp_min(0.0)
        if fit_weight is None:
            p_weight, p_mean, p_var = queue_weight.to(dt), mean, var + eps
        else:
            assert fit_mean is not None and fit_var is not None
            p_weight = fit_weight.to(dt)
            p_mean = torch.cat([fit_mean.to(dt).reshape(t * k, c), zero_c])
            p_var = torch.cat([fit_var.to(dt).reshape(t * k, c).clamp_min(eps), var[-1:] + eps])
        prior = torch.cat([(tau[:, None] * p_weight).reshape(-1), empty[None]])
        ps = PointSet(x)  # fit coordinates are shifted by the batch mean; shift the means alike
        resp, _ = gmm.e_step(ps, GMMParams(prior, p_mean - ps.shift, p_var))
        scale = lam if reading == "consistent" else tau_j * lam
    return mixture_transform(
        x, ps.as_points(resp), (lam, mean, var), weight, bias, eps, activation, scale_weight=scale
    )


@register_norm(
    "mixture", "mixture normalization (Kalayeh & Shah): per-batch diagonal GMM, fit queue for eval"
)
class MixtureNorm(nn.Module):
    r"""Mixture Normalization (Kalayeh & Shah, Sec. 3.2) for ``(N, C)`` and ``(N, C, *)`` input.

    Training: fit a K-component diagonal GMM to the batch's points (k-means++ seeding, k-means,
    EM; ``em_iters`` is their total, split equally), prune components with λ < ``min_weight``,
    normalize with Eq. 34–36 and apply a per-channel affine; push the fit (λ, μ, σ²) onto a queue
    of the last ``queue_size`` batches. Eval: Eq. 38–39 over the queued fits. See the module
    docstring of :mod:`normlab.nn.mixture` for every formula and reading.

    Args:
        num_features: C.
        k: number of mixture components K (K = 1 is batch normalization).
        em_iters: k-means + EM iterations in total (Kalayeh & Shah, Tables 2, 4 "EM iter.").
        eps: ε of Eq. 35, also the variance floor of the fit.
        affine: learnable per-channel γ (init 1), β (init 0).
        queue_size: T, fits kept for inference (Kalayeh & Shah: 10).
        queue_decay: ζ of Eq. 39 (Kalayeh & Shah: 0.9), in [0, 1].
        min_weight: prune components with fitted λ below this (Kalayeh & Shah, Sec. 5.3: 0.01), in [0, 1).
        sample_fraction: fit on this random fraction of the points (Kalayeh & Shah, Sec. 5.1), in (0, 1].
        activation: None or ``"relu"`` (fused, Eq. 40).
        inference: ``"consistent"`` (default) or ``"literal"`` reading of Eq. 38.
        init: ``"kmeans++"`` (default, the paper: fresh k-means++ seeds every batch) or ``"warm"``
            (seed every batch after the first with ``warm_mean``, a moving average of the past
            batches' Eq. 35 means; not in the paper — steadier fits, see the module docstring).
        warm_momentum: m of ``warm_mean ← (1 − m)·warm_mean + m·μ`` (``init="warm"``), in
            (0, 1]; 1 seeds from the previous batch's means alone, which lets the fit random-walk
            between local optima of the likelihood under batch noise (training loss and test
            error rise late in training); the default 0.1 keeps it steady.

    Buffers: ``queue_weight`` (T, K), ``queue_mean``, ``queue_var`` (T, K, C) — the Eq. 35–36
    statistics —, ``queue_fit_weight`` (T, K), ``queue_fit_mean``, ``queue_fit_var`` (T, K, C) —
    the fitted mixtures (variances with the ε floor) —, ``queue_valid`` (T,) bool,
    ``num_batches_tracked``, ``warm_mean`` (K, C) — the seed of ``init="warm"``; diagnostics of the latest training step (Sec. 5.2–5.3):
    ``last_weight`` (K,), ``last_mean``, ``last_var`` (K, C) and ``last_num_components`` (number of
    components not pruned) — all tensors, written without host synchronisation.

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same.
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    # 2: the queue also keeps the fitted mixtures (queue_fit_*); 3: warm_mean (init="warm" seed)
    _version = 3

    def __init__(
        self,
        num_features: int,
        k: int = 3,
        em_iters: int = 2,
        eps: float = 1e-5,
        affine: bool = True,
        queue_size: int = 10,
        queue_decay: float = 0.9,
        min_weight: float = 0.01,
        sample_fraction: float = 1.0,
        activation: str | None = None,
        inference: str = "consistent",
        init: str = "kmeans++",
        warm_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", _LAYER)
        self.k = check_positive_int(k, "k", _LAYER)
        self.em_iters = check_positive_int(em_iters, "em_iters", _LAYER, minimum=0)
        self.eps = check_eps(eps, _LAYER)
        self.queue_size = check_positive_int(queue_size, "queue_size", _LAYER)
        self.queue_decay = _check_unit(queue_decay, "queue_decay", 0.0, 1.0, True, True)
        self.min_weight = _check_unit(min_weight, "min_weight", 0.0, 1.0, True, False)
        self.sample_fraction = _check_unit(
            sample_fraction, "sample_fraction", 0.0, 1.0, False, True
        )
        self.activation = _check_activation(activation, _LAYER)
        self.inference = _check_reading(inference, _LAYER)
        self.init = _check_init(init)
        self.warm_momentum = _check_unit(warm_momentum, "warm_momentum", 0.0, 1.0, False, True)
        c, t = num_features, self.queue_size
        self.affine = add_channel_affine(self, c, affine, _LAYER)
        self.register_buffer("queue_weight", torch.zeros(t, k))
        self.register_buffer("queue_mean", torch.zeros(t, k, c))
        self.register_buffer("queue_var", torch.ones(t, k, c))
        self.register_buffer("queue_fit_weight", torch.zeros(t, k))
        self.register_buffer("queue_fit_mean", torch.zeros(t, k, c))
        self.register_buffer("queue_fit_var", torch.ones(t, k, c))
        self.register_buffer("queue_valid", torch.zeros(t, dtype=torch.bool))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_weight", torch.zeros(k))
        self.register_buffer("last_mean", torch.zeros(k, c))
        self.register_buffer("last_var", torch.ones(k, c))
        self.register_buffer("last_num_components", torch.tensor(0, dtype=torch.long))
        self.register_buffer("warm_mean", torch.zeros(k, c))
        # whether warm_mean holds fitted means (init="warm" seeds from it; the first fit is copied
        # into it); a Python flag, so that the hot path never reads a tensor to decide
        self._has_fit = False
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Empty the queue and the diagnostics."""
        self.queue_weight.zero_()
        self.queue_mean.zero_()
        self.queue_var.fill_(1.0)
        self.queue_fit_weight.zero_()
        self.queue_fit_mean.zero_()
        self.queue_fit_var.fill_(1.0)
        self.queue_valid.fill_(False)
        self.num_batches_tracked.zero_()
        self.last_weight.zero_()
        self.last_mean.zero_()
        self.last_var.fill_(1.0)
        self.last_num_components.zero_()
        self.warm_mean.zero_()
        self._has_fit = False

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_channel_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, _LAYER)
        if x.numel() == 0:
            raise ValueError(f"{_LAYER}: got an empty input of shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            if not self.training:
                return mixture_norm_inference(
                    x,
                    self.queue_weight,
                    self.queue_mean,
                    self.queue_var,
                    self.queue_valid,
                    self.queue_decay,
                    self.eps,
                    self.weight,
                    self.bias,
                    self.activation,
                    self.inference,
                    self.queue_fit_weight,
                    self.queue_fit_mean,
                    self.queue_fit_var,
                )
            return self._train_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        dt = stat_dtype(x)
        xl = _layout(x).to(dt)
        ps = PointSet(xl)
        init_centers = None
        if self.init == "warm" and self._has_fit:  # the moving average of past Eq. 35 means
            init_centers = self.warm_mean.to(dt) - ps.shift
        nu, keep, fit = _fit_posteriors(
            ps,
            self.k,
            self.em_iters,
            self.eps,
            self.min_weight,
            self.sample_fraction,
            init_centers=init_centers,
        )
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        if self.activation is None:
            y, lam, mean, var = _MixtureNormFn.apply(xl, nu, w, b, ps, self.eps)
        else:
            y, st = _normalize_autograd(xl, nu, w, b, self.eps, self.activation, ps.shift)
            lam, mean, var = st.lam, st.mean, st.var
        with torch.no_grad():
            lam, mean, var = lam.detach(), mean.detach(), var.detach()
            fit = GMMParams(lam, mean, var + self.eps) if fit is None else ps.unshift(fit)
            self._push(lam, mean, var, keep, fit)
        return y.reshape(x.shape).to(x.dtype)

    def _push(self, lam: Tensor, mean: Tensor, var: Tensor, keep: Tensor, fit: GMMParams) -> None:
        for buf, new in (
            (self.queue_weight, lam),
            (self.queue_mean, mean),
            (self.queue_var, var),
            (self.queue_fit_weight, fit.weight),
            (self.queue_fit_mean, fit.mean),
            (self.queue_fit_var, fit.var),
            (self.queue_valid, torch.ones((), dtype=torch.bool, device=lam.device)),
        ):
            buf.copy_(torch.cat([buf[1:], new.to(buf.dtype)[None]]))
        if self._has_fit and self.init == "warm":
            # per-component momentum: m for a component of the fit, 1 (restart at its Eq. 35 mean,
            # the batch mean) for one absent from it — see the module docstring
            m = torch.where(lam > 0, self.warm_momentum, 1.0).to(self.warm_mean.dtype)
            self.warm_mean.lerp_(mean.to(self.warm_mean.dtype), m[:, None])
        else:  # the first fit, or fresh seeding (no component identity): the latest means
            self.warm_mean.copy_(mean)
        self._has_fit = True
        self.last_weight.copy_(lam)
        self.last_mean.copy_(mean)
        self.last_var.copy_(var)
        self.last_num_components.copy_(keep.sum())
        self.num_batches_tracked.add_(1)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # checkpoints written before the queue kept the fitted mixtures (version < 2): take the
        # posteriors under the statistics, as those versions did
        version = (local_metadata or {}).get("version") or 1
        if version < 2 and prefix + "queue_weight" in state_dict:
            for name in ("weight", "mean", "var"):
                key = f"{prefix}queue_fit_{name}"
                if key not in state_dict:
                    v = state_dict[f"{prefix}queue_{name}"]
                    state_dict[key] = v + self.eps if name == "var" else v
        # checkpoints written before warm_mean (version < 3) seeded init="warm" from the newest
        # queued Eq. 35 means: start the moving average there
        key = prefix + "warm_mean"
        if version < 3 and key not in state_dict and prefix + "queue_mean" in state_dict:
            state_dict[key] = state_dict[prefix + "queue_mean"][-1].clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        valid = state_dict.get(prefix + "queue_valid")
        if isinstance(valid, Tensor) and valid.numel() == self.queue_size:
            self._has_fit = bool(valid[-1])  # host read at load time, not in the hot path

    @property
    def effective_components(self) -> Tensor:
        """Components used in the latest training step (Kalayeh & Shah, Sec. 5.3, Fig. 9); a 0-d tensor."""
        return self.last_num_components

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, k={self.k}, em_iters={self.em_iters}, eps={self.eps}, "
            f"affine={self.affine}, queue_size={self.queue_size}, queue_decay={self.queue_decay}, "
            f"min_weight={self.min_weight}, sample_fraction={self.sample_fraction}, "
            f"activation={self.activation}, inference={self.inference!r}, init={self.init!r}, "
            f"warm_momentum={self.warm_momentum}"
        )
