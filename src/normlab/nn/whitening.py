r"""Whitening normalizations: Iterative Normalization and Decorrelated Batch Normalization (Huang et al., Sec. 3).

Both layers *whiten* groups of channels over the mini-batch instead of only standardizing each
channel. The channels are split into groups of ``d = group_size`` consecutive channels (the last
group is smaller when ``d`` does not divide C); every spatial position of every sample is one
observation (Huang et al., Sec. 3.3, "Convolutional Layer"), so a group's data matrix is
:math:`X \in \mathbb{R}^{d\times m}`, ``m = N·H·W``. Per group (Huang et al., Alg. 1):

.. math::
    \mu = \tfrac1m X\mathbf 1,\qquad X_C = X - \mu\mathbf 1^T,\qquad
    \Sigma = \tfrac1m X_C X_C^T + \epsilon I,\qquad \hat X = \Sigma^{-1/2} X_C

then the per-channel affine ``y = γ ⊙ x̂ + β`` (Huang et al., Sec. 3.3, footnote 1). The two layers differ only
in how :math:`\Sigma^{-1/2}` is obtained:

* **IterNorm** (:class:`IterNorm`): trace-normalize, :math:`\Sigma_N = \Sigma/\operatorname{tr}\Sigma`
  (Eq. 4), run T Newton steps :math:`P_0 = I,\ P_k = \tfrac12(3P_{k-1} - P_{k-1}^3\Sigma_N)` (Eq. 3)
  and rescale, :math:`\Sigma^{-1/2} \approx P_T/\sqrt{\operatorname{tr}\Sigma}` (Eq. 5). Small T
  whitens only partially: directions with large eigenvalues converge first (Sec. 3.1), which is
  the paper's point. ``iters=0`` is trace normalization :math:`X_C/\sqrt{\operatorname{tr}\Sigma}`.
* **DBN** (:class:`DBN`): exact ZCA whitening :math:`D\Lambda^{-1/2}D^T` from a symmetric
  eigendecomposition :math:`\Sigma = D\Lambda D^T` (Eq. 2).

With ``group_size=1`` both reduce exactly to batch normalization (Sec. 4, "Effects of Group Size").

**Back-propagation** is by autograd through the whole computation, the mean and
:math:`\operatorname{tr}\Sigma` included (Eq. 6–7), so the gradient is exactly that of Eq. 6–7 /
Algorithm 2. The data cost is in the five ``m × d`` by ``d × d`` products per step (forward: Σxxᵀ
and the output; backward: ``∂L/∂W = ∂L/∂Y·Xᵀ``, ``Wᵀ·∂L/∂Y`` and the covariance term
``(Ḡ + Ḡᵀ)X``), the same five a hand-written Algorithm 2 needs; the covariance term is one product,
not two, because the Gram sums have a symmetric backward, and the statistics and the output share
one copy/view of the input so autograd accumulates their gradients in place. No hand-written
Algorithm 2 is used: it could at best save one full-size gradient buffer and its add, and it would
have to redo by hand the cross-process reduction that autograd through
:func:`normlab.nn.stats.reduce_sums` gets right. Two pieces do have a hand-written backward:

* the Newton iteration (``_NewtonSchulz``): the exact reverse pass of the coupled iteration
  (3T − 3 batched d × d products forward, Y_T is never formed; 6 per step backward), with the
  iterates in preallocated stacks. For small batches the d × d work is *not* cheap next to the
  products: with (N, C) = (256, 512) and d = 64 the 36 Newton products of T = 5 cost about twice
  the five data products. Double backward differentiates the plain-autograd iteration instead, so
  IterNorm stays twice differentiable.
* DBN's eigen-backward (below).

**(N, C) input** (MLPs) is whitened on *row batches*: the channels (zero-padded to G·d when d does
not divide C) are copied once into a contiguous ``(G, N, d)`` batch — one N × d data matrix per
group — that the statistics (``XᵀX``, through :func:`normlab.nn.stats.reduce_sums` like
:func:`normlab.nn.stats.gram_sums`) and the output product (``X W_effᵀ``, written straight into the
(N, C) output through a strided view) share. :func:`normlab.nn.stats.group_batch`'s ``(G, d, N)`` view of an (N, C) tensor has the
batch as its strided inner dimension, which made the products, the (transposed) output and the
gradient accumulated into ``x`` each pay a slow transposing copy. The padded channels are zero, so
the padded last block of Σ is ``blockdiag(Σ_last, εI)``; its padding is replaced by the identity
(see below), so the last group is whitened on its own, exactly as for ``(N, C, *)`` input.

DBN's eigen-backward uses the closed-form Loewner (divided-difference) matrix of
:math:`f(\lambda) = \lambda^{-1/2}`,
:math:`K_{ij} = -1/(\sqrt{\lambda_i}\sqrt{\lambda_j}(\sqrt{\lambda_i} + \sqrt{\lambda_j}))`
(:math:`-\tfrac12\lambda_i^{-3/2}` on the diagonal): the exact derivative of the matrix function,
finite for repeated eigenvalues, where the textbook eigenvector backward divides by
:math:`\lambda_i - \lambda_j` and blows up (DBN is not twice differentiable).

**Running statistics** (Eq. 8): ``running_mean`` (C,) starts at 0 and ``running_wm``
(num_groups, d, d) at I; both follow PyTorch's momentum convention
``running = (1 - momentum)·running + momentum·batch``; ``running_wm`` tracks :math:`\Sigma^{-1/2}`
(before the affine). Eval mode uses them: :math:`y = γ ⊙ \hat\Sigma^{-1/2}(x - \hat\mu) + β`, which is a
1×1 convolution (Sec. 3.3) — :meth:`IterNorm.fold` returns it as a torch layer.

**Choices where the paper leaves room** (and why):

* ``group_size`` larger than C is clamped to C (one group), so specs like ``iternorm`` work on any
  width; a non-dividing ``group_size`` leaves a smaller last group of ``C mod d`` channels, whitened on
  its own (its trace, its Newton iteration), exactly as if it were a separate layer.
* The m×d products run as at most two batched calls for ``(N, C, *)`` input (the full groups,
  then the last smaller group) and as one on zero-padded row batches for ``(N, C)`` input; the d×d
  work (Newton or eigendecomposition) is one batched call, the last group padded with an identity
  block (exact: the blocks never mix, and the identity is a fixed point of Eq. 3; the last group's
  trace is taken over its real channels). In ``running_wm`` the padded entries of the last group
  stay at the identity and are unused.
* The covariance comes from sums (Σx, Σxxᵀ), so a distributed run can all-reduce them
  (:mod:`normlab.nn.stats`); in float32 this loses precision when a channel's mean is much larger
  than its spread (as E[x²]−E[x]² does in any one-pass BN).
* Statistics, whitening matrix and the output product are computed in ``stat_dtype``: by default
  float32 for float16/bfloat16 input (with autocast disabled inside the layer) and the input dtype
  otherwise; ``stat_dtype="float64"`` forces double. The output has the input's dtype.
* DBN's eigendecomposition always runs in float64 (a ``G·d³`` cost, negligible next to the ``m·d²``
  products of convolutional batches; for (N, C) input with m a few times d it dominates the step:
  LAPACK's batched ``eigh`` of eight 64 × 64 matrices takes ≈ 2 ms on one CPU core, ≈ 40 % of
  ``dbn(group_size=64)`` on (256, 512)) and its eigenvalues are clamped below at ε before :math:`\lambda^{-1/2}`. In exact
  arithmetic :math:`\Sigma \succeq \epsilon I`, so the clamp only removes rounding error; it is the
  documented fallback for ill-conditioned or singular groups (duplicated or constant channels,
  N·H·W < d, …) and needs no host synchronisation. ``max_condition`` adds an explicit check (one host
  sync per training step, off by default) that raises ``ValueError`` when a group's condition number
  λ_max/λ_min exceeds it or its covariance is not finite.
* IterNorm needs no fallback for the default T: :math:`P_T` is a polynomial in :math:`\Sigma_N`,
  whose eigenvalues lie in (0, 1], so it is finite. Newton's iteration is evaluated in the
  equivalent coupled (Newton–Schulz) form because Eq. 3 as printed diverges once converged (see
  :func:`newton_inverse_sqrt`); and for T > 10, where rounding on a numerically rank-deficient group
  (collinear channels at a large scale) could make an eigenvalue negative and the iteration
  overflow, a group whose iterate exceeds the bound :math:`2\sqrt{\operatorname{tr}\Sigma/\epsilon}`
  keeps its previous iterate (no host sync).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

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
)
from normlab.nn._utils import stat_dtype as default_stat_dtype
from normlab.nn.registry import register_norm
from normlab.nn.stats import CovarianceSums, gram_sums, group_batch, reduce_sums

__all__ = [
    "DBN",
    "GroupLayout",
    "IterNorm",
    "decorrelated_batch_norm",
    "group_layout",
    "iterative_normalization",
    "iternorm_whitening_matrix",
    "newton_inverse_sqrt",
    "zca_whitening_matrix",
]


# --------------------------------------------------------------------------------------------
# Group layout
# --------------------------------------------------------------------------------------------


class GroupLayout(NamedTuple):
    """How C channels split into whitening groups.

    ``group_size`` is the effective d (``min(requested, C)``), ``num_full`` the number of groups of
    exactly d channels, ``last`` the size of the final smaller group (0 when d divides C).
    """

    num_features: int
    group_size: int
    num_full: int
    last: int

    @property
    def num_groups(self) -> int:
        return self.num_full + (1 if self.last else 0)

    def parts(self) -> list[tuple[int, int, int, int]]:
        """``(first_channel, first_group, groups, size)`` of the (at most two) uniform parts."""
        d, g = self.group_size, self.num_full
        out = [(0, 0, g, d)] if g else []
        if self.last:
            out.append((g * d, g, 1, self.last))
        return out


def group_layout(num_features: int, group_size: int) -> GroupLayout:
    """Split ``num_features`` channels into groups of ``group_size`` (clamped to ``num_features``)."""
    d = min(group_size, num_features)
    return GroupLayout(num_features, d, num_features // d, num_features % d)


# --------------------------------------------------------------------------------------------
# The d × d part: Σ^{-1/2} by Newton's iteration (IterNorm) or eigendecomposition (DBN)
# --------------------------------------------------------------------------------------------


def newton_inverse_sqrt(a: Tensor, iters: int, max_abs: Tensor | None = None) -> Tensor:
    r"""Newton's iteration for :math:`A^{-1/2}` (Huang et al., Eq. 3), batched over leading dimensions.

    Computes :math:`P_T` of :math:`P_0 = I,\ P_k = \tfrac12(3P_{k-1} - P_{k-1}^3 A)`, k = 1..T, which
    converges when :math:`\|A - I\|_2 < 1` (e.g. a trace-normalized covariance, Eq. 4).
    Differentiable.

    Evaluated in the equivalent *coupled* form :math:`Y_0 = A,\ Z_0 = I,\ S_k = \tfrac12(3I -
    Z_{k-1}Y_{k-1}),\ Y_k = Y_{k-1}S_k,\ Z_k = S_kZ_{k-1}` (Newton–Schulz), for which
    :math:`Z_k = P_k` and :math:`Y_k = AP_k` in exact arithmetic, at the same cost (three d × d
    products per step). Eq. 3 as printed is numerically unstable once converged: a rounding error
    that does not commute with A grows by :math:`|1 - (r + r^2)/2|`, :math:`r = \sqrt{\lambda_j/
    \lambda_i}`, per step, so for a condition number above ≈ 2.4 it eventually diverges (NaN
    after 20–50 steps in float64 even for well-conditioned covariances). The coupled form is stable,
    so large T (e.g. 30) converges to the ZCA matrix. For small T the two agree to rounding.

    ``max_abs`` (shape ``(*,)``, optional) is a bound on the entries of :math:`A^{-1/2}`; a batch
    element whose iterate exceeds it keeps its previous iterate from then on (no host sync). This
    only triggers when rounding has made an eigenvalue of A negative (numerically rank-deficient A,
    many iterations), for which the iteration would otherwise overflow to inf/NaN.

    Shape: ``a`` ``(*, d, d)`` -> ``(*, d, d)``.
    """
    d = a.shape[-1]
    if iters == 0:
        return torch.eye(d, dtype=a.dtype, device=a.device).expand_as(a).clone()
    batch = a.shape[:-2]
    a3 = a.reshape(-1, d, d)
    if max_abs is None:
        if torch.is_grad_enabled() and a3.requires_grad:
            z = _NewtonSchulz.apply(a3, iters)
        else:
            z = _newton_schulz_forward(a3, iters)[0]
        return z.reshape(*batch, d, d)
    return _newton_schulz_autograd(a3, iters, max_abs.reshape(-1, 1, 1).to(a.dtype)).reshape(
        *batch, d, d
    )


def _newton_schulz_autograd(a3: Tensor, iters: int, bound: Tensor | None = None) -> Tensor:
    """The coupled iteration with plain autograd (and the optional divergence guard): the
    reference for :class:`_NewtonSchulz`, used with ``max_abs`` and for double backward."""
    d = a3.shape[-1]
    eye = torch.eye(d, dtype=a3.dtype, device=a3.device)
    z = 1.5 * eye - 0.5 * a3  # k = 1 with Z_0 = I, Y_0 = A: S_1 = Z_1
    y = torch.bmm(a3, z)
    for _ in range(iters - 1):
        s = torch.baddbmm(eye, z, y, beta=1.5, alpha=-0.5)
        y_new, z_new = torch.bmm(y, s), torch.bmm(s, z)
        if bound is None:
            y, z = y_new, z_new
        else:
            ok = z_new.detach().abs().amax((-2, -1), keepdim=True) <= bound
            y, z = torch.where(ok, y_new, y), torch.where(ok, z_new, z)
    return z


def _newton_schulz_forward(a: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """T ≥ 1 coupled Newton–Schulz steps on a (B, d, d); returns Z_T and the stacked iterates the
    backward needs: Z_1..Z_{T−1}, Y_1..Y_{T−1} and S_2..S_T (each (T − 1, B, d, d), written in
    place into one buffer each). Y_T is not formed (only Z_T is returned)."""
    b, d, _ = a.shape
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    z1 = torch.add(1.5 * eye, a, alpha=-0.5)  # Z_1 = 1.5 I − 0.5 A
    if iters == 1:
        return z1, z1.unsqueeze(0), z1.unsqueeze(0), z1.unsqueeze(0)
    zs = a.new_empty(iters - 1, b, d, d)
    ys = a.new_empty(iters - 1, b, d, d)
    ss = a.new_empty(iters - 1, b, d, d)
    zs[0] = z1
    torch.bmm(a, z1, out=ys[0])  # Y_1 = A Z_1
    for k in range(1, iters):  # step k + 1: S, then Z (and Y except at the last step)
        s = torch.baddbmm(eye, zs[k - 1], ys[k - 1], beta=1.5, alpha=-0.5, out=ss[k - 1])
        if k == iters - 1:
            return torch.bmm(s, zs[k - 1]), zs, ys, ss
        torch.bmm(s, zs[k - 1], out=zs[k])
        torch.bmm(ys[k - 1], s, out=ys[k])
    raise AssertionError("unreachable")


class _NewtonSchulz(torch.autograd.Function):
    """Z_T of the coupled Newton–Schulz iteration (see :func:`newton_inverse_sqrt`) with a
    hand-written reverse pass.

    Forward: 3T − 3 batched d × d products (Y_T, which autograd's version also forms, is never
    needed), the iterates stored in three preallocated stacks instead of ~3T separate tensors.
    Backward: for each step ``S = 1.5I − 0.5 Z Y``, ``Z' = S Z``, ``Y' = Y S`` (given ∂Z', ∂Y'):
    ``∂S = ∂Z' Zᵀ + Yᵀ ∂Y'``, ``∂Z = Sᵀ ∂Z' − 0.5 ∂S Yᵀ``, ``∂Y = ∂Y' Sᵀ − 0.5 Zᵀ ∂S`` (six
    products, four at the last step where ∂Y' = 0), then Z_1 = 1.5I − 0.5A, Y_1 = A Z_1 — exactly
    autograd's chain rule for the same iteration, with the products accumulated in place.
    Double backward (``create_graph=True``) differentiates the plain-autograd iteration instead.
    """

    @staticmethod
    def forward(ctx, a: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        z, zs, ys, ss = _newton_schulz_forward(a, iters)
        ctx.save_for_backward(a, zs, ys, ss)
        ctx.iters = iters
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        a, zs, ys, ss = ctx.saved_tensors
        iters = ctx.iters
        if torch.is_grad_enabled():  # create_graph=True: differentiate the autograd iteration
            with torch.enable_grad():
                z = _newton_schulz_autograd(a, iters)
            (ga,) = torch.autograd.grad(z, a, grad, create_graph=True)
            return ga, None
        if iters == 1:
            return grad * -0.5, None
        gz = grad
        gy: Tensor | None = None
        work = grad.new_empty(5, *grad.shape)  # ∂S and two ping-pong pairs for ∂Z, ∂Y
        g_s = work[0]
        for i, k in enumerate(range(iters - 1, 0, -1)):  # the step that made Z_{k+1}, Y_{k+1}
            s, z, y = ss[k - 1], zs[k - 1], ys[k - 1]
            torch.bmm(gz, z.mT, out=g_s)
            if gy is not None:
                g_s.baddbmm_(y.mT, gy)
            gz_new = torch.bmm(s.mT, gz, out=work[1 + i % 2]).baddbmm_(g_s, y.mT, alpha=-0.5)
            gy_new = torch.bmm(z.mT, g_s, out=work[3 + i % 2]).mul_(-0.5)
            if gy is not None:
                gy_new.baddbmm_(gy, s.mT)
            gz, gy = gz_new, gy_new
        assert gy is not None
        z1 = zs[0]
        ga = torch.bmm(gy, z1.mT)  # Y_1 = A Z_1, Z_1 = 1.5 I − 0.5 A
        ga.baddbmm_(a.mT, gy, alpha=-0.5).sub_(gz, alpha=0.5)
        return ga, None


# With T <= this many steps the iterate cannot grow enough to overflow (|Z| <= 1.5^T), so the
# divergence guard of newton_inverse_sqrt (a few extra small ops per step) is skipped.
_GUARD_AFTER = 10


def iternorm_whitening_matrix(sigma: Tensor, iters: int, eps: float | None = None) -> Tensor:
    r"""IterNorm's approximation of :math:`\Sigma^{-1/2}` (Huang et al., Eq. 3–5).

    :math:`\Sigma_N = \Sigma/\operatorname{tr}\Sigma`, T Newton steps, then
    :math:`P_T/\sqrt{\operatorname{tr}\Sigma}`. Differentiable, including through the trace.
    ``eps`` (the ε included in Σ, so :math:`\lambda_{min}(\Sigma) \ge \epsilon`) enables, for
    T > 10, the divergence guard of :func:`newton_inverse_sqrt` with the bound
    :math:`2\sqrt{\operatorname{tr}\Sigma/\epsilon} \ge 2\|\Sigma_N^{-1/2}\|_2`.

    Shape: ``sigma`` ``(*, d, d)`` symmetric positive definite -> ``(*, d, d)``.
    """
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    bound = None
    if eps is not None and iters > _GUARD_AFTER:
        bound = 2.0 * (tr.detach() / eps).sqrt()
    p = newton_inverse_sqrt(sigma / tr[..., None, None], iters, bound)
    return p * tr.rsqrt()[..., None, None]


class _ZCAInvSqrt(torch.autograd.Function):
    """Σ ↦ D max(Λ, floor)^{-1/2} Dᵀ in float64 with the Loewner-matrix backward."""

    @staticmethod
    def forward(ctx, sigma: Tensor, floor: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        s64 = sigma.to(torch.float64)
        s64 = 0.5 * (s64 + s64.transpose(-1, -2))
        lam, vec = torch.linalg.eigh(s64)
        root = lam.clamp_min(floor).sqrt()
        w = (vec / root.unsqueeze(-2)) @ vec.transpose(-1, -2)
        ctx.save_for_backward(vec, root)
        ctx.in_dtype = sigma.dtype
        ctx.mark_non_differentiable(lam)
        return w.to(sigma.dtype), lam.to(sigma.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w: Tensor, grad_lam: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        vec, root = ctx.saved_tensors
        g = grad_w.to(torch.float64)
        g = 0.5 * (g + g.transpose(-1, -2))
        m = vec.transpose(-1, -2) @ g @ vec
        ri, rj = root.unsqueeze(-1), root.unsqueeze(-2)
        k = -1.0 / (ri * rj * (ri + rj))  # divided differences of λ^{-1/2}; diagonal = -½λ^{-3/2}
        grad_sigma = vec @ (k * m) @ vec.transpose(-1, -2)
        return grad_sigma.to(ctx.in_dtype), None


def zca_whitening_matrix(
    sigma: Tensor, min_eigenvalue: float = 1e-5, return_eigenvalues: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    r"""ZCA whitening matrix :math:`D\Lambda^{-1/2}D^T` of a symmetric ``sigma`` (Huang et al., Eq. 2).

    The eigendecomposition runs in float64; eigenvalues below ``min_eigenvalue`` are clamped to it
    (the documented fallback for singular / ill-conditioned input; DBN passes its ε, below which the
    eigenvalues of Σ = cov + εI can only fall by rounding). The backward uses the divided
    differences of :math:`\lambda^{-1/2}` in closed form, so it is finite for repeated eigenvalues.
    With ``return_eigenvalues`` also returns the (unclamped, non-differentiable) eigenvalues.

    Shape: ``sigma`` ``(*, d, d)`` -> ``(*, d, d)`` (and ``(*, d)``).
    """
    if not min_eigenvalue > 0:
        raise ValueError(
            f"zca_whitening_matrix: min_eigenvalue must be > 0, got {min_eigenvalue!r}"
        )
    w, lam = _ZCAInvSqrt.apply(sigma, float(min_eigenvalue))
    return (w, lam) if return_eigenvalues else w


# --------------------------------------------------------------------------------------------
# The m × d part: batched views, statistics and the output product
# --------------------------------------------------------------------------------------------


def _part_batches(x: Tensor, layout: GroupLayout) -> list[tuple[Tensor, int]]:
    """:func:`normlab.nn.stats.group_batch` of each uniform part (all groups, or the full groups
    and the last smaller one) of ``(N, C, *)`` input: ``(R·groups, size, L)`` batches for
    left-multiplication by per-group ``size × size`` blocks, shared by the statistics and the
    output product. (``(N, C)`` input uses row batches, see :func:`_whiten_2d`.)"""
    out = []
    for start, _, groups, size in layout.parts():
        width = groups * size
        xs = x if width == x.shape[1] else x[:, start : start + width]
        out.append(group_batch(xs, size))
    return out


class _RowGramSums(torch.autograd.Function):
    """``A ↦ (Σ_n A[:, n], AᵀA)`` for row batches ``A`` (B, N, d): the product of
    :func:`normlab.nn.stats.gram_sums` for the row layout, with its one-product backward
    ``A (Ḡ + Ḡᵀ) + 1 s̄ᵀ`` in A's own layout. Twice differentiable."""

    @staticmethod
    def forward(ctx, a: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.set_materialize_grads(False)
        return a.sum(1), torch.bmm(a.mT, a)

    @staticmethod
    def backward(ctx, grad_s1: Tensor | None, grad_outer: Tensor | None) -> Tensor | None:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        if grad_outer is None:
            return None if grad_s1 is None else grad_s1.unsqueeze(1).expand_as(a)
        sym = grad_outer + grad_outer.mT
        if grad_s1 is None:
            return torch.bmm(a, sym)
        return torch.baddbmm(grad_s1.unsqueeze(1), a, sym)


class _RowProduct(torch.autograd.Function):
    """``Y = X_g W_gᵀ + b_g`` for row batches ``X`` (G, N, d), written straight into the
    ``(N, G·d)`` output through a strided view (autograd's ``baddbmm`` would return (G, N, d) and
    need a transposing copy back). Backward: ``∂X = ∂Y W``, ``∂W = (Xᵀ ∂Y)ᵀ``, ``∂b = Σ_n ∂Y``
    on the (G, N, d) view of ∂Y. Twice differentiable."""

    @staticmethod
    def forward(ctx, rows: Tensor, w: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        g, n, d = rows.shape
        y = rows.new_empty(n, g * d)
        torch.baddbmm(shift.unsqueeze(1), rows, w.mT, out=y.view(n, g, d).transpose(0, 1))
        ctx.save_for_backward(rows, w)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, w = ctx.saved_tensors
        g, n, d = rows.shape
        gy_t = gy.reshape(n, g, d).transpose(0, 1)  # (G, N, d)
        need_x, need_w, need_b = ctx.needs_input_grad
        g_rows = torch.bmm(gy_t, w) if need_x else None
        g_w = torch.bmm(rows.mT, gy_t).mT if need_w else None
        g_b = gy_t.sum(1) if need_b else None
        return g_rows, g_w, g_b


def _row_gram_sums(rows: Tensor) -> CovarianceSums:
    """Covariance sums (count N, Σx (B, d), Σ x xᵀ (B, d, d)) of a row batch (B, N, d), through
    :func:`normlab.nn.stats.reduce_sums` like :func:`normlab.nn.stats.gram_sums`."""
    count = torch.tensor(float(rows.shape[1]), dtype=rows.dtype, device=rows.device)
    s1, outer = _RowGramSums.apply(rows)
    return CovarianceSums(*reduce_sums(count, s1, outer))


def _unbatched(y: Tensor, shape: torch.Size, groups: int, size: int) -> Tensor:
    """Inverse of :func:`normlab.nn.stats.group_batch` for a part's output: ``(N, groups·size, *)``."""
    n = shape[0]
    if len(shape) == 2:
        return y.permute(2, 0, 1).reshape(n, groups * size)
    return y.reshape(n, groups * size, *shape[2:])


def _pad_blocks(blocks: list[Tensor], d: int) -> Tensor:
    """Stack per-part ``(g, k, k)`` blocks into ``(G, d, d)``, padding a smaller last block with an
    identity block (a fixed point of Newton's iteration and of the ZCA transform)."""
    if len(blocks) == 1 and blocks[0].shape[-1] == d:
        return blocks[0]
    out = []
    for b in blocks:
        k = b.shape[-1]
        if k < d:
            pad = torch.zeros(b.shape[0], d, d, dtype=b.dtype, device=b.device)
            idx = torch.arange(k, d, device=b.device)
            pad[:, idx, idx] = 1.0
            b = F.pad(b, (0, d - k, 0, d - k)) + pad
        out.append(b)
    return torch.cat(out, 0)


def _pad_channels(v: Tensor, layout: GroupLayout, value: float) -> Tensor:
    """``(C,)`` -> ``(num_groups, d)``, padding the last group with ``value``."""
    total = layout.num_groups * layout.group_size
    if total != v.shape[0]:
        v = F.pad(v, (0, total - v.shape[0]), value=value)
    return v.reshape(layout.num_groups, layout.group_size)


def _batch_moments(batches: list[tuple[Tensor, int]], eps: float) -> tuple[Tensor, list[Tensor]]:
    """Mean ``(C,)`` and per-part covariances ``Σ = XcXcᵀ/m + εI`` ``(g, k, k)`` from the covariance
    sums of each part (:func:`normlab.nn.stats.gram_sums`)."""
    means, sigmas = [], []
    for xb, reps in batches:
        count, s1, outer = gram_sums(xb, reps)
        mu = s1 / count
        eye = torch.eye(mu.shape[-1], dtype=outer.dtype, device=outer.device)
        sigmas.append(outer / count - mu.unsqueeze(-1) * mu.unsqueeze(-2) + eps * eye)
        means.append(mu.reshape(-1))
    return (torch.cat(means) if len(means) > 1 else means[0]), sigmas


def _fold_affine(
    layout: GroupLayout, wm: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``W_eff = diag(γ) W`` (G, d, d) and ``b = β − W_eff μ`` (G, d): the affine and the centring
    folded into the blocks and a shift, so that the output product is the only pass over the
    data."""
    w_eff = wm
    if weight is not None:
        w_eff = wm * _pad_channels(weight.to(wm.dtype), layout, 1.0).unsqueeze(-1)
    mu = _pad_channels(mean, layout, 0.0)
    shift = -(w_eff @ mu.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        shift = shift + _pad_channels(bias.to(wm.dtype), layout, 0.0)
    return w_eff, shift


def _apply_whitening(
    batches: list[tuple[Tensor, int]],
    shape: torch.Size,
    layout: GroupLayout,
    wm: Tensor,
    mean: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """``y = γ ⊙ W (x - μ) + β`` with W block diagonal ``(G, d, d)``, as at most two ``baddbmm``
    (see :func:`_fold_affine`)."""
    w_eff, shift = _fold_affine(layout, wm, mean, weight, bias)
    outs = []
    for (xb, reps), (_, g0, groups, size) in zip(batches, layout.parts()):
        w = w_eff[g0 : g0 + groups, :size, :size]
        b = shift[g0 : g0 + groups, :size]
        if reps > 1:
            w = w.repeat(reps, 1, 1)
            b = b.repeat(reps, 1)
        y = torch.baddbmm(b.unsqueeze(-1), w, xb)
        outs.append(_unbatched(y, shape, groups, size))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


@functools.lru_cache(maxsize=64)
def _block_mask(num_groups: int, d: int, last: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a layout whose last group has ``last < d`` channels: the (G, d, d) mask of the real
    block entries and the (G, d) mask of the real channels (the rest is padding)."""
    real = torch.ones(num_groups, d, dtype=torch.bool, device=device)
    real[-1, last:] = False
    return real.unsqueeze(-1) & real.unsqueeze(-2), real


def _whiten_2d(
    x: Tensor,
    layout: GroupLayout,
    matrix_fn: Callable[[Tensor], Tensor],
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_wm: Tensor | None,
    training: bool,
    momentum: float,
) -> Tensor:
    """:func:`_whiten` for ``(N, C)`` input (already in the compute dtype), on *row batches*.

    The channels (zero-padded to G·d when d does not divide C) are copied once into a contiguous
    ``(G, N, d)`` batch — one N × d data matrix per group — used by the statistics
    (:class:`_RowGramSums`, ``XᵀX``) and the output product (``X W_effᵀ``), and the output is
    copied back to ``(N, C)``. (The ``(G, d, N)`` view of :func:`normlab.nn.stats.group_batch`
    has the batch as its strided inner dimension: products on it, the transposed output and the
    gradient accumulated through it each pay a slow transposing copy.) A zero-padded channel has
    zero mean and zero covariance with the others, so the padded last block of Σ is
    ``blockdiag(Σ_last, εI)``; the matrix functions replace its padding by the identity, as for
    ``(N, C, *)`` input, so the last group is still whitened on its own."""
    n, c = x.shape
    g, d = layout.num_groups, layout.group_size
    if g * d != c:
        x = F.pad(x, (0, g * d - c))
    rows = x.reshape(n, g, d).transpose(0, 1).contiguous()
    if training:
        count, s1, outer = _row_gram_sums(rows)
        mu = s1 / count  # (G, d)
        eye = torch.eye(d, dtype=outer.dtype, device=outer.device)
        wm = matrix_fn(outer / count - mu.unsqueeze(-1) * mu.unsqueeze(-2) + eps * eye)
        mean = mu.reshape(-1)[:c]
        if running_mean is not None and running_wm is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_wm.lerp_(wm.detach().to(running_wm.dtype), momentum)
    else:
        if running_mean is None or running_wm is None:
            raise ValueError("running_mean and running_wm are required when training=False")
        mean, wm = running_mean.to(x.dtype), running_wm.to(x.dtype)
    w_eff, shift = _fold_affine(layout, wm, mean, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w_eff, shift)):
        y = _RowProduct.apply(rows, w_eff, shift)
    else:
        y = rows.new_empty(n, g * d)
        torch.baddbmm(shift.unsqueeze(1), rows, w_eff.mT, out=y.view(n, g, d).transpose(0, 1))
    return y if g * d == c else y[:, :c].contiguous()


# --------------------------------------------------------------------------------------------
# Functional forms
# --------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _resolve_stat_dtype(stat_dtype: object, layer: str) -> torch.dtype | None:
    if stat_dtype is None:
        return None
    if isinstance(stat_dtype, torch.dtype) and stat_dtype in _DTYPES.values():
        return stat_dtype
    if isinstance(stat_dtype, str) and stat_dtype.lower() in _DTYPES:
        return _DTYPES[stat_dtype.lower()]
    raise ValueError(
        f"{layer}: stat_dtype must be None, 'float32' or 'float64', got {stat_dtype!r}"
    )


def _compute_dtype(x: Tensor, stat_dtype: torch.dtype | None) -> torch.dtype:
    return default_stat_dtype(x) if stat_dtype is None else stat_dtype


def _no_autocast(x: Tensor):
    dev = x.device.type
    if torch.amp.is_autocast_available(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return nullcontext()


def _whiten(
    x: Tensor,
    layout: GroupLayout,
    matrix_fn: Callable[[Tensor], Tensor],
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_wm: Tensor | None,
    training: bool,
    momentum: float,
    stat_dtype: torch.dtype | None,
) -> Tensor:
    """Shared forward of both layers: batch statistics and ``matrix_fn(Σ parts) -> W (G, d, d)``
    in training (updating the running buffers, Eq. 8), the running buffers in eval, then
    ``γ ⊙ W(x − μ) + β``; everything in the compute dtype with autocast off."""
    dt = _compute_dtype(x, stat_dtype)
    with _no_autocast(x):
        if x.dim() == 2:
            y = _whiten_2d(
                x.to(dt), layout, matrix_fn, eps, weight, bias, running_mean, running_wm,
                training, momentum,
            )  # fmt: skip
            return y.to(x.dtype)
        batches = _part_batches(x.to(dt), layout)
        if training:
            mean, sigmas = _batch_moments(batches, eps)
            wm = matrix_fn(_pad_blocks(sigmas, layout.group_size))
            if running_mean is not None and running_wm is not None:
                with torch.no_grad():
                    running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                    running_wm.lerp_(wm.detach().to(running_wm.dtype), momentum)
        else:
            if running_mean is None or running_wm is None:
                raise ValueError("running_mean and running_wm are required when training=False")
            mean, wm = running_mean.to(dt), running_wm.to(dt)
        y = _apply_whitening(batches, x.shape, layout, wm, mean, weight, bias)
    return y.to(x.dtype)


def _iternorm_matrix_fn(layout: GroupLayout, iters: int, eps: float):
    """Σ (G, d, d) -> IterNorm's W (G, d, d). When the last group is smaller than d, the
    padding of its block (whatever it holds) is replaced by the identity before the iteration
    (a fixed point of Eq. 3, and it leaves that group's trace alone) and after it."""

    def fn(sigma: Tensor) -> Tensor:
        diag = sigma.diagonal(dim1=-2, dim2=-1)
        if layout.last:
            mask, real = _block_mask(
                layout.num_groups, layout.group_size, layout.last, sigma.device
            )
            eye = torch.eye(layout.group_size, dtype=sigma.dtype, device=sigma.device)
            tr = torch.where(real, diag, 0.0).sum(-1)
            sigma_n = torch.where(mask, sigma / tr[:, None, None], eye)
        else:
            tr = diag.sum(-1)
            sigma_n = sigma / tr[:, None, None]
        bound = 2.0 * (tr.detach() / eps).sqrt() if iters > _GUARD_AFTER else None
        wm = newton_inverse_sqrt(sigma_n, iters, bound) * tr.rsqrt()[:, None, None]
        if layout.last:  # keep the unused padding of the last group at the identity
            wm = torch.where(mask, wm, eye)
        return wm

    return fn


def _dbn_matrix_fn(layout: GroupLayout, eps: float, max_condition: float | None):
    """Σ (G, d, d) -> DBN's W (G, d, d); the padding of a smaller last group's block is replaced
    by the identity before the eigendecomposition and after it."""
    d = layout.group_size

    def fn(sigma: Tensor) -> Tensor:
        eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
        if layout.last:
            mask, _ = _block_mask(layout.num_groups, d, layout.last, sigma.device)
            sigma = torch.where(mask, sigma, eye)
        # never hand LAPACK a non-finite matrix (it may fail to converge or return NaN): such
        # groups get W = I, and their output is non-finite anyway because their mean is
        finite = torch.isfinite(sigma.abs().amax((-2, -1)))  # (amax propagates NaN)
        sigma = torch.where(finite[:, None, None], sigma, eye)
        wm, lam = _ZCAInvSqrt.apply(sigma, eps)
        if max_condition is not None:
            _check_condition(lam, finite, max_condition)
        if layout.last:
            wm = torch.where(mask, wm, eye)
        return wm

    return fn


def _check_condition(lam: Tensor, finite: Tensor, max_condition: float) -> None:
    """Explicit check (one host synchronisation) of each group's covariance: finite, and condition
    number λ_max / λ_min <= ``max_condition``."""
    lo, hi = lam[..., 0], lam[..., -1]
    cond = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(lam.dtype).tiny), torch.inf)
    bad = ~finite | ~(cond <= max_condition)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        if not bool(finite.all()):
            raise ValueError(
                f"DBN: the covariance of group(s) {(~finite).nonzero().flatten().tolist()} is "
                "non-finite (the input contains inf/NaN, or its squares overflow the statistics "
                "dtype)"
            )
        raise ValueError(
            f"DBN: the covariance of group(s) {idx} is too ill-conditioned for a stable ZCA "
            f"whitening (condition numbers {[float(c) for c in cond[bad]]} > max_condition="
            f"{max_condition}); increase eps, reduce group_size, or set max_condition=None to "
            "whiten with eigenvalues clamped at eps"
        )


def _check_functional_args(
    x: Tensor, group_size: int, eps: float, momentum: float, name: str
) -> None:
    check_input(x, x.shape[1] if x.dim() >= 2 else 0, name)
    check_positive_int(group_size, "group_size", name)
    check_eps(eps, name)
    check_momentum(momentum, name)


def iterative_normalization(
    x: Tensor,
    group_size: int = 64,
    iters: int = 5,
    eps: float = 1e-5,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_wm: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    stat_dtype: str | torch.dtype | None = None,
) -> Tensor:
    """Functional IterNorm (Huang et al., Alg. 1, Eq. 3–5, 8); see :class:`IterNorm`.

    In training mode, ``running_mean`` (C,) and ``running_wm`` (num_groups, d, d), when given, are
    updated in place; with ``training=False`` they are used instead of batch statistics.
    """
    name = "iterative_normalization"
    _check_functional_args(x, group_size, eps, momentum, name)
    check_positive_int(iters, "iters", name, minimum=0)
    layout = group_layout(x.shape[1], group_size)
    fn = _iternorm_matrix_fn(layout, iters, eps)
    dt = _resolve_stat_dtype(stat_dtype, "iterative_normalization")
    return _whiten(
        x, layout, fn, eps, weight, bias, running_mean, running_wm, training, momentum, dt
    )


def decorrelated_batch_norm(
    x: Tensor,
    group_size: int = 16,
    eps: float = 1e-5,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_wm: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    stat_dtype: str | torch.dtype | None = None,
    max_condition: float | None = None,
) -> Tensor:
    """Functional DBN (ZCA whitening, Huang et al., Eq. 2; running statistics as Eq. 8); see :class:`DBN`."""
    _check_functional_args(x, group_size, eps, momentum, "decorrelated_batch_norm")
    layout = group_layout(x.shape[1], group_size)
    fn = _dbn_matrix_fn(layout, eps, max_condition)
    dt = _resolve_stat_dtype(stat_dtype, "decorrelated_batch_norm")
    return _whiten(
        x, layout, fn, eps, weight, bias, running_mean, running_wm, training, momentum, dt
    )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

_FOLD_KINDS = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}


class _Whitening(nn.Module, abc.ABC):
    """Shared parameters, buffers, eval path and folding of :class:`IterNorm` and :class:`DBN`."""

    _layer = "Whitening"

    def __init__(
        self,
        num_features: int,
        group_size: int,
        eps: float,
        momentum: float,
        affine: bool,
        stat_dtype: str | torch.dtype | None,
    ) -> None:
        super().__init__()
        name = self._layer
        self.num_features = check_positive_int(num_features, "num_features", name)
        self.requested_group_size = check_positive_int(group_size, "group_size", name)
        self.layout = group_layout(num_features, group_size)
        self.group_size = self.layout.group_size
        self.num_groups = self.layout.num_groups
        self.eps = check_eps(eps, name)
        self.momentum = check_momentum(momentum, name)
        self._stat_dtype = _resolve_stat_dtype(stat_dtype, name)
        self.stat_dtype = None if self._stat_dtype is None else str(self._stat_dtype).split(".")[-1]
        self.affine = add_channel_affine(self, num_features, affine, name)
        d = self.group_size
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_wm", torch.eye(d).repeat(self.num_groups, 1, 1))
        self._last_ndim: int | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_mean ← 0, running_wm ← I (Huang et al., Sec. 3.3)."""
        self.running_mean.zero_()
        eye = torch.eye(self.group_size, dtype=self.running_wm.dtype, device=self.running_wm.device)
        self.running_wm.copy_(eye.expand_as(self.running_wm))

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_channel_affine(self)

    @abc.abstractmethod
    def _matrix_fn(self) -> Callable[[Tensor], Tensor]:
        """The per-group whitening-matrix function: IterNorm's Newton iteration, DBN's ZCA."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, self._layer)
        self._last_ndim = x.dim()
        return _whiten(
            x,
            self.layout,
            self._matrix_fn(),
            self.eps,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_wm,
            self.training,
            self.momentum,
            self._stat_dtype,
        )

    def whitening_matrix(self) -> Tensor:
        """The running whitening matrix as a dense block-diagonal ``(C, C)`` tensor (no affine)."""
        g, d = self.num_groups, self.group_size
        wm = self.running_wm
        full = wm.new_zeros(g, d, g, d)
        idx = torch.arange(g, device=wm.device)
        full[idx, :, idx, :] = wm
        c = self.num_features
        return full.reshape(g * d, g * d)[:c, :c]

    @torch.no_grad()
    def fold(self, kind: str | None = None) -> nn.Module:
        """Eval-mode layer as an equivalent ``nn.Linear`` / ``nn.Conv1d/2d/3d`` with 1 × 1 kernel
        (Huang et al., Sec. 3.3): weight ``diag(γ)·Σ̂^{-1/2}``, bias ``β − diag(γ)·Σ̂^{-1/2}·μ̂``.

        ``kind`` is ``"linear"`` (for (N, C) input), ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``; by
        default it follows the rank of the last input this layer saw (ValueError if it saw none).
        Convolutions use ``groups=num_groups`` (the weight stays block diagonal) when the groups are
        all of equal size, a dense C × C weight otherwise; ``nn.Linear`` is always dense. The result
        is on the buffers' device and dtype, in eval mode.
        """
        if kind is None:
            inv = {v: k for k, v in _FOLD_KINDS.items()}
            if self._last_ndim not in inv:
                raise ValueError(
                    f"{self._layer}.fold: pass kind= one of {sorted(_FOLD_KINDS)} (it is inferred "
                    f"from the last input's rank, and no 2- to 5-D input has been seen)"
                )
            kind = inv[self._last_ndim]
        if kind not in _FOLD_KINDS:
            raise ValueError(
                f"{self._layer}.fold: kind must be one of {sorted(_FOLD_KINDS)}, got {kind!r}"
            )
        c, d, g = self.num_features, self.group_size, self.num_groups
        wm, mu = self.running_wm, self.running_mean
        gamma = self.weight if self.affine else torch.ones_like(mu)
        beta = self.bias if self.affine else torch.zeros_like(mu)
        dense = self.whitening_matrix() * gamma.unsqueeze(-1)
        bias = beta - dense @ mu
        fk = {"device": mu.device, "dtype": mu.dtype}
        if kind == "linear":
            layer: nn.Module = nn.Linear(c, c, **fk)
            layer.weight.copy_(dense)
        else:
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
            grouped = self.layout.last == 0 and g > 1
            groups = g if grouped else 1
            layer = conv(c, c, 1, groups=groups, **fk)
            if grouped:
                w = wm * _pad_channels(gamma, self.layout, 1.0).unsqueeze(-1)
                w = w.reshape(c, d)
            else:
                w = dense
            layer.weight.copy_(w.reshape(layer.weight.shape))
        layer.bias.copy_(bias)
        return layer.eval()

    def _extra_args(self) -> str:
        return ""

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, group_size={self.group_size}{self._extra_args()}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )
        if self.stat_dtype is not None:
            s += f", stat_dtype={self.stat_dtype}"
        return s


@register_norm(
    "iternorm", "Iterative Normalization: group whitening by Newton's iteration (Huang et al.)"
)
class IterNorm(_Whitening):
    r"""Iterative Normalization (Huang et al., Sec. 3, Algorithm 1; module docstring has the math).

    Per group of ``group_size`` channels, over all N·H·W positions: centre, Σ = XcXcᵀ/m + εI,
    :math:`\Sigma^{-1/2} \approx P_T/\sqrt{\operatorname{tr}\Sigma}` from ``iters`` = T Newton steps
    on :math:`\Sigma/\operatorname{tr}\Sigma` (Eq. 3–5), output :math:`\Sigma^{-1/2}X_c`, then the
    per-channel affine. Gradients by autograd through everything, tr(Σ) included (Eq. 6–7).
    Running mean and whitening matrix (Eq. 8) are used in eval mode; :meth:`fold` gives the
    equivalent 1 × 1 convolution / linear layer.

    Args:
        num_features: C.
        group_size: channels per whitening group d (clamped to C; a smaller last group when it
            does not divide C). ``group_size=1`` is batch normalization.
        iters: Newton iterations T >= 0; ``iters=0`` is trace normalization only.
        eps: ε added to the covariance diagonal.
        momentum: running-statistics momentum (PyTorch convention).
        affine: learnable per-channel γ (``weight``) and β (``bias``).
        stat_dtype: ``None`` (float32 for half input, else the input dtype), ``"float32"`` or
            ``"float64"``: dtype of the statistics, the whitening matrix and the output product.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    _layer = "IterNorm"

    def __init__(
        self,
        num_features: int,
        group_size: int = 64,
        iters: int = 5,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        stat_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, group_size, eps, momentum, affine, stat_dtype)
        self.iters = check_positive_int(iters, "iters", self._layer, minimum=0)

    def _matrix_fn(self) -> Callable[[Tensor], Tensor]:
        return _iternorm_matrix_fn(self.layout, self.iters, self.eps)

    def _extra_args(self) -> str:
        return f", iters={self.iters}"


@register_norm("dbn", "Decorrelated Batch Normalization: group ZCA whitening by eigendecomposition")
class DBN(_Whitening):
    r"""Decorrelated Batch Normalization: group-wise ZCA whitening (Huang et al., Eq. 2).

    Like :class:`IterNorm` (same grouping, running statistics, affine and :meth:`fold`) but
    :math:`\Sigma^{-1/2} = D\Lambda^{-1/2}D^T` from a float64 symmetric eigendecomposition, with the
    eigenvalues clamped below at ε (no host sync; finite output and gradients for singular or
    ill-conditioned groups) and a closed-form backward that is finite for repeated eigenvalues.

    Args:
        num_features, group_size, eps, momentum, affine, stat_dtype: as :class:`IterNorm`
            (``group_size`` defaults to 16).
        max_condition: if set, every training forward checks (one host synchronisation) that each
            group's covariance is finite with condition number λ_max/λ_min <= ``max_condition``
            and raises ``ValueError`` otherwise. ``None`` (default): no check.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    _layer = "DBN"

    def __init__(
        self,
        num_features: int,
        group_size: int = 16,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        stat_dtype: str | torch.dtype | None = None,
        max_condition: float | None = None,
    ) -> None:
        super().__init__(num_features, group_size, eps, momentum, affine, stat_dtype)
        if max_condition is not None and (
            isinstance(max_condition, bool)
            or not isinstance(max_condition, int | float)
            or not max_condition >= 1
        ):
            raise ValueError(
                f"DBN: max_condition must be None or a number >= 1, got {max_condition!r}"
            )
        self.max_condition = None if max_condition is None else float(max_condition)

    def _matrix_fn(self) -> Callable[[Tensor], Tensor]:
        return _dbn_matrix_fn(self.layout, self.eps, self.max_condition)

    def _extra_args(self) -> str:
        return "" if self.max_condition is None else f", max_condition={self.max_condition}"
