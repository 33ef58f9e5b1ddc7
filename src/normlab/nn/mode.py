r"""Mode Normalization and Mode Group Normalization (Deecke et al., Sec. 3.2–3.3, Alg. 1–3, Eq. 2–5).

**Mode Normalization** (``ModeNorm``, registry ``mode``). Each sample :math:`x_n` is softly
assigned to K modes by a gate computed from its spatially averaged features
:math:`\varphi(x_n) = \langle x_n\rangle` (Deecke et al., Sec. 3.2, "we average over W and H"):

.. math::  g_{nk} = \operatorname{softmax}_k\big(\Psi(\varphi(x_n))\big)_k ,
           \qquad \Psi:\ \mathbb R^C \to \mathbb R^K \text{ affine (an ``nn.Linear`` named ``gate``)}.

In training (Alg. 1, Eq. 2–3) the per-mode statistics are gate-weighted over the batch
(:math:`\langle\cdot\rangle` is the mean over the spatial positions)

.. math::  N_k = \sum_n g_{nk},\quad
           \mu_k = \frac1{N_k}\sum_n g_{nk}\langle x_n\rangle,\quad
           \sigma^2_k = \frac1{N_k}\sum_n g_{nk}\big\langle (x_n-\mu_k)^2\big\rangle

and every sample is normalized "under voting from its gate assignment" (Eq. 2)

.. math::  \mathrm{MN}(x_n) = \alpha \sum_k g_{nk}\,\frac{x_n-\mu_k}{\sqrt{\sigma_k^2+\epsilon}} + \beta .

The gates are learned end-to-end: gradients flow through :math:`g_{nk}` into the estimators and
the output. Running estimates of :math:`\langle x\rangle_k` and :math:`\langle x^2\rangle_k` are
kept per mode (Eq. 4; PyTorch's momentum convention, so the paper's λ = 0.1 is ``momentum=0.1``)
and used at test time (Alg. 2) as :math:`\mu_k = \langle x\rangle_k`,
:math:`\sigma_k^2 = \langle x^2\rangle_k - \langle x\rangle_k^2`, with the gates still computed
from the input. K = 1 is batch normalization (in training mode).

**Mode Group Normalization** (``ModeGroupNorm``, registry ``mgn``; Sec. 3.3, Alg. 3, Eq. 5).
Within each sample, each channel c is softly assigned to K modes by a gate ψ: ℝ → ℝ^K shared
by all channels and applied to the channel's spatial average,
:math:`g_{ck} = \operatorname{softmax}_k(\psi(\langle x_c\rangle))_k`; per sample and mode,
:math:`C_k = \sum_c g_{ck}`, :math:`\mu_k = \frac1{C_k}\sum_c g_{ck}\langle x_c\rangle`,
:math:`\sigma_k^2 = \frac1{C_k}\sum_c g_{ck}\langle (x_c-\mu_k)^2\rangle`, and (Eq. 5 as printed)

.. math::  \mathrm{MGN}(x) = \alpha\,\frac1K\sum_k \frac{x-\mu_k}{\sqrt{\sigma_k^2+\epsilon}} + \beta .

Implementation notes (shared by both layers):

* **One scale and shift per (sample, channel).** :math:`\sum_k g_k (x-\mu_k)s_k = x\cdot\sum_k g_k
  s_k - \sum_k g_k\mu_k s_k` with :math:`s_k = (\sigma_k^2+\epsilon)^{-1/2}`, so the output is
  ``x * scale + shift`` with (N, C) ``scale``/``shift`` (α, β folded in); the K modes only ever
  touch (N, C)-, (K, C)- or (N, K, C)-sized tensors. No loop over modes.
* **Fused big-tensor work** (``_GatedAffine``). For ``(N, C, *)`` input the large tensor is read a
  few times and only one large tensor is allocated per direction (like ``nn.BatchNorm2d``):
  forward = spatial mean, x − m, ‖x − m‖², then ``x * scale + shift`` into the same buffer;
  backward = Σ g·x and Σ g, the small (N, C) graph differentiated by autograd, then
  ``∂x = g * scale + a * x + b`` in one buffer. Double backward is not supported for such input.
* **(N, C) input** (MLPs; one position per sample and channel, so m = x and v = 0). Training-mode
  ModeNorm (``_ModeNormTrain2d``) and MGN (``_MGNorm2d``) are single autograd Functions with a
  hand-written backward: plain autograd over the same formulas keeps about a dozen full-size
  intermediates and runs a broadcast product plus a reduction per elementwise step, which made
  these layers 6× slower than BatchNorm1d / GroupNorm at (256, 512). ModeNorm allocates two (N, C)
  tensors per direction and keeps its gates transposed, (K, N) (a softmax over a leading
  dimension is much faster on CPU than one over a last dimension of size K); products with an
  inner dimension of K ≤ 4 run as K broadcast multiply-adds on CPU (``_gate_sum``: a matrix
  product with an inner dimension of 2–4 is several times slower there than an elementwise
  pass). MGN keeps its gates mode-major, (K, N, C), computes K = 2 gates as the two-way softmax
  σ(±((ψ_1 − ψ_2)·x + b_1 − b_2)) and uses one (N, C) scratch buffer per mode loop. The gradients
  of ModeNorm's batch sums are all-reduced in the backward as autograd through
  :func:`normlab.nn.stats.reduce_sums` would do. Double backward (``create_graph=True``) stays
  supported for (N, C) input: it differentiates a plain-autograd replay of the forward. Eval-mode
  ModeNorm on (N, C) input uses plain autograd (its graph is small).
* **Statistics.** Per (sample, channel) the layer computes the spatial mean m and the within-sample
  variance v (centred at m, so no cancellation at the level of the big tensor); then
  :math:`\sigma^2_k = \frac1{N_k}\sum_n g_{nk}\,(v_n + (m_n-c)^2) - (\mu_k-c)^2`, which equals
  Eq. 3's definition for any constant c. ModeNorm takes c = the batch average of m, whose sum goes
  through :func:`normlab.nn.stats.reduce_sums` (so in a distributed run every process uses the
  same c and the gate-weighted sums of :func:`normlab.nn.stats.weighted_sums` stay additive); MGN
  takes each sample's own channel average.
* **Float32 statistics.** Gates and statistics are computed with autocast disabled, in float32 for
  float16/bfloat16 input; the output has the input's dtype.
* **Dead modes.** A mode's total gate weight (:math:`N_k` or :math:`C_k`) is clamped below at
  ``MIN_MODE_WEIGHT`` (1e-12) before dividing. Above it the estimators are exact weighted
  averages; below it they shrink toward c (|μ_k − c| ≤ max |m − c|), so they stay finite and
  bounded, and their contribution to the output is weighted by gates < 1e-12. ModeNorm does *not*
  update the running estimates of a mode whose batch weight is ≤ ``MIN_MODE_WEIGHT`` (selected with
  ``torch.where``, no host synchronisation): such a mode keeps its previous running estimates
  (initially ⟨x⟩ = 0, ⟨x²⟩ = 1, i.e. μ = 0, σ² = 1) instead of absorbing meaningless numbers.
* **Eval precision.** As in Alg. 2, eval uses σ²_k = ⟨x²⟩_k − ⟨x⟩_k² from the running estimates
  (clamped at 0); for features whose mean is huge relative to their spread this difference loses
  float32 precision (training-mode statistics do not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab.nn._utils import (
    add_channel_affine,
    check_eps,
    check_input,
    check_momentum,
    check_positive_int,
    reset_channel_affine,
    stat_dtype,
)
from normlab.nn.registry import register_norm
from normlab.nn.stats import current_group, reduce_sums, reduction_scope, weighted_sums

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
"""Lower clamp of a mode's total gate weight (and the "dead mode" threshold for running stats)."""

Combine = Literal["mean", "gated"]


def _stats_context(x: Tensor) -> contextlib.AbstractContextManager[None]:
    """Disable autocast (if active) so gates and statistics are computed in float32."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def spatial_moments(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-(sample, channel) spatial mean ``m`` and biased spatial variance ``v`` of ``x``.

    Shape: ``x`` is ``(N, C)`` or ``(N, C, *)``; ``m`` and ``v`` are ``(N, C)`` in the statistics
    dtype (float32 for half input). For ``(N, C)`` input there is one position per channel, so
    ``m = x`` and ``v`` is ``None`` (zero). ``v`` is computed about ``m`` (two passes), so it has no
    cancellation error. Differentiable (plain autograd; the layers use a fused kernel instead).
    """
    xf = x.to(stat_dtype(x))
    if x.dim() == 2:
        return xf, None
    flat = xf.reshape(x.shape[0], x.shape[1], -1)
    m = flat.mean(2, keepdim=True)
    d = flat - m
    return m.squeeze(2), (d * d).mean(2)


# A "small function" maps the per-(sample, channel) moments m, v (N, C) and some parameters to a
# per-(sample, channel) scale and shift (N, C); the layer output is x * scale + shift.
SmallFn = Callable[..., tuple[Tensor, Tensor]]


def _as_channels(t: Tensor) -> Tensor:
    """(N, C, L) -> (1, N·C, L): every (sample, channel) row becomes a batch-norm "channel"."""
    return t.reshape(1, t.shape[0] * t.shape[1], t.shape[2])


def _row_affine(rows: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``rows * scale + shift`` for (N, C, L) ``rows`` and (N, C) ``scale``/``shift``: one fused,
    vectorised pass (eval-mode batch norm with mean 0, variance 1, eps 0 is exactly a per-channel
    affine map)."""
    nc = scale.numel()
    zeros = torch.zeros(nc, dtype=rows.dtype, device=rows.device)
    ones = torch.ones(nc, dtype=rows.dtype, device=rows.device)
    out = F.batch_norm(
        _as_channels(rows), zeros, ones, scale.reshape(nc), shift.reshape(nc), False, 0.0, 0.0
    )
    return out.view(rows.shape)


def _row_dots(g: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_l g·x, Σ_l g)`` per (sample, channel) row of (N, C, L) tensors, each (N, C).

    On CPU and CUDA this is one pass without temporaries: the per-channel reductions of eval-mode
    batch-norm backward (mean 0, variance 1, eps 0). Other devices use two plain reductions."""
    n, c, _ = rows.shape
    if rows.device.type not in ("cpu", "cuda"):
        return (g * rows).sum(2), g.sum(2)
    zeros = torch.zeros(n * c, dtype=rows.dtype, device=rows.device)
    ones = torch.ones(n * c, dtype=rows.dtype, device=rows.device)
    _, dots, sums = torch.ops.aten.native_batch_norm_backward(
        _as_channels(g), _as_channels(rows), None, zeros, ones, None, None, False, 0.0,
        [False, True, True],
    )  # fmt: skip
    return dots.view(n, c), sums.view(n, c)


def _row_moments(flat: Tensor, need_var: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Spatial mean m (N, C) and, if ``need_var``, the biased variance v (N, C) of each row of
    ``flat`` (N, C, L), computed about m (two passes: no cancellation), plus the buffer holding
    x − m (reused for the output)."""
    m = flat.mean(2)
    if not need_var:
        return m, None, None
    buf = torch.sub(flat, m.unsqueeze(2))
    v = torch.linalg.vector_norm(buf, dim=2).square_().div_(flat.shape[2])
    return m, v, buf


def _output(flat: Tensor, m: Tensor, buf: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift``; in place on ``buf = x − m`` as (x − m) * scale + (m * scale + shift)
    when there is one (two vectorised passes, no new allocation), else one fused pass."""
    if buf is None:
        return _row_affine(flat, scale, shift)
    return buf.mul_(scale.unsqueeze(2)).add_(torch.addcmul(shift, m, scale).unsqueeze(2))


class _GatedAffine(torch.autograd.Function):
    """``y = x * scale(m, v, θ) + shift(m, v, θ)`` with ``m, v`` the spatial mean and variance of
    each (sample, channel) row of ``flat`` (N, C, L) and ``scale``/``shift`` computed by a small
    autograd graph ``fn(m, v, *θ)`` on (N, C)-sized tensors.

    Fused so that the big tensor is read few times and only one big tensor is allocated per
    direction, like ``nn.BatchNorm2d``:

    - forward: m = mean x, the buffer x − m and its squared norm, then ``x * scale + shift``
      written into that buffer;
    - backward: Σ g·x and Σ g (one pass) give ∂scale and ∂shift; the small graph is
      differentiated with :func:`torch.autograd.grad` to get ∂m, ∂v and ∂θ; then
      ``∂x = g * scale + a * x + b`` (two passes) with ``a = 2 ∂v / L``, ``b = ∂m / L − a m``
      (from ∂m/∂x = 1/L and ∂v/∂x = 2 (x − m)/L).

    Double backward is not supported (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, flat: Tensor, fn: SmallFn, need_var: bool, *params: Tensor | None) -> Tensor:  # type: ignore[override]
        m, v, buf = _row_moments(flat, need_var)
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            m_ = m.detach().requires_grad_()
            v_ = None if v is None else v.detach().requires_grad_()
            p_ = [
                p.detach().requires_grad_() if (p is not None and need) else p
                for p, need in zip(params, needs)
            ]
            scale, shift = fn(m_, v_, *p_)
        ctx.save_for_backward(flat, m)
        ctx.graph = (m_, v_, p_, scale, shift, needs)
        return _output(flat, m, buf, scale.detach(), shift.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat, m = ctx.saved_tensors
        m_, v_, p_, scale, shift, needs = ctx.graph
        g_scale, g_shift = _row_dots(g, flat)
        inputs = [m_] + ([v_] if v_ is not None else []) + [p for p, n in zip(p_, needs) if n]
        with torch.enable_grad():
            grads = list(
                torch.autograd.grad(
                    (scale, shift), inputs, (g_scale, g_shift), retain_graph=True, allow_unused=True
                )
            )
        g_m = grads.pop(0)
        g_v = grads.pop(0) if v_ is not None else None
        g_params = [(_zeros_if_none(grads.pop(0), p) if n else None) for p, n in zip(p_, needs)]
        if not ctx.needs_input_grad[0]:
            return (None, None, None, *g_params)
        inv_l = 1.0 / flat.shape[2]
        b = torch.zeros_like(m) if g_m is None else g_m * inv_l
        if g_v is None:
            return (_row_affine(g, scale.detach(), b), None, None, *g_params)
        a = g_v * (2.0 * inv_l)
        gx = _row_affine(g, scale.detach(), b - a * m)
        gx.addcmul_(flat, a.unsqueeze(2))
        return (gx, None, None, *g_params)


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _gated_affine(
    x: Tensor, fn: SmallFn, need_var: bool, params: tuple[Tensor | None, ...]
) -> Tensor:
    """Apply ``x * scale + shift`` where ``(scale, shift) = fn(m, v, *params)`` and m, v are the
    spatial moments of x (see :class:`_GatedAffine`). Statistics in float32 for half input, autocast
    off; the output has the dtype and shape of ``x``."""
    with _stats_context(x):
        xf = x.to(stat_dtype(x))
        if x.dim() == 2:  # one position per (sample, channel): m = x, v = 0; plain autograd
            scale, shift = fn(xf, None, *params)
            return torch.addcmul(shift, xf, scale).to(x.dtype)
        flat = xf.reshape(x.shape[0], x.shape[1], -1)
        if torch.is_grad_enabled() and (
            flat.requires_grad or any(p is not None and p.requires_grad for p in params)
        ):
            out = _GatedAffine.apply(flat, fn, need_var, *params)
        else:
            m, v, buf = _row_moments(flat, need_var)
            scale, shift = fn(m, v, *params)
            out = _output(flat, m, buf, scale, shift)
        return out.reshape(x.shape).to(x.dtype)


def mode_gates(means: Tensor, gate_weight: Tensor, gate_bias: Tensor | None = None) -> Tensor:
    """ModeNorm gates :math:`g_{nk} = \\mathrm{softmax}_k(\\Psi(\\varphi(x_n)))` (Deecke et al., Sec. 3.2).

    ``means`` are the per-sample spatial means ``(N, C)`` (see :func:`spatial_moments`);
    ``gate_weight`` is ``(K, C)`` and ``gate_bias`` ``(K,)`` (an ``nn.Linear(C, K)``). Returns
    ``(N, K)`` gates in the dtype of ``means``. Differentiable.
    """
    dt = means.dtype
    b = None if gate_bias is None else gate_bias.to(dt)
    return torch.softmax(F.linear(means, gate_weight.to(dt), b), dim=1)


def batch_center(means: Tensor) -> Tensor:
    """The (global) batch average of the per-sample means, ``(C,)``, detached: the constant that
    :func:`mode_norm_statistics` subtracts before forming sums. Its count and sum go through
    :func:`normlab.nn.stats.reduce_sums`, so every process of a distributed run uses the same one
    (as the sums require)."""
    m = means.detach()
    count = torch.tensor(float(m.shape[0]), dtype=m.dtype, device=m.device)
    count, s1 = reduce_sums(count, m.sum(0))
    return s1 / count


def mode_norm_statistics(
    means: Tensor, variances: Tensor | None, gates: Tensor, center: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gate-weighted batch statistics of ModeNorm (Deecke et al., Alg. 1, Eq. 3).

    Args:
        means: per-sample spatial means ⟨x_n⟩, ``(N, C)``.
        variances: per-sample spatial variances ⟨(x_n − ⟨x_n⟩)²⟩, ``(N, C)``, or ``None`` for
            ``(N, C)`` input (one position per sample).
        gates: ``(N, K)``.
        center: constant ``(C,)`` subtracted before forming sums, for numerical conditioning only
            (the result is mathematically independent of it); default :func:`batch_center`.

    Returns:
        ``(mean, var, weight)``: μ_k ``(K, C)``, σ²_k ``(K, C)`` (biased, ≥ 0) and N_k ``(K,)``,
        where σ²_k = Σ_n g_nk ⟨(x_n − μ_k)²⟩ / N_k
        = Σ_n g_nk (v_n + (m_n − c)²) / N_k − (μ_k − c)². The sums go through
        :func:`normlab.nn.stats.weighted_sums` (the cross-process reduction seam).
        N_k is clamped at :data:`MIN_MODE_WEIGHT` before dividing (see the module docstring).
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


# --------------------------------------------------------------------------------------------
# ModeNorm on (N, C) input in training mode: one fused autograd Function


def _gate_sum(gt: Tensor, v: Tensor, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """``gtᵀ v`` (N, C) for ``gt`` (J, N) and ``v`` (J, C), written into ``out`` when given, or added
    to it in place with ``accumulate=True`` (``out`` contiguous (N, C)).

    On CPU with J ≤ 4 rows this runs as J broadcast multiply-adds: there a matrix product with an
    inner dimension of 2–4 is several times slower than an elementwise pass."""
    j, n = gt.shape
    if gt.device.type != "cpu" or j > 4 or n * v.shape[1] < 16384:
        if accumulate:
            assert out is not None
            return out.addmm_(gt.t(), v)
        return torch.mm(gt.t(), v, out=out)
    cols = gt.unsqueeze(2)  # (J, N, 1)
    first = 0
    if not accumulate:
        out = torch.mul(cols[0], v[:1], out=out)
        first = 1
    assert out is not None
    for i in range(first, j):
        out.addcmul_(cols[i], v[i : i + 1])
    return out


def _mode2d_forward(
    x: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    running: tuple[Tensor, Tensor] | None,
    momentum: float,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Training-mode ModeNorm of (N, C) ``x`` (already in the statistics dtype): the output and the
    intermediates the hand-written backward needs.

    The gates are kept transposed, ``gt = Gᵀ`` (K, N) (a softmax over the leading dimension is
    much faster on CPU than one over a last dimension of size K). With c the batch centre and
    p = x − c: the sums Gᵀp and Gᵀp² (p² in the output's buffer), then
    ``y = p · (G A) − G (B − β)`` with ``A = α s`` and ``B = (μ − c) A`` — the same
    Σ_k g_nk (x − μ_k) α s_k + β as Eq. 2 (with Σ_k g_nk = 1). Two (N, C) allocations: p and
    y."""
    xt = x.t()
    logits = torch.mm(gw, xt) if gb is None else torch.addmm(gb.unsqueeze(1), gw, xt)
    gt = torch.softmax(logits, dim=0)  # (K, N)
    center = batch_center(x)
    p = x - center
    y = torch.mul(p, p)  # p², then the output
    nk, s1, s2 = reduce_sums(gt.sum(1), torch.mm(gt, p), torch.mm(gt, y))  # N_k, Σgp, Σgp²
    nkc = nk.clamp_min(MIN_MODE_WEIGHT).unsqueeze(1)
    mean_c = s1 / nkc  # μ_k − c
    var_raw = torch.addcmul(s2 / nkc, mean_c, mean_c, value=-1)
    var = var_raw.clamp_min(0)
    if running is not None:
        _update_running(running[0], running[1], mean_c + center, var, nk, momentum)
    s = (var + eps).rsqrt_()  # (K, C)
    a = s if w is None else s * w
    bm = mean_c * a
    _gate_sum(gt, a, out=y)  # scale = α Σ_k g_nk s_k
    if b is None:
        y.mul_(p)
    else:
        torch.addcmul(b, p, y, out=y)  # p · scale + β
    _gate_sum(gt, bm.neg(), out=y, accumulate=True)  # − Σ_k g_nk B_k
    return y, (gt, p, nk, s1, s2, mean_c, var_raw, s, a, bm)


class _ModeNormTrain2d(torch.autograd.Function):
    """Training-mode ModeNorm on ``(N, C)`` input with a hand-written backward.

    Plain autograd over this computation keeps about a dozen full-size (N, C) intermediates and
    runs two products per matrix product; here the forward allocates two (N, C) tensors (p = x − c
    and the output) and the backward two (a scratch buffer and ∂x):

    - ``t = gy · p`` gives ∂A = Gᵀt, ∂B = −Gᵀgy and the output's gate gradient ``t Aᵀ − gy Bᵀ``;
    - the (K, C) chain A, B → s, μ − c → σ², μ − c → the sums Σ g p, Σ g p² and N_k in closed form
      (the clamps of σ² at 0 and of N_k at MIN_MODE_WEIGHT pass the gradient where the input is ≥
      the bound, as ``clamp_min`` does);
    - the gradients of the sums are all-reduced like the sums were (under the forward's reduction
      scope, see :mod:`normlab.nn.stats`); α's and β's gradients stay local;
    - then ∂G (with p² recomputed into ``t``), the softmax backward and
      ``∂x = gy · (G A) + 2 p · (G ∂s2) + G ∂s1 + ∂logits Ψ``.

    Double backward (``create_graph=True``) recomputes the forward with plain autograd and
    differentiates that, so it stays supported for ``(N, C)`` input.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        gw: Tensor,
        gb: Tensor | None,
        w: Tensor | None,
        b: Tensor | None,
        eps: float,
        running: tuple[Tensor, Tensor] | None,
        momentum: float,
    ) -> Tensor:
        y, saved = _mode2d_forward(x, gw, gb, w, b, eps, running, momentum)
        ctx.save_for_backward(x, gw, gb, w, b, *saved)
        ctx.eps = eps
        ctx.group = current_group()
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, gw, gb, w, b, gt, p, nk, s1, s2, mean_c, var_raw, s, a, bm = ctx.saved_tensors
        nx, ngw, ngb, nw, nb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd replay
            return _mode2d_double_backward(ctx, gy, x, gw, gb, w, b)
        t = gy * p
        g_a = torch.mm(gt, t)  # ∂A
        g_bn = torch.mm(gt, gy)  # −∂B
        g_gt = torch.mm(a, t.t()).addmm_(bm, gy.t(), alpha=-1)  # ∂Gᵀ (K, N) from the output
        h = torch.addcmul(g_a, g_bn, mean_c, value=-1)  # ∂A + ∂B (μ − c): the part through s
        g_w = (h * s).sum(0) if nw else None
        g_b = g_bn.sum(0) if nb else None  # Σ_n gy (the gates of a sample sum to 1)
        g_s = h if w is None else h * w
        g_var = torch.where(var_raw >= 0, g_s * s.pow(3), 0.0).mul_(-0.5)
        g_mean = torch.addcmul(g_bn * a, mean_c, g_var, value=2.0).neg_()
        inv_nk = nk.clamp_min(MIN_MODE_WEIGHT).reciprocal().unsqueeze(1)
        g_s1, g_s2 = g_mean.mul_(inv_nk), g_var.mul_(inv_nk)
        g_nk = torch.addcmul(g_s1 * s1, g_s2, s2).sum(1).mul_(-inv_nk.squeeze(1))
        g_nk = torch.where(nk >= MIN_MODE_WEIGHT, g_nk, 0.0)
        if ctx.group is not None:
            with reduction_scope(ctx.group):
                g_nk, g_s1, g_s2 = reduce_sums(g_nk, g_s1, g_s2)
        torch.mul(p, p, out=t)  # p²
        g_gt.addmm_(g_s1, p.t()).addmm_(g_s2, t.t()).add_(g_nk.unsqueeze(1))
        g_lt = gt * (g_gt - (gt * g_gt).sum(0))  # softmax backward: ∂logitsᵀ (K, N)
        g_gw = torch.mm(g_lt, x) if ngw else None
        g_gb = g_lt.sum(1) if ngb else None
        g_x = None
        if nx:
            g_x = _gate_sum(gt, a).mul_(gy)  # gy · scale
            g_x.addcmul_(p, _gate_sum(gt, g_s2, out=t), value=2.0)  # + 2 p · (G ∂s2)
            _gate_sum(gt, g_s1, out=g_x, accumulate=True)  # + G ∂s1
            # + ∂logits Ψ, as Σ_{k<K} ∂logits_k (Ψ_k − Ψ_K): the ∂logits of a sample sum to 0
            _gate_sum(g_lt[:-1], gw[:-1] - gw[-1:], out=g_x, accumulate=True)
        return g_x, g_gw, g_gb, g_w, g_b, None, None, None


def _mode2d_double_backward(
    ctx, gy: Tensor, x: Tensor, gw: Tensor, gb: Tensor | None, w: Tensor | None, b: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Backward of :class:`_ModeNormTrain2d` under ``create_graph=True``: replay the forward with
    plain autograd (no running-stat update; same reduction scope) and differentiate it."""
    inputs = (x, gw, gb, w, b)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:5]) if need]
    with reduction_scope(ctx.group):
        gates = mode_gates(x, gw, gb)
        mean, var, _ = mode_norm_statistics(x, None, gates)
        scale, shift = _mode_scale_shift(gates, mean, var, ctx.eps, w, b)
        y = torch.addcmul(shift, x, scale)
    grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
    out = [
        (_zeros_if_none(next(grads), t) if need else None)
        for t, need in zip(inputs, ctx.needs_input_grad[:5])
    ]
    return (*out, None, None, None)


def _mode_scale_shift(
    gates: Tensor, mean: Tensor, var: Tensor, eps: float, w: Tensor | None, b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """ModeNorm's per-(sample, channel) ``scale = α Σ_k g_nk s_k`` and
    ``shift = β − α Σ_k g_nk μ_k s_k`` from gates (N, K) and per-mode μ_k, σ²_k (K, C)."""
    inv = torch.rsqrt(var + eps)  # s_k, (K, C)
    if w is not None:  # fold α into the (K, C) factors: cheaper than scaling (N, C) results
        inv = inv * w.to(inv.dtype)
    scale = gates @ inv  # α Σ_k g_nk s_k, (N, C)
    if b is None:
        shift = -(gates @ (mean * inv))  # −α Σ_k g_nk μ_k s_k, (N, C)
    else:
        shift = torch.addmm(b.to(inv.dtype), gates, mean * inv, alpha=-1)  # β − α Σ_k …
    return scale, shift


def _mode_norm_train_2d(
    x: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    running_mean: Tensor | None,
    running_sqmean: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """Training-mode ModeNorm of ``(N, C)`` input (see :class:`_ModeNormTrain2d`)."""
    with _stats_context(x):
        dt = stat_dtype(x)
        args = (_cast(x, dt), _cast(gw, dt), _cast(gb, dt), _cast(w, dt), _cast(b, dt))
        running = None
        if running_mean is not None and running_sqmean is not None:
            running = (running_mean, running_sqmean)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            y = _ModeNormTrain2d.apply(*args, eps, running, momentum)
        else:
            y = _mode2d_forward(*args, eps, running, momentum)[0]
        return _cast(y, x.dtype)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)`` without the dispatch when it is a no-op (this runs per layer and step)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
    r"""Functional Mode Normalization (Deecke et al., Eq. 2–4, Alg. 1–2).

    Training (``training=True``): gate-weighted batch statistics (Eq. 3); if ``running_mean`` and
    ``running_sqmean`` (both ``(K, C)``) are given they are updated in place with
    ``running = (1 - momentum) * running + momentum * batch`` for ⟨x⟩_k and ⟨x²⟩_k (Eq. 4);
    modes whose batch weight N_k ≤ :data:`MIN_MODE_WEIGHT` keep their running estimates.
    Eval (``training=False``): μ_k = ⟨x⟩_k, σ²_k = max(⟨x²⟩_k − ⟨x⟩_k², 0) from the running
    estimates (Alg. 2); the gates are still computed from the input.

    Output (Eq. 2): ``weight * Σ_k g_nk (x_n − μ_k) / sqrt(σ²_k + eps) + bias``.

    Shape:
        - x: ``(N, C)`` or ``(N, C, *)``; output: same shape and dtype.
        - gate_weight ``(K, C)``, gate_bias ``(K,)``; weight, bias ``(C,)``.
    """
    if not training and (running_mean is None or running_sqmean is None):
        raise ValueError(
            "mode_norm: eval mode (training=False) needs running_mean and running_sqmean"
        )

    def scale_shift(
        means: Tensor,
        variances: Tensor | None,
        gw: Tensor,
        gb: Tensor | None,
        w: Tensor | None,
        b: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        gates = mode_gates(means, gw, gb)  # (N, K)
        if training:
            mean, var, nk = mode_norm_statistics(means, variances, gates)
            if running_mean is not None and running_sqmean is not None:
                _update_running(running_mean, running_sqmean, mean, var, nk, momentum)
        else:
            assert running_mean is not None and running_sqmean is not None
            mean = running_mean.to(means.dtype)
            var = (running_sqmean.to(means.dtype) - mean * mean).clamp_min(0)
        return _mode_scale_shift(gates, mean, var, eps, w, b)

    if training and x.dim() == 2:
        return _mode_norm_train_2d(
            x, gate_weight, gate_bias, running_mean, running_sqmean, weight, bias, momentum, eps
        )
    return _gated_affine(x, scale_shift, training, (gate_weight, gate_bias, weight, bias))


@torch.no_grad()
def _update_running(
    running_mean: Tensor,
    running_sqmean: Tensor,
    mean: Tensor,
    var: Tensor,
    nk: Tensor,
    momentum: float,
) -> None:
    """Eq. 4 with PyTorch's convention, skipping modes with N_k ≤ MIN_MODE_WEIGHT (no host sync)."""
    live = (nk > MIN_MODE_WEIGHT).unsqueeze(1)
    mean = mean.detach()
    bm = _cast(mean, running_mean.dtype)
    bsq = _cast(torch.addcmul(var.detach(), mean, mean), running_sqmean.dtype)
    running_mean.lerp_(torch.where(live, bm, running_mean), momentum)  # lerp(r, r, m) = r exactly
    running_sqmean.lerp_(torch.where(live, bsq, running_sqmean), momentum)


def mode_group_gates(means: Tensor, gate_weight: Tensor, gate_bias: Tensor | None) -> Tensor:
    """MGN channel gates :math:`g_{ck} = \\mathrm{softmax}_k(\\psi(\\langle x_c\\rangle))`.

    ``means`` ``(N, C)`` (per-channel spatial means), ``gate_weight`` ``(K, 1)`` and ``gate_bias``
    ``(K,)`` (ψ as an ``nn.Linear(1, K)``). Returns the gates laid out as ``(N, K, C)`` (the
    softmax runs over dim 1; a softmax over a last dimension of size K is slow on CPU).
    """
    dt = means.dtype
    k = gate_weight.shape[0]
    logits = means.unsqueeze(1) * gate_weight.to(dt).reshape(1, k, 1)
    if gate_bias is not None:
        logits = logits + gate_bias.to(dt).reshape(1, k, 1)
    return torch.softmax(logits, dim=1)


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

    Per sample n and mode k (channels c softly assigned by :func:`mode_group_gates`):
    C_k = Σ_c g_ck, μ_k = Σ_c g_ck ⟨x_c⟩ / C_k, σ²_k = Σ_c g_ck ⟨(x_c − μ_k)²⟩ / C_k. Then

    - ``combine="mean"`` (Eq. 5 as printed): ``weight * (1/K) Σ_k (x − μ_k)/sqrt(σ²_k + eps) + bias``;
    - ``combine="gated"`` (the MN-style reading, cf. Eq. 2):
      ``weight * Σ_k g_ck (x − μ_k)/sqrt(σ²_k + eps) + bias``.

    The same computation in training and eval; valid at batch size 1. The statistics are per
    sample, so they are *not* routed through the cross-process reduction seam.

    Shape:
        - x: ``(N, C)`` or ``(N, C, *)``; output: same shape and dtype.
        - gate_weight ``(K, 1)``, gate_bias ``(K,)``; weight, bias ``(C,)``.
    """
    if combine not in ("mean", "gated"):
        raise ValueError(f"mode_group_norm: combine must be 'mean' or 'gated', got {combine!r}")

    def scale_shift(
        means: Tensor,
        variances: Tensor | None,
        gw: Tensor,
        gb: Tensor | None,
        w: Tensor | None,
        b: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        return _mgn_scale_shift(means, variances, gw, gb, w, b, eps, combine)

    if x.dim() == 2:
        return _mode_group_norm_2d(x, gate_weight, gate_bias, weight, bias, eps, combine)
    return _gated_affine(x, scale_shift, True, (gate_weight, gate_bias, weight, bias))


def _mgn_scale_shift(
    means: Tensor,
    variances: Tensor | None,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    combine: Combine,
) -> tuple[Tensor, Tensor]:
    """MGN's per-(sample, channel) scale and shift from the spatial moments (N, C) (plain
    autograd; the ``(N, C, *)`` path runs it inside :class:`_GatedAffine`)."""
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
    return _affine(scale, shift, w, b)


# --------------------------------------------------------------------------------------------
# ModeGroupNorm on (N, C) input: one fused autograd Function


def _col(v: Tensor) -> Tensor:
    """(N,) -> (N, 1), to broadcast a per-sample quantity over the channels."""
    return v.unsqueeze(1)


def _mgn2d_forward(
    z: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    combine: Combine,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """MGN of (N, C) ``z`` (already in the statistics dtype): the output and what the backward
    needs. The gates are laid out mode-major, ``g`` (K, N, C); for K = 2 they are
    ``σ(±((ψ_1 − ψ_2) z + b_1 − b_2))`` (the two-way softmax without its normalising pass). With
    m = z − c (c the sample's channel average, a constant for conditioning only), the
    per-(mode, sample) sums Σ_c g, Σ_c g m and Σ_c g m² run one mode at a time through one (N, C)
    scratch buffer, which then receives ``u = Σ_k w_k s_k (z − μ_k)`` (w_k = 1/K for ``mean``,
    the gate g_k for ``gated``); ``y = α u + β``."""
    n, c = z.shape
    k = gw.shape[0]
    gwv = gw.reshape(k)
    if k == 2:
        d = torch.mul(z, gwv[0] - gwv[1])
        if gb is not None:
            d.add_(gb[0] - gb[1])
        g = torch.empty(2, n, c, dtype=z.dtype, device=z.device)
        torch.sigmoid(d, out=g[0])
        torch.sigmoid(d.neg_(), out=g[1])
    else:
        logits = z.unsqueeze(0) * gwv.view(k, 1, 1)
        if gb is not None:
            logits.add_(gb.view(k, 1, 1))
        g = torch.softmax(logits, dim=0)
    m = z - z.mean(1, keepdim=True)
    u = torch.empty_like(z)  # scratch, then the normalized output
    s1, s2 = [], []
    for j in range(k):
        torch.mul(g[j], m, out=u)
        s1.append(u.sum(1))
        s2.append(u.mul_(m).sum(1))
    ck = g.sum(2)  # (K, N)
    ckc = ck.clamp_min(MIN_MODE_WEIGHT)
    sum1, sum2 = torch.stack(s1), torch.stack(s2)
    mu = sum1 / ckc  # μ_k − c, (K, N)
    var_raw = torch.addcmul(sum2 / ckc, mu, mu, value=-1)
    s = (var_raw.clamp_min(0) + eps).rsqrt_()  # (K, N)
    sm = s * mu
    if combine == "mean":
        sig, tau = s.mean(0), sm.mean(0)  # u = σ m − τ per sample
        torch.addcmul(_col(tau.neg()), m, _col(sig), out=u)
    else:
        torch.mul(g[0], _col(s[0]), out=u)  # Σ_k g_k s_k
        for j in range(1, k):
            u.addcmul_(g[j], _col(s[j]))
        u.mul_(m)
        for j in range(k):
            u.addcmul_(g[j], _col(sm[j]), value=-1)
    if w is not None:
        y = u * w if b is None else torch.addcmul(b, u, w)
    elif b is not None:
        y = u + b
    else:
        y = u
    return y, (g, m, u, sum1, sum2, ck, mu, var_raw, s)


class _MGNorm2d(torch.autograd.Function):
    """MGN on ``(N, C)`` input with a hand-written backward (autograd over the (N, K, C) gates
    would keep and re-read several (N, K, C) intermediates and run a broadcast product and a
    reduction per elementwise step).

    Backward, per sample and mode (α = ``w``, u the normalized output before the affine, ∂u = α ∂y):
    ∂s_k, ∂μ_k from the output (``mean``: ∂σ = Σ_c ∂u m, ∂τ = −Σ_c ∂u; ``gated``: Σ_c g_k ∂u m and
    Σ_c g_k ∂u), then σ²_k → (Σ g m, Σ g m², C_k) in closed form (clamps pass the gradient where
    the input is ≥ the bound, as ``clamp_min`` does), ∂g_k = ∂C_k + ∂s1_k m + ∂s2_k m² (+ the
    ``gated`` output term), the softmax backward (for K = 2: ∂d = g_1 g_2 (∂g_1 − ∂g_2)), and
    ``∂z = ∂u · scale + Σ_k g_k (∂s1_k + 2 ∂s2_k m) + Σ_k ∂logits_k ψ_k``.

    Double backward (``create_graph=True``) differentiates a plain-autograd replay.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        gw: Tensor,
        gb: Tensor | None,
        w: Tensor | None,
        b: Tensor | None,
        eps: float,
        combine: Combine,
    ) -> Tensor:
        y, saved = _mgn2d_forward(z, gw, gb, w, b, eps, combine)
        g, m, u, *small = saved
        ctx.save_for_backward(z, gw, gb, w, b, g, m, u if w is not None else None, *small)
        ctx.eps, ctx.combine = eps, combine
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, gw, gb, w, b, g, m, u, sum1, sum2, ck, mu, var_raw, s = ctx.saved_tensors
        nz, ngw, ngb, nw, nb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd replay
            inputs = (z, gw, gb, w, b)
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:5]) if need]
            scale, shift = _mgn_scale_shift(z, None, gw, gb, w, b, ctx.eps, ctx.combine)
            grads = iter(
                torch.autograd.grad(
                    torch.addcmul(shift, z, scale), wanted, gy, create_graph=True,
                    allow_unused=True,
                )
            )  # fmt: skip
            out = [
                (_zeros_if_none(next(grads), t) if need else None)
                for t, need in zip(inputs, ctx.needs_input_grad[:5])
            ]
            return (*out, None, None)
        k = g.shape[0]
        g_w = (gy * u).sum(0) if nw else None
        g_b = gy.sum(0) if nb else None
        gu = gy if w is None else gy * w
        t = gu * m
        sm = s * mu
        if ctx.combine == "mean":
            g_sig, g_tau = t.sum(1), gu.sum(1).neg_()  # (N,)
            g_s = torch.addcmul(g_sig, g_tau, mu).div_(k)  # (K, N)
            g_mu = g_tau * s / k
        else:
            gdot_t = torch.stack([torch.linalg.vecdot(g[j], t) for j in range(k)])  # Σ_c g ∂u m
            gdot_u = torch.stack([torch.linalg.vecdot(g[j], gu) for j in range(k)])  # Σ_c g ∂u
            g_s = torch.addcmul(gdot_t, mu, gdot_u, value=-1)
            g_mu = -(s * gdot_u)
        g_var = torch.where(var_raw >= 0, g_s * s.pow(3), 0.0).mul_(-0.5)
        inv_ck = ck.clamp_min(MIN_MODE_WEIGHT).reciprocal()
        g_s1 = torch.addcmul(g_mu, mu, g_var, value=-2.0).mul_(inv_ck)  # ∂(Σ g m)
        g_s2 = g_var.mul_(inv_ck)  # ∂(Σ g m²)
        g_ck = torch.addcmul(g_s1 * sum1, g_s2, sum2).mul_(inv_ck).neg_()
        g_ck = torch.where(ck >= MIN_MODE_WEIGHT, g_ck, 0.0)
        gated = ctx.combine == "gated"

        def gate_grad(j_coef: Callable[[Tensor], Tensor], out: Tensor | None = None) -> Tensor:
            """∂g for mode coefficients ``j_coef(v)`` (v → v[j] or a difference of modes):
            ∂C + ∂s1 m + ∂s2 m² (+ gated: s t − s μ ∂u), Horner-evaluated."""
            e = torch.addcmul(_col(j_coef(g_s1)), _col(j_coef(g_s2)), m, out=out)
            e.mul_(m).add_(_col(j_coef(g_ck)))
            if gated:
                e.addcmul_(t, _col(j_coef(s))).addcmul_(gu, _col(j_coef(sm)), value=-1)
            return e

        if k == 2:  # softmax of two: ∂d = g_1 g_2 (∂g_1 − ∂g_2), ∂logits = (∂d, −∂d)
            g_d = gate_grad(lambda v: v[0] - v[1]).mul_(g[0]).mul_(g[1])
            g_l = None
        else:
            g_l = torch.empty_like(g)
            for j in range(k):
                gate_grad(lambda v, j=j: v[j], out=g_l[j])
            g_l.mul_(g)
            g_l.sub_(g * g_l.sum(0))  # softmax backward (mode-major)
        g_gw = g_gb = None
        if ngw or ngb:
            if g_l is None:
                gd_w = torch.linalg.vecdot(g_d.reshape(-1), z.reshape(-1)).reshape(1)
                gd_b = g_d.sum().reshape(1)
                g_gw = torch.cat([gd_w, -gd_w]).reshape(2, 1) if ngw else None
                g_gb = torch.cat([gd_b, -gd_b]) if ngb else None
            else:
                flat = g_l.reshape(k, -1)
                g_gw = torch.mv(flat, z.reshape(-1)).reshape(k, 1) if ngw else None
                g_gb = flat.sum(1) if ngb else None
        g_z = None
        if nz:
            if gated:  # ∂u · Σ_k g_k s_k
                g_z = torch.mul(g[0], _col(s[0]))
                for j in range(1, k):
                    g_z.addcmul_(g[j], _col(s[j]))
                g_z.mul_(gu)
            else:
                g_z = gu * _col(s.mean(0))
            for j in range(k):  # Σ_k g_k (∂s1_k + 2 ∂s2_k m), through t as scratch
                g_z.addcmul_(g[j], torch.addcmul(_col(g_s1[j]), _col(g_s2[j]), m, value=2.0, out=t))
            gwv = gw.reshape(k)
            if g_l is None:
                g_z.addcmul_(g_d, gwv[0] - gwv[1])
            else:
                for j in range(k):
                    g_z.addcmul_(g_l[j], gwv[j])
        return g_z, g_gw, g_gb, g_w, g_b, None, None


def _mode_group_norm_2d(
    x: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    combine: Combine,
) -> Tensor:
    """MGN of ``(N, C)`` input (see :class:`_MGNorm2d`); statistics in float32 for half input."""
    with _stats_context(x):
        dt = stat_dtype(x)
        args = (_cast(x, dt), _cast(gw, dt), _cast(gb, dt), _cast(w, dt), _cast(b, dt))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            y = _MGNorm2d.apply(*args, eps, combine)
        else:
            y = _mgn2d_forward(*args, eps, combine)[0]
        return _cast(y, x.dtype)


def _init_gate(gate: nn.Linear, k: int) -> None:
    """Gate init of Deecke et al.'s reference code: weights 1/K + 0.01·N(0, 1) (near-uniform gates)."""
    with torch.no_grad():
        gate.weight.normal_(0.0, 1.0).mul_(0.01).add_(1.0 / k)


@register_norm("mode", "mode normalization: K gated modes with per-mode batch statistics")
class ModeNorm(nn.Module):
    r"""Mode Normalization (Deecke et al., Sec. 3.2, Alg. 1–2, Eq. 2–4).

    ``y_n = α Σ_k g_nk (x_n − μ_k)/sqrt(σ²_k + ε) + β`` with per-sample gates
    ``g_n = softmax(gate(⟨x_n⟩))`` and gate-weighted batch statistics (see the module docstring
    and :func:`mode_norm`). ``k=1`` is batch normalization in training mode.

    Args:
        num_features: C.
        k: number of modes K (≥ 1).
        momentum: running-estimate rate, ``running = (1 - momentum) * running + momentum * batch``
            (the paper's λ = 0.1 is ``momentum=0.1``).
        eps: added to σ²_k.
        affine: learn per-channel α (init 1) and β (init 0). The paper shares one affine across
            modes (Deecke et al., footnote 3).

    Attributes:
        gate: ``nn.Linear(C, K)`` — Ψ; weights initialised to 1/K + 0.01·N(0, 1), bias as
            ``nn.Linear``'s default.
        running_mean: buffer ``(K, C)``, running ⟨x⟩_k (init 0).
        running_sqmean: buffer ``(K, C)``, running ⟨x²⟩_k (init 1). No Bessel correction: the
            paper's Alg. 2 uses σ² = ⟨x²⟩ − ⟨x⟩² directly.

    Notes:
        Gradients reach the gate (Ψ), α, β and the input; double backward (``create_graph=True``)
        is not supported for ``(N, C, *)`` input (the fused backward is once-differentiable).
        One sample at a time works in eval mode; in training a batch of one sample normalizes
        that sample by its own statistics (finite, but as degenerate as batch norm's).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``.
        - Output: same shape as the input.
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

    Within each sample, channel c goes to mode k with gate ``g_ck = softmax_k(gate(⟨x_c⟩))``
    (``gate`` = ψ: ℝ → ℝ^K, shared by all channels); per sample and mode, μ_k and σ²_k are
    gate-weighted averages over the channels (see :func:`mode_group_norm`).

    Args:
        num_features: C.
        k: number of modes K (≥ 1).
        eps: added to σ²_k.
        affine: learn per-channel α (init 1) and β (init 0).
        combine: ``"mean"`` (default) — ``α (1/K) Σ_k (x − μ_k)/sqrt(σ²_k + ε) + β``, Eq. 5 *as
            printed* (Alg. 3's return line agrees: "(α/K) Σ_k y_k + β"), so the default reproduces
            the paper's layer; ``"gated"`` — ``α Σ_k g_ck (x − μ_k)/sqrt(σ²_k + ε) + β``, the
            reading analogous to ModeNorm's Eq. 2, in which each channel is normalized mainly by
            the statistics of its own mode. With ``"mean"`` the gates act only through μ_k, σ_k
            (every channel of a sample gets the same scale and shift before the affine).

    Attributes:
        gate: ``nn.Linear(1, K)`` — ψ; weights initialised to 1/K + 0.01·N(0, 1) as in ModeNorm,
            bias 0 (``nn.Linear``'s default bias for fan-in 1 would be U(−1, 1), which would
            skew the initial gates for no reason).

    There are no running statistics: training and eval compute the same thing, at any batch size.
    Double backward is not supported for ``(N, C, *)`` input (as for :class:`ModeNorm`).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``.
        - Output: same shape as the input.
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
