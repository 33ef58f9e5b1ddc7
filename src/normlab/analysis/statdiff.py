r"""Statistical differences between channels normalized together (Qiao et al., Sec. 6.1.4, Eq. 35,
Fig. 6).

For a group g of channels that a channel-based normalization (GN, LN) normalizes together, with
running per-channel means :math:`\mu^r_c` and standard deviations :math:`\sigma_c` of the
activations *after the convolution* (i.e. before normalization),

.. math::

    \operatorname{StatDiff}(g) = \frac{\sqrt{\mathbb E_{c\in g}[(\mu^r_c)^2]
        - (\mathbb E_{c\in g}[\mu^r_c])^2}}{\mathbb E_{c\in g}[\sigma_c]} \qquad (35)

— the (population) standard deviation of the channel means divided by the mean channel standard
deviation. It is 0 when all channels of the group share their mean (BN's situation) and grows as
channels drift apart, leaving some channels under-represented after Eq. 30.

:func:`stat_diff` is the pure formula; :class:`StatDiffCollector` puts forward hooks on a model's
convolutions and keeps, per convolution, running per-channel E[x] and E[x²] over training batches
(so σ_c² = E[x²] − E[x]²), from which it evaluates Eq. 35 per group and the summary plotted in
Qiao et al., Fig. 6. :func:`plot_stat_diff` draws that summary over training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.analysis._plot import new_figure, save_figure
from normlab.nn._utils import check_momentum
from normlab.nn.registry import norm_classes
from normlab.nn.stats import channel_sums

__all__ = ["StatDiffCollector", "plot_stat_diff", "stat_diff"]


def stat_diff(mean: Tensor, var: Tensor, num_groups: int, eps: float = 1e-12) -> Tensor:
    r"""StatDiff of each channel group (Qiao et al., Eq. 35).

    Args:
        mean: per-channel means :math:`\mu^r_c`, shape ``(..., C)``.
        var: per-channel variances :math:`\sigma_c^2` (>= 0; negative values are clamped to 0),
            same shape. The denominator of Eq. 35 averages their square roots.
        num_groups: G; channels are grouped contiguously as in group normalization (channel c is
            in group ``c // (C // G)``). G = 1 is layer normalization's single group.
        eps: lower clamp of the denominator (all-constant channels give 0 / eps, finite).

    Returns:
        ``(..., G)``: the population standard deviation of the group's means divided by the mean
        of its standard deviations.

    Example::

        >>> mean = torch.tensor([1.0, 3.0, 0.0, 0.0])  # group 0: means 1 and 3, group 1: equal
        >>> stat_diff(mean, torch.full((4,), 4.0), num_groups=2)  # (std 1) / (mean σ 2)
        tensor([0.5000, 0.0000])
    """
    if mean.shape != var.shape or mean.dim() < 1:
        raise ValueError(
            f"stat_diff: mean and var must have the same shape (..., C), got {tuple(mean.shape)} "
            f"and {tuple(var.shape)}"
        )
    c = mean.shape[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"stat_diff: num_groups must be a positive integer, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"stat_diff: num_groups={num_groups} must divide the channel count {c}")
    shape = (*mean.shape[:-1], num_groups, c // num_groups)
    mu = mean.reshape(shape)
    sd = var.clamp_min(0).sqrt().reshape(shape)
    # sqrt(E[μ²] − E[μ]²), computed as the centred second moment (no cancellation)
    spread = (mu - mu.mean(-1, keepdim=True)).square().mean(-1).sqrt()
    return spread / sd.mean(-1).clamp_min(eps)


GroupsArg = int | Mapping[str, int] | Callable[[str, nn.Module], int] | None


class StatDiffCollector:
    r"""Running per-channel statistics after convolutions, and their StatDiff (Qiao et al., Fig. 6).

    Registers a forward hook on every module of ``model`` that is an instance of ``modules``
    (by default every ``nn.Conv1d/2d/3d``, which includes normlab's ``WSConv*``). In training mode
    (or always, with ``train_only=False``) each hooked forward updates, per output channel,

    .. math::  m_1 \leftarrow (1-\text{momentum})\,m_1 + \text{momentum}\,\overline{x},\qquad
               m_2 \leftarrow (1-\text{momentum})\,m_2 + \text{momentum}\,\overline{x^2}

    with the batch averages over N and all positions (from :func:`normlab.nn.stats.channel_sums`,
    no gradients, no host synchronisation); the first batch initialises m₁, m₂. The running
    variance is :math:`m_2 - m_1^2` (clamped at 0); it includes the spread of the batch means, so
    it estimates the channel's variance over the data.

    Groups (the channels normalized together after each convolution) come from ``groups``: an int
    for every layer, a mapping from the module's qualified name, or a callable ``(name, module) ->
    G``. ``None`` infers them: the first module after the convolution in ``model.named_modules()``
    order that has ``num_features`` or ``num_channels`` equal to the convolution's output channels
    and is a normalization layer gives ``num_groups`` if it has one (GroupNorm, LayerNorm (1),
    InstanceNorm, BCNorm, ...), otherwise 1 (the whole layer: e.g. after BN, which has no groups,
    StatDiff measures how different the channels are across the layer). Pass ``groups`` explicitly
    when the model's order of registration does not follow the data flow.

    Use it as a trainer callback (``callbacks=[collector]`` records every ``every`` steps), or call
    :meth:`record` yourself (Qiao et al. record after every epoch). Remove the hooks with
    :meth:`remove` or a ``with`` block.

    Args:
        model: the network.
        groups: the channel groups per layer (see above); ``None`` infers them.
        momentum: of the running averages m₁, m₂ (PyTorch convention).
        modules: the module types to hook.
        train_only: update only in training-mode forwards.
        every: record every ``every`` steps when used as a trainer callback.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU())
        >>> with StatDiffCollector(model) as collector:
        ...     _ = model(torch.randn(4, 3, 8, 8))
        ...     rec = collector.record(step=1)
        >>> collector.groups, sorted(rec)
        ({'0': 2}, ['layers', 'mean', 'std', 'step'])
    """

    def __init__(
        self,
        model: nn.Module,
        groups: GroupsArg = None,
        momentum: float = 0.1,
        modules: type | tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d),
        train_only: bool = True,
        every: int = 1,
    ) -> None:
        self.momentum = check_momentum(momentum, "StatDiffCollector")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"StatDiffCollector: every must be a positive integer, got {every!r}")
        self.every = every
        self.train_only = bool(train_only)
        named = list(model.named_modules())
        self.modules: dict[str, nn.Module] = {
            name: mod for name, mod in named if isinstance(mod, modules)
        }
        if not self.modules:
            raise ValueError(
                f"StatDiffCollector: the model has no modules of type {modules!r} to collect from"
            )
        self.groups: dict[str, int] = {}
        for name, mod in self.modules.items():
            c = _out_channels(mod, name)
            g = _resolve_groups(groups, name, mod, named)
            if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
                raise ValueError(
                    f"StatDiffCollector: groups for {name!r} must be a positive divisor of its "
                    f"{c} output channels, got {g!r}"
                )
            self.groups[name] = g
        self.running_mean: dict[str, Tensor | None] = dict.fromkeys(self.modules)
        self.running_sqmean: dict[str, Tensor | None] = dict.fromkeys(self.modules)
        self.history: list[dict[str, Any]] = []
        self._handles = [
            mod.register_forward_hook(self._hook(name)) for name, mod in self.modules.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if self.train_only and not module.training:
                return
            with torch.no_grad():
                sums = channel_sums(output.detach())
                m1, m2 = sums.s1 / sums.count, sums.s2 / sums.count
                if self.running_mean[name] is None:
                    self.running_mean[name], self.running_sqmean[name] = m1, m2
                else:
                    self.running_mean[name].lerp_(m1, self.momentum)
                    self.running_sqmean[name].lerp_(m2, self.momentum)

        return hook

    def running_var(self, name: str) -> Tensor | None:
        """Running per-channel variance E[x²] − E[x]² (clamped at 0) of layer ``name``."""
        m1, m2 = self.running_mean[name], self.running_sqmean[name]
        if m1 is None or m2 is None:
            return None
        return (m2 - m1 * m1).clamp_min(0)

    def stat_diff(self) -> dict[str, Tensor]:
        """StatDiff of every group (Qiao et al., Eq. 35), ``{layer name: (G,) tensor}``, for the
        layers that have seen at least one batch."""
        out = {}
        for name in self.modules:
            var = self.running_var(name)
            if var is not None:
                out[name] = stat_diff(self.running_mean[name], var, self.groups[name])
        return out

    def summary(self) -> dict[str, Any]:
        """Qiao et al., Fig. 6 at this point of training: each layer's StatDiff averaged over its
        groups (``layers``), and the mean and (population) standard deviation of those layer
        averages over all layers (``mean``, ``std``; NaN before any batch). Plain Python floats."""
        per_layer = {k: float(v.mean()) for k, v in self.stat_diff().items()}
        vals = torch.tensor(list(per_layer.values()), dtype=torch.float64)
        if vals.numel() == 0:
            return {"mean": float("nan"), "std": float("nan"), "layers": per_layer}
        return {
            "mean": float(vals.mean()),
            "std": float(vals.std(unbiased=False)),
            "layers": per_layer,
        }

    def record(self, step: int) -> dict[str, Any]:
        """Append ``{"step": step, **summary()}`` to :attr:`history` and return it."""
        rec = {"step": int(step), **self.summary()}
        self.history.append(rec)
        return rec

    def __call__(self, trainer: Any) -> None:
        """Trainer callback: record every ``every`` optimizer steps (``trainer.step``)."""
        if trainer.step % self.every == 0:
            self.record(trainer.step)

    def reset(self) -> None:
        """Forget the running statistics and the history."""
        self.running_mean = dict.fromkeys(self.modules)
        self.running_sqmean = dict.fromkeys(self.modules)
        self.history = []

    def remove(self) -> None:
        """Remove the forward hooks (the statistics and history stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> StatDiffCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _out_channels(mod: nn.Module, name: str) -> int:
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        v = getattr(mod, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"StatDiffCollector: cannot tell the output channel count of {name!r}")


def _is_norm(mod: nn.Module) -> bool:
    torch_norms = (
        nn.modules.batchnorm._NormBase,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
    )
    return isinstance(mod, torch_norms + norm_classes())


def _resolve_groups(
    groups: GroupsArg, name: str, mod: nn.Module, named: list[tuple[str, nn.Module]]
) -> Any:
    if groups is None:
        c = _out_channels(mod, name)
        after = False
        for _other_name, other in named:
            if other is mod:
                after = True
                continue
            if not after or not _is_norm(other):
                continue
            width = getattr(other, "num_features", getattr(other, "num_channels", None))
            if width == c:
                g = getattr(other, "num_groups", None)
                return g if isinstance(g, int) else 1
        return 1
    if isinstance(groups, Mapping):
        if name not in groups:
            raise ValueError(f"StatDiffCollector: groups has no entry for layer {name!r}")
        return groups[name]
    if callable(groups):
        return groups(name, mod)
    return groups


def plot_stat_diff(
    runs: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Qiao et al., Fig. 6: mean ± std (shaded) of StatDiff over layers against the training step.

    ``runs`` is one :attr:`StatDiffCollector.history` or a mapping ``{label: history}`` (e.g. GN,
    GN+WS, LN, LN+WS); one curve per run. Returns the written path.

    Example::

        >>> import tempfile
        >>> hist = [{"step": 0, "mean": 0.4, "std": 0.1}, {"step": 10, "mean": 0.2, "std": 0.05}]
        >>> plot_stat_diff({"GN": hist}, tempfile.mkdtemp() + "/statdiff.png").name
        'statdiff.png'
    """
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    fig, axes = new_figure(size=(5.0, 3.4))
    ax = axes[0, 0]
    for label, hist in runs.items():
        steps = [r["step"] for r in hist]
        mean = torch.tensor([r["mean"] for r in hist], dtype=torch.float64)
        std = torch.tensor([r["std"] for r in hist], dtype=torch.float64)
        ax.plot(steps, mean.tolist(), label=label or None)
        ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel("StatDiff (Qiao et al., Eq. 35)")
    if title:
        ax.set_title(title)
    if any(runs):
        ax.legend()
    return save_figure(fig, path)
