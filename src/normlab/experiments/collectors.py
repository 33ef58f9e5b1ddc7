"""Collectors: analyses recorded while a run trains, written next to its ``metrics.jsonl``.

A collector is a trainer callback (called after every optimizer step) built from one entry of
the experiment's ``[collect]`` table (:data:`normlab.experiments.spec.COLLECT_OPTIONS`):

* ``statdiff`` -> ``statdiff.jsonl``: StatDiff of the convolutions' running per-channel
  statistics (Qiao et al., Fig. 6);
* ``gmm`` -> ``gmm_snapshot.pt``: one training batch of a module's output at a fraction of
  training, for the report's mixture fits (Kalayeh & Shah, Fig. 1);
* ``percentiles`` -> ``percentiles.jsonl``: percentiles of a module's output over training
  (Collins et al., Fig. 4).

Collectors keep their running state in memory: a resumed run keeps the records written before
the interruption and starts that state afresh from the checkpoint's step on.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from normlab.analysis.activations import PercentileRecorder
from normlab.analysis.statdiff import StatDiffCollector
from normlab.experiments.spec import (
    ExperimentError,
    GMMCollect,
    PercentilesCollect,
    Record,
    StatDiffCollect,
)

__all__ = [
    "COLLECTORS",
    "Collector",
    "GMMSnapshot",
    "Percentiles",
    "StatDiff",
    "build_collectors",
    "json_default",
]


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for paths and arrays / tensors."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


class Collector(abc.ABC):
    """A trainer callback that appends JSON records to ``run_dir / file``; ``fresh`` removes the
    file of an earlier attempt."""

    file = ""

    def __init__(self, run_dir: Path, fresh: bool) -> None:
        self.path = run_dir / self.file
        if fresh and self.path.exists():
            self.path.unlink()

    def append(self, rec: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=json_default) + "\n")

    @abc.abstractmethod
    def __call__(self, trainer: Any) -> None:
        """Record what this collector measures at the trainer's current step."""

    def close(self) -> None:  # noqa: B027 (a no-op unless the collector holds hooks)
        """Remove the collector's hooks (the run has ended)."""


def _due(trainer: Any, every: int) -> bool:
    """``every`` > 0: every that many steps; 0: at epoch ends (the trainer resets ``pos`` to 0)."""
    if every > 0:
        return trainer.step % every == 0 or trainer.step == trainer.total_steps
    return trainer.pos == 0 or trainer.step == trainer.total_steps


def _pick_module(mods: Mapping[str, Any], module: str | Sequence[str], key: str) -> str:
    """The first of ``module`` (a name or a list of candidate names) that the model has."""
    cands = [module] if isinstance(module, str) else list(module)
    for c in cands:
        if c in mods:
            return c
    raise ExperimentError(
        f"{key}: none of {cands!r} is a module of the model; e.g. {', '.join(list(mods)[1:8])}"
    )


class StatDiff(Collector):
    """Qiao et al., Fig. 6: StatDiff of the convolutions' running per-channel statistics."""

    file = "statdiff.jsonl"

    def __init__(self, trainer: Any, run_dir: Path, fresh: bool, opts: StatDiffCollect) -> None:
        super().__init__(run_dir, fresh)
        self.every = opts.every
        self.c = StatDiffCollector(trainer.model, groups=opts.groups, momentum=opts.momentum)

    def __call__(self, trainer: Any) -> None:
        if _due(trainer, self.every):
            rec = self.c.record(trainer.step)
            self.append({"epoch": round(trainer.step / trainer.steps_per_epoch, 6), **rec})

    def close(self) -> None:
        self.c.remove()


class GMMSnapshot(Collector):
    """Kalayeh & Shah, Fig. 1: one training batch of a module's output (the activations a norm
    sees), saved at a fraction of training as ``gmm_snapshot.pt`` ``{module, step, values}``
    with ``values`` of shape (channels, points)."""

    file = "gmm_snapshot.pt"

    def __init__(self, trainer: Any, run_dir: Path, fresh: bool, opts: GMMCollect) -> None:
        super().__init__(run_dir, fresh)
        mods = dict(trainer.model.named_modules())
        self.module = _pick_module(mods, opts.module, "collect.gmm.module")
        self.at_step = max(1, round(opts.at * trainer.total_steps))
        self.channels = opts.channels
        self.max_points = opts.max_points
        self._last: torch.Tensor | None = None
        self._h = mods[self.module].register_forward_hook(self._hook)

    def _hook(self, mod: Any, args: Any, output: Any) -> None:
        if mod.training:
            self._last = output.detach()

    def __call__(self, trainer: Any) -> None:
        if trainer.step == self.at_step and self._last is not None and not self.path.exists():
            x = self._last[:, : self.channels].float().cpu()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)[:, : self.max_points]
            torch.save(
                {"module": self.module, "step": trainer.step, "values": x.contiguous()}, self.path
            )

    def close(self) -> None:
        self._h.remove()


class Percentiles(Collector):
    """Collins et al., Fig. 4: percentiles of a module's output over training."""

    file = "percentiles.jsonl"

    def __init__(self, trainer: Any, run_dir: Path, fresh: bool, opts: PercentilesCollect) -> None:
        super().__init__(run_dir, fresh)
        mods = dict(trainer.model.named_modules())
        module = _pick_module(mods, opts.module, "collect.percentiles.module")
        self.every = opts.every
        self.r = PercentileRecorder(mods[module], q=opts.q)

    def __call__(self, trainer: Any) -> None:
        if _due(trainer, self.every):
            rec = self.r.record(trainer.step)
            if rec is not None:
                self.append({**rec, "q": list(self.r.q)})

    def close(self) -> None:
        self.r.remove()


#: ``[collect]`` key -> collector class (the keys of
#: :data:`normlab.experiments.spec.COLLECT_OPTIONS`)
COLLECTORS: dict[str, type[Collector]] = {
    "statdiff": StatDiff,
    "gmm": GMMSnapshot,
    "percentiles": Percentiles,
}


def build_collectors(
    collect: Mapping[str, Record], trainer: Any, run_dir: Path, fresh: bool, where: str
) -> list[Collector]:
    """The collectors of an experiment's ``[collect]`` options, attached to ``trainer``'s model."""
    out = []
    for name, opts in collect.items():
        try:
            out.append(COLLECTORS[name](trainer, run_dir, fresh, opts))
        except (TypeError, ValueError) as e:
            for c in out:
                c.close()
            raise ExperimentError(f"{where}: [collect].{name}: {e}") from None
    return out
