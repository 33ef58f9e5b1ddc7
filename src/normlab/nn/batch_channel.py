r"""Batch-Channel Normalization (Qiao et al., Sec. 7, Eq. 40–43, Algorithm 1).

BCN first normalizes every channel with batch information and a per-channel affine
(γ^b_c, β^b_c) (Qiao et al., Eq. 40–41)

.. math::  \dot X_{\cdot c\cdot\cdot} = \gamma^b_c\,\frac{X_{\cdot c\cdot\cdot}-\hat\mu_c}{\hat\sigma_c}
           + \beta^b_c ,

then splits each sample's channels into G groups and normalizes each group over its channels and
positions, with a per-*group* affine (γ^c_g, β^c_g) (Qiao et al., Eq. 42)

.. math::  \dot Y_{bg\cdots} = \gamma^c_g\,\frac{\dot X_{bg\cdots}-\mu_{bg}}{\sigma_{bg}} + \beta^c_g .

How μ̂_c, σ̂_c are obtained gives the two modes (Qiao et al., Sec. 7.2):

* **large batch** (Sec. 7.2.1, Eq. 43 ``BCN(X) = CN(BN(X))``): μ̂, σ̂² are the batch statistics,
  exactly batch normalization, with running statistics for eval (PyTorch's momentum convention);
* **micro batch** (Sec. 7.2.2, Algorithm 1): μ̂, σ̂² are *estimates*, initialised to 0 and 1 and
  moved towards the batch's statistics at rate r (the optimizer's current learning rate, set
  with :func:`set_bcn_rate`) at every training step; the layer normalizes with the updated
  estimates, which carry no gradient:

  .. math::  \hat\mu_c \leftarrow \hat\mu_c + r(\dot\mu_c - \hat\mu_c), \qquad
             \hat\sigma^2_c \leftarrow \hat\sigma^2_c + r(\dot\sigma^2_c - \hat\sigma^2_c),

  with :math:`\dot\mu_c` the batch mean and :math:`\dot\sigma^2_c` the batch's second moment
  around the estimate *before* the update (:func:`micro_batch_estimates`).

Both square roots are :math:`\sqrt{\text{var} + \epsilon}`. Both modes keep the estimates in the
buffers ``running_mean`` / ``running_var`` (BatchNorm's ``state_dict`` keys). Under
:func:`normlab.sync_stats` the batch statistics (large batch) and :math:`\dot\mu, \dot\sigma^2`
(micro batch) are those of all processes; the channel part is per sample. The reading of
Algorithm 1 and the choices where the paper is silent are in ``docs/methods/bcn.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.nn._utils import check_eps, check_input, check_momentum, check_positive_int
from normlab.nn.registry import register_norm
from normlab.nn.standard import batch_norm_from_sums, default_num_groups
from normlab.nn.stats import channel_sums, current_group

__all__ = [
    "BCNorm",
    "batch_channel_norm",
    "channel_group_norm",
    "micro_batch_estimates",
    "set_bcn_rate",
]

_LAYER = "BCNorm"


def _check_rate(rate: object, where: str) -> float:
    if isinstance(rate, Tensor) and rate.numel() == 1:
        rate = float(rate)  # once per step, outside the forward pass
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or not 0.0 <= rate <= 1.0
    ):
        raise ValueError(
            f"{where}: the update rate r must be a number in [0, 1] (Qiao et al., Algorithm 1 uses the "
            f"learning rate), got {rate!r}"
        )
    return float(rate)


def channel_group_norm(
    x: Tensor,
    num_groups: int,
    group_weight: Tensor | None = None,
    group_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Channel part of BCN (Qiao et al., Eq. 42): group normalization of each sample with a
    per-*group* affine.

    .. math::  y_{bg\cdots} = \gamma^c_g\,\frac{x_{bg\cdots} - \mu_{bg}}{\sqrt{\sigma^2_{bg}
               + \epsilon}} + \beta^c_g

    Computed as ``F.group_norm`` with the per-group parameters repeated to per-channel ones
    (gradients flow back to the ``(G,)`` parameters).

    Args:
        x: the input.
        num_groups: G; must divide the channel count C.
        group_weight: γ^c of shape ``(G,)``, or ``None`` for 1.
        group_bias: β^c of shape ``(G,)``, or ``None`` for 0.
        eps: added to the group variances.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> x = torch.randn(4, 8, 5, 5)
        >>> y = channel_group_norm(x, 2, torch.full((2,), 3.0), torch.zeros(2))
        >>> y.shape, round(float(y[0, :4].std(correction=0)), 2)
        (torch.Size([4, 8, 5, 5]), 3.0)
    """
    c = x.shape[1]
    per = c // num_groups
    w = None if group_weight is None else group_weight.repeat_interleave(per)
    b = None if group_bias is None else group_bias.repeat_interleave(per)
    return F.group_norm(x, num_groups, w, b, eps)


def micro_batch_estimates(
    x: Tensor, mean: Tensor, var: Tensor, rate: float | Tensor
) -> tuple[Tensor, Tensor]:
    r"""Steps 1–4 of Qiao et al., Algorithm 1: the estimates (μ̂, σ̂²) after seeing batch ``x``.

    .. math::  \dot\mu_c = \overline{x_c}, \quad
               \dot\sigma^2_c = \overline{(x_c - \hat\mu_c)^2}
                              = \operatorname{Var}(x_c) + (\dot\mu_c - \hat\mu_c)^2, \quad
               \hat\mu_c \leftarrow \hat\mu_c + r(\dot\mu_c - \hat\mu_c), \quad
               \hat\sigma^2_c \leftarrow \hat\sigma^2_c + r(\dot\sigma^2_c - \hat\sigma^2_c)

    with averages over every dimension but 1 and :math:`\hat\mu_c` the estimate *before* the
    update. The sums come from :func:`normlab.nn.stats.channel_sums` (all-reduced under
    :func:`normlab.sync_stats`). Pure and gradient-free: ``x`` is detached and new tensors are
    returned.

    Args:
        x: the batch.
        mean: the current estimate μ̂, ``(C,)``.
        var: the current estimate σ̂², ``(C,)``.
        rate: the update rate r in [0, 1] (Qiao et al., Sec. 7.2.2: the learning rate).

    Shape:
        - Input: ``x`` ``(N, C)`` or ``(N, C, *)``; ``mean``, ``var`` ``(C,)``
        - Output: two ``(C,)`` tensors, in the dtypes of ``mean`` and ``var``

    Example::

        >>> x = torch.tensor([[1.0], [3.0]])  # one channel: batch mean 2, variance 1
        >>> micro_batch_estimates(x, torch.zeros(1), torch.ones(1), rate=0.5)
        (tensor([1.]), tensor([3.]))
    """
    sums = channel_sums(x.detach())
    mu_dot, batch_var = sums.mean_var()
    m = mean.to(mu_dot.dtype)
    v = var.to(mu_dot.dtype)
    diff = mu_dot - m
    sigma_dot2 = batch_var + diff * diff
    new_mean = m + rate * diff
    new_var = v + rate * (sigma_dot2 - v)
    return new_mean.to(mean.dtype), new_var.to(var.dtype)


def batch_channel_norm(
    x: Tensor,
    mean: Tensor | None,
    var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    group_weight: Tensor | None,
    group_bias: Tensor | None,
    num_groups: int,
    use_batch_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch-Channel Normalization, Qiao et al., Eq. 40–42: the batch part, then
    :func:`channel_group_norm`.

    .. math::  y = \operatorname{CN}\Bigl(\gamma^b\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2
               + \epsilon}} + \beta^b\Bigr)

    Args:
        x: the input.
        mean, var: per-channel statistics ``(C,)`` or ``None``. With ``use_batch_stats=True``
            they are running statistics, updated in place exactly as ``F.batch_norm`` does
            (large-batch BCN, Eq. 43); with ``use_batch_stats=False`` they are the constants the
            batch part normalizes with (eval, or micro-batch BCN with the estimates of
            :func:`micro_batch_estimates`).
        weight, bias: the per-channel affine γ^b, β^b ``(C,)`` (or ``None``).
        group_weight, group_bias: the per-group affine γ^c, β^c ``(G,)`` (or ``None``).
        num_groups: G of the channel part.
        use_batch_stats: normalize the batch part with the batch's own statistics.
        momentum: running-statistics momentum (PyTorch convention).
        eps: added to the variances inside both square roots.

    Inside a reduction scope (:func:`normlab.sync_stats`) the batch statistics of the large-batch
    mode are those of all processes (:func:`normlab.nn.standard.batch_norm_from_sums`).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> x = torch.randn(8, 16, 4, 4)
        >>> rm, rv = torch.zeros(16), torch.ones(16)
        >>> y = batch_channel_norm(x, rm, rv, None, None, None, None, num_groups=4)
        >>> y.shape, bool(rm.abs().sum() > 0)  # the running mean moved
        (torch.Size([8, 16, 4, 4]), True)
    """
    if use_batch_stats and current_group() is not None:
        xb = batch_norm_from_sums(x, mean, var, weight, bias, momentum, eps)
    else:
        xb = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, momentum, eps)
    return channel_group_norm(xb, num_groups, group_weight, group_bias, eps)


@register_norm(
    "bcn",
    "batch-channel normalization (Qiao et al., Sec. 7): batch norm per channel, then group norm per sample "
    "with a per-group affine; micro_batch=true uses estimates updated at the learning rate",
)
class BCNorm(nn.Module):
    r"""Batch-Channel Normalization (Qiao et al., Sec. 7): batch normalization with a per-channel
    affine, then group normalization of each sample with a per-group affine (Eq. 40–42).

    .. math::  y = \operatorname{CN}\Bigl(\gamma^b\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2
               + \epsilon}} + \beta^b\Bigr)

    In large-batch mode μ̂, σ̂² are the batch statistics in training and the running statistics in
    eval (Eq. 43). In micro-batch mode (Algorithm 1) they are estimates moved towards each
    training batch's statistics at rate r (:func:`micro_batch_estimates`), used in training and
    eval alike; a training forward without a rate raises ``RuntimeError``.

    Args:
        num_features: C, the number of channels.
        num_groups: G for the channel part. ``None`` means ``min(32, C // 4)`` (Qiao et al.,
            Sec. 8.2), or the largest divisor of C below it
            (:func:`normlab.nn.standard.default_num_groups`). An explicit value must divide C.
        eps: added to the variances inside both square roots.
        momentum: running-statistics momentum of the large-batch mode (PyTorch convention
            ``running = (1 - momentum) * running + momentum * batch``); unused in micro-batch mode.
        micro_batch: use Algorithm 1 (estimates updated at rate r) instead of batch statistics.
        rate: the update rate r of micro-batch mode in [0, 1], normally set before every step to
            the learning rate with :func:`set_bcn_rate` (Qiao et al., Sec. 7.2.2) or
            :meth:`set_rate`.

    Parameters: ``weight``, ``bias`` (C,) = γ^b, β^b; ``group_weight``, ``group_bias`` (G,) = γ^c,
    β^c. Buffers: ``running_mean`` (μ̂, init 0), ``running_var`` (σ̂², init 1),
    ``num_batches_tracked``.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, *)``; micro-batch mode trains with N = 1, large-batch
          training needs more than one value per channel, as BatchNorm does
        - Output: same shape as the input

    Example::

        >>> bcn = BCNorm(64, micro_batch=True)
        >>> opt = torch.optim.SGD(bcn.parameters(), lr=0.1)
        >>> set_bcn_rate(bcn, opt)  # r = the learning rate, before every step
        1
        >>> bcn(torch.randn(1, 64, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        micro_batch: bool = False,
        rate: float | None = None,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", _LAYER)
        if num_groups is None:
            num_groups = default_num_groups(num_features)
        check_positive_int(num_groups, "num_groups", _LAYER)
        if num_features % num_groups:
            raise ValueError(
                f"{_LAYER}: num_groups={num_groups} must divide num_features={num_features}"
            )
        self.num_groups = num_groups
        self.eps = check_eps(eps, _LAYER)
        self.momentum = check_momentum(momentum, _LAYER)
        if not isinstance(micro_batch, bool):
            raise ValueError(f"{_LAYER}: micro_batch must be True or False, got {micro_batch!r}")
        self.micro_batch = micro_batch
        self.rate: float | None = None if rate is None else _check_rate(rate, _LAYER)

        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.group_weight = nn.Parameter(torch.empty(num_groups))
        self.group_bias = nn.Parameter(torch.empty(num_groups))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """μ̂ = 0, σ̂² = 1 (Qiao et al., Sec. 7.2.2), counter 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.group_weight)
        nn.init.zeros_(self.group_bias)

    def set_rate(self, rate: float | Tensor) -> None:
        """Set the micro-batch update rate r (Qiao et al., Algorithm 1); r must be in [0, 1]."""
        self.rate = _check_rate(rate, f"{_LAYER}.set_rate")

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, _LAYER)
        args = (self.weight, self.bias, self.group_weight, self.group_bias, self.num_groups)
        if not self.training:
            return batch_channel_norm(
                x, self.running_mean, self.running_var, *args, False, 0.0, self.eps
            )
        self.num_batches_tracked.add_(1)
        if not self.micro_batch:
            return batch_channel_norm(
                x, self.running_mean, self.running_var, *args, True, self.momentum, self.eps
            )
        if self.rate is None:
            raise RuntimeError(
                f"{_LAYER}(micro_batch=True): no update rate r is set. Qiao et al., Sec. 7.2.2 uses the "
                "learning rate: call normlab.set_bcn_rate(model, optimizer) before each training "
                "step (or build the layer with rate=...)."
            )
        with torch.no_grad():
            mean, var = micro_batch_estimates(x, self.running_mean, self.running_var, self.rate)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        # Normalize with the fresh tensors, not the buffers: autograd saves them, and the next
        # training forward updates the buffers in place (shared layers, gradient accumulation).
        return batch_channel_norm(x, mean, var, *args, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum}, micro_batch={self.micro_batch}"
        )
        if self.micro_batch:
            s += f", rate={self.rate}"
        return s


def set_bcn_rate(model: nn.Module, optimizer_or_rate: torch.optim.Optimizer | float) -> int:
    """Set the micro-batch update rate r of every :class:`BCNorm` in ``model`` (Qiao et al.,
    Sec. 7.2.2: r is the learning rate of the trainable parameters).

    Call it before every training step so that r follows the learning-rate schedule. Layers in
    large-batch mode get the rate too and ignore it.

    Args:
        model: the network (a single :class:`BCNorm` works too).
        optimizer_or_rate: an optimizer (its ``param_groups[0]["lr"]`` is used) or a number in
            [0, 1].

    Returns:
        the number of BCN layers updated.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BCNorm(8, micro_batch=True))
        >>> set_bcn_rate(net, 0.05), net[1].rate
        (1, 0.05)
    """
    if hasattr(optimizer_or_rate, "param_groups"):
        groups = optimizer_or_rate.param_groups
        if not groups or "lr" not in groups[0]:
            raise ValueError("set_bcn_rate: the optimizer has no param_groups[0]['lr']")
        rate = groups[0]["lr"]
    else:
        rate = optimizer_or_rate
    r = _check_rate(rate, "set_bcn_rate")
    n = 0
    for m in model.modules():
        if isinstance(m, BCNorm):
            m.rate = r
            n += 1
    return n
