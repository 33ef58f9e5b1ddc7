"""The model a config describes, and what its layers add to the training loop.

The loop names no layer. :func:`build_training_model` builds the architecture with its norm
spec (:func:`build_model`), moves it to the device, applies :func:`normlab.sync_stats` when
``run.sync_stats`` is set, and asks every registered *wiring rule* what the model's layers need
from the loop. A rule is a function ``rule(model, config) -> Wiring | None`` registered with
:func:`register_wiring`; the :class:`Wiring` it returns holds

* ``aux_losses``: ``{name: fn}``, ``fn()`` a scalar added to the training loss of every
  micro-batch (after its forward) and logged in ``metrics.jsonl`` under ``name`` (the mean per
  optimizer step);
* ``step_hooks``: ``hook(step, lr)`` run at the start of every optimizer step, before its
  forwards, with the step's 0-based index (the steps taken so far) and the learning rate the
  schedule set for it;
* ``after_step``: ``hook(steps_done, lr)`` run after every optimizer update, with the number
  of steps now taken (before the step's evaluation, checkpoint and callbacks);
* ``on_end``: functions run once training has finished.

The rules here: the standardization loss (Collins et al., Eq. 2; ``model.std_loss_weight``)
is an auxiliary loss; BCN's micro-batch rate follows the learning rate (Qiao et al.,
Sec. 7.2.2: r = the learning rate) through a step hook; Batch Renormalization's r_max/d_max
ramps (Ioffe's schedule) follow the step count through :func:`normlab.set_brn_step`. A new
layer that needs the loop registers a rule of its own, and the loop stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from normlab.convert import convert
from normlab.models import create
from normlab.nn.batch_channel import BCNorm, set_bcn_rate
from normlab.nn.renorm import BatchRenorm, set_brn_step
from normlab.nn.std_loss import StandardizationLoss
from normlab.nn.sync import sync_stats
from normlab.train.config import Config, ConfigError, ModelConfig

__all__ = [
    "AuxLoss",
    "BuiltModel",
    "StepHook",
    "Wiring",
    "WiringRule",
    "build_model",
    "build_training_model",
    "register_wiring",
]

#: ``fn()`` -> a scalar tensor added to the training loss of each micro-batch.
AuxLoss = Callable[[], Tensor]
#: ``hook(step, lr)`` run at the start of every optimizer step.
StepHook = Callable[[int, float], None]


@dataclass
class Wiring:
    """What a model's layers add to the training loop (see the module docstring)."""

    aux_losses: dict[str, AuxLoss] = field(default_factory=dict)
    step_hooks: list[StepHook] = field(default_factory=list)
    after_step: list[StepHook] = field(default_factory=list)
    on_end: list[Callable[[], None]] = field(default_factory=list)

    def extend(self, other: Wiring) -> None:
        """Add ``other``'s entries (an auxiliary loss name may appear once)."""
        clash = sorted(set(self.aux_losses) & set(other.aux_losses))
        if clash:
            raise ValueError(f"two wiring rules add an auxiliary loss named {clash[0]!r}")
        self.aux_losses.update(other.aux_losses)
        self.step_hooks.extend(other.step_hooks)
        self.after_step.extend(other.after_step)
        self.on_end.extend(other.on_end)


#: ``rule(model, config)`` -> the :class:`Wiring` its layers need, or ``None``.
WiringRule = Callable[[nn.Module, Config], "Wiring | None"]
_RULES: list[WiringRule] = []


def register_wiring(rule: WiringRule) -> WiringRule:
    """Register ``rule`` (usable as a decorator); rules run in registration order, each on
    every model :func:`build_training_model` builds.

    Example (a layer whose state follows the learning rate)::

        @register_wiring
        def _my_layer_rate(model, config):
            layers = [m for m in model.modules() if isinstance(m, MyLayer)]
            if not layers:
                return None
            return Wiring(step_hooks=[lambda step, lr: [m.set_rate(lr) for m in layers]])
    """
    if not callable(rule):
        raise TypeError(f"register_wiring: rule must be callable, got {rule!r}")
    _RULES.append(rule)
    return rule


@dataclass
class BuiltModel:
    """The model on its device and the :class:`Wiring` of its layers."""

    model: nn.Module
    wiring: Wiring


def _patterns(value: str | list) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    return list(value)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.norm`` in every normalization slot, or — when
    ``include``/``exclude`` select only some slots — with ``cfg.base_norm`` and then
    ``normlab.convert(model, cfg.norm, include, exclude)`` on the selected slots.

    Example::

        >>> from normlab.train import load_config
        >>> model = build_model(load_config(None, ["model.norm=gn"]).model, 10, 1)
    """
    include, exclude = _patterns(cfg.include), _patterns(cfg.exclude)
    everywhere = include == ["*"] and not exclude
    base = cfg.norm if everywhere else cfg.base_norm
    try:
        model = create(
            cfg.name,
            num_classes=num_classes,
            in_channels=in_channels,
            norm=base,
            conv=cfg.conv,
            **cfg.kwargs,
        )
    except (ValueError, TypeError) as e:
        key = "model.base_norm" if not everywhere else "model"
        raise ConfigError(f"{key}: cannot build {cfg.name!r} ({e})") from None
    if not everywhere:
        try:
            convert(model, cfg.norm, include=include or None, exclude=exclude or None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.include: {e}") from None
    return model


def build_training_model(
    config: Config, num_classes: int, in_channels: int, device: torch.device
) -> BuiltModel:
    """:func:`build_model` on ``device`` (synchronised with ``run.sync_stats``), with the
    :class:`Wiring` every registered rule adds.

    Example::

        >>> from normlab.train import load_config
        >>> cfg = load_config(None, ["model.norm=bcn(micro_batch=true)", "model.std_loss_weight=0.1"])
        >>> built = build_training_model(cfg, 10, 1, torch.device("cpu"))
        >>> list(built.wiring.aux_losses), len(built.wiring.step_hooks)
        (['std_loss'], 2)
    """
    model = build_model(config.model, num_classes, in_channels).to(device)
    if config.run.sync_stats:  # before the rules: torch BatchNorms may be replaced
        model = sync_stats(model)
    wiring = Wiring()
    for rule in _RULES:
        extra = rule(model, config)
        if extra is not None:
            wiring.extend(extra)
    return BuiltModel(model, wiring)


@register_wiring
def _standardization_loss(model: nn.Module, config: Config) -> Wiring | None:
    """Collins et al.: the weighted loss of the watched layers' pre-activations."""
    m = config.model
    if m.std_loss_weight <= 0:
        return None
    std = StandardizationLoss(
        model, modules=_patterns(m.std_loss_include) or None, weight=m.std_loss_weight
    )
    if config.run.sync_stats:
        std.sync()
    return Wiring(
        aux_losses={"std_loss": std.loss},
        # forwards outside a training step (e.g. a callback's) must not reach the next step
        step_hooks=[lambda step, lr: std.reset()],
        # the returned model must not keep accumulating loss graphs in later training forwards
        on_end=[std.remove],
    )


@register_wiring
def _bcn_rate(model: nn.Module, config: Config) -> Wiring | None:
    """Qiao et al., Sec. 7.2.2: BCN's micro-batch estimates move with rate r = the learning rate."""
    if not any(isinstance(m, BCNorm) for m in model.modules()):
        return None
    return Wiring(step_hooks=[lambda step, lr: set_bcn_rate(model, lr)])


@register_wiring
def _brn_ramps(model: nn.Module, config: Config) -> Wiring | None:
    """Ioffe's r_max/d_max ramps: every ``brn`` layer's step is the number of optimizer steps
    taken, before each step's forwards and after its update (so checkpoints and the trained
    model hold the steps done); the step is a buffer, so a checkpoint carries it."""
    if not any(isinstance(m, BatchRenorm) for m in model.modules()):
        return None

    def follow(step: int, lr: float) -> None:
        set_brn_step(model, step)

    return Wiring(step_hooks=[follow], after_step=[follow])
