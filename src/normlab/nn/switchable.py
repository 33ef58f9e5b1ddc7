r"""Switchable Normalization (Luo et al. 2018; compared in Qiao et al., Tables 2 and 8).

SN normalizes with a softmax-weighted mixture of the instance-, layer- and batch-normalization
moments, with one set of learnable weights for the means and another for the variances:

.. math::  y = \gamma\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}} + \beta,
           \qquad k \in \{\mathrm{IN}, \mathrm{LN}, \mathrm{BN}\},\quad
           w = \mathrm{softmax}(\lambda_{mean}),\ w' = \mathrm{softmax}(\lambda_{var}).

All three sets of moments come from one pass over the input: the IN moments μ_IN, σ²_IN of each
(sample, channel) over its positions, then LN as their average over channels and BN as their
average over samples (population variances, by the law of total variance). The BN part keeps
running statistics for eval, as batch normalization does; the IN and LN parts are per sample in
training and eval alike.

Synchronised (:func:`normlab.sync_stats`): the BN part's sums go through
:func:`normlab.nn.stats.reduce_sums`, so inside a reduction scope they are those of the global
batch; the IN and LN parts need nothing. Paper readings are in ``docs/methods/compared.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn._utils import (
    add_channel_affine,
    check_eps,
    check_momentum,
    check_positive_int,
    read_running,
    reset_channel_affine,
    stat_dtype,
)
from normlab.nn.registry import register_norm
from normlab.nn.renorm import RunningStats, update_running_stats
from normlab.nn.stats import ChannelSums, reduce_sums

__all__ = ["SwitchNorm", "switch_norm", "switch_norm_moments"]

_LAYER = "SwitchNorm"


def _grouped(x: Tensor) -> Tensor:
    """``x`` as ``(N, C, L)`` (L positions per sample and channel), or as ``(N, C)`` when there
    is a single position (reductions over a trailing dimension of size 1 are slow on CPU)."""
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // max(n * c, 1)
    return x.reshape(n, c) if length == 1 else x.reshape(n, c, length)


def switch_norm_moments(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    r"""The IN, LN and BN moments of Switchable Normalization, each as ``(mean, variance)``.

    With ``x`` viewed as ``(N, C, L)`` (L positions; L = 1 for ``(N, C)`` input):

    * IN: μ_IN, σ²_IN of shape ``(N, C)``, over the L positions (for ``(N, C)`` input μ_IN = x and
      σ²_IN = 0: the moments of a single value);
    * LN: ``(N, 1)``, μ_LN = mean_c μ_IN and σ²_LN = mean_c(σ²_IN + μ²_IN) − μ²_LN, computed as
      mean_c σ²_IN + mean_c (μ_IN − μ_LN)² (the same number, without cancellation);
    * BN: ``(1, C)``, the same over samples from all-reduced sums (:func:`reduce_sums`), shifted by
      ``running_mean`` when given; in training ``running_mean``/``running_var`` are updated in
      place, ``running = (1 − momentum)·running + momentum·batch`` with the unbiased variance (as
      torch's batch norm). With ``training=False`` the BN moments are the running ones.

    Statistics are in float32 for half input. Differentiable in ``x``.
    """
    dt = stat_dtype(x)
    n, c = x.shape[0], x.shape[1]
    xv = _grouped(x.to(dt))
    length = 1 if xv.dim() == 2 else xv.shape[-1]
    if xv.dim() == 2:  # one position: the moments of a single value
        mu_in = xv
        var_in = torch.zeros_like(mu_in)
    else:  # two passes: as accurate as torch.var_mean, and much faster on CPU
        mu_in = xv.mean(-1)
        centered = xv + (-mu_in).unsqueeze(-1)  # + (−μ): the backward needs no full-size negation
        var_in = centered.square().mean(-1)
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = var_in.mean(1, keepdim=True) + (mu_in - mu_ln).square().mean(1, keepdim=True)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "switch_norm_moments: training=False needs running_mean and running_var"
            )
        mu_bn, var_bn = running_mean.to(dt), running_var.to(dt)
    else:
        shift = torch.zeros(c, dtype=dt, device=x.device)
        if running_mean is not None:
            shift = read_running(running_mean).to(dt)
        dm = mu_in - shift
        count = torch.tensor(float(n * length), dtype=dt, device=x.device)
        sums = ChannelSums(
            *reduce_sums(count, length * dm.sum(0), length * (var_in + dm * dm).sum(0))
        )
        d_bn, var_bn = sums.mean_var()
        mu_bn = shift + d_bn
        if running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mu_bn, var_bn, sums.count, momentum)
    return (mu_in, var_in), (mu_ln, var_ln), (mu_bn.unsqueeze(0), var_bn.unsqueeze(0))


def switch_norm(
    x: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Switchable Normalization of ``x``: ``γ·(x − Σ_k w_k μ_k)/√(Σ_k w'_k σ²_k + eps) + β``.

    ``w = softmax(mean_weight)`` and ``w' = softmax(var_weight)`` over (IN, LN, BN); the moments
    are those of :func:`switch_norm_moments` (whose ``running_*``, ``training`` and ``momentum``
    arguments are passed on). Differentiable in ``x``, the two logit vectors and ``γ``, ``β``.

    Shape: ``x`` ``(N, C)`` or ``(N, C, *)`` -> same; ``mean_weight``, ``var_weight`` ``(3,)``;
    ``running_*``, ``weight``, ``bias`` ``(C,)``.

    Example::

        >>> x = torch.randn(4, 8, 5, 5)
        >>> y = switch_norm(x, torch.zeros(3), torch.zeros(3))
        >>> y.shape
        torch.Size([4, 8, 5, 5])
    """
    dt = stat_dtype(x)
    moments = switch_norm_moments(x, running_mean, running_var, training, momentum)
    wm = torch.softmax(mean_weight.to(dt), 0)
    wv = torch.softmax(var_weight.to(dt), 0)
    (mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn) = moments
    mean = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn  # (N, C)
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(dt)
    xv = _grouped(x.to(dt))
    if xv.dim() == 3:
        mean, scale = mean.unsqueeze(-1), scale.unsqueeze(-1)
    # x − mean first: x·scale − mean·scale would cancel when |mean| ≫ σ
    centered = xv + (-mean)
    if bias is None:
        y = centered * scale
    else:
        b = bias.to(dt).reshape((1, -1) + (1,) * (xv.dim() - 2))
        y = torch.addcmul(b, centered, scale)
    return y.reshape(x.shape).to(x.dtype)


@register_norm(
    "sn",
    "switchable normalization (Luo et al.): softmax-weighted IN/LN/BN means and variances, "
    "running statistics for the BN part",
)
class SwitchNorm(RunningStats):
    r"""Switchable Normalization (Luo et al. 2018; Qiao et al., Tables 2 and 8).

    .. math::  y = \gamma\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}}
               + \beta,\qquad k \in \{\mathrm{IN}, \mathrm{LN}, \mathrm{BN}\}

    with ``w = softmax(mean_weight)``, ``w' = softmax(var_weight)``; both logit vectors are ordered
    (IN, LN, BN) and start at 0 (equal weights 1/3). The moments are those of
    :func:`switch_norm_moments`: population variances; for ``(N, C)`` input there are no
    positions, so IN is the moments of a single value (μ_IN = x, σ²_IN = 0). The BN part uses the
    batch in training and the running statistics in eval.

    Args:
        num_features: C, the number of channels.
        eps: added to the mixed variance inside the square root.
        momentum: running-statistics momentum of the BN part (PyTorch convention
            ``running = (1 - momentum) * running + momentum * batch``; the unbiased batch
            variance is stored, as in ``nn.BatchNorm2d``).
        affine: learnable per-channel γ (``weight``) and β (``bias``).

    Parameters: ``mean_weight``, ``var_weight`` (3,); ``weight``, ``bias`` (C,). Buffers:
    ``running_mean``, ``running_var`` (C,), ``num_batches_tracked``.

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same.

    Example::

        >>> sn = SwitchNorm(8)
        >>> y = sn(torch.randn(4, 8, 5, 5))
        >>> y.shape, sn.running_mean.shape
        (torch.Size([4, 8, 5, 5]), torch.Size([8]))
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces the BN part's sums

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", _LAYER)
        self.eps = check_eps(eps, _LAYER)
        self.momentum = check_momentum(momentum, _LAYER)
        self.affine = add_channel_affine(self, num_features, affine, _LAYER)
        self.mean_weight = nn.Parameter(torch.zeros(3))
        self.var_weight = nn.Parameter(torch.zeros(3))
        self._add_running_stats(num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Running statistics reset, γ = 1, β = 0, equal IN/LN/BN weights (logits 0)."""
        self.reset_running_stats()
        reset_channel_affine(self)
        nn.init.zeros_(self.mean_weight)
        nn.init.zeros_(self.var_weight)

    def forward(self, x: Tensor) -> Tensor:
        self._begin_forward(x)
        return switch_norm(
            x,
            self.mean_weight,
            self.var_weight,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self._batch_statistics(x),
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )
