r"""Kernels of IterNorm and DBN (Huang et al.): hand-written backwards and fused fast paths.

Each computes what the plain functional of :mod:`normlab.nn.whitening` computes (which runs under
``normlab.use_kernels(False)``), faster or with less memory:

* :func:`newton_schulz`: the coupled Newton iteration for :math:`A^{-1/2}` (Huang et al., Eq. 3)
  with a written-out reverse pass (``_NewtonSchulz``): 3T − 3 batched d × d products forward,
  six per step backward. Under ``create_graph=True`` the backward recomputes the iterates from
  the saved input, so autograd differentiates the reverse pass itself (double backward).
* :func:`zca_inv_sqrt`: ZCA :math:`D\Lambda^{-1/2}D^T` (Eq. 2) in float64 with the closed-form
  backward of the matrix function (``_ZCAInvSqrt``): the Loewner matrix
  :math:`K_{ij} = -1/(\sqrt{\lambda_i}\sqrt{\lambda_j}(\sqrt{\lambda_i} + \sqrt{\lambda_j}))`,
  finite for repeated eigenvalues, where autograd's eigenvector backward divides by
  :math:`\lambda_i - \lambda_j`. Once differentiable.
* :func:`iternorm_blocks`, :func:`padded_blocks`: the d × d work of all groups as one batched
  call, a smaller last group padded with an identity block (exact: the blocks never mix, and
  the identity is a fixed point of Eq. 3 and of the ZCA transform).
* :func:`whiten`: the m × d part. The affine and the centring are folded into the blocks and a
  shift (``W_eff = diag(γ) W``, ``b = β − W_eff μ``), so the output is at most two ``baddbmm``.
  ``(N, C, *)`` input shares one :func:`normlab.nn.stats.group_batch` view between the statistics
  and the output product; ``(N, C)`` input is copied once into contiguous *row batches*
  ``(G, N, d)`` (the channels zero-padded to G·d) shared by ``XᵀX`` (``_RowGramSums``) and
  ``X W_effᵀ`` (``_RowProduct``, written straight into the ``(N, C)`` output in eager mode).

All batch sums go through :func:`normlab.nn.stats.reduce_sums`, so :func:`normlab.sync_stats`
synchronises the kernels exactly as it does the reference; :func:`moments` and
:func:`update_running` (shared with the reference) let a batch without positions take part with
zero sums and leave the running buffers untouched when no process had samples. Everything is
traceable by ``torch.compile(fullgraph=True)``: no ``torch.autograd.grad`` inside a Function, no
host synchronisation, buffer updates in place outside the Functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.nn.stats import CovarianceSums, gram_sums, group_batch, reduce_sums

__all__ = [
    "Layout",
    "WhitenArgs",
    "iternorm_blocks",
    "moments",
    "newton_schulz",
    "padded_blocks",
    "update_running",
    "whiten",
    "zca_inv_sqrt",
]


class WhitenArgs(NamedTuple):
    """The per-call arguments of a whitening forward (both paths): ε, the affine (``None`` for
    none), the running buffers (updated in place in training when given, required in eval), the
    mode and the momentum."""

    eps: float
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_wm: Tensor | None
    training: bool
    momentum: float


class Layout(Protocol):
    """What the kernels read of a :class:`normlab.nn.whitening.GroupLayout`."""

    @property
    def group_size(self) -> int: ...
    @property
    def last(self) -> int: ...
    @property
    def num_groups(self) -> int: ...
    def parts(self) -> list[tuple[int, int, int, int]]: ...


# --------------------------------------------------------------------------------------------
# The d × d part: Newton–Schulz and ZCA
# --------------------------------------------------------------------------------------------


def _newton_schulz_forward(
    a: Tensor, iters: int
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """T ≥ 1 coupled Newton–Schulz steps on a (B, d, d); returns Z_T and the iterates the backward
    needs: Z_1..Z_{T−1}, Y_1..Y_{T−1} and S_2..S_T. Y_T is not formed (only Z_T is returned).
    Plain out-of-place ops, so it is traceable and, under grad mode, differentiable."""
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    z = torch.add(1.5 * eye, a, alpha=-0.5)  # Z_1 = 1.5 I − 0.5 A
    if iters == 1:
        return z, [], [], []
    zs, ys, ss = [z], [torch.bmm(a, z)], []  # Y_1 = A Z_1
    for k in range(1, iters):  # step k + 1: S, then Z (and Y except at the last step)
        s = torch.baddbmm(eye, zs[-1], ys[-1], beta=1.5, alpha=-0.5)
        ss.append(s)
        z = torch.bmm(s, zs[-1])
        if k < iters - 1:
            zs.append(z)
            ys.append(torch.bmm(ys[-1], s))
    return z, zs, ys, ss


def _newton_schulz_backward(
    a: Tensor, zs: list[Tensor], ys: list[Tensor], ss: list[Tensor], grad: Tensor
) -> Tensor:
    """∂L/∂A from ∂L/∂Z_T by the reverse pass of :func:`_newton_schulz_forward`: for each step
    ``S = 1.5I − 0.5 Z Y``, ``Z' = S Z``, ``Y' = Y S`` (given ∂Z', ∂Y'): ``∂S = ∂Z' Zᵀ + Yᵀ ∂Y'``,
    ``∂Z = Sᵀ ∂Z' − 0.5 ∂S Yᵀ``, ``∂Y = ∂Y' Sᵀ − 0.5 Zᵀ ∂S`` (six products, four at the last
    step where ∂Y' = 0), then Z_1 = 1.5I − 0.5A, Y_1 = A Z_1. Out-of-place ops only, so autograd
    can differentiate it (double backward)."""
    if not ss:
        return grad * -0.5
    gz, gy = grad, None
    for s, z, y in zip(reversed(ss), reversed(zs), reversed(ys)):
        g_s = torch.bmm(gz, z.mT)
        if gy is not None:
            g_s = torch.baddbmm(g_s, y.mT, gy)
        gz_new = torch.baddbmm(torch.bmm(s.mT, gz), g_s, y.mT, alpha=-0.5)
        gy_new = torch.bmm(z.mT, g_s) * -0.5
        if gy is not None:
            gy_new = torch.baddbmm(gy_new, gy, s.mT)
        gz, gy = gz_new, gy_new
    assert gy is not None
    ga = torch.baddbmm(torch.bmm(gy, zs[0].mT), a.mT, gy, alpha=-0.5)
    return torch.sub(ga, gz, alpha=0.5)


class _NewtonSchulz(torch.autograd.Function):
    """Z_T of the coupled Newton–Schulz iteration with a hand-written reverse pass.

    Forward: 3T − 3 batched d × d products (Y_T, which autograd's version also forms, is never
    needed). Backward: :func:`_newton_schulz_backward`, exactly autograd's chain rule for the
    same iteration. Under ``create_graph=True`` the backward recomputes the iterates from the
    saved input so that autograd differentiates the whole reverse pass (double backward). No
    ``torch.autograd.grad`` inside, so ``torch.compile`` traces forward and backward.
    """

    @staticmethod
    def forward(ctx, a: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        z, zs, ys, ss = _newton_schulz_forward(a, iters)
        ctx.save_for_backward(a, *zs, *ys, *ss)
        ctx.iters = iters
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        a, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: iterates that depend on a
            _, zs, ys, ss = _newton_schulz_forward(a, ctx.iters)
        else:
            t = ctx.iters - 1
            zs, ys, ss = saved[:t], saved[t : 2 * t], saved[2 * t :]
        return _newton_schulz_backward(a, zs, ys, ss, grad), None


def newton_schulz(a: Tensor, iters: int) -> Tensor:
    """Z_T of T ≥ 1 coupled Newton–Schulz steps on ``a`` (B, d, d), with the hand-written
    backward when a gradient is needed and without storing any iterate otherwise."""
    if torch.is_grad_enabled() and a.requires_grad:
        return _NewtonSchulz.apply(a, iters)
    return _newton_schulz_forward(a, iters)[0]


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


def zca_inv_sqrt(sigma: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """``(D max(Λ, floor)^{-1/2} Dᵀ, Λ)`` of a symmetric ``sigma`` (*, d, d), the eigenvalues
    non-differentiable, with the closed-form (Loewner) backward."""
    return _ZCAInvSqrt.apply(sigma, floor)


def _block_mask(num_groups: int, d: int, last: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a layout whose last group has ``last < d`` channels: the (G, d, d) mask of the real
    block entries and the (G, d) mask of the real channels (the rest is padding). Not cached:
    a constant of the graph under ``torch.compile``, which does not trace through caches."""
    real = torch.ones(num_groups, d, dtype=torch.bool, device=device)
    real[-1, last:] = False
    return real.unsqueeze(-1) & real.unsqueeze(-2), real


def iternorm_blocks(
    sigma: Tensor, layout: Layout, rescaled_newton: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Σ (G, d, d) -> IterNorm's W (G, d, d) in one batched call: ``rescaled_newton(Σ_N, tr Σ)``
    (Eq. 3–5 on the trace-normalized Σ_N). When the last group is smaller than d, the padding of
    its block (whatever it holds) is replaced by the identity before the iteration (a fixed point
    of Eq. 3; the trace is taken over the real channels) and after it."""
    diag = sigma.diagonal(dim1=-2, dim2=-1)
    if layout.last:
        mask, real = _block_mask(layout.num_groups, layout.group_size, layout.last, sigma.device)
        eye = torch.eye(layout.group_size, dtype=sigma.dtype, device=sigma.device)
        tr = torch.where(real, diag, 0.0).sum(-1)
        sigma_n = torch.where(mask, sigma / tr[:, None, None], eye)
    else:
        tr = diag.sum(-1)
        sigma_n = sigma / tr[:, None, None]
    wm = rescaled_newton(sigma_n, tr)
    if layout.last:  # keep the unused padding of the last group at the identity
        wm = torch.where(mask, wm, eye)
    return wm


def padded_blocks(sigma: Tensor, layout: Layout, matrix: Callable[[Tensor], Tensor]) -> Tensor:
    """Σ (G, d, d) -> ``matrix(Σ)`` (G, d, d) in one batched call, the padding of a smaller last
    group's block replaced by the identity before and after (used for DBN's ZCA)."""
    if not layout.last:
        return matrix(sigma)
    d = layout.group_size
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
    mask, _ = _block_mask(layout.num_groups, d, layout.last, sigma.device)
    wm = matrix(torch.where(mask, sigma, eye))
    return torch.where(mask, wm, eye)


# --------------------------------------------------------------------------------------------
# The m × d part: statistics, folded affine and the output product
# --------------------------------------------------------------------------------------------


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


def _row_product(rows: Tensor, w: Tensor, shift: Tensor) -> Tensor:
    """``(N, G·d)`` output of ``X_g W_gᵀ + b_g`` for row batches ``X`` (G, N, d). Eager: written
    straight into the output through a strided view (``baddbmm`` alone would return (G, N, d)
    and need a transposing copy back). Under ``torch.compile`` / ``torch.export``, where an
    ``out=`` tensor must be contiguous, the same product with the transpose left to the
    compiler."""
    g, n, d = rows.shape
    if torch.compiler.is_compiling():
        return torch.baddbmm(shift.unsqueeze(1), rows, w.mT).transpose(0, 1).reshape(n, g * d)
    y = rows.new_empty(n, g * d)
    torch.baddbmm(shift.unsqueeze(1), rows, w.mT, out=y.view(n, g, d).transpose(0, 1))
    return y


class _RowProduct(torch.autograd.Function):
    """:func:`_row_product` with its backward on the (G, N, d) view of ∂Y: ``∂X = ∂Y W``,
    ``∂W = (Xᵀ ∂Y)ᵀ``, ``∂b = Σ_n ∂Y``. Twice differentiable."""

    @staticmethod
    def forward(ctx, rows: Tensor, w: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows, w)
        return _row_product(rows, w, shift)

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


def _part_batches(x: Tensor, layout: Layout) -> list[tuple[Tensor, int]]:
    """:func:`normlab.nn.stats.group_batch` of each uniform part (all groups, or the full groups
    and the last smaller one) of ``(N, C, *)`` input: ``(R·groups, size, L)`` batches for
    left-multiplication by per-group ``size × size`` blocks, shared by the statistics and the
    output product."""
    out = []
    for start, _, groups, size in layout.parts():
        width = groups * size
        xs = x if width == x.shape[1] else x[:, start : start + width]
        if x.numel() == 0:  # no positions: the (groups, size, 0) batch, whose sums are zero
            out.append((xs.reshape(groups, size, 0), 1))
        else:
            out.append(group_batch(xs, size))
    return out


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


def _pad_channels(v: Tensor, layout: Layout, value: float) -> Tensor:
    """``(C,)`` -> ``(num_groups, d)``, padding the last group with ``value``."""
    total = layout.num_groups * layout.group_size
    if total != v.shape[0]:
        v = F.pad(v, (0, total - v.shape[0]), value=value)
    return v.reshape(layout.num_groups, layout.group_size)


def moments(
    sums: CovarianceSums, eps: float, empty: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Huang et al., Alg. 1, lines 4 and 6 from covariance sums: ``μ = Σx/m`` (G, d) and
    ``Σ = Σxxᵀ/m − μμᵀ + εI`` (G, d, d), and ``valid`` for :func:`update_running`.

    ``empty`` (this process's batch has no positions) is a static shape fact, so no host sync:
    the sums are then the other processes' (under :func:`normlab.sync_stats`) or zero, m is
    clamped at 1 (finite statistics when no process had samples; nothing is whitened with them)
    and ``valid`` is the tensor ``m > 0``; otherwise ``valid`` is ``None``.
    """
    count, s1, outer = sums
    valid = None
    if empty:
        valid = count > 0
        count = count.clamp_min(1)
    mu = s1 / count
    eye = torch.eye(mu.shape[-1], dtype=outer.dtype, device=outer.device)
    return mu, outer / count - mu.unsqueeze(-1) * mu.unsqueeze(-2) + eps * eye, valid


def _batch_moments(
    batches: list[tuple[Tensor, int]], eps: float, empty: bool
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Mean ``(C,)``, per-part covariances ``Σ = XcXcᵀ/m + εI`` ``(g, k, k)`` and ``valid`` (see
    :func:`moments`) from the covariance sums of each part (:func:`normlab.nn.stats.gram_sums`)."""
    means, sigmas = [], []
    valid = None
    for xb, reps in batches:
        mu, sigma, valid = moments(gram_sums(xb, reps), eps, empty)  # one count for all parts
        sigmas.append(sigma)
        means.append(mu.reshape(-1))
    return (torch.cat(means) if len(means) > 1 else means[0]), sigmas, valid


def _fold_affine(
    layout: Layout, wm: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None
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
    layout: Layout,
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


def update_running(
    running_mean: Tensor | None,
    running_wm: Tensor | None,
    mean: Tensor,
    wm: Tensor,
    momentum: float,
    valid: Tensor | None = None,
) -> None:
    """Eq. 8 with PyTorch's momentum convention, in place, when the buffers (or views of them)
    are given; where the tensor ``valid`` (from :func:`moments`) is false the buffers keep their
    values exactly (an empty batch on every process), without a host sync."""
    if running_mean is None or running_wm is None:
        return
    with torch.no_grad():
        mean = mean.detach().to(running_mean.dtype)
        wm = wm.detach().to(running_wm.dtype)
        if valid is not None:
            mean = torch.where(valid, mean, running_mean)
            wm = torch.where(valid, wm, running_wm)
        running_mean.lerp_(mean, momentum)
        running_wm.lerp_(wm, momentum)


def _whiten_rows(
    x: Tensor, layout: Layout, blocks: Callable[[Tensor], Tensor], args: WhitenArgs
) -> Tensor:
    """:func:`whiten` for ``(N, C)`` input, on row batches. A zero-padded channel has zero mean and
    zero covariance with the others, so the padded last block of Σ is ``blockdiag(Σ_last, εI)``;
    ``blocks`` replaces its padding by the identity, as for ``(N, C, *)`` input, so the last group
    is still whitened on its own."""
    eps, weight, bias, running_mean, running_wm, training, momentum = args
    n, c = x.shape
    g, d = layout.num_groups, layout.group_size
    if g * d != c:
        x = F.pad(x, (0, g * d - c))
    rows = x.reshape(n, g, d).transpose(0, 1).contiguous()
    if training:
        mu, sigma, valid = moments(_row_gram_sums(rows), eps, n == 0)  # (G, d), (G, d, d)
        wm = blocks(sigma)
        mean = mu.reshape(-1)[:c]
        update_running(running_mean, running_wm, mean, wm, momentum, valid)
    else:
        assert running_mean is not None and running_wm is not None
        mean, wm = running_mean.to(x.dtype), running_wm.to(x.dtype)
    w_eff, shift = _fold_affine(layout, wm, mean, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, w_eff, shift)):
        y = _RowProduct.apply(rows, w_eff, shift)
    else:
        y = _row_product(rows, w_eff, shift)
    return y if g * d == c else y[:, :c].contiguous()


def whiten(
    x: Tensor, layout: Layout, blocks: Callable[[Tensor], Tensor], args: WhitenArgs
) -> Tensor:
    """Group whitening ``γ ⊙ W(x − μ) + β`` of ``x`` (already in the compute dtype, autocast off).

    In training, the batch mean and ``blocks(Σ) -> W`` (Σ the ``(G, d, d)`` covariances, a smaller
    last group padded, see :func:`iternorm_blocks` / :func:`padded_blocks`), and the running
    buffers, when given, updated in place (Eq. 8); in eval, the running buffers (required).
    """
    if x.dim() == 2:
        return _whiten_rows(x, layout, blocks, args)
    eps, weight, bias, running_mean, running_wm, training, momentum = args
    batches = _part_batches(x, layout)
    if training:
        mean, sigmas, valid = _batch_moments(batches, eps, x.numel() == 0)
        wm = blocks(_pad_blocks(sigmas, layout.group_size))
        update_running(running_mean, running_wm, mean, wm, momentum, valid)
    else:
        assert running_mean is not None and running_wm is not None
        mean, wm = running_mean.to(x.dtype), running_wm.to(x.dtype)
    return _apply_whitening(batches, x.shape, layout, wm, mean, weight, bias)
