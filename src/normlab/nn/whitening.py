r"""Whitening normalizations: Iterative Normalization and Decorrelated Batch Normalization.

Both layers of Huang et al. (Sec. 3) *whiten* groups of ``d = group_size`` consecutive channels
over the mini-batch instead of only standardizing each channel; every spatial position of every
sample is one observation (Sec. 3.3, "Convolutional Layer"), so a group's data matrix is
:math:`X \in \mathbb{R}^{d\times m}`, ``m = N·H·W``. Per group (Alg. 1):

.. math::
    \mu = \tfrac1m X\mathbf 1,\quad X_C = X - \mu\mathbf 1^T,\quad
    \Sigma = \tfrac1m X_C X_C^T + \epsilon I,\quad \hat X = \Sigma^{-1/2} X_C,\quad
    Y = \gamma \odot \hat X + \beta

The layers differ in :math:`\Sigma^{-1/2}`:

* :class:`IterNorm`: :math:`P_T/\sqrt{\operatorname{tr}\Sigma}`, with T Newton steps
  :math:`P_k = \tfrac12(3P_{k-1} - P_{k-1}^3\Sigma_N)` (Eq. 3) on the trace-normalized
  :math:`\Sigma_N = \Sigma/\operatorname{tr}\Sigma` (Eq. 4–5). Small T whitens only partially.
* :class:`DBN`: exact ZCA :math:`D\Lambda^{-1/2}D^T` with :math:`\Sigma = D\Lambda D^T` (Eq. 2).

Back-propagation goes through everything, the mean and :math:`\operatorname{tr}\Sigma` included
(Eq. 6–7, Alg. 2). Eval mode uses running estimates of μ and :math:`\Sigma^{-1/2}` (Eq. 8), so
the layer is a 1 × 1 convolution (:meth:`IterNorm.fold`). ``group_size=1`` is batch normalization.

This module holds the layers and the plain-autograd functional that reads like the paper
(``_whiten_reference``); :mod:`normlab.nn._kernels.whitening` holds hand-written backwards and
fused paths that compute the same. ``normlab.use_kernels(False)`` runs the plain functional.
Both paths compile to one graph (``torch.compile(fullgraph=True)``, forward and backward, running
buffers updated inside it), take an empty batch as torch's BatchNorm does (empty output, buffers
untouched; under ``sync_stats`` an empty share still joins every reduction) and export to ONNX
in eval mode. Readings of the paper, deviations and measurements: ``docs/methods/iternorm.md``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from normlab.nn._kernels import kernels_enabled
from normlab.nn._kernels import whitening as kernels
from normlab.nn._kernels.whitening import WhitenArgs
from normlab.nn._utils import (
    add_channel_affine,
    channel_view,
    check_eps,
    check_input,
    check_momentum,
    check_positive_int,
    reset_channel_affine,
)
from normlab.nn._utils import stat_dtype as default_stat_dtype
from normlab.nn.registry import register_norm
from normlab.nn.stats import covariance_sums

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

# Σ (g, k, k) of consecutive groups, the first of them group ``first`` -> W (g, k, k)
_GroupMatrix = Callable[[Tensor, int], Tensor]


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
    """Split ``num_features`` channels into groups of ``group_size`` (clamped to ``num_features``).

    Example::

        >>> group_layout(80, 64).parts()  # 64 channels, then a group of 16 whitened on its own
        [(0, 0, 1, 64), (64, 1, 1, 16)]
    """
    d = min(group_size, num_features)
    return GroupLayout(num_features, d, num_features // d, num_features % d)


# --------------------------------------------------------------------------------------------
# The d × d part: Σ^{-1/2} by Newton's iteration (IterNorm) or eigendecomposition (DBN)
# --------------------------------------------------------------------------------------------

# With T <= this many steps the iterate cannot grow enough to overflow (|Z| <= 1.5^T), so the
# divergence guard of newton_inverse_sqrt (a few extra small ops per step) is skipped.
_GUARD_AFTER = 10


def _newton_schulz(a3: Tensor, iters: int, bound: Tensor | None = None) -> Tensor:
    """Eq. 3 in its coupled form, ``Y_0 = A, Z_0 = I, S_k = (3I − Z_{k−1}Y_{k−1})/2,
    Y_k = Y_{k−1}S_k, Z_k = S_kZ_{k−1}`` (``Z_k = P_k``), T ≥ 1 steps on a (B, d, d), by plain
    autograd; a batch element whose iterate exceeds ``bound`` (B, 1, 1) keeps its previous one."""
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


def _check_square(a: object, name: str) -> None:
    if not isinstance(a, Tensor) or a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        got = f"shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"{name}: expected a (*, d, d) tensor of square matrices, got {got}")


def newton_inverse_sqrt(a: Tensor, iters: int, max_abs: Tensor | None = None) -> Tensor:
    r"""Newton's iteration for :math:`A^{-1/2}` (Huang et al., Eq. 3), batched over leading dims.

    .. math::  P_0 = I,\qquad P_k = \tfrac12(3P_{k-1} - P_{k-1}^3 A),\quad k = 1, \dots, T

    converges when :math:`\|A - I\|_2 < 1` (e.g. a trace-normalized covariance, Eq. 4). Evaluated
    in the equivalent coupled (Newton–Schulz) form, which is stable where Eq. 3 as printed
    diverges once converged. Differentiable (twice).

    Args:
        a: the matrices A.
        iters: T >= 0; ``iters=0`` returns the identity.
        max_abs: optional bound ``(*,)`` on the entries of :math:`A^{-1/2}`; a batch element whose
            iterate exceeds it keeps its previous iterate from then on (no host sync). It only
            triggers when rounding has made an eigenvalue of A negative.

    Shape:
        ``a``: ``(*, d, d)`` -> ``(*, d, d)``.

    Example::

        >>> a = torch.tensor([[0.5, 0.0], [0.0, 0.25]], dtype=torch.float64)
        >>> newton_inverse_sqrt(a, 30).diagonal()
        tensor([1.4142, 2.0000], dtype=torch.float64)
    """
    _check_square(a, "newton_inverse_sqrt")
    check_positive_int(iters, "iters", "newton_inverse_sqrt", minimum=0)
    d = a.shape[-1]
    if iters == 0:
        return torch.eye(d, dtype=a.dtype, device=a.device).expand_as(a).clone()
    batch = a.shape[:-2]
    a3 = a.reshape(-1, d, d)
    if max_abs is not None:
        z = _newton_schulz(a3, iters, max_abs.reshape(-1, 1, 1).to(a.dtype))
    elif kernels_enabled():
        z = kernels.newton_schulz(a3, iters)
    else:
        z = _newton_schulz(a3, iters)
    return z.reshape(*batch, d, d)


def _rescaled_newton(sigma_n: Tensor, tr: Tensor, iters: int, eps: float | None) -> Tensor:
    """Eq. 3 on the trace-normalized Σ_N, then Eq. 5: ``P_T / √tr(Σ)``; for T > 10 with the
    divergence guard ``2 √(tr Σ / ε)``, a bound on the entries of Σ_N^{-1/2}."""
    bound = None
    if eps is not None and iters > _GUARD_AFTER:
        bound = 2.0 * (tr.detach() / eps).sqrt()
    return newton_inverse_sqrt(sigma_n, iters, bound) * tr.rsqrt()[..., None, None]


def iternorm_whitening_matrix(sigma: Tensor, iters: int, eps: float | None = None) -> Tensor:
    r"""IterNorm's approximation of :math:`\Sigma^{-1/2}` (Huang et al., Eq. 3–5).

    .. math::  \Sigma_N = \Sigma / \operatorname{tr}\Sigma,\qquad
               \Sigma^{-1/2} \approx P_T(\Sigma_N) / \sqrt{\operatorname{tr}\Sigma}

    Differentiable, including through the trace (Eq. 6–7).

    Args:
        sigma: symmetric positive definite Σ.
        iters: Newton steps T >= 0 (:func:`newton_inverse_sqrt`).
        eps: the ε included in Σ (so :math:`\lambda_{min}(\Sigma) \ge \epsilon`); for T > 10 it
            enables the divergence guard of :func:`newton_inverse_sqrt` with the bound
            :math:`2\sqrt{\operatorname{tr}\Sigma/\epsilon}`.

    Shape:
        ``sigma``: ``(*, d, d)`` -> ``(*, d, d)``.

    Example::

        >>> sigma = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> iternorm_whitening_matrix(sigma, 30).diagonal()
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return _rescaled_newton(sigma / tr[..., None, None], tr, iters, eps)


def _zca_eigh(sigma: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Eq. 2 by plain autograd: ``D max(Λ, floor)^{-1/2} Dᵀ`` from a float64 ``eigh``, and Λ."""
    s64 = sigma.to(torch.float64)
    s64 = 0.5 * (s64 + s64.transpose(-1, -2))
    lam, vec = torch.linalg.eigh(s64)
    w = (vec / lam.clamp_min(floor).sqrt().unsqueeze(-2)) @ vec.transpose(-1, -2)
    return w.to(sigma.dtype), lam.detach().to(sigma.dtype)


def zca_whitening_matrix(
    sigma: Tensor, min_eigenvalue: float = 1e-5, return_eigenvalues: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    r"""ZCA whitening matrix of a symmetric matrix (Huang et al., Eq. 2).

    .. math::  \Sigma = D\Lambda D^T,\qquad W = D\,\max(\Lambda, \lambda_{min})^{-1/2} D^T

    The eigendecomposition runs in float64. Eigenvalues below ``min_eigenvalue`` are clamped to
    it (the fallback for singular or ill-conditioned input; DBN passes its ε, below which the
    eigenvalues of Σ = cov + εI can only fall by rounding). With the kernels (the default) the
    backward is the closed-form derivative of the matrix function, finite for repeated
    eigenvalues; under ``normlab.use_kernels(False)`` it is autograd's ``eigh`` backward, which
    needs distinct eigenvalues.

    Args:
        sigma: the symmetric matrices Σ.
        min_eigenvalue: :math:`\lambda_{min} > 0`.
        return_eigenvalues: also return the (unclamped, non-differentiable) eigenvalues,
            ascending.

    Shape:
        ``sigma``: ``(*, d, d)`` -> ``(*, d, d)`` (and ``(*, d)``).

    Example::

        >>> sigma = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> w = zca_whitening_matrix(sigma)
        >>> torch.allclose(w @ sigma @ w, torch.eye(2), atol=1e-5)
        True
    """
    _check_square(sigma, "zca_whitening_matrix")
    if not min_eigenvalue > 0:
        raise ValueError(
            f"zca_whitening_matrix: min_eigenvalue must be > 0, got {min_eigenvalue!r}"
        )
    if kernels_enabled():
        w, lam = kernels.zca_inv_sqrt(sigma, float(min_eigenvalue))
    else:
        w, lam = _zca_eigh(sigma, float(min_eigenvalue))
    return (w, lam) if return_eigenvalues else w


def _check_condition(
    lo: Tensor, hi: Tensor, finite: Tensor, max_condition: float, first: int
) -> None:
    """Explicit check (one host synchronisation) of each group's covariance: finite, and condition
    number λ_max / λ_min <= ``max_condition`` (``hi / lo``); groups are numbered from ``first``."""
    cond = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(lo.dtype).tiny), torch.inf)
    bad = ~finite | ~(cond <= max_condition)
    if bool(bad.any()):
        if not bool(finite.all()):
            idx = [first + i for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(
                f"DBN: the covariance of group(s) {idx} is non-finite (the input contains "
                "inf/NaN, or its squares overflow the statistics dtype)"
            )
        idx = [first + i for i in bad.nonzero().flatten().tolist()]
        raise ValueError(
            f"DBN: the covariance of group(s) {idx} is too ill-conditioned for a stable ZCA "
            f"whitening (condition numbers {[float(c) for c in cond[bad]]} > max_condition="
            f"{max_condition}); increase eps, reduce group_size, or set max_condition=None to "
            "whiten with eigenvalues clamped at eps"
        )


def _dbn_matrix(
    sigma: Tensor, eps: float, max_condition: float | None, first: int = 0, last: int = 0
) -> Tensor:
    """DBN's W = ZCA(Σ) for (g, k, k) blocks, eigenvalues clamped at ε; a non-finite block gets
    W = I (LAPACK is never handed inf/NaN; such a group's output is non-finite anyway).

    ``last > 0``: the final block is a smaller group of ``last`` channels padded with the identity
    (the kernels' batched layout); ``max_condition`` then reads that group's extreme eigenvalues
    from its real ``last × last`` block (one more ``eigvalsh``), not from the padded one, whose
    padding adds eigenvalues equal to 1."""
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    finite = torch.isfinite(sigma.abs().amax((-2, -1)))  # (amax propagates NaN)
    sigma = torch.where(finite[:, None, None], sigma, eye)
    wm, lam = zca_whitening_matrix(sigma, eps, return_eigenvalues=True)
    if max_condition is not None:
        lo, hi = lam[..., 0], lam[..., -1]
        if last:
            real = sigma[-1, :last, :last].to(torch.float64)
            lam_last = torch.linalg.eigvalsh(0.5 * (real + real.mT)).to(lam.dtype)
            lo = torch.cat([lo[:-1], lam_last[:1]])
            hi = torch.cat([hi[:-1], lam_last[-1:]])
        _check_condition(lo, hi, finite, max_condition, first)
    return wm


# --------------------------------------------------------------------------------------------
# The m × d part: the reference functional
# --------------------------------------------------------------------------------------------


def _whiten_reference(
    x: Tensor, layout: GroupLayout, matrix: _GroupMatrix, args: WhitenArgs
) -> Tensor:
    """Huang et al., Alg. 1 for each uniform part of the groups (all of them, or the full groups
    and the smaller last one), by plain autograd (the backward is Eq. 6–7 / Alg. 2). The sums
    come from :func:`normlab.nn.stats.covariance_sums`, so :func:`normlab.sync_stats` applies."""
    eps, weight, bias, running_mean, running_wm, training, momentum = args
    n, length = x.shape[0], math.prod(x.shape[2:])
    outs = []
    for start, g0, groups, size in layout.parts():
        stop = start + groups * size
        xp = x[:, start:stop]
        if training:
            empty = xp.numel() == 0  # no positions: the (0, width) view, whose sums are zero
            sums = covariance_sums(xp.reshape(0, stop - start) if empty else xp, size)
            mu, sigma, valid = kernels.moments(sums, eps, empty)  # Alg. 1, lines 4 and 6
            wm = matrix(sigma, g0)  # lines 7–12 (Eq. 3–5), or Eq. 2
            blocks = None if running_wm is None else running_wm[g0 : g0 + groups, :size, :size]
            means = None if running_mean is None else running_mean[start:stop]
            kernels.update_running(means, blocks, mu.reshape(-1), wm, momentum, valid)  # Eq. 8
        else:
            assert running_mean is not None and running_wm is not None
            mu = running_mean[start:stop].to(x.dtype).reshape(groups, size)
            wm = running_wm[g0 : g0 + groups, :size, :size].to(x.dtype)
        xc = xp.reshape(n, groups, size, length) - mu.unsqueeze(-1)  # line 5
        x_hat = torch.einsum("gij,ngjl->ngil", wm, xc)  # line 13
        outs.append(x_hat.reshape(xp.shape))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if weight is not None:
        y = y * channel_view(weight.to(y.dtype), y.dim())
    if bias is not None:
        y = y + channel_view(bias.to(y.dtype), y.dim())
    return y


# --------------------------------------------------------------------------------------------
# Dispatch and functional forms
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


def _no_autocast(x: Tensor):
    dev = x.device.type
    if torch.amp.is_autocast_available(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return nullcontext()


class _Matrices(NamedTuple):
    """A method's Σ -> W: ``group`` per part for the reference, ``blocks`` on the padded
    (G, d, d) batch of all groups for the kernels."""

    group: _GroupMatrix
    blocks: Callable[[Tensor], Tensor]


def _iternorm_matrices(layout: GroupLayout, iters: int, eps: float) -> _Matrices:
    def rescaled(sigma_n: Tensor, tr: Tensor) -> Tensor:
        return _rescaled_newton(sigma_n, tr, iters, eps)

    return _Matrices(
        lambda sigma, first: iternorm_whitening_matrix(sigma, iters, eps),
        lambda sigma: kernels.iternorm_blocks(sigma, layout, rescaled),
    )


def _dbn_matrices(layout: GroupLayout, eps: float, max_condition: float | None) -> _Matrices:
    return _Matrices(
        lambda sigma, first: _dbn_matrix(sigma, eps, max_condition, first),
        lambda sigma: kernels.padded_blocks(
            sigma, layout, lambda s: _dbn_matrix(s, eps, max_condition, last=layout.last)
        ),
    )


def _whiten(
    x: Tensor,
    layout: GroupLayout,
    matrices: _Matrices,
    args: WhitenArgs,
    stat_dtype: torch.dtype | None,
) -> Tensor:
    """Shared forward of both layers in the compute dtype with autocast off: the kernels
    (:func:`normlab.nn._kernels.whitening.whiten`) or the plain reference, by the switch."""
    if not args.training and (args.running_mean is None or args.running_wm is None):
        raise ValueError("running_mean and running_wm are required when training=False")
    dt = default_stat_dtype(x) if stat_dtype is None else stat_dtype
    with _no_autocast(x):
        if kernels_enabled():
            y = kernels.whiten(x.to(dt), layout, matrices.blocks, args)
        else:
            y = _whiten_reference(x.to(dt), layout, matrices.group, args)
    return y.to(x.dtype)


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
    r"""Functional IterNorm (Huang et al., Alg. 1, Eq. 3–5, 8); see :class:`IterNorm`.

    Args:
        x: the input.
        group_size, iters, eps, momentum, stat_dtype: as :class:`IterNorm`.
        weight, bias: per-channel γ and β ``(C,)``, or ``None``.
        running_mean, running_wm: ``(C,)`` and ``(num_groups, d, d)``; updated in place in
            training mode when given (Eq. 8), used instead of the batch statistics (and then
            required) with ``training=False``.
        training: batch statistics (``True``) or the running ones.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.

    Example::

        >>> x = torch.randn(256, 8)
        >>> rm, rw = torch.zeros(8), torch.eye(4).repeat(2, 1, 1)
        >>> y = iterative_normalization(x, 4, 30, running_mean=rm, running_wm=rw)
        >>> torch.allclose(y[:, :4].T.cov(correction=0), torch.eye(4), atol=1e-3)
        True
    """
    name = "iterative_normalization"
    _check_functional_args(x, group_size, eps, momentum, name)
    check_positive_int(iters, "iters", name, minimum=0)
    layout = group_layout(x.shape[1], group_size)
    dt = _resolve_stat_dtype(stat_dtype, name)
    args = WhitenArgs(eps, weight, bias, running_mean, running_wm, training, momentum)
    return _whiten(x, layout, _iternorm_matrices(layout, iters, eps), args, dt)


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
    r"""Functional DBN (ZCA whitening, Huang et al., Eq. 2; running statistics Eq. 8); see
    :class:`DBN`.

    Args:
        x: the input.
        group_size, eps, momentum, stat_dtype, max_condition: as :class:`DBN`.
        weight, bias, running_mean, running_wm, training: as :func:`iterative_normalization`.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.

    Example::

        >>> x = torch.randn(64, 4, 3, 3)
        >>> x = x + x[:, :1]  # correlated channels
        >>> y = decorrelated_batch_norm(x, group_size=4)
        >>> p = y.transpose(0, 1).reshape(4, -1)  # one column per position
        >>> torch.allclose(p.cov(correction=0), torch.eye(4), atol=1e-3)
        True
    """
    name = "decorrelated_batch_norm"
    _check_functional_args(x, group_size, eps, momentum, name)
    layout = group_layout(x.shape[1], group_size)
    dt = _resolve_stat_dtype(stat_dtype, name)
    args = WhitenArgs(eps, weight, bias, running_mean, running_wm, training, momentum)
    return _whiten(x, layout, _dbn_matrices(layout, eps, max_condition), args, dt)


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
    def _matrices(self) -> _Matrices:
        """The method's Σ -> W: IterNorm's Newton iteration, DBN's ZCA."""

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, self._layer)
        self._last_ndim = x.dim()
        args = WhitenArgs(
            self.eps, self.weight, self.bias, self.running_mean, self.running_wm, self.training,
            self.momentum,
        )  # fmt: skip
        return _whiten(x, self.layout, self._matrices(), args, self._stat_dtype)

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
            # grouped: equal groups, so γ is exactly (G, d)
            w = (wm * gamma.reshape(g, d).unsqueeze(-1)).reshape(c, d) if grouped else dense
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
    r"""Iterative Normalization (Huang et al., Sec. 3, Algorithm 1).

    Per group of ``group_size`` channels, over all N·H·W positions:

    .. math::
        \Sigma = \tfrac1m X_C X_C^T + \epsilon I,\qquad
        \hat X = \frac{P_T(\Sigma/\operatorname{tr}\Sigma)}{\sqrt{\operatorname{tr}\Sigma}} X_C,
        \qquad y = \gamma \odot \hat x + \beta

    with ``iters`` = T Newton steps (Eq. 3–5); gradients by back-propagation through everything,
    tr(Σ) included (Eq. 6–7). Running mean and whitening matrix (Eq. 8) are used in eval mode;
    :meth:`fold` gives the equivalent 1 × 1 convolution / linear layer.

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

    Buffers: ``running_mean`` (C,), init 0; ``running_wm`` (num_groups, d, d), init I.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.

    Example::

        >>> m = IterNorm(64, group_size=16, iters=5)
        >>> x = torch.randn(32, 64, 8, 8)
        >>> m(x).shape, m.running_wm.shape  # one running whitening matrix per group (Eq. 8)
        (torch.Size([32, 64, 8, 8]), torch.Size([4, 16, 16]))
        >>> conv = m.eval().fold()  # the eval-mode layer as a grouped 1 × 1 convolution
        >>> torch.allclose(conv(x), m(x), atol=1e-4)
        True
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

    def _matrices(self) -> _Matrices:
        return _iternorm_matrices(self.layout, self.iters, self.eps)

    def _extra_args(self) -> str:
        return f", iters={self.iters}"


@register_norm("dbn", "Decorrelated Batch Normalization: group ZCA whitening by eigendecomposition")
class DBN(_Whitening):
    r"""Decorrelated Batch Normalization: group-wise ZCA whitening (Huang et al., Eq. 2).

    Like :class:`IterNorm` (same grouping, running statistics, affine and :meth:`fold`) but with
    the exact

    .. math::  \Sigma^{-1/2} = D\Lambda^{-1/2}D^T,\qquad \Sigma = D\Lambda D^T

    from a float64 symmetric eigendecomposition, the eigenvalues clamped below at ε (no host
    sync; finite output for singular or ill-conditioned groups, and finite gradients with the
    default kernels, see :func:`zca_whitening_matrix`).

    Args:
        num_features, group_size, eps, momentum, affine, stat_dtype: as :class:`IterNorm`
            (``group_size`` defaults to 16).
        max_condition: if set, every training forward checks (one host synchronisation, so a
            graph break under ``torch.compile``) that each group's covariance is finite with
            condition number λ_max/λ_min <= ``max_condition`` and raises ``ValueError``
            otherwise. ``None`` (default): no check.

    Shape:
        ``(N, C)`` or ``(N, C, *)`` -> same shape and dtype.

    Example::

        >>> m = DBN(8, group_size=4, affine=False)
        >>> x = torch.randn(512, 8)
        >>> y = m(x + x[:, :1])  # correlated channels
        >>> torch.allclose(y[:, 4:].T.cov(correction=0), torch.eye(4), atol=1e-3)
        True
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

    def _matrices(self) -> _Matrices:
        return _dbn_matrices(self.layout, self.eps, self.max_condition)

    def _extra_args(self) -> str:
        return "" if self.max_condition is None else f", max_condition={self.max_condition}"
