r"""Batch normalization to fixed random per-channel statistics: the "distance to elimination
singularities" experiment of Qiao et al., Sec. 6.1.3 (Eq. 33–34, Fig. 5).

Batch normalization makes every channel zero-mean with unit variance (Qiao et al., Eq. 32). This
layer instead normalizes each channel c to a *pre-defined* mean :math:`\hat\mu_c` and scale
:math:`\hat\sigma_c`, drawn once (Qiao et al., Eq. 33)

.. math::

    \hat\mu_c \sim \mathcal N(0, \sigma_\mu^2), \qquad
    \hat\sigma_c = e^{\dot\sigma_c},\quad \dot\sigma_c \sim \mathcal N(0, \sigma_\sigma^2),

and kept fixed during training, while the affine γ, β stays trainable (Qiao et al., Eq. 34):

.. math::

    Y_{\cdot c \cdot\cdot} = \gamma_c\Big(\hat\sigma_c\,
        \frac{X_{\cdot c\cdot\cdot} - \mu_{\cdot c\cdot\cdot}}{\sqrt{\sigma^2_{\cdot c\cdot\cdot}
        + \epsilon}} + \hat\mu_c\Big) + \beta_c ,

with μ, σ² the batch statistics of channel c (over N and all positions; running estimates in
eval mode). ``sigma_mu = sigma_sigma = 0`` is batch normalization exactly; larger values put the
model farther from BN, i.e. closer to singularities (Qiao et al., Fig. 5).

Eq. 34 is batch normalization with weight :math:`\gamma\hat\sigma` and bias
:math:`\gamma\hat\mu + \beta`, so the layer is one ``F.batch_norm`` call (or
:func:`~normlab.nn.standard.batch_norm_from_sums` under :func:`normlab.sync_stats`). The draws
are the buffers ``target_mean`` and ``target_std``. How N(0, σ) is read and how the draws are
made are in ``docs/methods/standard.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from normlab.nn.standard import batch_norm_from_sums
from normlab.nn.stats import current_group

__all__ = ["FixedStatsNorm", "draw_fixed_stats", "fixed_stats_norm"]

_LAYER = "FixedStatsNorm"


def _check_scale(value: object, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{_LAYER}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def draw_fixed_stats(
    num_features: int,
    sigma_mu: float,
    sigma_sigma: float,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw the fixed per-channel targets of Qiao et al., Eq. 33.

    .. math::  \hat\mu = \sigma_\mu z_1, \qquad \hat\sigma = \exp(\sigma_\sigma z_2)

    with :math:`z_1, z_2` two successive draws of C standard normals from
    ``torch.Generator().manual_seed(seed)``, or from torch's global generator if ``seed`` is None.

    Args:
        num_features: C.
        sigma_mu: σ_μ >= 0, the standard deviation of the target means.
        sigma_sigma: σ_σ >= 0, the standard deviation of the log target scales.
        seed: an integer seed for a private generator, or None.

    Returns:
        ``(mean, std)``, both ``(C,)`` float32 on the CPU.

    Example::

        >>> mean, std = draw_fixed_stats(4, 0.0, 0.0)  # sigma_mu = sigma_sigma = 0: BN's targets
        >>> bool((mean == 0).all()), bool((std == 1).all())
        (True, True)
        >>> a, b = draw_fixed_stats(4, 1.0, 0.5, seed=3), draw_fixed_stats(4, 1.0, 0.5, seed=3)
        >>> torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # an integer seed repeats the draws
        True
    """
    c = check_positive_int(num_features, "num_features", _LAYER)
    sm = _check_scale(sigma_mu, "sigma_mu")
    ss = _check_scale(sigma_sigma, "sigma_sigma")
    if seed is None:
        gen = None
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{_LAYER}: seed must be None or an integer, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
    z_mu = torch.randn(c, generator=gen)
    z_sigma = torch.randn(c, generator=gen)
    return sm * z_mu, torch.exp(ss * z_sigma)


def fixed_stats_norm(
    x: Tensor,
    target_mean: Tensor,
    target_std: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Qiao et al., Eq. 34: batch normalization to the targets μ̂, σ̂ per channel.

    .. math::  y = \gamma\Big(\hat\sigma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}
               + \hat\mu\Big) + \beta

    Differentiable in ``x``, γ and β (μ̂, σ̂ are constants).

    Args:
        x: the input.
        target_mean, target_std: μ̂ and σ̂, ``(C,)``.
        running_mean, running_var: running statistics ``(C,)`` or ``None``; updated in place as
            by ``F.batch_norm`` when ``training=True``, used as μ, σ² when ``training=False``.
        weight, bias: γ and β ``(C,)``, or ``None`` for 1 and 0.
        training: use the batch statistics.
        momentum: running-statistics momentum (PyTorch convention).
        eps: added to the variance.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``; every other tensor ``(C,)``
        - Output: same shape as the input

    Example::

        >>> x = torch.randn(64, 3, 4, 4)
        >>> y = fixed_stats_norm(x, torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 2.0, 0.5]))
        >>> [round(float(v), 2) for v in y.mean((0, 2, 3))]
        [0.0, 1.0, -2.0]
        >>> [round(float(v), 2) for v in y.std((0, 2, 3), correction=0)]
        [1.0, 2.0, 0.5]
    """
    scale = target_std.to(stat_dtype(x))
    shift = target_mean.to(scale.dtype)
    if weight is not None:
        scale = weight * scale
        shift = weight * shift
    if bias is not None:
        shift = shift + bias
    if training and current_group() is not None:
        return batch_norm_from_sums(x, running_mean, running_var, scale, shift, momentum, eps)
    return F.batch_norm(x, running_mean, running_var, scale, shift, training, momentum, eps)


@register_norm(
    "fixedstats",
    "batch norm to fixed random per-channel mean/std (Qiao et al., Eq. 33-34, distance to singularities)",
)
class FixedStatsNorm(nn.Module):
    r"""Batch normalization to fixed random per-channel statistics (Qiao et al., Sec. 6.1.3,
    Eq. 33–34).

    .. math::  y = \gamma\Big(\hat\sigma\,\frac{x - \mathrm E[x]}{\sqrt{\mathrm{Var}[x]
               + \epsilon}} + \hat\mu\Big) + \beta, \qquad
               \hat\mu \sim \mathcal N(0, \sigma_\mu^2),\;
               \log\hat\sigma \sim \mathcal N(0, \sigma_\sigma^2),

    μ̂ and σ̂ drawn once per channel (:func:`draw_fixed_stats`) and fixed. ``sigma_mu =
    sigma_sigma = 0`` is ``bn``.

    Args:
        num_features: C.
        sigma_mu: σ_μ >= 0, standard deviation of the target means.
        sigma_sigma: σ_σ >= 0, standard deviation of the log target scales.
        seed: integer seed of the draws (private generator), or None for torch's global generator.
        eps: added to the variance.
        momentum: running-statistics momentum (PyTorch convention).
        affine: learnable per-channel γ (init 1) and β (init 0).
        track_running_stats: keep running mean/variance for eval (else batch statistics always).

    Buffers: ``target_mean`` μ̂ and ``target_std`` σ̂ (C,), ``running_mean``, ``running_var`` (C,),
    ``num_batches_tracked`` — the last three as in ``nn.BatchNorm2d``.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> layer = FixedStatsNorm(16, sigma_mu=1.0, sigma_sigma=0.5, seed=0)
        >>> layer(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
        >>> sorted(k for k in layer.state_dict() if k.startswith("target"))
        ['target_mean', 'target_std']
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    def __init__(
        self,
        num_features: int,
        sigma_mu: float = 0.0,
        sigma_sigma: float = 0.0,
        seed: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", _LAYER)
        self.sigma_mu = _check_scale(sigma_mu, "sigma_mu")
        self.sigma_sigma = _check_scale(sigma_sigma, "sigma_sigma")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{_LAYER}: seed must be None or an integer, got {seed!r}")
        self.seed = seed
        self.eps = check_eps(eps, _LAYER)
        self.momentum = check_momentum(momentum, _LAYER)
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats)):
            if not isinstance(flag, bool):
                raise ValueError(f"{_LAYER}: {name} must be True or False, got {flag!r}")
        self.track_running_stats = track_running_stats
        c = num_features
        self.affine = add_channel_affine(self, c, affine, _LAYER)
        self.register_buffer("target_mean", torch.zeros(c))
        self.register_buffer("target_std", torch.ones(c))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(c))
            self.register_buffer("running_var", torch.ones(c))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    @torch.no_grad()
    def reset_targets(self) -> None:
        """Draw μ̂, σ̂ again (Qiao et al., Eq. 33); with an integer ``seed`` the same values come
        back."""
        mean, std = draw_fixed_stats(self.num_features, self.sigma_mu, self.sigma_sigma, self.seed)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self.reset_targets()
        reset_channel_affine(self)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, _LAYER)
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return fixed_stats_norm(
            x,
            self.target_mean,
            self.target_std,
            self.running_mean if (not self.training or self.track_running_stats) else None,
            self.running_var if (not self.training or self.track_running_stats) else None,
            self.weight,
            self.bias,
            use_batch,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, sigma_mu={self.sigma_mu}, sigma_sigma={self.sigma_sigma}, "
            f"seed={self.seed}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
