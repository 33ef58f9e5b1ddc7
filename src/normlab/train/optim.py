"""Optimizers and learning-rate schedules used in the papers.

* SGD with momentum / Nesterov and weight decay (Deecke et al., Huang et al., Qiao et al.; Kalayeh & Shah Inception/DenseNet with NAG).
* RMSprop with momentum (Kalayeh & Shah: momentum 0.9, lr decayed by 0.93 every 2 or 4 epochs; Collins et al.).
* Adam (Collins et al. PointNet) and AdamW.

The schedule is a pure function of the optimizer-step counter (:class:`LRSchedule`), so a resumed
run only needs the counter to be back on the same learning rate — there is no hidden scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from normlab.train.config import OptimConfig, ScheduleConfig

__all__ = ["LRSchedule", "build_optimizer", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Parameter groups: everything decayed, or (``decay_norm_and_bias=False``) 1-d parameters —
    normalization affine parameters and biases — in a group without weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0.0:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer described by ``cfg`` over ``model``'s trainable parameters.

    RMSprop uses ``alpha`` (decay of the squared-gradient average, default 0.9 as in the
    TensorFlow implementation the papers used) and ``momentum``; weight decay is the L2 term added
    to the gradient, as a ``weight_decay · ||w||²/2`` loss term would (AdamW: decoupled).
    """
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum
        )
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


class LRSchedule:
    """Learning-rate factor as a function of the optimizer step ``t`` (0-based: the factor used by
    the ``t``-th update).

    ``steps_per_epoch`` converts epochs to steps, ``total_steps`` is the length of training (for
    fraction milestones and cosine). See :class:`normlab.train.config.ScheduleConfig` for kinds.
    """

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch) + cfg.warmup_steps
        unit = {"fraction": total_steps, "epoch": steps_per_epoch, "step": 1}[cfg.milestone_unit]
        self.milestone_steps = [round(m * unit) for m in cfg.milestones]

    def decay(self, t: int) -> float:
        """The schedule without warm-up."""
        c = self.cfg
        if c.name == "constant":
            return 1.0
        if c.name == "exp":
            periods = t / (c.every_epochs * self.steps_per_epoch)
            if c.staircase:
                periods = math.floor(periods + 1e-9)
            return c.gamma**periods
        if c.name == "step":
            return c.gamma ** sum(1 for m in self.milestone_steps if t >= m)
        if c.name == "cosine":
            frac = min(t / self.total_steps, 1.0)
            return c.min_factor + (1.0 - c.min_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))
        raise ValueError(f"schedule.name: unknown schedule {c.name!r}")

    def factor(self, t: int) -> float:
        f = self.decay(t)
        if t < self.warmup:
            s = self.cfg.warmup_start
            f *= s + (1.0 - s) * t / self.warmup
        return f

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> float:
        """Set every parameter group's lr to ``initial_lr · factor(t)``; returns the first lr."""
        f = self.factor(t)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g["lr"] = g["initial_lr"] * f
        return optimizer.param_groups[0]["lr"]

    def lrs(self, base_lr: float, steps: Iterable[int]) -> list[float]:
        """``base_lr · factor(t)`` for each t (for plots and tests)."""
        return [base_lr * self.factor(t) for t in steps]
