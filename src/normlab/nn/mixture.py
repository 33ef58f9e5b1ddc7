r"""Mixture Normalization (Kalayeh & Shah, Sec. 3.2, Eq. 34–40).

Points are the C-dimensional vectors x_i of a channel-first input, one per sample and position
(m = N·H·W; ``(N, C)`` input is N points). Per training batch a K-component Gaussian mixture with
diagonal covariances is fitted to them outside autograd (:mod:`normlab.nn.gmm`: k-means++ seeding,
k-means, EM), giving the posteriors ν ∈ R^{m×K} (Eq. 31). The *mixture normalizing transform*
(Eq. 34–36, with the affine after normalization as in BN) is

.. math::

    λ_k = \tfrac1m \textstyle\sum_i ν_{ik},\quad \hat ν_{ik} = ν_{ik} / \sum_j ν_{jk},\quad
    μ_k = \sum_i \hat ν_{ik} x_i,\quad σ^2_k = \sum_i \hat ν_{ik} x_i^2 - μ_k^2,

    y_i = \sum_k ν_{ik}\, φ\Big(γ \odot \frac{x_i - μ_k}{\sqrt{λ_k}\sqrt{σ^2_k + ε}} + β\Big),

φ the identity or, fused (Eq. 40), ReLU. ν is detached: gradients flow through μ_k, σ²_k and the
transform (Sec. 3.2, "Differentiability and Gradient Propagation"). K = 1 is batch normalization;
the 1/√λ_k of Eq. 34 makes the output variance ≈ K (the affine can absorb it). Components with
fitted λ_k < ``min_weight`` are pruned (Sec. 5.3). Inference (Eq. 38–39) normalizes with a queue
of the statistics and fits of the last T training batches, fits weighted by τ^t ∝ ζ^{T−1−t}.

Two implementations of the transform, chosen at every forward by
:func:`normlab.nn.kernels_enabled` (``with normlab.use_kernels(False):`` for the reference):

* the reference here — plain autograd, one pass per component, as the equations read;
* the kernels of :mod:`normlab.nn._kernels.mixture` — the same values in coefficient form, with a
  closed-form backward in training (used without the fused activation).

Everything is computed channel-first, in float32 for half-precision input, with autocast disabled
inside the layer; a training step compiles to one graph (``torch.compile(fullgraph=True)``, queue
updates included) and the eval layer exports to ONNX with a dynamic batch. An empty batch gives an
empty output and leaves the buffers alone, as BatchNorm does. Under :func:`normlab.sync_stats` the
fit and the statistics use all-reduced sums of every process's points (a process with no points
joins every collective). Readings of the paper's ambiguous passages (fit schedule, seeding,
Eq. 37–38), the ``init="warm"`` option, numerics and measurements: ``docs/methods/mixture.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from normlab.nn import gmm
from normlab.nn._kernels import kernels_enabled
from normlab.nn._kernels import mixture as kernels
from normlab.nn._utils import (
    add_channel_affine,
    channel_first_input,
    channel_view,
    check_eps,
    check_input,
    check_positive_int,
    reset_channel_affine,
    stat_dtype,
)
from normlab.nn.gmm import GMMParams, PointSet
from normlab.nn.registry import register_norm
from normlab.nn.stats import current_group, weighted_channel_sums

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


def _check_choice(value: object, name: str, choices: tuple[str, str], where: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{where}: {name} must be {allowed}, got {value!r}")
    return value.lower()


def _check_unit(value: object, name: str, interval: str, where: str = _LAYER) -> float:
    """``value`` as a float in ``interval``: "[0, 1]", "[0, 1)" or "(0, 1]"."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value >= 0.0 if interval[0] == "[" else value > 0.0)  # type: ignore[operator]
    ok = ok and (value <= 1.0 if interval[-1] == "]" else value < 1.0)  # type: ignore[operator]
    if not ok:
        raise ValueError(f"{where}: {name} must be a number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _cv(v: Tensor, ndim: int) -> Tensor:
    """(J,) or (J, C)-indexed per-channel values against points of layout (N, C) / (B, C, L)."""
    return v if ndim == 2 else v.unsqueeze(-1)


def _layout(x: Tensor) -> Tensor:
    """(N, C) stays; (N, C, *) -> (N, C, L) (a view for contiguous input); an empty input ->
    (0, C) (no points either way; a process's share of a synchronised batch may be empty)."""
    if x.dim() == 2:
        return x
    if x.numel() == 0:
        return x.reshape(0, x.shape[1])
    return x if x.dim() == 3 else x.reshape(x.shape[0], x.shape[1], -1)


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


def _components(
    x: Tensor,
    nu: Tensor,
    mean: Tensor,
    alpha: Tensor,
    rstd: Tensor,
    gamma: Tensor,
    bias: Tensor | None,
    activation: str | None,
) -> Tensor:
    """Σ_k ν_ik · φ((x_i − μ_k) ⊙ α_k rstd_k γ + β), one pass per component (Eq. 34, Eq. 40):
    ``x`` (N, C) / (B, C, L), ``nu`` (N, K) / (B, K, L), ``mean`` and ``rstd`` (K, C), ``alpha``
    (K,) (1/√λ_k, 0 for a component that contributes nothing)."""
    nd = x.dim()
    out = None
    for k in range(nu.shape[1]):
        z = (x - _cv(mean[k], nd)) * _cv(alpha[k] * rstd[k] * gamma, nd)
        if bias is not None:
            z = z + _cv(bias, nd)
        if activation == "relu":
            z = torch.relu(z)
        z = z * nu[:, k : k + 1]
        out = z if out is None else out + z
    assert out is not None
    return out


def _normalize_autograd(
    x: Tensor,
    nu: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str | None,
    shift: Tensor,
) -> tuple[Tensor, _Stats]:
    """The reference: Eq. 34–36 (+ Eq. 40) with plain autograd (``x`` in point layout,
    differentiable; ``shift`` a constant used for the variance, see :func:`_stats_from_sums`)."""
    xc = x - _cv(shift, x.dim())
    cnt, s1, s2c = weighted_channel_sums(x, nu, xc * xc)  # Σ ν, Σ ν x, Σ ν (x − shift)²
    st = _stats_from_sums(cnt, s1, s2c, shift, eps)  # λ, μ, σ² of Eq. 35–36
    gamma = weight if weight is not None else torch.ones_like(st.mean[0])
    return _components(x, nu, st.mean, st.alpha, st.rstd, gamma, bias, activation), st


def _normalize(
    x: Tensor,
    nu: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    ps: PointSet,
    eps: float,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 34–36 (+ Eq. 40) in point layout: the kernel (:class:`MixtureNormFn
    <normlab.nn._kernels.mixture.MixtureNormFn>`, no activation, kernels enabled) or the reference.
    ``ps`` is the :class:`PointSet` of ``x`` (in eager mode the kernel consumes its squares). Returns ``y`` and
    the detached λ, μ, σ²."""
    if activation is None and kernels_enabled():
        cnt, s1, s2c = weighted_channel_sums(ps.raw, nu, ps.sq)
        st = _stats_from_sums(cnt, s1, s2c, ps.shift, eps)
        # eager: the squares' memory becomes the output; compiled: inductor plans the memory
        scratch = None if torch.compiler.is_compiling() else ps.take_squares()
        args = (st.mean, st.rstd, st.alpha, st.cnt, scratch)
        y = kernels.MixtureNormFn.apply(x, nu, weight, bias, *args)
    else:
        y, st = _normalize_autograd(x, nu, weight, bias, eps, activation, ps.shift)
    return y, st.lam.detach(), st.mean.detach(), st.var.detach()


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
    r"""The mixture normalizing transform with the posteriors given (Kalayeh & Shah, Eq. 34–36, 40).

    .. math::

        y_i = \sum_k ν_{ik}\, φ\Big(γ \odot \frac{x_i - μ_k}{\sqrt{λ_k}\sqrt{σ^2_k + ε}} + β\Big),
        \quad λ_k = \frac{\sum_i ν_{ik}}{\sum_{ij} ν_{ij}},

    μ_k, σ²_k the ν̂-weighted mean and biased variance (Eq. 35–36), φ the identity or ReLU (the
    rectifier acts on each component's affine-transformed value, Eq. 40). ν is a constant (no
    gradient); the result is differentiable in ``x``, ``weight`` (γ) and ``bias`` (β).

    Args:
        x: the points, channel-first.
        nu: posteriors; the posterior of the point ``x[n, :, h, w]`` is ``nu[n, :, h, w]``.
        weight, bias: γ, β (C,) or ``None`` (1 and 0).
        eps: ε of Eq. 35.
        activation: ``None`` or ``"relu"`` (fused, Eq. 40).
        return_stats: also return :class:`MixtureStats` (λ, μ, σ², detached).

    Shape: ``x`` (N, C) or (N, C, *); ``nu`` (N, K) or (N, K, *); output like ``x``.

    Example::

        >>> x = torch.randn(8, 4, 5, 5)
        >>> nu = torch.softmax(torch.randn(8, 3, 5, 5), 1)
        >>> y, stats = mixture_norm(x, nu, return_stats=True)
        >>> y.shape, stats.mean.shape
        (torch.Size([8, 4, 5, 5]), torch.Size([3, 4]))
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
    y, lam, mean, var = _normalize(xl, nul, w, b, PointSet(xl), float(eps), activation)
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
    r"""Eq. 34 with *given* statistics (Kalayeh & Shah; the inference transform of Eq. 38 once ν
    holds the queue posteriors).

    .. math::

        y_i = \sum_j ν_{ij}\, φ\Big(γ \odot \frac{x_i - μ_j}{\sqrt{s_j}\sqrt{σ^2_j + ε}} + β\Big)

    with s_j = ``scale_weight`` (default λ_j); a component with s_j = 0 contributes nothing. No
    gradient flows to ν or the statistics; differentiable in ``x``, γ and β.

    Args:
        x, nu, weight, bias, eps, activation: as in :func:`mixture_norm`.
        stats: λ (J,), μ (J, C), σ² (J, C) (biased, without ε).
        scale_weight: s (J,), or ``None`` for λ.

    Shape: as in :func:`mixture_norm`, with J components.

    Example::

        >>> x = torch.randn(16, 4)
        >>> stats = (torch.tensor([0.5, 0.5]), torch.randn(2, 4), torch.ones(2, 4))
        >>> mixture_transform(x, torch.softmax(torch.randn(16, 2), 1), stats).shape
        torch.Size([16, 4])
    """
    activation = _check_activation(activation, "mixture_transform")
    lam, mean, var = stats
    dt = stat_dtype(x)
    xl = _layout(x).to(dt)
    nul = _layout(nu).detach().to(dt)
    s = (lam if scale_weight is None else scale_weight).detach().to(dt)
    with torch.no_grad():
        tiny = torch.finfo(dt).tiny
        alpha = torch.where(s > 0, torch.rsqrt(s.clamp_min(tiny)), torch.zeros_like(s))
        mean = mean.detach().to(dt)
        rstd = torch.rsqrt(var.detach().to(dt).clamp_min(0.0) + eps)
    gamma = torch.ones_like(mean[0]) if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    if activation is None and kernels_enabled():
        coef_a, coef_b = kernels.coefficients(alpha, rstd, gamma, mean, b)
        y = kernels.mixture_transform_fused(xl, nul, coef_a, coef_b)
    else:
        y = _components(xl, nul, mean, alpha, rstd, gamma, b, activation)
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
    sum to 1; ``None`` for K = 1, where it is the batch's Gaussian). ``em_iters`` k-means + EM
    iterations in total, split by :func:`~normlab.nn.gmm.split_em_iters` and run by
    :func:`~normlab.nn.gmm.fit_from_centers` (on the sub-sample, if any), then the E-step of every
    point gives ν; 0: one-hot posteriors of the nearest seed. ``init_centers`` (K, C), shifted,
    replaces the k-means++ seeding (``init="warm"``)."""
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
    if em_iters == 0:
        _, _, params = gmm.kmeans_init(fit_ps, centers, 0, reg_covar)  # the seeds' clusters
        keep = _keep_mask(params.weight, min_weight)
        labels = gmm.assign(ps, centers, keep)
        # the nearest-centre rule as a mixture: equal weights over the kept centres and one
        # isotropic variance (the pooled within-cluster variance), so its posteriors are a soft
        # version of the hard assignment with the same decision boundaries
        kept = keep.to(ps.dtype)
        pooled = (params.weight[:, None] * params.var).sum() / ps.channels
        fit = GMMParams(kept / kept.sum(), centers, pooled.expand_as(centers).clone())
        return gmm.one_hot(labels, k, ps.dtype), keep, fit
    params = gmm.fit_from_centers(fit_ps, centers, n_km, n_em, reg_covar)
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
    """The posteriors ν of Eq. 31 that :class:`MixtureNorm` uses in training (Kalayeh & Shah,
    Sec. 3.2, 4.2, 5.1, 5.3): fit a K-component diagonal GMM to the points of ``x`` (k-means++
    seeding, then ``em_iters`` k-means + EM iterations in total, split equally, the extra one to
    EM: 2 is one k-means iteration, the mixture of its labels, one EM iteration) and prune the
    components with fitted λ_k < ``min_weight``. No gradient.

    Args:
        x: the points, channel-first.
        k: number of components K.
        em_iters: k-means + EM iterations in total (0: one-hot posteriors of the nearest seed).
        eps: variance floor of the fit.
        min_weight: pruning threshold on λ_k, in [0, 1).
        sample_fraction: fit on this random fraction of the points, in (0, 1].
        generator: random source of the seeding and of the subset.

    Returns:
        ``(nu, keep)``: ``nu`` (N, K, *) with Σ_k ν_ik = 1 and ν = 0 for pruned components, and
        ``keep`` (K,) bool, the components not pruned.

    Example::

        >>> nu, keep = mixture_posteriors(torch.randn(64, 4), k=3)
        >>> nu.shape, keep.shape
        (torch.Size([64, 3]), torch.Size([3]))
    """
    where = "mixture_posteriors"
    check_input(x, x.shape[1] if x.dim() >= 2 else 0, where)
    check_positive_int(k, "k", where)
    check_positive_int(em_iters, "em_iters", where, minimum=0)
    check_eps(eps, where)
    _check_unit(min_weight, "min_weight", "[0, 1)", where)
    _check_unit(sample_fraction, "sample_fraction", "(0, 1]", where)
    if x.numel() == 0:
        raise ValueError(f"{where}: got an empty input of shape {tuple(x.shape)}")
    ps = PointSet(x)
    nu, keep, _ = _fit_posteriors(ps, k, em_iters, eps, min_weight, sample_fraction, generator)
    return ps.as_points(nu), keep


def queue_decay_weights(valid: Tensor, decay: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The decay weights τ^t of a queue of T slots (Kalayeh & Shah, Eq. 39), slot T−1 the newest.

    τ^t ∝ ζ^{T−1−t}, normalised over the ``valid`` slots; for a full queue that is
    (1−ζ)/(1−ζ^T)·ζ^{T−1−t}, as Eq. 39 prints it. All 0 if no slot is valid.

    Args:
        valid: (T,) bool, the slots that hold a fit.
        decay: ζ.
        dtype: of the result.

    Example::

        >>> queue_decay_weights(torch.tensor([False, True, True]), 0.5)
        tensor([0.0000, 0.3333, 0.6667])
    """
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
    r"""Eval-mode mixture normalization with a queue of fits (Kalayeh & Shah, Eq. 38–39).

    Posteriors r (detached) are taken under the mixture of the T·K queued *fits*, component (t, k)
    with prior weight τ^t λ_k^t (τ from :func:`queue_decay_weights`), and each component
    normalizes with its queued *statistics*:

    .. math::

        \hat x_i = \sum_{t,k} r_{i,tk}\, \frac{x_i - μ_k^t}{\sqrt{s_k^t}\sqrt{σ^{2,t}_k + ε}},
        \qquad y_i = γ \odot \hat x_i + β,

    with s = λ_k^t (``"consistent"``) or τ^t λ_k^t (``"literal"``, Eq. 38 as printed; it scales
    the normalized part by Σ_t √τ^t). Without the ``fit_*`` tensors the posteriors are taken under
    the statistics themselves, N(μ, σ² + ε). An empty queue acts as one component (λ = 1, μ = 0,
    σ² = 1): a freshly constructed BatchNorm in eval. Differentiable in ``x``, γ and β.

    Args:
        x: the points, channel-first, (N, C) or (N, C, *); the output has its shape.
        queue_weight, queue_mean, queue_var: the Eq. 35–36 statistics λ (T, K), μ, σ² (T, K, C)
            of the queued batches (σ² biased, without ε).
        queue_valid: (T,) bool, the slots that hold a batch (slot T−1 the newest).
        decay: ζ of Eq. 39.
        eps, weight, bias, activation: as in :func:`mixture_norm`.
        inference: ``"consistent"`` or ``"literal"``.
        fit_weight, fit_mean, fit_var: (T, K), (T, K, C), (T, K, C), the fitted mixtures whose
            posteriors normalized the queued batches (variances used as they are); all or none.

    Example::

        >>> t, k, c = 10, 3, 4
        >>> qw, qm, qv = torch.full((t, k), 1 / k), torch.randn(t, k, c), torch.ones(t, k, c)
        >>> valid = torch.ones(t, dtype=torch.bool)
        >>> mixture_norm_inference(torch.randn(8, c, 5, 5), qw, qm, qv, valid).shape
        torch.Size([8, 4, 5, 5])
    """
    reading = _check_choice(inference, "inference", _READINGS, "mixture_norm_inference")
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
    EM; ``em_iters`` is their total, split equally, Sec. 4.2), prune components with fitted
    λ_k < ``min_weight`` (Sec. 5.3), normalize with Eq. 34–36 and a per-channel affine,

    .. math::

        y_i = \sum_k ν_{ik}\, φ\Big(γ \odot \frac{x_i - μ_k}{\sqrt{λ_k}\sqrt{σ^2_k + ε}} + β\Big),

    and push the statistics (λ, μ, σ²) and the fit onto a queue of the last ``queue_size``
    batches. Eval: Eq. 38–39 over the queue (:func:`mixture_norm_inference`); before any training
    step, a freshly constructed BatchNorm's eval.

    Args:
        num_features: C.
        k: number of mixture components K (K = 1 is batch normalization).
        em_iters: k-means + EM iterations in total (Kalayeh & Shah, Tables 2, 4 "EM iter."; 2 is
            one k-means then one EM iteration, 1 one EM iteration from the seeds' clusters, 0
            the one-hot posteriors of the nearest seed).
        eps: ε of Eq. 35, also the variance floor of the fit.
        affine: learnable per-channel γ (init 1), β (init 0).
        queue_size: T, fits kept for inference (Kalayeh & Shah: 10).
        queue_decay: ζ of Eq. 39 (Kalayeh & Shah: 0.9), in [0, 1].
        min_weight: prune components with fitted λ below this (Sec. 5.3: 0.01), in [0, 1).
        sample_fraction: fit on this random fraction of the points (Sec. 5.1), in (0, 1].
        activation: None or ``"relu"`` (fused, Eq. 40: φ = ReLU).
        inference: ``"consistent"`` (default) or ``"literal"`` reading of Eq. 38.
        init: ``"kmeans++"`` (default, the paper: fresh k-means++ seeds every batch) or ``"warm"``
            (not in the paper: seed every batch after the first with ``warm_mean``, a moving
            average of the past batches' Eq. 35 means).
        warm_momentum: m of ``warm_mean ← (1 − m)·warm_mean + m·μ`` (``init="warm"``), in (0, 1];
            a component absent from a fit restarts at its Eq. 35 mean (the batch mean).

    Buffers: ``queue_weight`` (T, K), ``queue_mean``, ``queue_var`` (T, K, C) — the Eq. 35–36
    statistics —, ``queue_fit_weight`` (T, K), ``queue_fit_mean``, ``queue_fit_var`` (T, K, C) —
    the fitted mixtures (variances with the ε floor) —, ``queue_valid`` (T,) bool,
    ``num_batches_tracked``, ``warm_mean`` (K, C) — the seed of ``init="warm"`` —; diagnostics of
    the latest training step (Sec. 5.2–5.3): ``last_weight`` (K,), ``last_mean``, ``last_var``
    (K, C) and ``last_num_components`` (components not pruned), all written without host
    synchronisation.

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same.

    Example::

        >>> m = MixtureNorm(16, k=3, em_iters=2)
        >>> x = torch.randn(8, 16, 6, 6)
        >>> m(x).shape
        torch.Size([8, 16, 6, 6])
        >>> int(m.num_batches_tracked), m.eval()(x).shape
        (1, torch.Size([8, 16, 6, 6]))
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
        self.queue_decay = _check_unit(queue_decay, "queue_decay", "[0, 1]")
        self.min_weight = _check_unit(min_weight, "min_weight", "[0, 1)")
        self.sample_fraction = _check_unit(sample_fraction, "sample_fraction", "(0, 1]")
        self.activation = _check_activation(activation, _LAYER)
        self.inference = _check_choice(inference, "inference", _READINGS, _LAYER)
        self.init = _check_choice(init, "init", _INITS, _LAYER)
        self.warm_momentum = _check_unit(warm_momentum, "warm_momentum", "(0, 1]")
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

    @channel_first_input
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, _LAYER)
        # an empty batch is no batch, as for BatchNorm: nothing is fitted or queued; inside a
        # reduction scope the full step runs, so this process joins every collective
        if x.numel() == 0 and not (self.training and current_group() is not None):
            return self._empty_forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if not self.training:
                queue = (self.queue_weight, self.queue_mean, self.queue_var, self.queue_valid)
                fit = (self.queue_fit_weight, self.queue_fit_mean, self.queue_fit_var)
                options = (self.queue_decay, self.eps, self.weight, self.bias, self.activation)
                return mixture_norm_inference(x, *queue, *options, self.inference, *fit)
            return self._train_forward(x)

    def _empty_forward(self, x: Tensor) -> Tensor:
        """The empty output of an empty input: its affine transform (and activation), so that
        backward reaches x, γ and β (with zero gradients); buffers untouched."""
        y = x.to(stat_dtype(x))
        if self.weight is not None:
            nd = y.dim()
            y = y * channel_view(self.weight.to(y.dtype), nd) + channel_view(
                self.bias.to(y.dtype), nd
            )
        if self.activation == "relu":
            y = torch.relu(y)
        return y.to(x.dtype)

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
        y, lam, mean, var = _normalize(xl, nu, w, b, ps, self.eps, self.activation)
        with torch.no_grad():
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
        if self.init == "warm" and self._has_fit:  # (init first: no guard on the flag otherwise)
            # per-component momentum: m for a component of the fit, 1 (restart at its Eq. 35 mean,
            # the batch mean) for one absent from it (docs/methods/mixture.md, "Warm seeding")
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
