r"""Mode Normalization and Mode Group Normalization (Deecke et al., Sec. 3.2–3.3, Alg. 1–3, Eq. 2–5).

**Mode Normalization** (:class:`ModeNorm`, registry ``mode``) softly assigns each sample to K
modes with a gate on its spatially averaged features and normalizes it "under voting from its
gate assignment" with gate-weighted batch statistics (Sec. 3.2, Alg. 1, Eq. 2–3):

.. math::
    g_{nk} = \operatorname{softmax}_k\big(\Psi(\langle x_n\rangle)\big)_k,\quad
    N_k = \sum_n g_{nk},\quad
    \mu_k = \frac{1}{N_k}\sum_n g_{nk}\langle x_n\rangle,\quad
    \sigma^2_k = \frac{1}{N_k}\sum_n g_{nk}\big\langle (x_n-\mu_k)^2\big\rangle,

.. math::
    \mathrm{MN}(x_n) = \alpha \sum_k g_{nk}\,\frac{x_n-\mu_k}{\sqrt{\sigma_k^2+\epsilon}} + \beta ,

with ⟨·⟩ the mean over the spatial positions and Ψ an ``nn.Linear(C, K)``. Running estimates of
⟨x⟩_k and ⟨x²⟩_k (Eq. 4) give μ_k and σ²_k = ⟨x²⟩_k − ⟨x⟩_k² at test time (Alg. 2). K = 1 is
batch normalization.

**Mode Group Normalization** (:class:`ModeGroupNorm`, registry ``mgn``; Sec. 3.3, Alg. 3, Eq. 5)
gates the channels of each sample, g_ck = softmax_k(ψ(⟨x_c⟩)) with ψ: ℝ → ℝ^K, takes per sample
μ_k and σ²_k as gate-weighted averages over the channels (weights C_k = Σ_c g_ck), and returns

.. math::  \mathrm{MGN}(x) = \alpha\,\frac1K\sum_k \frac{x-\mu_k}{\sqrt{\sigma_k^2+\epsilon}} + \beta

(Eq. 5 as printed; ``combine="gated"`` weights mode k by g_ck instead, like Eq. 2).

:func:`mode_norm` and :func:`mode_group_norm` are written with plain differentiable torch ops on
the per-(sample, channel) moments of :func:`spatial_moments`, as x · scale + shift. By default the
layers run the hand-written kernels of :mod:`normlab.nn._kernels.mode`, which compute the same
values; ``with normlab.use_kernels(False):`` runs the plain reference. Either way a layer compiles
to one graph (``torch.compile(fullgraph=True)``, forward and backward, the running update inside),
takes an empty batch as ``nn.BatchNorm2d`` does and exports to ONNX in eval mode. Statistics are
computed in float32 for half-precision input (autocast off). Readings of the paper, deviations
from its code and benchmarks: ``docs/methods/mode.md``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.nn._kernels import kernels_enabled
from normlab.nn._kernels import mode as kernels
from normlab.nn._kernels.mode import batch_center
from normlab.nn._utils import (
    add_channel_affine,
    check_eps,
    check_input,
    check_momentum,
    check_positive_int,
    reset_channel_affine,
    same_memory_format,
    stat_dtype,
)
from normlab.nn.registry import register_norm
from normlab.nn.stats import weighted_sums

__all__ = [
    "MIN_MODE_WEIGHT",
    "ModeGroupNorm",
    "ModeNorm",
    "batch_center",
    "mode_gates",
    "mode_group_gates",
    "mode_group_norm",
    "mode_norm",
    "mode_norm_statistics",
    "spatial_moments",
]

MIN_MODE_WEIGHT = 1e-12
"""Lower clamp of a mode's total gate weight N_k (ModeNorm) or C_k (MGN) before dividing by it.

Above it the estimators are exact weighted averages; below it they shrink toward the centre, so
they stay finite, and their contribution to the output is weighted by gates < 1e-12. ModeNorm does
not update the running estimates of a mode whose batch weight is ≤ this value."""

Combine = Literal["mean", "gated"]


def _stats_context(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Disable autocast (if active) so gates and statistics are computed in float32."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)`` without the dispatch when it is a no-op (this runs per layer and step)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _flat(x: Tensor) -> Tensor:
    """``x`` in the statistics dtype as ``(N, C)`` or ``(N, C, L)`` (L the number of positions;
    written out, so that an empty batch reshapes too)."""
    xf = x.to(stat_dtype(x))
    if x.dim() <= 3:
        return xf
    return xf.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def spatial_moments(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-(sample, channel) spatial mean ``m`` and biased spatial variance ``v`` of ``x``.

    ``v`` is computed about ``m`` (two passes), so it has no cancellation error. For ``(N, C)``
    input there is one position per channel, so ``m = x`` and ``v`` is ``None`` (zero).
    Differentiable (plain autograd).

    Shape:
        - x: ``(N, C)`` or ``(N, C, *)``.
        - m, v: ``(N, C)``, in float32 for half-precision input, else in the input's dtype.

    Example::

        >>> m, v = spatial_moments(torch.arange(8.0).reshape(1, 2, 4))
        >>> m, v
        (tensor([[1.5000, 5.5000]]), tensor([[1.2500, 1.2500]]))
    """
    flat = _flat(x)
    if x.dim() == 2:
        return flat, None
    m = flat.mean(2, keepdim=True)
    d = flat - m
    return m.squeeze(2), (d * d).mean(2)


# --------------------------------------------------------------------------------------------
# Mode Normalization (Deecke et al., Sec. 3.2, Alg. 1–2, Eq. 2–4)


def mode_gates(means: Tensor, gate_weight: Tensor, gate_bias: Tensor | None = None) -> Tensor:
    r"""ModeNorm gates :math:`g_{nk} = \operatorname{softmax}_k(\Psi(\langle x_n\rangle))_k`
    (Deecke et al., Sec. 3.2, Alg. 1): an affine map of the spatial means, then a softmax.

    Args:
        means: per-sample spatial means ⟨x_n⟩ (see :func:`spatial_moments`).
        gate_weight, gate_bias: Ψ as an ``nn.Linear(C, K)``'s weight and bias (or ``None``).

    Shape:
        - means ``(N, C)``, gate_weight ``(K, C)``, gate_bias ``(K,)``.
        - Output: ``(N, K)`` in the dtype of ``means``; each row sums to 1.

    Example::

        >>> mode_gates(torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [-1.0]]))
        tensor([[0.8808, 0.1192],
                [0.1192, 0.8808]])
    """
    dt = means.dtype
    b = None if gate_bias is None else gate_bias.to(dt)
    return torch.softmax(F.linear(means, gate_weight.to(dt), b), dim=1)


def mode_norm_statistics(
    means: Tensor, variances: Tensor | None, gates: Tensor, center: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gate-weighted batch statistics of ModeNorm (Deecke et al., Alg. 1, Eq. 3).

    .. math::  N_k = \sum_n g_{nk},\quad \mu_k = \frac1{N_k}\sum_n g_{nk} m_n,\quad
               \sigma^2_k = \frac1{N_k}\sum_n g_{nk}\big(v_n + (m_n - c)^2\big) - (\mu_k - c)^2,

    which equals :math:`\frac1{N_k}\sum_n g_{nk}\langle (x_n-\mu_k)^2\rangle` for any constant c.
    The sums go through :func:`normlab.nn.stats.weighted_sums` (the cross-process seam); N_k is
    clamped at :data:`MIN_MODE_WEIGHT` before dividing.

    Args:
        means: per-sample spatial means m_n = ⟨x_n⟩.
        variances: per-sample spatial variances v_n = ⟨(x_n − m_n)²⟩, or ``None`` for ``(N, C)``
            input (one position per sample, v = 0).
        gates: g_nk from :func:`mode_gates`.
        center: the constant c (detached); default :func:`batch_center` of ``means``.

    Returns:
        ``(mean, var, weight)``: μ_k, the biased σ²_k (≥ 0) and N_k.

    Shape:
        - means, variances ``(N, C)``; gates ``(N, K)``; center ``(C,)``.
        - mean, var ``(K, C)``; weight ``(K,)``.

    Example::

        >>> means = torch.tensor([[2.0], [-2.0]])
        >>> mean, var, nk = mode_norm_statistics(means, torch.ones(2, 1), torch.eye(2))
        >>> mean.flatten(), var.flatten(), nk
        (tensor([ 2., -2.]), tensor([1., 1.]), tensor([1., 1.]))
    """
    c = means.shape[1]
    if center is None:
        center = batch_center(means)
    center = center.detach().to(means.dtype)
    pts = means - center
    if variances is None:
        ws = weighted_sums(pts, gates)
        s1, s2 = ws.s1, ws.s2
    else:
        # One call: s1 = [Σ g (m − c), Σ g v], s2[:, :C] = Σ g (m − c)²; s2[:, C:] is unused.
        ws = weighted_sums(torch.cat([pts, variances], dim=1), gates)
        s1 = ws.s1[:, :c]
        s2 = ws.s2[:, :c] + ws.s1[:, c:]
    nk = ws.w.clamp_min(MIN_MODE_WEIGHT).unsqueeze(1)
    mean_c = s1 / nk
    var = (s2 / nk - mean_c * mean_c).clamp_min(0)
    return mean_c + center, var, ws.w


@torch.no_grad()
def _update_running(
    running_mean: Tensor,
    running_sqmean: Tensor,
    mean: Tensor,
    var: Tensor,
    nk: Tensor,
    momentum: float,
) -> None:
    """Eq. 4 with PyTorch's convention for ⟨x⟩_k and ⟨x²⟩_k = σ²_k + μ_k², skipping modes with
    N_k ≤ MIN_MODE_WEIGHT (selected with ``torch.where``: no host synchronisation)."""
    live = (nk > MIN_MODE_WEIGHT).unsqueeze(1)
    mean = mean.detach()
    bm = _cast(mean, running_mean.dtype)
    bsq = _cast(torch.addcmul(var.detach(), mean, mean), running_sqmean.dtype)
    running_mean.lerp_(torch.where(live, bm, running_mean), momentum)  # lerp(r, r, m) = r exactly
    running_sqmean.lerp_(torch.where(live, bsq, running_sqmean), momentum)


def _scale_shift_from_stats(
    gates: Tensor, mean: Tensor, var: Tensor, eps: float, w: Tensor | None, b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Eq. 2 as ``x * scale + shift``: ``scale = α Σ_k g_nk s_k`` and
    ``shift = β − α Σ_k g_nk μ_k s_k`` with s_k = (σ²_k + ε)^(-1/2), from gates (N, K) and
    per-mode μ_k, σ²_k (K, C) (Σ_k g_nk = 1)."""
    inv = torch.rsqrt(var + eps)  # s_k, (K, C)
    if w is not None:  # fold α into the (K, C) factors: cheaper than scaling (N, C) results
        inv = inv * w.to(inv.dtype)
    scale = gates @ inv  # α Σ_k g_nk s_k, (N, C)
    if b is None:
        shift = -(gates @ (mean * inv))  # −α Σ_k g_nk μ_k s_k, (N, C)
    else:
        shift = torch.addmm(b.to(inv.dtype), gates, mean * inv, alpha=-1)  # β − α Σ_k …
    return scale, shift


def _mode_norm_scale_shift(
    means: Tensor,
    variances: Tensor | None,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    *,
    eps: float,
    running: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """ModeNorm's small function: gates (Alg. 1), then in training (``running=None``) the batch
    statistics (Eq. 3), in eval the given ``running = (μ_k, σ²_k)`` (Alg. 2); then Eq. 2's
    per-(sample, channel) scale and shift. Returns ``(scale, shift, stats)`` with
    ``stats = (μ_k, σ²_k, N_k)`` in training (for the update of Eq. 4), ``()`` in eval."""
    gates = mode_gates(means, gw, gb)  # (N, K)
    if running is None:
        mean, var, nk = mode_norm_statistics(means, variances, gates)
        stats: tuple[Tensor, ...] = (mean, var, nk)
    else:
        (mean, var), stats = running, ()
    return (*_scale_shift_from_stats(gates, mean, var, eps, w, b), stats)


def _running_mean_var(running: tuple[Tensor, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """μ_k = ⟨x⟩_k and σ²_k = max(⟨x²⟩_k − ⟨x⟩_k², 0) from the running estimates (Alg. 2)."""
    mean = running[0].to(dtype)
    return mean, (running[1].to(dtype) - mean * mean).clamp_min(0)


def _plain_gated_affine(
    flat: Tensor, fn: Callable[..., tuple], params: tuple[Tensor | None, ...]
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Plain autograd: ``x * scale + shift`` with ``(scale, shift, stats) = fn(m, v, *params)``
    and m, v the spatial moments of ``flat`` (``(N, C)``: m = x, v = ``None``; or ``(N, C, L)``).
    Returns the output (shaped like ``flat``) and ``stats``."""
    if flat.dim() == 2:  # one position per (sample, channel): m = x, v = 0
        scale, shift, stats = fn(flat, None, *params)
        return torch.addcmul(shift, flat, scale), stats
    means, variances = spatial_moments(flat)
    scale, shift, stats = fn(means, variances, *params)
    return torch.addcmul(shift.unsqueeze(2), flat, scale.unsqueeze(2)), stats


def _stat_args(x: Tensor, *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """The parameters in the statistics dtype of ``x`` (float32 for half input)."""
    dt = stat_dtype(x)
    return tuple(_cast(t, dt) for t in params)


def mode_norm(
    x: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor | None,
    running_mean: Tensor | None,
    running_sqmean: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Functional Mode Normalization (Deecke et al., Alg. 1–2, Eq. 2–4).

    .. math::  y_n = \mathrm{weight} \sum_k g_{nk}\,\frac{x_n - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}}
               + \mathrm{bias}

    with gates from :func:`mode_gates`. Training: μ_k, σ²_k from :func:`mode_norm_statistics`
    (Eq. 3); if both running buffers are given they are updated in place,
    ``running = (1 - momentum) * running + momentum * batch`` for ⟨x⟩_k and ⟨x²⟩_k (Eq. 4),
    except for modes with batch weight N_k ≤ :data:`MIN_MODE_WEIGHT`. Eval: μ_k = ⟨x⟩_k,
    σ²_k = max(⟨x²⟩_k − ⟨x⟩_k², 0) from the running estimates (Alg. 2).

    Args:
        x: the input.
        gate_weight, gate_bias: Ψ, an ``nn.Linear(C, K)``'s weight and bias (or ``None``).
        running_mean, running_sqmean: ⟨x⟩_k and ⟨x²⟩_k, or ``None`` (training only).
        weight, bias: the per-channel affine α, β, or ``None``.
        training: batch statistics (``True``) or the running estimates (``False``).
        momentum: rate of the running estimates (the paper's λ = 0.1 is ``momentum=0.1``).
        eps: added to σ²_k.

    Shape:
        - x: ``(N, C)`` or ``(N, C, *)``; output: same shape and dtype.
        - gate_weight ``(K, C)``, gate_bias ``(K,)``; running buffers ``(K, C)``; weight, bias
          ``(C,)``.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rsq = torch.zeros(2, 3), torch.ones(2, 3)
        >>> mode_norm(x, torch.randn(2, 3), torch.zeros(2), rm, rsq).shape
        torch.Size([8, 3, 4, 4])
    """
    if not training and (running_mean is None or running_sqmean is None):
        raise ValueError(
            "mode_norm: eval mode (training=False) needs running_mean and running_sqmean"
        )
    running = None
    if running_mean is not None and running_sqmean is not None:
        running = (running_mean, running_sqmean)
    params = (gate_weight, gate_bias, weight, bias)
    with _stats_context(x):
        flat = _flat(x)
        stats: tuple[Tensor, ...] = ()
        eval_stats = None
        if not training and running is not None:  # (eval without running estimates raised above)
            eval_stats = _running_mean_var(running, flat.dtype)
        if not kernels_enabled() or (not training and x.dim() == 2):  # plain autograd
            fn = functools.partial(_mode_norm_scale_shift, eps=eps, running=eval_stats)
            y, stats = _plain_gated_affine(flat, fn, params)
        elif training:
            y, *stats = kernels.mode_norm_train(flat, _stat_args(x, *params), eps, MIN_MODE_WEIGHT)
        else:
            y = kernels.mode_norm_eval(flat, _stat_args(x, *params), *eval_stats, eps)
        if training and running is not None:
            _update_running(*running, *stats, momentum)
        return _cast(y.reshape(x.shape), x.dtype)


# --------------------------------------------------------------------------------------------
# Mode Group Normalization (Deecke et al., Sec. 3.3, Alg. 3, Eq. 5)


def mode_group_gates(means: Tensor, gate_weight: Tensor, gate_bias: Tensor | None) -> Tensor:
    r"""MGN channel gates :math:`g_{ck} = \operatorname{softmax}_k(\psi(\langle x_c\rangle))_k`
    (Deecke et al., Sec. 3.3, Alg. 3), ψ: ℝ → ℝ^K shared by all channels.

    Args:
        means: per-channel spatial means (see :func:`spatial_moments`).
        gate_weight, gate_bias: ψ as an ``nn.Linear(1, K)``'s weight and bias (or ``None``).

    Shape:
        - means ``(N, C)``, gate_weight ``(K, 1)``, gate_bias ``(K,)``.
        - Output: ``(N, K, C)`` (the softmax runs over dim 1).

    Example::

        >>> g = mode_group_gates(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0], [0.0]]), None)
        >>> g
        tensor([[[0.5000, 0.7311],
                 [0.5000, 0.2689]]])
    """
    dt = means.dtype
    k = gate_weight.shape[0]
    logits = means.unsqueeze(1) * gate_weight.to(dt).reshape(1, k, 1)
    if gate_bias is not None:
        logits = logits + gate_bias.to(dt).reshape(1, k, 1)
    return torch.softmax(logits, dim=1)


def _affine(
    scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Fold the per-channel affine α, β into per-(sample, channel) scale and shift."""
    if weight is not None:
        w = weight.to(scale.dtype)
        scale = scale * w
        shift = shift * w
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def _mgn_scale_shift(
    means: Tensor,
    variances: Tensor | None,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    combine: Combine,
) -> tuple[Tensor, Tensor, tuple[()]]:
    """MGN's small function: channel gates, per-(sample, mode) statistics over the channels
    (Alg. 3), then Eq. 5's per-(sample, channel) scale and shift (and no statistics)."""
    gates = mode_group_gates(means, gw, gb)  # (N, K, C)
    center = means.detach().mean(1, keepdim=True)  # per-sample constant (conditioning only)
    mc = means - center
    sq = mc * mc if variances is None else mc * mc + variances
    ck = gates.sum(2).clamp_min(MIN_MODE_WEIGHT)  # C_k, (N, K)
    # (batched mat-vec products as broadcast-and-sum: bmm is slow for these tiny shapes)
    mean_c = (gates * mc.unsqueeze(1)).sum(2) / ck  # (N, K)
    var = ((gates * sq.unsqueeze(1)).sum(2) / ck - mean_c * mean_c).clamp_min(0)
    mean = mean_c + center  # μ_k, (N, K)
    inv = torch.rsqrt(var + eps)  # s_k, (N, K)
    c = means.shape[1]
    if combine == "mean":  # (1/K) Σ_k s_k (x − μ_k): one scale and shift per sample
        k = gates.shape[1]
        scale = (inv.sum(1, keepdim=True) / k).expand(-1, c)
        shift = (-(mean * inv).sum(1, keepdim=True) / k).expand(-1, c)
    else:  # Σ_k g_ck s_k (x − μ_k)
        scale = (gates * inv.unsqueeze(2)).sum(1)  # (N, C)
        shift = -(gates * (mean * inv).unsqueeze(2)).sum(1)
    return (*_affine(scale, shift, w, b), ())


def mode_group_norm(
    x: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    combine: Combine = "mean",
) -> Tensor:
    r"""Functional Mode Group Normalization (Deecke et al., Sec. 3.3, Alg. 3, Eq. 5).

    Per sample, with channel gates g_ck from :func:`mode_group_gates`: C_k = Σ_c g_ck,
    μ_k = Σ_c g_ck ⟨x_c⟩ / C_k, σ²_k = Σ_c g_ck ⟨(x_c − μ_k)²⟩ / C_k, and

    .. math::  y = \mathrm{weight}\, \sum_k w_k\,\frac{x - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}}
               + \mathrm{bias},

    with w_k = 1/K for ``combine="mean"`` (Eq. 5 as printed) or w_k = g_ck for ``"gated"`` (the
    reading analogous to ModeNorm's Eq. 2). The same computation in training and eval, valid at
    batch size 1; the statistics are per sample, so they do not go through the cross-process seam.

    Args:
        x: the input.
        gate_weight, gate_bias: ψ, an ``nn.Linear(1, K)``'s weight and bias (or ``None``).
        weight, bias: the per-channel affine α, β, or ``None``.
        eps: added to σ²_k.
        combine: ``"mean"`` or ``"gated"``.

    Shape:
        - x: ``(N, C)`` or ``(N, C, *)``; output: same shape and dtype.
        - gate_weight ``(K, 1)``, gate_bias ``(K,)``; weight, bias ``(C,)``.

    Example::

        >>> x = torch.randn(2, 6, 5, 5)
        >>> mode_group_norm(x, torch.randn(3, 1), torch.zeros(3), combine="gated").shape
        torch.Size([2, 6, 5, 5])
    """
    if combine not in ("mean", "gated"):
        raise ValueError(f"mode_group_norm: combine must be 'mean' or 'gated', got {combine!r}")
    fn = functools.partial(_mgn_scale_shift, eps=eps, combine=combine)
    params = (gate_weight, gate_bias, weight, bias)
    with _stats_context(x):
        flat = _flat(x)
        if kernels_enabled():
            ps = _stat_args(x, *params)
            y = kernels.mode_group_norm(flat, ps, eps, MIN_MODE_WEIGHT, combine)
        else:
            y = _plain_gated_affine(flat, fn, params)[0]
        return _cast(y.reshape(x.shape), x.dtype)


# --------------------------------------------------------------------------------------------
# The layers


def _init_gate(gate: nn.Linear, k: int) -> None:
    """Gate init of Deecke et al.'s reference code: weights 1/K + 0.01·N(0, 1) (near-uniform gates)."""
    with torch.no_grad():
        gate.weight.normal_(0.0, 1.0).mul_(0.01).add_(1.0 / k)


@register_norm("mode", "mode normalization: K gated modes with per-mode batch statistics")
class ModeNorm(nn.Module):
    r"""Mode Normalization (Deecke et al., Sec. 3.2, Alg. 1–2, Eq. 2–4).

    .. math::  y_n = \alpha \sum_k g_{nk}\,\frac{x_n - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta,
               \qquad g_n = \operatorname{softmax}(\Psi(\langle x_n\rangle)),

    with gate-weighted batch statistics μ_k, σ²_k in training (Eq. 3) and running estimates of
    ⟨x⟩_k, ⟨x²⟩_k in eval (Eq. 4, Alg. 2); see :func:`mode_norm`. ``k=1`` is batch normalization
    in training mode.

    Args:
        num_features: C.
        k: number of modes K (≥ 1).
        momentum: running-estimate rate, ``running = (1 - momentum) * running + momentum * batch``
            (the paper's λ = 0.1 is ``momentum=0.1``).
        eps: added to σ²_k.
        affine: learn per-channel α (init 1) and β (init 0), shared by the modes (Deecke et al.,
            footnote 3).

    Attributes:
        gate: ``nn.Linear(C, K)`` — Ψ; weights initialised to 1/K + 0.01·N(0, 1), bias as
            ``nn.Linear``'s default.
        running_mean: buffer ``(K, C)``, running ⟨x⟩_k (init 0).
        running_sqmean: buffer ``(K, C)``, running ⟨x²⟩_k (init 1). No Bessel correction: the
            paper's Alg. 2 uses σ² = ⟨x²⟩ − ⟨x⟩² directly.

    Gradients reach the gate (Ψ), α, β and the input. With kernels enabled (the default), double
    backward (``create_graph=True``) is supported for ``(N, C)`` input only; the plain reference
    (``normlab.use_kernels(False)``) supports it for every input. One sample at a time works in
    eval mode; in training a batch of one sample normalizes that sample by its own statistics
    (finite, but as degenerate as batch norm's). An empty batch gives an empty output and leaves
    the running estimates as they were (under :func:`normlab.sync_stats` the process still joins
    every reduction, and the estimates follow the other processes' samples).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``.
        - Output: same shape as the input.

    Example::

        >>> norm = ModeNorm(16, k=2)
        >>> y = norm(torch.randn(8, 16, 5, 5))
        >>> norm.gates(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 2])
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    def __init__(
        self,
        num_features: int,
        k: int = 2,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "ModeNorm")
        self.k = check_positive_int(k, "k", "ModeNorm")
        self.momentum = check_momentum(momentum, "ModeNorm")
        self.eps = check_eps(eps, "ModeNorm")
        self.gate = nn.Linear(num_features, k)
        self.affine = add_channel_affine(self, num_features, affine, "ModeNorm")
        self.register_buffer("running_mean", torch.zeros(k, num_features))
        self.register_buffer("running_sqmean", torch.ones(k, num_features))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """⟨x⟩_k = 0 and ⟨x²⟩_k = 1 (so the initial running σ²_k is 1, as in BatchNorm)."""
        self.running_mean.zero_()
        self.running_sqmean.fill_(1.0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self.gate.reset_parameters()
        _init_gate(self.gate, self.k)
        reset_channel_affine(self)

    @property
    def running_var(self) -> Tensor:
        """Running per-mode variance ⟨x²⟩_k − ⟨x⟩_k² used in eval, ``(K, C)`` (clamped at 0)."""
        return (self.running_sqmean - self.running_mean**2).clamp_min(0)

    def gates(self, x: Tensor) -> Tensor:
        """The gates g_nk ``(N, K)`` this layer assigns to the samples of ``x``."""
        check_input(x, self.num_features, "ModeNorm")
        with _stats_context(x):
            return mode_gates(spatial_moments(x)[0], self.gate.weight, self.gate.bias)

    @same_memory_format
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, "ModeNorm")
        return mode_norm(
            x,
            self.gate.weight,
            self.gate.bias,
            self.running_mean,
            self.running_sqmean,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, k={self.k}, momentum={self.momentum}, eps={self.eps}, "
            f"affine={self.affine}"
        )


@register_norm("mgn", "mode group normalization: channels gated into K modes within each sample")
class ModeGroupNorm(nn.Module):
    r"""Mode Group Normalization (Deecke et al., Sec. 3.3, Alg. 3, Eq. 5).

    .. math::  y = \alpha\,\frac1K \sum_k \frac{x - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta

    where, within each sample, channel c goes to mode k with gate
    ``g_ck = softmax_k(gate(⟨x_c⟩))`` and μ_k, σ²_k are gate-weighted averages over the channels
    (see :func:`mode_group_norm`). There are no running statistics: training and eval compute the
    same thing, at any batch size.

    Args:
        num_features: C.
        k: number of modes K (≥ 1).
        eps: added to σ²_k.
        affine: learn per-channel α (init 1) and β (init 0).
        combine: ``"mean"`` (default) — ``α (1/K) Σ_k (x − μ_k)/sqrt(σ²_k + ε) + β``, Eq. 5 as
            printed (Alg. 3's return line agrees); ``"gated"`` —
            ``α Σ_k g_ck (x − μ_k)/sqrt(σ²_k + ε) + β``, the reading analogous to ModeNorm's
            Eq. 2. With ``"mean"`` the gates act only through μ_k and σ_k.

    Attributes:
        gate: ``nn.Linear(1, K)`` — ψ; weights initialised to 1/K + 0.01·N(0, 1) as in ModeNorm,
            bias 0.

    With kernels enabled (the default), double backward is supported for ``(N, C)`` input only
    (as for :class:`ModeNorm`).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``.
        - Output: same shape as the input.

    Example::

        >>> norm = ModeGroupNorm(16, k=2)
        >>> norm(torch.randn(1, 16, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        k: int = 2,
        eps: float = 1e-5,
        affine: bool = True,
        combine: Combine = "mean",
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", "ModeGroupNorm")
        self.k = check_positive_int(k, "k", "ModeGroupNorm")
        self.eps = check_eps(eps, "ModeGroupNorm")
        if combine not in ("mean", "gated"):
            raise ValueError(f"ModeGroupNorm: combine must be 'mean' or 'gated', got {combine!r}")
        self.combine = combine
        self.gate = nn.Linear(1, k)
        self.affine = add_channel_affine(self, num_features, affine, "ModeGroupNorm")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_gate(self.gate, self.k)
        nn.init.zeros_(self.gate.bias)
        reset_channel_affine(self)

    def gates(self, x: Tensor) -> Tensor:
        """The channel gates g_ck of ``x``, laid out as ``(N, K, C)``."""
        check_input(x, self.num_features, "ModeGroupNorm")
        with _stats_context(x):
            return mode_group_gates(spatial_moments(x)[0], self.gate.weight, self.gate.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, "ModeGroupNorm")
        return mode_group_norm(
            x, self.gate.weight, self.gate.bias, self.weight, self.bias, self.eps, self.combine
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, eps={self.eps}, affine={self.affine}, combine={self.combine!r}"
