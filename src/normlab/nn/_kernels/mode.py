r"""Kernels for Mode Normalization and Mode Group Normalization (Deecke et al., Alg. 1–3, Eq. 2–5).

The plain references live in :mod:`normlab.nn.mode`; the functions here compute the same values
and gradients with hand-written autograd Functions whose backward passes are written out (no
:func:`torch.autograd.grad`, nothing that ``torch.compile`` cannot trace). Both layers write
their output as one scale and shift per (sample, channel) about a centre c,

.. math::  y = (x - c) \odot \mathrm{scale} + \mathrm{shift},\qquad
           \mathrm{scale} = α \textstyle\sum_k w_k s_k,\quad
           \mathrm{shift} = β - α \sum_k w_k (μ_k - c) s_k,\quad s_k = (σ_k^2 + ε)^{-1/2},

(w_k the gate g_k, or 1/K for MGN's ``combine="mean"``), so the K modes only touch (N, C)-,
(K, C)- or (K, N, C)-sized tensors. Each layer has a *small function*: a forward from the
per-(sample, channel) moments m, v (N, C) to scale and shift, and its closed-form vector-Jacobian
product from ∂scale = Σ g (x − c) and ∂shift = Σ g (sums over the positions) to ∂m, ∂v and the
parameter gradients. Three Functions carry them:

* :class:`_GatedAffine` — ``(N, C, *)`` input, both layers, training and eval. The big tensor is
  read a few times and one big tensor is allocated per direction, like ``nn.BatchNorm2d``.
  Once differentiable.
* :class:`_ModeNormTrain2d`, :class:`_MGNorm2d` — ``(N, C)`` input (m = x, v = 0). Twice
  differentiable: under ``create_graph=True`` the backward recomputes the small forward from the
  saved inputs with differentiable ops, so autograd differentiates the written-out backward.

ModeNorm's training Functions also return the batch statistics (μ_k, σ²_k, N_k), marked
non-differentiable, so that the layer updates its running estimates (Eq. 4) outside any Function.
Sums over the batch go through :func:`normlab.nn.stats.reduce_sums` (the cross-process seam);
the backward re-enters the forward's reduction scope for the gradients of the sums and keeps α's
and β's gradients local. Every shape takes the same sequence of reductions, an empty batch
included. Why each kernel is shaped as it is: ``docs/methods/mode.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.nn.stats import current_group, reduce_sums, reduction_scope

__all__ = ["batch_center", "mode_group_norm", "mode_norm_eval", "mode_norm_train"]


def batch_center(means: Tensor) -> Tensor:
    """The (global) batch average of the per-sample means, detached: the constant ModeNorm
    subtracts before forming sums (numerical conditioning only). Its count and sum go through
    :func:`normlab.nn.stats.reduce_sums`; an empty (global) batch gives 0.

    Shape:
        - means ``(N, C)``; output ``(C,)``.

    Example::

        >>> batch_center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 4.])
    """
    m = means.detach()
    count = torch.full((), m.shape[0], dtype=m.dtype, device=m.device)
    count, s1 = reduce_sums(count, m.sum(0))
    return s1 / count.clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Passes over the big (N, C, L) tensor


def _fused_rows_ok(rows: Tensor) -> bool:
    """Whether batch norm's per-channel kernels can stand in for the row passes (not for empty
    tensors, which they reject, nor on devices other than CPU and CUDA)."""
    return rows.device.type in ("cpu", "cuda") and rows.numel() > 0


def _as_channels(t: Tensor) -> Tensor:
    """(N, C, L) -> (1, N·C, L): every (sample, channel) row becomes a batch-norm "channel"."""
    return t.reshape(1, t.shape[0] * t.shape[1], t.shape[2])


def _row_affine(rows: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``rows * scale + shift`` for (N, C, L) ``rows`` and (N, C) ``scale``/``shift``: one fused
    pass (eval-mode batch norm with mean 0, variance 1, eps 0 is a per-channel affine map)."""
    if not _fused_rows_ok(rows):
        return torch.addcmul(shift.unsqueeze(2), rows, scale.unsqueeze(2))
    nc = scale.numel()
    zeros = torch.zeros(nc, dtype=rows.dtype, device=rows.device)
    ones = torch.ones(nc, dtype=rows.dtype, device=rows.device)
    out = F.batch_norm(
        _as_channels(rows), zeros, ones, scale.reshape(nc), shift.reshape(nc), False, 0.0, 0.0
    )
    return out.view(rows.shape)


def _row_dots(g: Tensor, rows: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_l g (x − m), Σ_l g)`` per (sample, channel) row of (N, C, L) tensors, each (N, C),
    with m (N, C) the rows' means: one pass without temporaries (the per-channel reductions of
    eval-mode batch-norm backward with the running mean m, variance 1, eps 0)."""
    if not _fused_rows_ok(rows):
        return (g * (rows - m.unsqueeze(2))).sum(2), g.sum(2)
    n, c, _ = rows.shape
    ones = torch.ones(n * c, dtype=rows.dtype, device=rows.device)
    _, dots, sums = torch.ops.aten.native_batch_norm_backward(
        _as_channels(g), _as_channels(rows), None, m.reshape(n * c), ones, None, None, False, 0.0,
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


def _output(
    flat: Tensor, m: Tensor, buf: Tensor | None, scale: Tensor, shift: Tensor, mc: Tensor
) -> Tensor:
    """``(x − c) * scale + shift`` with ``mc = m − c``: in place on ``buf = x − m`` as
    (x − m) * scale + (mc * scale + shift) when there is one, else one fused pass
    x * scale + (shift − c * scale)."""
    if buf is None:
        return _row_affine(flat, scale, torch.addcmul(shift, mc - m, scale))
    return buf.mul_(scale.unsqueeze(2)).add_(torch.addcmul(shift, mc, scale).unsqueeze(2))


# --------------------------------------------------------------------------------------------
# The small functions. A forward ``fwd(m, v, tensors, consts) -> (scale, shift, m − c, stats,
# saved)`` (y = (x − c) * scale + shift; ``v`` is None for (N, C) input; ``shift`` is a fresh
# tensor the caller may write the output into); a backward ``bwd(saved, t, gs, needs, group,
# consts) -> (∂m, ∂v, *∂tensors)`` from t = Σ g (x − c) and gs = Σ g, computing only the
# gradients ``needs`` asks for (``None`` for the others; ∂m is fresh). Both use in-place updates
# of tensors they just created only, so autograd can differentiate them (double backward).

_Opts = tuple[Tensor | None, ...]
_Needs = tuple[bool, ...]
_Fwd = tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...], _Opts]


# ModeNorm (Alg. 1–2, Eq. 2–3), gates transposed: gt = Gᵀ (K, N)


def _gate_sum(gt: Tensor, v: Tensor, init: Tensor | None = None, inplace: bool = False) -> Tensor:
    """``init + gtᵀ v`` (N, C) for ``gt`` (J, N) and ``v`` (J, C): a new tensor (``init`` may
    broadcast), or with ``inplace=True`` added to ``init`` (a fresh (N, C) tensor) in place.

    On CPU with J ≤ 4 rows this runs as J broadcast multiply-adds: there a matrix product with an
    inner dimension of 2–4 is several times slower than an elementwise pass. Eager mode keeps the
    product for small tensors; traced code (``torch.compile``, ``torch.export``) never branches
    on the size, which may be symbolic."""
    j, n = gt.shape
    small = not torch.compiler.is_compiling() and n * v.shape[1] < 16384
    if gt.device.type != "cpu" or j > 4 or small:
        if init is None:
            return torch.mm(gt.t(), v)
        return init.addmm_(gt.t(), v) if inplace else torch.addmm(init, gt.t(), v)
    cols = gt.unsqueeze(2)  # (J, N, 1)
    out, first = init, 0
    if not inplace:
        first = 1
        out = torch.mul(cols[0], v[:1]) if init is None else torch.addcmul(init, cols[0], v[:1])
    for i in range(first, j):
        out.addcmul_(cols[i], v[i : i + 1])
    return out


def _mode_gates_t(m: Tensor, gw: Tensor, gb: Tensor | None) -> Tensor:
    """Gates Gᵀ = softmax over the modes of Ψ mᵀ + b, (K, N) (a softmax over a leading dimension
    is much faster on CPU than one over a last dimension of size K)."""
    mt = m.t()
    logits = torch.mm(gw, mt) if gb is None else torch.addmm(gb.unsqueeze(1), gw, mt)
    return torch.softmax(logits, dim=0)


def _mode_scale_shift(
    gt: Tensor, mc: Tensor, s: Tensor, w: Tensor | None, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 2 about c: scale = G A, shift = β − G B with A = α s and B = (μ − c) A (K, C);
    returns ``(scale, shift, A, B)``."""
    a = s if w is None else s * w
    bm = mc * a
    scale = _gate_sum(gt, a)
    shift = _gate_sum(gt, bm.neg(), b)
    return scale, shift, a, bm


def _mode_train_fwd(m: Tensor, v: Tensor | None, tensors: _Opts, consts: tuple) -> _Fwd:
    """Training-mode ModeNorm: gates, the batch sums N_k, Σ g p, Σ g (p² + v) with p = m − c
    (c the batch centre), μ_k, σ²_k (Eq. 3), then Eq. 2's scale and shift. ``tensors`` are
    (Ψ, b, α, β), ``consts`` (ε, the clamp of N_k). Returns ``(scale, shift, p, (μ, σ², N_k),
    saved)``."""
    (gw, gb, w, b), (eps, min_weight) = tensors, consts
    c = batch_center(m)
    gt = _mode_gates_t(m, gw, gb)
    p = m - c
    q = p * p if v is None else torch.addcmul(v, p, p)
    nk, s1, s2 = reduce_sums(gt.sum(1), torch.mm(gt, p), torch.mm(gt, q))
    nkc = nk.clamp_min(min_weight).unsqueeze(1)
    mc = s1 / nkc  # μ_k − c
    var_raw = torch.addcmul(s2 / nkc, mc, mc, value=-1)
    var = var_raw.clamp_min(0)
    s = (var + eps).rsqrt()
    scale, shift, a, bm = _mode_scale_shift(gt, mc, s, w, b)
    saved = (gt, m, p, q, nk, s1, s2, mc, var_raw, s, a, bm, gw, w)
    return scale, shift, p, (mc + c, var, nk), saved


def _mode_eval_fwd(m: Tensor, v: Tensor | None, tensors: _Opts, consts: tuple) -> _Fwd:
    """Eval-mode ModeNorm (Alg. 2): gates from the input, μ_k and σ²_k given (c = 0);
    ``tensors`` are (Ψ, b, α, β, μ, σ²), ``consts`` (ε,)."""
    (gw, gb, w, b, mean, var), (eps,) = tensors, consts
    gt = _mode_gates_t(m, gw, gb)
    s = (var + eps).rsqrt()
    scale, shift, a, bm = _mode_scale_shift(gt, mean, s, w, b)
    return scale, shift, m, (), (gt, m, s, a, bm, mean, gw)


def _mode_gate_tail(
    gt: Tensor, m: Tensor, g_gt: Tensor, gw: Tensor, g_m: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """From ∂Gᵀ: the softmax backward, ∂Ψ, ∂b and ∂m (added to ``g_m`` in place if given), as
    Σ_{k<K} ∂logits_k (Ψ_k − Ψ_K) (the ∂logits of a sample sum to 0)."""
    g_lt = gt * (g_gt - (gt * g_gt).sum(0))  # ∂logitsᵀ (K, N)
    g_gw = torch.mm(g_lt, m) if needs[0] else None
    g_gb = g_lt.sum(1) if needs[1] else None
    if g_lt.shape[0] > 1:
        g_m = _gate_sum(g_lt[:-1], gw[:-1] - gw[-1:], g_m, inplace=g_m is not None)
    elif g_m is None:
        g_m = torch.zeros_like(m)
    return g_m, g_gw, g_gb


def _mode_output_bwd(
    gt: Tensor, a: Tensor, bm: Tensor, mc: Tensor, t: Tensor, gs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Through scale = G A and shift = β − G B: ``(∂Gᵀ, ∂A + ∂B (μ − c), −∂B)``."""
    g_a = torch.mm(gt, t)  # ∂A
    g_bn = torch.mm(gt, gs)  # −∂B
    g_gt = torch.addmm(torch.mm(a, t.t()), bm, gs.t(), alpha=-1)  # ∂Gᵀ (K, N)
    return g_gt, torch.addcmul(g_a, g_bn, mc, value=-1), g_bn


def _mode_train_bwd(
    saved: _Opts, t: Tensor, gs: Tensor, needs: _Needs, group: object | None, consts: tuple
) -> _Opts:
    """Vector-Jacobian product of :func:`_mode_train_fwd`: ``(∂m, ∂v, ∂Ψ, ∂b, ∂α, ∂β)``.

    ∂A = G t, −∂B = G gs; the (K, C) chain A, B → s, μ − c → σ², μ − c → the sums Σ g p,
    Σ g q and N_k in closed form (the clamps of σ² at 0 and of N_k at ``min_weight`` pass the
    gradient where the input is ≥ the bound, as ``clamp_min`` does); the gradients of the sums
    are all-reduced like the sums were; then ∂G, the softmax backward and
    ``∂m = 2 p · (G ∂s2) + G ∂s1 + ∂logits Ψ``, ``∂v = G ∂s2``."""
    gt, m, p, q, nk, s1, s2, mc, var_raw, s, a, bm, gw, w = saved
    min_weight = consts[1]
    g_gt, h, g_bn = _mode_output_bwd(gt, a, bm, mc, t, gs)
    g_w = (h * s).sum(0) if needs[2] else None
    g_b = g_bn.sum(0) if needs[3] else None  # Σ_n gs (the gates of a sample sum to 1)
    g_s = h if w is None else h * w
    g_var = torch.where(var_raw >= 0, g_s * s.pow(3), 0.0) * -0.5
    inv_nk = nk.clamp_min(min_weight).reciprocal().unsqueeze(1)
    g_s1 = torch.addcmul(g_bn * a, mc, g_var, value=2.0).neg() * inv_nk
    g_s2 = g_var * inv_nk
    g_nk = torch.addcmul(g_s1 * s1, g_s2, s2).sum(1) * inv_nk.squeeze(1).neg()
    g_nk = torch.where(nk >= min_weight, g_nk, 0.0)
    if group is not None:
        with reduction_scope(group):
            g_nk, g_s1, g_s2 = reduce_sums(g_nk, g_s1, g_s2)
    g_gt = torch.addmm(torch.addmm(g_gt, g_s1, p.t()), g_s2, q.t()) + g_nk.unsqueeze(1)
    g_v = _gate_sum(gt, g_s2)  # ∂v = G ∂s2
    g_m = _gate_sum(gt, g_s1).addcmul_(p, g_v, value=2.0)  # ∂p = G ∂s1 + 2 p · (G ∂s2)
    g_m, g_gw, g_gb = _mode_gate_tail(gt, m, g_gt, gw, g_m, needs)
    return g_m, g_v, g_gw, g_gb, g_w, g_b


def _mode_eval_bwd(
    saved: _Opts, t: Tensor, gs: Tensor, needs: _Needs, group: object | None, consts: tuple
) -> _Opts:
    """Vector-Jacobian product of :func:`_mode_eval_fwd`: ``(∂m, None, ∂Ψ, ∂b, ∂α, ∂β, None,
    None)`` (the running estimates get no gradient)."""
    gt, m, s, a, bm, mean, gw = saved
    g_gt, h, g_bn = _mode_output_bwd(gt, a, bm, mean, t, gs)
    g_w = (h * s).sum(0) if needs[2] else None
    g_b = g_bn.sum(0) if needs[3] else None
    g_m, g_gw, g_gb = _mode_gate_tail(gt, m, g_gt, gw, None, needs)
    return g_m, None, g_gw, g_gb, g_w, g_b, None, None


# --------------------------------------------------------------------------------------------
# ModeGroupNorm's small function (Sec. 3.3, Alg. 3, Eq. 5), gates mode-major: g (K, N, C)


def _col(v: Tensor) -> Tensor:
    """(…, N) -> (…, N, 1), to broadcast a per-sample quantity over the channels."""
    return v.unsqueeze(-1)


def _mgn_gates(m: Tensor, gw: Tensor, gb: Tensor | None) -> Tensor:
    """Channel gates g_ck = softmax_k(ψ_k m_c + b_k), mode-major (K, N, C); for K = 2 the two-way
    softmax σ((ψ_k − ψ_j) m + b_k − b_j) (j the other mode) without its normalising pass."""
    k = gw.shape[0]
    gwv, gbv = gw.reshape(k), gb
    if k == 2:
        gwv = gwv - gwv.flip(0)
        gbv = None if gb is None else gb - gb.flip(0)
    if gbv is None:
        logits = m.unsqueeze(0) * gwv.view(k, 1, 1)
    else:
        logits = torch.addcmul(gbv.view(k, 1, 1), m.unsqueeze(0), gwv.view(k, 1, 1))
    return logits.sigmoid_() if k == 2 else torch.softmax(logits, dim=0)


def _mode_sum(coef: Tensor, g: Tensor, init: Tensor | None = None) -> Tensor:
    """``init + Σ_k coef_k g_k`` (N, C) for per-(mode, sample) ``coef`` (K, N) and gates ``g``
    (K, N, C), one multiply-add per mode (``init``, a fresh tensor, is updated in place)."""
    out, first = init, 0
    if out is None:
        out, first = g[0] * _col(coef[0]), 1
    for j in range(first, g.shape[0]):
        out.addcmul_(g[j], _col(coef[j]))
    return out


def _mgn_fwd(m: Tensor, v: Tensor | None, tensors: _Opts, consts: tuple) -> _Fwd:
    """MGN: channel gates, per-(mode, sample) sums C_k, Σ_c g d, Σ_c g (d² + v) with d = m − c
    (c the sample's channel average, a constant for conditioning only), μ_k, σ²_k, then Eq. 5's
    scale and shift: ``u = (x − c) σ_u + τ_u`` with σ_u = Σ_k w_k s_k, τ_u = −Σ_k w_k s_k (μ_k − c),
    and ``y = α u + β``. ``tensors`` are (ψ, b, α, β), ``consts`` (ε, the clamp of C_k,
    ``combine``). Returns ``(scale, shift, d, (), saved)``."""
    (gw, gb, w, b), (eps, min_weight, combine) = tensors, consts
    g = _mgn_gates(m, gw, gb)
    d = m - m.detach().mean(1, keepdim=True)
    q = d * d if v is None else torch.addcmul(v, d, d)
    gd = g * d
    sum1 = gd.sum(2)  # Σ_c g d, (K, N)
    sum2 = (gd.mul_(d) if v is None else g * q).sum(2)  # Σ_c g q
    ck = g.sum(2)  # C_k
    ckc = ck.clamp_min(min_weight)
    mu = sum1 / ckc  # μ_k − c
    var_raw = torch.addcmul(sum2 / ckc, mu, mu, value=-1)
    s = (var_raw.clamp_min(0) + eps).rsqrt()  # (K, N)
    sm = s * mu
    if combine == "mean":  # one scale and shift per sample, (N, 1)
        sig_u, tau_u = _col(s.mean(0)), _col(sm.mean(0).neg())
    else:  # Σ_k g_k s_k and −Σ_k g_k s_k (μ_k − c), (N, C)
        sig_u, tau_u = _mode_sum(s, g), _mode_sum(sm, g).neg_()
    scale = sig_u.expand_as(m) if w is None else sig_u * w
    if w is None:  # shift must be a fresh tensor: the output is written into it
        shift = tau_u.expand_as(m).clone() if b is None else tau_u + b
    else:
        shift = tau_u * w if b is None else torch.addcmul(b, tau_u, w)
    saved = (g, m, d, q, ck, sum1, sum2, mu, var_raw, s, sig_u, tau_u, gw, w)
    return scale, shift, d, (), saved


def _mgn_bwd(
    saved: _Opts, t: Tensor, gs: Tensor, needs: _Needs, group: object | None, consts: tuple
) -> _Opts:
    """Vector-Jacobian product of :func:`_mgn_fwd`: ``(∂m, ∂v, ∂ψ, ∂b, ∂α, ∂β)``.

    With ∂σ_u = α t and ∂τ_u = α gs: ∂s_k, ∂μ_k (``mean``: from Σ_c; ``gated``: Σ_c g_k ∂σ_u and
    Σ_c g_k ∂τ_u, and the output's own gate term s_k ∂σ_u − s_k μ_k ∂τ_u), then σ²_k → (Σ g d,
    Σ g q, C_k) in closed form, ∂g_k = ∂C_k + ∂s1_k d + ∂s2_k q, the softmax backward (for K = 2:
    ∂logit-difference = g_1 g_2 (∂g_1 − ∂g_2)) and ``∂m = Σ_k g_k (∂s1_k + 2 ∂s2_k d) +
    Σ_k ∂logits_k ψ_k``, ``∂v = Σ_k g_k ∂s2_k``."""
    g, m, d, q, ck, sum1, sum2, mu, var_raw, s, sig_u, tau_u, gw, w = saved
    _, min_weight, combine = consts
    k = g.shape[0]
    g_w = torch.addcmul(t * sig_u, gs, tau_u).sum(0) if needs[2] else None
    g_b = gs.sum(0) if needs[3] else None
    tu = t if w is None else t * w  # ∂σ_u
    gu = gs if w is None else gs * w  # ∂τ_u
    gated = combine != "mean"
    if gated:
        gdot_t = torch.stack([torch.linalg.vecdot(g[j], tu) for j in range(k)])  # Σ_c g ∂σ_u
        gdot_u = torch.stack([torch.linalg.vecdot(g[j], gu) for j in range(k)])  # Σ_c g ∂τ_u
        g_s = torch.addcmul(gdot_t, mu, gdot_u, value=-1)
        g_mu = -(s * gdot_u)
    else:
        g_sig, g_tau = tu.sum(1), gu.sum(1)  # (N,)
        g_s = torch.addcmul(g_sig, g_tau, mu, value=-1) / k  # (K, N)
        g_mu = g_tau * s / -k
    g_var = torch.where(var_raw >= 0, g_s * s.pow(3), 0.0) * -0.5
    inv_ck = ck.clamp_min(min_weight).reciprocal()
    g_s1 = torch.addcmul(g_mu, mu, g_var, value=-2.0) * inv_ck  # ∂(Σ g d)
    g_s2 = g_var * inv_ck  # ∂(Σ g q)
    g_ck = torch.addcmul(g_s1 * sum1, g_s2, sum2) * inv_ck.neg()
    g_ck = torch.where(ck >= min_weight, g_ck, 0.0)

    def gate_grad(coef: Callable[[Tensor], Tensor]) -> Tensor:
        """∂g for the per-mode coefficients ``coef(v)`` (a mode's row, or a difference of
        modes): ∂C + ∂s1 d + ∂s2 q (+ gated: s ∂σ_u − s μ ∂τ_u)."""
        e = torch.addcmul(_col(coef(g_ck)), _col(coef(g_s1)), d).addcmul_(_col(coef(g_s2)), q)
        if gated:
            e.addcmul_(_col(coef(s)), tu).addcmul_(_col(coef(s * mu)), gu, value=-1)
        return e

    gwv = gw.reshape(k)
    g_v = _mode_sum(g_s2, g)  # ∂v = Σ_k g_k ∂s2_k
    g_m = _mode_sum(g_s1, g, torch.mul(d, g_v).mul_(2.0))  # Σ_k g_k (∂s1_k + 2 ∂s2_k d)
    if k == 2:  # ∂logits = (∂δ, −∂δ) for the logit difference δ = (ψ_1 − ψ_2) m + b_1 − b_2
        g_d = gate_grad(lambda c: c[0] - c[1]).mul_(g[0]).mul_(g[1])
        g_m.addcmul_(g_d, gwv[0] - gwv[1])
        g_gw = g_gb = None
        if needs[0]:
            gd_w = torch.linalg.vecdot(g_d.reshape(-1), m.reshape(-1)).reshape(1)
            g_gw = torch.cat([gd_w, -gd_w]).unsqueeze(1)
        if needs[1]:
            gd_b = g_d.sum().reshape(1)
            g_gb = torch.cat([gd_b, -gd_b])
        return g_m, g_v, g_gw, g_gb, g_w, g_b
    e = [gate_grad(lambda c, j=j: c[j]) for j in range(k)]  # ∂g_k
    e_mean = e[0] * g[0]  # Σ_k g_k ∂g_k
    for j in range(1, k):
        e_mean.addcmul_(e[j], g[j])
    dots, sums = [], []
    for j in range(k):  # softmax backward: ∂logits_k = g_k (∂g_k − Σ_j g_j ∂g_j)
        g_l = torch.sub(e[j], e_mean).mul_(g[j])
        g_m.addcmul_(g_l, gwv[j])
        dots.append(torch.linalg.vecdot(g_l.reshape(-1), m.reshape(-1)) if needs[0] else None)
        sums.append(g_l.sum() if needs[1] else None)
    g_gw = torch.stack(dots).unsqueeze(1) if needs[0] else None
    g_gb = torch.stack(sums) if needs[1] else None
    return g_m, g_v, g_gw, g_gb, g_w, g_b


_SmallFn = Callable[..., tuple]  # a small forward or backward, see _SMALL
_SMALL: dict[str, tuple[_SmallFn, _SmallFn]] = {
    "mode_train": (_mode_train_fwd, _mode_train_bwd),
    "mode_eval": (_mode_eval_fwd, _mode_eval_bwd),
    "mgn": (_mgn_fwd, _mgn_bwd),
}


# --------------------------------------------------------------------------------------------
# The autograd Functions


class _GatedAffine(torch.autograd.Function):
    """``y = (x − c) * scale(m, v, θ) + shift(m, v, θ)`` for (N, C, L) ``flat``, with m, v the
    spatial mean and variance of each (sample, channel) row and the small function ``kind``.

    - forward: m = mean x, the buffer x − m and its squared norm, the small forward, then the
      output written into that buffer;
    - backward: Σ g (x − m) and Σ g (one pass) give ∂scale and ∂shift; the small backward gives
      ∂m, ∂v and ∂θ; then ``∂x = g * scale + a * x + b`` (two passes) with ``a = 2 ∂v / L``,
      ``b = ∂m / L − a m`` (from ∂m/∂x = 1/L and ∂v/∂x = 2 (x − m)/L).

    Outputs ``(y, *stats)``; the statistics are not differentiable. Double backward is not
    supported (``once_differentiable``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, flat: Tensor, kind: str, need_var: bool, consts: tuple, *tensors: Tensor | None
    ) -> tuple[Tensor, ...]:
        m, v, buf = _row_moments(flat, need_var)
        scale, shift, mc, stats, saved = _SMALL[kind][0](m, v, tensors, consts)
        y = _output(flat, m, buf, scale, shift, mc)
        ctx.save_for_backward(flat, m, scale, mc, *saved)
        ctx.kind, ctx.consts, ctx.group = kind, consts, current_group()
        ctx.mark_non_differentiable(*stats)
        return (y, *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat, m, scale, mc, *saved = ctx.saved_tensors
        dots, gs = _row_dots(gy, flat, m)
        t = torch.addcmul(dots, mc, gs)  # Σ g (x − c) = Σ g (x − m) + (m − c) Σ g
        needs = ctx.needs_input_grad[4:]
        g_m, g_v, *g_tensors = _SMALL[ctx.kind][1](saved, t, gs, needs, ctx.group, ctx.consts)
        g_x = None
        if ctx.needs_input_grad[0]:
            inv_l = 1.0 / flat.shape[2]
            if g_v is None:
                g_x = _row_affine(gy, scale, g_m * inv_l)
            else:
                a = g_v * (2.0 * inv_l)
                g_x = _row_affine(gy, scale, torch.addcmul(g_m * inv_l, a, m, value=-1))
                g_x.addcmul_(flat, a.unsqueeze(2))
        return (g_x, None, None, None, *g_tensors)


class _Gated2d(torch.autograd.Function):
    """``y = (x − c) * scale(x, θ) + shift(x, θ)`` for (N, C) input (one position per row:
    m = x, v = 0) with the small function ``kind``; outputs ``(y, *stats)``, the statistics not
    differentiable. Backward: ∂scale = g · (x − c), ∂shift = g, the small backward, then
    ``∂x = g · scale + ∂m``. Under ``create_graph=True`` the small forward is recomputed from the
    saved inputs with differentiable ops (inside the forward's reduction scope), so the
    written-out backward is itself differentiated by autograd (double backward).

    Subclassed once per layer so that a graph names its kernel.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, kind: str, consts: tuple, *tensors: Tensor | None
    ) -> tuple[Tensor, ...]:
        scale, shift, xc, stats, saved = _SMALL[kind][0](x, None, tensors, consts)
        ctx.save_for_backward(x, *tensors, scale, xc, *saved)
        ctx.kind, ctx.consts, ctx.group = kind, consts, current_group()
        ctx.mark_non_differentiable(*stats)
        return (shift.addcmul_(xc, scale), *stats)

    @staticmethod
    def backward(ctx, gy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        fwd, bwd = _SMALL[ctx.kind]
        n_in = len(ctx.needs_input_grad) - 3
        x, *rest = ctx.saved_tensors
        tensors, (scale, xc, *saved) = rest[:n_in], rest[n_in:]
        if torch.is_grad_enabled():  # create_graph=True: recompute with differentiable ops
            with reduction_scope(ctx.group):
                scale, _, xc, _, saved = fwd(x, None, tuple(tensors), ctx.consts)
        needs = ctx.needs_input_grad[3:]
        g_m, _, *g_tensors = bwd(saved, gy * xc, gy, needs, ctx.group, ctx.consts)
        g_x = g_m.addcmul_(gy, scale) if ctx.needs_input_grad[0] else None
        return (g_x, None, None, *g_tensors)


class _ModeNormTrain2d(_Gated2d):
    """Training-mode ModeNorm on ``(N, C)`` input (see :class:`_Gated2d`)."""


class _MGNorm2d(_Gated2d):
    """ModeGroupNorm on ``(N, C)`` input (see :class:`_Gated2d`)."""


_FUNCTIONS_2D: dict[str, type[_Gated2d]] = {"mode_train": _ModeNormTrain2d, "mgn": _MGNorm2d}


def _wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records here and one of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(
    x: Tensor, kind: str, need_var: bool, consts: tuple, tensors: tuple[Tensor | None, ...]
) -> tuple[Tensor, ...]:
    """The small function ``kind`` applied to ``x`` ((N, C) or (N, C, L)): the Function when
    gradients are wanted, else the same forward without a graph. Returns ``(y, *stats)``."""
    fwd = _SMALL[kind][0]
    if x.dim() == 2:
        if _wants_grad(x, *tensors):
            return _FUNCTIONS_2D[kind].apply(x, kind, consts, *tensors)
        scale, shift, xc, stats, _ = fwd(x, None, tensors, consts)
        return (shift.addcmul_(xc, scale), *stats)
    if _wants_grad(x, *tensors):
        return _GatedAffine.apply(x, kind, need_var, consts, *tensors)
    m, v, buf = _row_moments(x, need_var)
    scale, shift, mc, stats, _ = fwd(m, v, tensors, consts)
    return (_output(x, m, buf, scale, shift, mc), *stats)


def mode_norm_train(
    x: Tensor, params: _Opts, eps: float, min_weight: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode ModeNorm of ``(N, C)`` or ``(N, C, L)`` input with ``params`` = (Ψ, b, α, β):
    ``(y, μ_k, σ²_k, N_k)``, the statistics detached (for the running update). All tensors in
    the statistics dtype; ``min_weight`` clamps N_k."""
    y, mean, var, nk = _run(x, "mode_train", True, (eps, min_weight), params)
    return y, mean, var, nk


def mode_norm_eval(flat: Tensor, params: _Opts, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Eval-mode ModeNorm of ``(N, C, L)`` input with ``params`` = (Ψ, b, α, β) and per-mode μ_k
    and σ²_k (K, C) (Alg. 2)."""
    return _run(flat, "mode_eval", False, (eps,), (*params, mean, var))[0]


def mode_group_norm(
    x: Tensor, params: _Opts, eps: float, min_weight: float, combine: str
) -> Tensor:
    """ModeGroupNorm of ``(N, C)`` or ``(N, C, L)`` input with ``params`` = (ψ, b, α, β);
    ``min_weight`` clamps C_k, ``combine`` is ``"mean"`` or ``"gated"``."""
    return _run(x, "mgn", True, (eps, min_weight, combine), params)[0]
