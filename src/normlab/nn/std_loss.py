r"""The standardization loss (Collins et al., Sec. 3, Eq. 2).

For the pre-activation ``x`` of a layer, with per-channel mean μ_i and variance σ²_i taken over
the batch (and spatial) dimensions — "the same way they are calculated in BN" (Collins et al.,
Sec. 3) — the loss is the KL divergence of the Gaussian fit to ``x`` from N(0, I) (Collins et al.,
Eq. 2):

.. math::  L = \tfrac12 \sum_i \bigl(\mu_i^2 + \sigma_i^2 - \log \sigma_i^2 - 1\bigr),

summed over hooked layers and multiplied by a weight, then added to the task loss in training.

* :func:`standardization_loss` is Eq. 2 for one tensor; :func:`standardization_moments` gives
  its μ, σ² (population variance, float32 statistics, two-pass and free of cancellation).
* :class:`StandardizationLoss` hooks a model's Conv/Linear layers and accumulates Eq. 2 over
  them in training forwards. ``log σ²`` is taken as ``log(σ² + eps)``.
* By default the moments are per process, like Collins et al., App. A.6 ("statistical moments
  are calculated independently for each core"). :meth:`StandardizationLoss.sync` (or
  ``normlab.sync_stats(model, std_loss=...)``) makes them those of all processes' samples
  (:func:`synced_standardization_moments`), with gradients through the all-reduce.

The channel dimension is 1 for convolutions and any other module (channel-first ``(N, C, *)``),
and the last dimension for ``nn.Linear`` (whose output is ``(N, *, C)``). The reasons for ``eps``,
the variance and the gradient under DDP are in ``docs/methods/std_loss.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from normlab.nn._utils import channel_view
from normlab.nn.collective import resolve_group
from normlab.nn.stats import channel_sums, reduction_scope

__all__ = [
    "StandardizationLoss",
    "standardization_loss",
    "standardization_moments",
    "synced_standardization_moments",
]

_PREACT_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_GLOB_CHARS = set("*?[")


def standardization_moments(x: Tensor, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance of ``x`` over every dimension except
    ``channel_dim``, in float32 (float64 input: float64). Differentiable.

    Args:
        x: a pre-activation with a batch dimension 0.
        channel_dim: 1 for channel-first tensors, -1 for the output of ``nn.Linear``.

    Shape:
        - Input: ``(N, C, *)`` (``channel_dim=1``) or ``(N, *, C)`` (``channel_dim=-1``)
        - Output: two ``(C,)`` tensors, ``(mean, var)``

    Example::

        >>> mean, var = standardization_moments(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> mean, var
        (tensor([2., 0.]), tensor([1., 0.]))
    """
    if x.dim() < 2:
        raise ValueError(
            f"standardization_loss: expected a tensor with a batch and a channel dimension, got "
            f"shape {tuple(x.shape)}"
        )
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("standardization_loss: channel_dim cannot be the batch dimension 0")
    xf = x if x.dtype == torch.float64 else x.float()
    dims = [d for d in range(x.dim()) if d != cd]
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean, var


def synced_standardization_moments(
    x: Tensor, channel_dim: int = 1, group: object | None = None
) -> tuple[Tensor, Tensor]:
    r""":func:`standardization_moments` over the samples of every process of ``group``.

    Two passes of :func:`normlab.nn.stats.channel_sums` in a reduction scope: a gradient-free one
    for the global mean :math:`\bar\mu`, then :math:`\sum(x - \bar\mu)`,
    :math:`\sum(x - \bar\mu)^2` and the count n, all-reduced inside autograd;

    .. math::  \mu = \bar\mu + \tfrac1n\textstyle\sum(x - \bar\mu), \qquad
               \sigma^2 = \tfrac1n\textstyle\sum(x - \bar\mu)^2
               - \bigl(\tfrac1n\sum(x - \bar\mu)\bigr)^2 .

    The second term is ~0 in value but carries the exact gradient. Float32 statistics (float64
    input: float64). Differentiable.

    Args:
        x: a pre-activation with a batch dimension 0.
        channel_dim: 1 for channel-first tensors, -1 for the output of ``nn.Linear``.
        group: a ``torch.distributed`` ProcessGroup, or ``None`` for this process only
            (computed the same way).

    Shape:
        - Input: as :func:`standardization_moments`
        - Output: two ``(C,)`` tensors, ``(mean, var)``

    Example::

        >>> x = torch.randn(32, 4, 3, 3, dtype=torch.float64)
        >>> m1, v1 = synced_standardization_moments(x)  # no group: this process's samples
        >>> m2, v2 = standardization_moments(x)
        >>> torch.allclose(m1, m2) and torch.allclose(v1, v2)
        True
    """
    if x.dim() < 2:
        raise ValueError(
            f"standardization_loss: expected a tensor with a batch and a channel dimension, got "
            f"shape {tuple(x.shape)}"
        )
    cd = channel_dim % x.dim()
    if cd == 0:
        raise ValueError("standardization_loss: channel_dim cannot be the batch dimension 0")
    xf = x if x.dtype == torch.float64 else x.float()
    xc = xf.movedim(cd, 1)  # a view: channel_sums reduces every dimension but 1
    with reduction_scope(group):
        with torch.no_grad():
            center = channel_sums(xc).mean_var()[0]
        sums = channel_sums(xc - channel_view(center, xc.dim()))
    d = sums.s1 / sums.count
    var = (sums.s2 / sums.count - d * d).clamp_min(0)
    return center + d, var


def standardization_loss(x: Tensor, channel_dim: int = 1, eps: float = 1e-8) -> Tensor:
    r"""Collins et al., Eq. 2 for one pre-activation tensor.

    .. math::  L = \tfrac12 \sum_i \bigl(\mu_i^2 + \sigma_i^2 - \log(\sigma_i^2 + \epsilon)
               - 1\bigr)

    with statistics over all dimensions but ``channel_dim`` (batch and spatial).

    Args:
        x: a pre-activation with a batch dimension 0.
        channel_dim: 1 for channel-first tensors, -1 for the output of ``nn.Linear``.
        eps: ε inside the logarithm, so a constant channel gives a finite loss.

    Returns:
        a scalar (float32, or float64 for float64 input) with gradient to ``x``.

    Shape:
        - Input: ``(N, C, *)`` for ``channel_dim=1``; ``(N, *, C)`` for ``channel_dim=-1``
        - Output: ``()``

    Example::

        >>> x = torch.tensor([[1.0, 2.0], [-1.0, 4.0]])  # (μ, σ²) = (0, 1) and (3, 1)
        >>> round(float(standardization_loss(x)), 4)  # ½ [(0 + 1 − 0 − 1) + (9 + 1 − 0 − 1)]
        4.5
    """
    mean, var = standardization_moments(x, channel_dim)
    return _eq2(mean, var, eps)


def _eq2(mean: Tensor, var: Tensor, eps: float) -> Tensor:
    return 0.5 * (mean * mean + var - torch.log(var + eps) - 1.0).sum()


def _check_weight(weight: object) -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(
            f"StandardizationLoss: weight must be a finite number >= 0, got {weight!r}"
        )
    return float(weight)


ModuleSelection = str | nn.Module | Iterable[str | nn.Module] | None


def _default_selection(model: nn.Module) -> list[str]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, _PREACT_TYPES)]
    linear = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Linear)]
    if linear:
        del named[linear[-1]]
    return [n for n, _ in named]


def _explicit_selection(model: nn.Module, modules: ModuleSelection) -> list[str]:
    items = [modules] if isinstance(modules, str | nn.Module) else list(modules)  # type: ignore[arg-type]
    all_named = dict(model.named_modules())
    by_id = {id(m): n for n, m in reversed(list(all_named.items()))}
    candidates = [n for n, m in all_named.items() if isinstance(m, _PREACT_TYPES)]
    chosen: list[str] = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(
                    f"StandardizationLoss: module {type(item).__name__} is not a submodule of the "
                    "model"
                )
            names = [by_id[id(item)]]
        elif isinstance(item, str):
            if _GLOB_CHARS & set(item):
                names = [n for n in candidates if fnmatchcase(n, item)]
                if not names:
                    raise ValueError(
                        f"StandardizationLoss: pattern {item!r} matches no Conv/Linear layer; the "
                        f"model's Conv/Linear layers are: {candidates or '(none)'}"
                    )
            elif item in all_named:
                names = [item]
            else:
                raise ValueError(
                    f"StandardizationLoss: the model has no module named {item!r}; its Conv/Linear "
                    f"layers are: {candidates or '(none)'}"
                )
        else:
            raise TypeError(
                "StandardizationLoss: modules must be modules, qualified names or glob patterns, "
                f"got {type(item).__name__}"
            )
        chosen.extend(n for n in names if n not in chosen)
    return chosen


class StandardizationLoss:
    """Accumulates the standardization loss (Collins et al., Eq. 2) of a model's pre-activations
    via forward hooks.

    Each forward of a hooked module *in training mode* adds its layer's Eq. 2 value to an
    accumulator; :meth:`loss` returns ``weight ×`` the total and resets it. The hooks never modify
    outputs. Use as ``loss = task_loss + std.loss()`` once per step (a forgotten ``loss()`` keeps
    the graphs of earlier forwards alive). :meth:`remove` detaches the hooks; the object is also
    a context manager that removes them on exit.

    Args:
        model: the network.
        modules: which outputs to penalize. ``None`` (default): every ``nn.Conv1d/2d/3d`` and
            ``nn.Linear`` (subclasses such as normlab's WS layers included) except the LAST
            ``nn.Linear`` in module order (the classifier's logits are not a pre-activation).
            Otherwise a module, a qualified name, a glob pattern (matched against the Conv/Linear
            layers' qualified names, as in :func:`normlab.convert`), or a list of those.
        weight: multiplies the total (Collins et al. use 1.0 on MNIST down to 1e-6 on ResNet-50).
        eps: ``log σ²`` is taken as ``log(σ² + eps)``.

    Multi-process training: by default the moments are per process (Collins et al., App. A.6);
    :meth:`sync` makes them global.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10))
        >>> std = StandardizationLoss(model, weight=1e-2)
        >>> std.names  # every Conv/Linear but the classifier
        ['0']
        >>> x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 10, (16,))
        >>> loss = nn.functional.cross_entropy(model(x), y) + std.loss()
        >>> loss.backward()
        >>> std.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSelection = None,
        weight: float = 1.0,
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"StandardizationLoss: model must be an nn.Module, got {model!r}")
        self.weight = _check_weight(weight)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"StandardizationLoss: eps must be a positive number, got {eps!r}")
        self.eps = float(eps)
        names = (
            _default_selection(model) if modules is None else _explicit_selection(model, modules)
        )
        if not names:
            raise ValueError(
                "StandardizationLoss: no layer to hook — the model has no Conv/Linear layer other "
                "than its last Linear; pass modules=... explicitly"
            )
        self.names: list[str] = names
        self._model = model
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._total: Tensor | None = None
        self._last: dict[str, Tensor] = {}
        self._moments: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles = []
        self._synced = False
        self._process_group: object | None = None
        for n in names:
            mod = model.get_submodule(n)
            self._handles.append(mod.register_forward_hook(self._make_hook(n)))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not module.training:
                return
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"StandardizationLoss: hooked module {name!r} returned "
                    f"{type(output).__name__}, expected a tensor"
                )
            cd = -1 if isinstance(module, nn.Linear) else 1
            group = None
            if self._synced:
                group = resolve_group(self._process_group)
            if group is None:
                mean, var = standardization_moments(output, cd)
            else:
                mean, var = synced_standardization_moments(output, cd, group)
            value = _eq2(mean, var, self.eps)
            self._total = value if self._total is None else self._total + value.to(self._total)
            self._last[name] = value.detach()
            self._moments[name] = (mean.detach(), var.detach())

        return hook

    def sync(self, process_group: object | None = None) -> StandardizationLoss:
        """Compute the moments over all processes of ``process_group`` (``None``: the default
        group) in training forwards, like :func:`normlab.sync_stats` does for layers. A no-op
        while ``torch.distributed`` is not initialised or the group has one process (resolved at
        every forward). Every process must then run the hooked layers in the same order.
        Returns ``self``."""
        dist = torch.distributed
        if process_group is not None and not (
            dist.is_available() and isinstance(process_group, dist.ProcessGroup)
        ):
            raise TypeError(
                "StandardizationLoss.sync: process_group must be a torch.distributed ProcessGroup "
                f"or None (the default group), got {type(process_group).__name__}"
            )
        self._synced = True
        self._process_group = process_group
        return self

    def unsync(self) -> StandardizationLoss:
        """Back to per-process moments (Collins et al., App. A.6). Returns ``self``."""
        self._synced = False
        self._process_group = None
        return self

    @property
    def synced(self) -> bool:
        """Whether :meth:`sync` is in effect."""
        return self._synced

    def loss(self) -> Tensor:
        """``weight × Σ_layers Eq. 2`` accumulated since the last call, then reset. A zero
        scalar when nothing was accumulated (eval mode, or no forward yet)."""
        total = self._total
        self._total = None
        if total is None:
            return torch.zeros((), device=self._device)
        return total * self.weight

    def reset(self) -> None:
        """Drop the accumulated loss without returning it."""
        self._total = None

    def per_layer(self) -> dict[str, Tensor]:
        """Last unweighted Eq. 2 value of each hooked layer (detached scalars), by qualified name;
        layers that have not run in training mode yet are absent."""
        return dict(self._last)

    def per_layer_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Last per-channel (μ, σ²) of each hooked layer, detached, by qualified name."""
        return dict(self._moments)

    def remove(self) -> None:
        """Detach every hook; later forwards accumulate nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> StandardizationLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"StandardizationLoss(weight={self.weight}, eps={self.eps}, "
            f"layers={self.names}, active={bool(self._handles)}, synced={self._synced})"
        )
