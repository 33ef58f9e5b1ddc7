r"""Kernels for Mixture Normalization (Kalayeh & Shah, Eq. 34–36).

The plain references live in :mod:`normlab.nn.mixture` (one autograd pass per component); the
kernels here compute the same values with the transform written in coefficient form,

.. math::

    y_i = x_i \odot \textstyle\sum_k ν_{ik} a_k + \sum_k ν_{ik} b_k,\qquad
    a_k = \frac{γ}{\sqrt{λ_k}\sqrt{σ^2_k + ε}},\quad b_k = β - a_k \odot μ_k,

i.e. two ``(C, K) × ν`` products on the channel-first layout and no per-component
activation-sized intermediates:

* :class:`MixtureNormFn` — the training transform with ν fixed and a closed-form backward that
  also differentiates through the statistics μ_k, σ²_k (Eq. 35–36).
* :func:`mixture_transform_fused` — the same forward with *given* statistics (the inference
  transform of Eq. 38), differentiated by autograd.

Both take points in layout ``(N, C)`` or ``(B, C, L)`` and posteriors ``(N, K)`` / ``(B, K, L)``.
Sums over points go through :func:`~normlab.nn.stats.weighted_channel_sums` (the cross-process
seam); the backward re-enters the forward's reduction scope for the input gradient and takes the
parameter gradients from the local sums, as ``nn.SyncBatchNorm`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.nn.stats import current_group, reduce_sums, reduction_scope, weighted_channel_sums

__all__ = ["MixtureNormFn", "coefficients", "mixture_transform_fused", "spread"]


def spread(coef: Tensor, nu: Tensor, out: Tensor | None = None, add: bool = False) -> Tensor:
    """Σ_k ν_ik coef_kc for every point: coef (K, C), ν (N, K) / (B, K, L) -> (N, C) / (B, C, L).

    ``out`` receives the result (``add=True``: is incremented by it) without a new full-size
    allocation (allocating activation-sized tensors dominates this layer's cost on CPU)."""
    if nu.dim() == 2:
        if out is None:
            return nu @ coef
        return out.addmm_(nu, coef) if add else torch.mm(nu, coef, out=out)
    ct = coef.t().expand(nu.shape[0], -1, -1)
    if out is None:
        return torch.bmm(ct, nu)
    return out.baddbmm_(ct, nu) if add else torch.bmm(ct, nu, out=out)


def coefficients(
    alpha: Tensor, rstd: Tensor, gamma: Tensor, mean: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``a_k = α_k · rstd_k ⊙ γ`` and ``b_k = β − a_k ⊙ μ_k``, both (K, C), from α = 1/√λ (K,),
    rstd = 1/√(σ² + ε), μ (K, C), γ (C,) and β (C,) or ``None`` (no shift)."""
    coef_a = alpha[:, None] * rstd * gamma
    coef_b = -coef_a * mean
    if bias is not None:
        coef_b = coef_b + bias
    return coef_a, coef_b


def mixture_transform_fused(x: Tensor, nu: Tensor, coef_a: Tensor, coef_b: Tensor) -> Tensor:
    """``x ⊙ Σ_k ν_k a_k + Σ_k ν_k b_k`` (points' layout), differentiable in ``x``, ``coef_a``
    and ``coef_b``."""
    return torch.addcmul(spread(coef_b, nu), x, spread(coef_a, nu))


class MixtureNormFn(torch.autograd.Function):
    r"""Eq. 34–36 + affine with ν fixed, closed-form backward.

    Forward: y_i = x_i ⊙ Σ_k ν_ik a_k + Σ_k ν_ik b_k (:func:`coefficients`), with s_k = √(σ²_k + ε).
    Backward: per component this is a BN with point weights ν̂_ik (Σ_i ν̂_ik = 1) scaled per point
    by w_ik = ν_ik/√λ_k. With G^k_i = γ w_ik g_i (the gradient reaching x̂ᵏ_i), S1_k = Σ_i G^k_i
    and S2_k = Σ_i G^k_i x̂ᵏ_i:

        ∂L/∂x_i = Σ_k [G^k_i − ν̂_ik (S1_k + x̂ᵏ_i S2_k)] / s_k
                = g_i Σ_k ν_ik a_k − x_i Σ_k ν_ik S2_k/(W_k s_k²)
                  − Σ_k ν_ik (S1_k − μ_k S2_k/s_k)/(W_k s_k),       W_k = Σ_i ν_ik,

    again (C, K) × ν products; ∂L/∂γ = Σ_k S2_k/γ and ∂L/∂β = Σ_k Σ_i ν_ik g_i.

    Inputs: ``x`` in point layout (the differentiable input), ``nu``, ``weight``, ``bias`` (C,) or
    None, the statistics of ``x`` under ν — μ (K, C), rstd = 1/s (K, C), α = 1/√λ (K,, 0 for an
    absent component) and W (K,, 1 for an absent one) — as computed from the weighted sums (no
    gradient; the backward accounts for their dependence on ``x``), and ``scratch``: ``None`` or
    a one-tuple holding a tensor of ``x``'s shape and dtype whose memory becomes the output
    (eager mode: :meth:`PointSet.take_squares <normlab.nn.gmm.PointSet.take_squares>`; then the
    forward allocates nothing activation-sized, the backward two; blocked on CPU, see
    :func:`_blocked`, the backward only the input gradient and one block). Output ``y`` like
    ``x``.

    Traceable by ``torch.compile(fullgraph=True)``: no Python state is changed in forward or
    backward, and without a process group the backward opens no reduction scope. Once
    differentiable (the backward treats the statistics as constants).
    """

    @staticmethod
    def forward(ctx, x, nu, weight, bias, mean, rstd, alpha, cnt, scratch):  # type: ignore[override]
        gamma = weight if weight is not None else torch.ones_like(mean[0])
        coef_a, coef_b = coefficients(alpha, rstd, gamma, mean, bias)
        if scratch is not None:
            (y,) = scratch
            _transform_into(y, x, nu, coef_a, coef_b, _blocked(x, y))
        elif _blocked_when_traced(x):
            y = torch.ops.normlab.mixture_transform_blocked(x, nu, coef_a, coef_b)
        else:
            y = mixture_transform_fused(x, nu, coef_a, coef_b)
        ctx.save_for_backward(x, nu, gamma, mean, rstd, alpha, cnt)
        ctx.group = current_group()  # the backward's sums are reduced over the same group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        xr, nu, gamma, mean, rstd, alpha, cnt = ctx.saved_tensors
        gy = gy.to(xr.dtype)
        # eager on CPU, or traced on CPU without a process group: the blocked passes (opaque
        # operators, so that a traced backward calls them as well)
        blocked = _blocked(xr, gy) or (ctx.group is None and _blocked_when_traced(xr))
        # local sums: T1_k = Σ_i ν_ik g_i, U_k = Σ_i ν_ik g_i x_i
        if blocked:
            r = None
            t1, u = torch.ops.normlab.mixture_sums_blocked(gy, nu, xr)
        else:
            r = gy * xr
            t1, u = _local_sums(gy, nu, r)
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
            if blocked:
                grad_x = torch.ops.normlab.mixture_grad_x_blocked(
                    gy, xr, nu, coef_a, coef_p, coef_q
                )
            else:
                grad_x = spread(coef_a, nu, out=r)  # reuse the buffer: r is no longer needed
                grad_x.mul_(gy)
                grad_x.addcmul_(xr, spread(coef_p, nu), value=-1.0)
                spread(coef_q, nu, out=grad_x, add=True)
        return grad_x, None, grad_w, grad_b, None, None, None, None, None


def _local_sums(gy: Tensor, nu: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_i ν_ik g_i and Σ_i ν_ik r_i on this process alone (no reduction scope is opened when
    none is active, so that a traced backward changes no Python state)."""
    if current_group() is None:
        _, t1, u = weighted_channel_sums(gy, nu, r)
        return t1, u
    with reduction_scope(None):
        _, t1, u = weighted_channel_sums(gy, nu, r)
    return t1, u


# Eager CPU passes in blocks of samples: every activation-sized intermediate of the backward
# (g ⊙ x and the three spreads) lives only in a block-sized buffer that stays in cache, so the
# backward reads g and x and writes ∂L/∂x once each instead of passing over memory about a dozen
# times; the forward's output block stays in cache across its three passes. Same operations, same
# order of summation within each sample; the sums over samples are added block by block.
_BLOCK_BYTES = 1 << 20


def _blocked(xr: Tensor, gy: Tensor) -> bool:
    """Whether an eager pass over ``xr`` (and ``gy``) runs blocked: on CPU, for the (B, C, L)
    layout of more than one block, contiguous (GPUs gain nothing from blocks)."""
    return (
        not torch.compiler.is_compiling()
        and _large_cpu_points(xr)
        and gy.is_contiguous()
        and xr.is_contiguous()
    )


def _blocked_when_traced(xr: Tensor) -> bool:
    """Whether a traced pass (``torch.compile``) calls the blocked passes as opaque operators
    (:func:`_transform_op`, :func:`_sums_op`, :func:`_grad_x_op`): on CPU, for the same inputs
    as :func:`_blocked`. Inductor's fused code for the plain form makes several passes over
    memory and keeps the intermediates of the backward; on GPUs it runs the plain form."""
    return torch.compiler.is_compiling() and _large_cpu_points(xr)


def _large_cpu_points(xr: Tensor) -> bool:
    return (
        xr.dim() == 3 and xr.device.type == "cpu" and xr.numel() * xr.element_size() > _BLOCK_BYTES
    )


def _transform_into(
    y: Tensor, x: Tensor, nu: Tensor, coef_a: Tensor, coef_b: Tensor, blocked: bool
) -> None:
    """``y = x ⊙ Σ_k ν_k a_k + Σ_k ν_k b_k`` written into ``y``; blocked, each output block stays
    in cache across the three passes."""
    whole = [slice(None)]
    for sl in _blocks(x.shape[0], x[0].numel() * x.element_size()) if blocked else whole:
        y_b, nu_b = y[sl], nu[sl]
        spread(coef_a, nu_b, out=y_b)
        y_b.mul_(x[sl])
        spread(coef_b, nu_b, out=y_b, add=True)


@torch.library.custom_op("normlab::mixture_transform_blocked", mutates_args=())
def _transform_op(x: Tensor, nu: Tensor, coef_a: Tensor, coef_b: Tensor) -> Tensor:
    """The training transform, blocked, as an operator that ``torch.compile`` does not trace."""
    x, nu = x.contiguous(), nu.contiguous()
    y = torch.empty_like(x)
    _transform_into(y, x, nu, coef_a, coef_b, True)
    return y


@_transform_op.register_fake
def _(x: Tensor, nu: Tensor, coef_a: Tensor, coef_b: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("normlab::mixture_sums_blocked", mutates_args=())
def _sums_op(gy: Tensor, nu: Tensor, xr: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_local_sums_blocked` as an operator that ``torch.compile`` does not trace."""
    return _local_sums_blocked(gy.contiguous(), nu.contiguous(), xr.contiguous())


@_sums_op.register_fake
def _(gy: Tensor, nu: Tensor, xr: Tensor) -> tuple[Tensor, Tensor]:
    k, c = nu.shape[1], xr.shape[1]
    return xr.new_empty(k, c), xr.new_empty(k, c)


@torch.library.custom_op("normlab::mixture_grad_x_blocked", mutates_args=())
def _grad_x_op(
    gy: Tensor, xr: Tensor, nu: Tensor, coef_a: Tensor, coef_p: Tensor, coef_q: Tensor
) -> Tensor:
    """:func:`_grad_x_blocked` as an operator that ``torch.compile`` does not trace."""
    return _grad_x_blocked(
        gy.contiguous(), xr.contiguous(), nu.contiguous(), coef_a, coef_p, coef_q
    )


@_grad_x_op.register_fake
def _(gy: Tensor, xr: Tensor, nu: Tensor, coef_a: Tensor, coef_p: Tensor, coef_q: Tensor) -> Tensor:
    return torch.empty_like(xr, memory_format=torch.contiguous_format)


def _blocks(n: int, per_sample: int) -> list[slice]:
    step = max(1, _BLOCK_BYTES // max(per_sample, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _local_sums_blocked(gy: Tensor, nu: Tensor, xr: Tensor) -> tuple[Tensor, Tensor]:
    """(T1, U) = (Σ_i ν_ik g_i, Σ_i ν_ik g_i x_i), (K, C), block by block (see :func:`_blocked`)."""
    n, c, _ = xr.shape
    k = nu.shape[1]
    t1 = xr.new_zeros(k, c)
    u = xr.new_zeros(k, c)
    blocks = _blocks(n, xr[0].numel() * xr.element_size())
    tmp = torch.empty_like(xr[blocks[0]])
    for sl in blocks:
        n_b = nu[sl]
        b = tmp[: sl.stop - sl.start]
        t1 += torch.bmm(n_b, gy[sl].transpose(1, 2)).sum(0)
        torch.mul(gy[sl], xr[sl], out=b)
        u += torch.bmm(n_b, b.transpose(1, 2)).sum(0)
    return t1, u


def _grad_x_blocked(
    gy: Tensor, xr: Tensor, nu: Tensor, coef_a: Tensor, coef_p: Tensor, coef_q: Tensor
) -> Tensor:
    """g ⊙ Σ_k ν_k a_k − x ⊙ Σ_k ν_k p_k + Σ_k ν_k q_k, block by block (see :func:`_blocked`)."""
    out = torch.empty_like(xr)
    blocks = _blocks(xr.shape[0], xr[0].numel() * xr.element_size())
    tmp = torch.empty_like(xr[blocks[0]])
    for sl in blocks:
        o, n_b = out[sl], nu[sl]
        b = tmp[: sl.stop - sl.start]
        spread(coef_a, n_b, out=o)
        o.mul_(gy[sl])
        spread(coef_p, n_b, out=b)
        o.addcmul_(xr[sl], b, value=-1.0)
        spread(coef_q, n_b, out=o, add=True)
    return out
