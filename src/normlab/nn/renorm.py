r"""Batch Renormalization (Ioffe 2017; written out in Kalayeh & Shah, Sec. 2.1, Eq. 5).

Batch renormalization corrects the batch-normalized value towards the normalization with the
running (population) statistics by a per-channel affine map whose parameters are constants:

.. math::  \frac{x - \mu}{\sigma} = \frac{x - \mu_B}{\sigma_B}\cdot r + d,\qquad
           r = \frac{\sigma_B}{\sigma},\quad d = \frac{\mu_B - \mu}{\sigma}
           \qquad \text{(Kalayeh \& Shah, Eq. 5)}

with μ, σ the running statistics. In training r and d are clipped to ``[1/r_max, r_max]`` and
``[-d_max, d_max]`` and treated as constants in the backward pass, so the gradient is that of
batch normalization with a fixed per-channel rescaling; eval normalizes with μ and σ, as
batch normalization does. With ``r_max = 1`` and ``d_max = 0`` the layer is batch normalization.

Ioffe trains with ``r_max = 1, d_max = 0`` first and then ramps them up linearly (to 3 and 5);
``r_max_ramp=(start, end)`` / ``d_max_ramp=(start, end)`` give those ramps over training steps,
driven by :meth:`BatchRenorm.set_step` or, for a whole model, :func:`set_brn_step` once per
step. The step lives in a buffer and the limits are computed from it inside the forward pass, so
a compiled layer is not recompiled as they change.

Synchronised (:func:`normlab.sync_stats`): μ_B and σ_B come from all-reduced
:func:`normlab.nn.stats.channel_sums`, shifted by the running mean (the same on every process).
Readings and deviations are in ``docs/methods/compared.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.nn._utils import (
    add_channel_affine,
    channel_view,
    check_eps,
    check_input,
    check_momentum,
    check_positive_int,
    read_running,
    reset_channel_affine,
    stat_dtype,
)
from normlab.nn.registry import register_norm
from normlab.nn.stats import channel_sums, current_group

__all__ = ["BatchRenorm", "batch_renorm", "ramp_limit", "set_brn_step"]

_LAYER = "BatchRenorm"


class RunningStats(nn.Module):
    """Base of the layers here that keep batch normalization's running statistics: buffers
    ``running_mean`` (0) and ``running_var`` (1) of shape (C,) and ``num_batches_tracked``, with
    ``nn.BatchNorm2d``'s names, initial values and :meth:`reset_running_stats`."""

    def _add_running_stats(self, num_features: int) -> None:
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0 (as ``nn.BatchNorm2d``)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _batch_statistics(self, x: Tensor) -> bool:
        """Whether this forward uses (and updates) batch statistics: in training, except for an
        empty batch outside :func:`normlab.sync_stats`, which is normalized with the running
        statistics and leaves them alone, as ``nn.BatchNorm2d`` does (inside it the process
        joins the reductions and the other processes' samples give the statistics)."""
        return self.training and (x.shape[0] > 0 or current_group() is not None)

    def _begin_forward(self, x: Tensor) -> None:
        """Check the input (``(N, C)`` or ``(N, C, *)``) and count a training batch."""
        check_input(x, self.num_features, type(self).__name__)
        if self.training:
            self.num_batches_tracked.add_(1)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: float,
) -> None:
    """In place and without gradient, as torch's batch norm: ``running = (1 − momentum)·running +
    momentum·batch``, storing the unbiased variance ``var·n/(n − 1)`` of the biased ``var`` over
    ``count`` = n values (factor 1 when n = 1). With n = 0 (an empty batch, also one that is
    empty on every process) the running statistics stay exactly as they were."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1).clamp_min(1))
        seen = count > 0
        mean = torch.where(seen, mean.to(running_mean.dtype), running_mean)
        unbiased = torch.where(seen, unbiased.to(running_var.dtype), running_var)
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(unbiased, momentum)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
) -> Tensor:
    r"""Batch renormalization: ``y = γ·(x̂·r + d) + β`` (Kalayeh & Shah, Eq. 5).

    In training ``x̂ = (x − μ_B)/σ_B`` with the batch mean and biased variance over every dimension
    but 1, ``σ_B = √(σ²_B + eps)``, ``σ = √(running_var + eps)``,
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − running_mean)/σ, −d_max, d_max)``,
    both detached (constants in the backward); r and d use the running statistics *before* this
    batch, which are then updated in place as in torch's batch norm,
    ``running = (1 − momentum)·running + momentum·batch``, with the unbiased batch variance. With
    ``training=False`` it is batch normalization with the running statistics.

    ``r_max`` (≥ 1) and ``d_max`` (≥ 0) may be 0-d tensors (see :func:`ramp_limit`). Statistics
    are in float32 for half input; the output has ``x``'s dtype.

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same; ``running_*``, ``weight``, ``bias`` ``(C,)``.

    Example::

        >>> x = torch.randn(16, 4, 3, 3)
        >>> y = batch_renorm(x, torch.zeros(4), torch.ones(4), r_max=1.0, d_max=0.0)
        >>> torch.allclose(y, F.batch_norm(x, None, None, training=True), atol=1e-5)
        True
    """
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    dt = stat_dtype(x)
    nd = x.dim()
    shift = read_running(running_mean).to(dt)
    xs = x.to(dt) - channel_view(shift, nd)
    sums = channel_sums(xs)
    d_mu, var = sums.mean_var()  # d_mu = μ_B − μ
    inv_sigma_b = torch.rsqrt(var + eps)
    if isinstance(r_max, Tensor):
        r_max = r_max.to(dt)
    if isinstance(d_max, Tensor):
        d_max = d_max.to(dt)
    with torch.no_grad():
        sigma = torch.sqrt(read_running(running_var).to(dt) + eps)
        r = (torch.sqrt(var + eps) / sigma).clamp(min=1.0 / r_max, max=r_max)
        d = (d_mu / sigma).clamp(min=-d_max, max=d_max)
    scale = r * inv_sigma_b
    offset = d - d_mu * scale
    if weight is not None:
        w = weight.to(dt)
        scale = scale * w
        offset = offset * w
    if bias is not None:
        offset = offset + bias.to(dt)
    y = torch.addcmul(channel_view(offset, nd), xs, channel_view(scale, nd))
    update_running_stats(running_mean, running_var, shift + d_mu, var, sums.count, momentum)
    return y.to(x.dtype)


def ramp_limit(
    step: Tensor, start_value: float, end_value: float, ramp: tuple[int, int] | None
) -> float | Tensor:
    """A clipping limit on Ioffe's linear schedule: ``start_value`` up to step ``ramp[0]``, then
    linear to ``end_value`` at step ``ramp[1]`` and constant after; ``end_value`` itself when
    ``ramp`` is None. Computed from the ``step`` tensor (a 0-d float tensor is returned) so that
    a compiled forward needs no recompilation as the step advances."""
    if ramp is None:
        return end_value
    start, end = ramp
    t = ((step.float() - start) / (end - start)).clamp(0.0, 1.0)
    return start_value + (end_value - start_value) * t


def _check_limit(value: object, name: str, minimum: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ValueError(f"{_LAYER}: {name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _check_ramp(ramp: object, name: str) -> tuple[int, int] | None:
    if ramp is None:
        return None
    ok = (
        isinstance(ramp, tuple | list)
        and len(ramp) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in ramp)
        and 0 <= ramp[0] < ramp[1]
    )
    if not ok:
        raise ValueError(
            f"{_LAYER}: {name} must be None or a pair of integer steps (start, end) with "
            f"0 <= start < end, got {ramp!r}"
        )
    return int(ramp[0]), int(ramp[1])


def _check_step(step: object, where: str) -> int:
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)  # once per step, outside the forward pass
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: step must be a non-negative integer, got {step!r}")
    return step


@register_norm(
    "brn",
    "batch renormalization (Ioffe): batch norm corrected by clipped r, d towards the running "
    "statistics; optional r_max/d_max ramps",
)
class BatchRenorm(RunningStats):
    r"""Batch Renormalization (Ioffe 2017; Kalayeh & Shah, Sec. 2.1, Eq. 5).

    Training: ``y = γ·(x̂·r + d) + β`` with the batch-normalized x̂ and the clipped, detached
    ``r = clip(σ_B/σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ)/σ, −d_max, d_max)``, where μ is
    ``running_mean`` and ``σ = √(running_var + eps)`` (:func:`batch_renorm`). Eval:
    ``y = γ·(x − μ)/σ + β``. ``running_var`` holds the *unbiased* batch variance, as in
    ``nn.BatchNorm2d``; σ_B uses the biased one.

    Args:
        num_features: C, the number of channels.
        eps: added to both variances inside the square roots.
        momentum: running-statistics momentum (PyTorch convention
            ``running = (1 - momentum) * running + momentum * batch``).
        affine: learnable per-channel γ (``weight``) and β (``bias``).
        r_max: the limit of r (≥ 1); with ``r_max_ramp`` the value reached at its end.
        d_max: the limit of |d| (≥ 0); with ``d_max_ramp`` the value reached at its end.
        r_max_ramp: ``(start, end)`` steps of a linear ramp of the r limit from 1 to ``r_max``
            (Ioffe: 1 until step 5k, 3 from step 40k), or None (``r_max`` throughout).
        d_max_ramp: ``(start, end)`` steps of a linear ramp of the d limit from 0 to ``d_max``
            (Ioffe: 0 until step 5k, 5 from step 25k), or None (``d_max`` throughout).

    The ramps follow the step given to :meth:`set_step` (or :func:`set_brn_step`), kept in the
    buffer ``step`` (0 until set; it is not a running statistic, so
    :meth:`reset_running_stats` leaves it alone). Buffers: ``running_mean``, ``running_var``
    (C,), ``num_batches_tracked``, ``step``.

    Shape: ``(N, C)`` or ``(N, C, *)`` -> same.

    Example::

        >>> brn = BatchRenorm(8, r_max_ramp=(5000, 40000), d_max_ramp=(5000, 25000))
        >>> set_brn_step(brn, 20000)
        1
        >>> [round(float(v), 3) for v in brn.limits()]
        [1.857, 3.75]
        >>> y = brn(torch.randn(16, 8, 4, 4))
    """

    sync_batch_stats = True  # normlab.sync_stats all-reduces its batch sums

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        r_max_ramp: tuple[int, int] | None = None,
        d_max_ramp: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features", _LAYER)
        self.eps = check_eps(eps, _LAYER)
        self.momentum = check_momentum(momentum, _LAYER)
        self.r_max = _check_limit(r_max, "r_max", 1.0)
        self.d_max = _check_limit(d_max, "d_max", 0.0)
        self.r_max_ramp = _check_ramp(r_max_ramp, "r_max_ramp")
        self.d_max_ramp = _check_ramp(d_max_ramp, "d_max_ramp")
        self.affine = add_channel_affine(self, num_features, affine, _LAYER)
        self._add_running_stats(num_features)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Running statistics reset, γ = 1, β = 0."""
        self.reset_running_stats()
        reset_channel_affine(self)

    def set_step(self, step: int | Tensor) -> None:
        """Set the training step that drives the ``r_max``/``d_max`` ramps (a non-negative int)."""
        self.step.fill_(_check_step(step, f"{_LAYER}.set_step"))

    def limits(self) -> tuple[float | Tensor, float | Tensor]:
        """The current ``(r_max, d_max)`` clipping limits at the step set by :meth:`set_step`."""
        return (
            ramp_limit(self.step, 1.0, self.r_max, self.r_max_ramp),
            ramp_limit(self.step, 0.0, self.d_max, self.d_max_ramp),
        )

    def forward(self, x: Tensor) -> Tensor:
        self._begin_forward(x)
        r_max, d_max = self.limits()
        return batch_renorm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self._batch_statistics(x),
            self.momentum,
            self.eps,
            r_max,
            d_max,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}"
        )
        for name in ("r_max_ramp", "d_max_ramp"):
            if getattr(self, name) is not None:
                s += f", {name}={getattr(self, name)}"
        return s


def set_brn_step(model: nn.Module, step: int | Tensor) -> int:
    """Set the training step of every :class:`BatchRenorm` in ``model`` (the position on its
    ``r_max``/``d_max`` ramps). Call it once per training step, before the forward pass, with the
    number of optimizer steps taken so far. Returns the number of layers updated.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchRenorm(8))
        >>> set_brn_step(model, 100)
        1
    """
    s = _check_step(step, "set_brn_step")
    n = 0
    for m in model.modules():
        if isinstance(m, BatchRenorm):
            m.step.fill_(s)
            n += 1
    return n
