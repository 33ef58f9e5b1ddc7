r"""Kernels for Mode Normalization and Mode Group Normalization (Deecke et al., Alg. 1–3, Eq. 2–5).

The plain references live in :mod:`normlab.nn.mode`; the functions here compute the same values
and gradients with hand-written autograd Functions and fused passes. Both layers write their
output as one scale and shift per (sample, channel),

.. math::  y = x \odot \mathrm{scale} + \mathrm{shift},\qquad
           \mathrm{scale} = α \textstyle\sum_k w_k s_k,\quad
           \mathrm{shift} = β - α \sum_k w_k μ_k s_k,\quad s_k = (σ_k^2 + ε)^{-1/2},

(w_k the gate g_k, or 1/K for MGN's ``combine="mean"``), so the K modes only touch (N, C)-,
(K, C)- or (K, N, C)-sized tensors:

* :func:`gated_affine` (``(N, C, *)`` input, both layers) — :class:`_GatedAffine` reads the big
  tensor a few times and allocates one big tensor per direction, like ``nn.BatchNorm2d``; the
  small (N, C) graph ``fn(m, v, *params)`` of the reference is differentiated by autograd inside
  its backward. Once differentiable.
* :func:`mode_norm_train_2d` (training-mode ModeNorm on ``(N, C)`` input) —
  :class:`_ModeNormTrain2d`, a closed-form backward; returns the batch statistics so that the
  caller updates the running estimates (Eq. 4).
* :func:`mode_group_norm_2d` (MGN on ``(N, C)`` input) — :class:`_MGNorm2d`, a closed-form
  backward with mode-major gates (K, N, C).

The 2-D Functions stay twice differentiable: under ``create_graph=True`` their backward replays
the reference's small function with plain autograd and differentiates that. Sums over the batch
go through :func:`normlab.nn.stats.reduce_sums` (the cross-process seam); ModeNorm's backward
re-enters the forward's reduction scope for the gradients of the sums and keeps α's and β's
gradients local. Why each kernel is shaped as it is: ``docs/methods/mode.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.nn.stats import current_group, reduce_sums, reduction_scope

__all__ = ["SmallFn", "gated_affine", "mode_group_norm_2d", "mode_norm_train_2d"]

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


def _wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records here and one of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_affine(
    flat: Tensor, fn: SmallFn, need_var: bool, params: tuple[Tensor | None, ...]
) -> Tensor:
    """``x * scale + shift`` with ``(scale, shift) = fn(m, v, *params)`` and m, v the spatial
    moments of each (sample, channel) row of ``flat`` (N, C, L) (``v`` is ``None`` unless
    ``need_var``). ``flat`` is in the statistics dtype; the output has its shape and dtype.

    With gradients wanted this is :class:`_GatedAffine`; without, the same fused forward.
    """
    if _wants_grad(flat, *params):
        return _GatedAffine.apply(flat, fn, need_var, *params)
    m, v, buf = _row_moments(flat, need_var)
    scale, shift = fn(m, v, *params)
    return _output(flat, m, buf, scale, shift)


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
    center: Tensor,
    eps: float,
    min_weight: float,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Training-mode ModeNorm of (N, C) ``x`` (already in the statistics dtype): the output, the
    clamped per-mode variance and the intermediates the hand-written backward needs.

    The gates are kept transposed, ``gt = Gᵀ`` (K, N). With c the batch centre and p = x − c: the
    sums Gᵀp and Gᵀp² (p² in the output's buffer), then ``y = p · (G A) − G (B − β)`` with
    ``A = α s`` and ``B = (μ − c) A`` — the same Σ_k g_nk (x − μ_k) α s_k + β as Eq. 2 (with
    Σ_k g_nk = 1). Two (N, C) allocations: p and y."""
    xt = x.t()
    logits = torch.mm(gw, xt) if gb is None else torch.addmm(gb.unsqueeze(1), gw, xt)
    gt = torch.softmax(logits, dim=0)  # (K, N)
    p = x - center
    y = torch.mul(p, p)  # p², then the output
    nk, s1, s2 = reduce_sums(gt.sum(1), torch.mm(gt, p), torch.mm(gt, y))  # N_k, Σgp, Σgp²
    nkc = nk.clamp_min(min_weight).unsqueeze(1)
    mean_c = s1 / nkc  # μ_k − c
    var_raw = torch.addcmul(s2 / nkc, mean_c, mean_c, value=-1)
    var = var_raw.clamp_min(0)
    s = (var + eps).rsqrt_()  # (K, C)
    a = s if w is None else s * w
    bm = mean_c * a
    _gate_sum(gt, a, out=y)  # scale = α Σ_k g_nk s_k
    if b is None:
        y.mul_(p)
    else:
        torch.addcmul(b, p, y, out=y)  # p · scale + β
    _gate_sum(gt, bm.neg(), out=y, accumulate=True)  # − Σ_k g_nk B_k
    return y, var, (gt, p, nk, s1, s2, mean_c, var_raw, s, a, bm)


class _ModeNormTrain2d(torch.autograd.Function):
    """Training-mode ModeNorm on ``(N, C)`` input with a hand-written backward.

    Outputs ``(y, μ_k, σ²_k, N_k)``; the statistics are not differentiable (the caller updates
    the running estimates with them). The forward allocates two (N, C) tensors (p = x − c and the
    output) and the backward two (a scratch buffer and ∂x):

    - ``t = gy · p`` gives ∂A = Gᵀt, ∂B = −Gᵀgy and the output's gate gradient ``t Aᵀ − gy Bᵀ``;
    - the (K, C) chain A, B → s, μ − c → σ², μ − c → the sums Σ g p, Σ g p² and N_k in closed form
      (the clamps of σ² at 0 and of N_k at ``min_weight`` pass the gradient where the input is ≥
      the bound, as ``clamp_min`` does);
    - the gradients of the sums are all-reduced like the sums were (under the forward's reduction
      scope, see :mod:`normlab.nn.stats`); α's and β's gradients stay local;
    - then ∂G (with p² recomputed into ``t``), the softmax backward and
      ``∂x = gy · (G A) + 2 p · (G ∂s2) + G ∂s1 + ∂logits Ψ``.

    Double backward (``create_graph=True``) differentiates a plain-autograd replay of the forward
    through the reference's small function ``fn`` (:func:`_replay_backward`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        gw: Tensor,
        gb: Tensor | None,
        w: Tensor | None,
        b: Tensor | None,
        center: Tensor,
        eps: float,
        min_weight: float,
        fn: SmallFn,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, var, saved = _mode2d_forward(x, gw, gb, w, b, center, eps, min_weight)
        ctx.save_for_backward(x, gw, gb, w, b, *saved)
        ctx.min_weight, ctx.fn = min_weight, fn
        ctx.group = current_group()
        nk, mean_c = saved[2], saved[5]
        mean = mean_c + center
        ctx.mark_non_differentiable(mean, var, nk)
        return y, mean, var, nk

    @staticmethod
    def backward(ctx, gy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, gw, gb, w, b, gt, p, nk, s1, s2, mean_c, var_raw, s, a, bm = ctx.saved_tensors
        nx, ngw, ngb, nw, nb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd replay
            return _replay_backward(ctx, gy, (x, gw, gb, w, b), ctx.group)
        min_weight = ctx.min_weight
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
        inv_nk = nk.clamp_min(min_weight).reciprocal().unsqueeze(1)
        g_s1, g_s2 = g_mean.mul_(inv_nk), g_var.mul_(inv_nk)
        g_nk = torch.addcmul(g_s1 * s1, g_s2, s2).sum(1).mul_(-inv_nk.squeeze(1))
        g_nk = torch.where(nk >= min_weight, g_nk, 0.0)
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
        return g_x, g_gw, g_gb, g_w, g_b, None, None, None, None


def _replay_backward(
    ctx, gy: Tensor, inputs: tuple[Tensor | None, ...], group: object | None
) -> tuple[Tensor | None, ...]:
    """Backward of a 2-D Function under ``create_graph=True``: replay ``y = x * scale + shift``
    with the plain-autograd small function ``ctx.fn`` (for ``(N, C)`` input m = x and v = 0;
    ``inputs = (x, *params)``, the Function's first arguments) under the forward's reduction
    scope, and differentiate that. ``None`` for the Function's remaining arguments."""
    needs = ctx.needs_input_grad[: len(inputs)]
    wanted = [t for t, need in zip(inputs, needs) if need]
    x = inputs[0]
    with reduction_scope(group):
        scale, shift = ctx.fn(x, None, *inputs[1:])
        y = torch.addcmul(shift, x, scale)
    grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
    out = [(_zeros_if_none(next(grads), t) if need else None) for t, need in zip(inputs, needs)]
    return (*out, *[None] * (len(ctx.needs_input_grad) - len(inputs)))


def mode_norm_train_2d(
    x: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    center: Tensor,
    eps: float,
    min_weight: float,
    fn: SmallFn,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode ModeNorm of ``(N, C)`` input: ``(y, μ_k, σ²_k, N_k)``.

    All tensors are in the statistics dtype; ``center`` is the batch centre c (``(C,)``, detached);
    ``min_weight`` the clamp of N_k; ``fn`` the reference's small function (used only for double
    backward). With gradients wanted this is :class:`_ModeNormTrain2d`, else its forward."""
    if _wants_grad(x, gw, gb, w, b):
        return _ModeNormTrain2d.apply(x, gw, gb, w, b, center, eps, min_weight, fn)
    y, var, saved = _mode2d_forward(x, gw, gb, w, b, center, eps, min_weight)
    return y, saved[5] + center, var, saved[2]


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
    min_weight: float,
    combine: str,
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
    ckc = ck.clamp_min(min_weight)
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

    Double backward (``create_graph=True``) differentiates a plain-autograd replay through the
    reference's small function ``fn`` (:func:`_replay_backward`).
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
        min_weight: float,
        combine: str,
        fn: SmallFn,
    ) -> Tensor:
        y, saved = _mgn2d_forward(z, gw, gb, w, b, eps, min_weight, combine)
        g, m, u, *small = saved
        ctx.save_for_backward(z, gw, gb, w, b, g, m, u if w is not None else None, *small)
        ctx.min_weight, ctx.combine, ctx.fn = min_weight, combine, fn
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, gw, gb, w, b, g, m, u, sum1, sum2, ck, mu, var_raw, s = ctx.saved_tensors
        nz, ngw, ngb, nw, nb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain-autograd replay
            return _replay_backward(ctx, gy, (z, gw, gb, w, b), None)
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
        inv_ck = ck.clamp_min(ctx.min_weight).reciprocal()
        g_s1 = torch.addcmul(g_mu, mu, g_var, value=-2.0).mul_(inv_ck)  # ∂(Σ g m)
        g_s2 = g_var.mul_(inv_ck)  # ∂(Σ g m²)
        g_ck = torch.addcmul(g_s1 * sum1, g_s2, sum2).mul_(inv_ck).neg_()
        g_ck = torch.where(ck >= ctx.min_weight, g_ck, 0.0)
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
        return g_z, g_gw, g_gb, g_w, g_b, None, None, None, None


def mode_group_norm_2d(
    z: Tensor,
    gw: Tensor,
    gb: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    min_weight: float,
    combine: str,
    fn: SmallFn,
) -> Tensor:
    """MGN of ``(N, C)`` input, all tensors in the statistics dtype; ``min_weight`` clamps C_k,
    ``combine`` is ``"mean"`` or ``"gated"`` and ``fn`` the reference's small function (used only
    for double backward). With gradients wanted this is :class:`_MGNorm2d`, else its forward."""
    if _wants_grad(z, gw, gb, w, b):
        return _MGNorm2d.apply(z, gw, gb, w, b, eps, min_weight, combine, fn)
    return _mgn2d_forward(z, gw, gb, w, b, eps, min_weight, combine)[0]
