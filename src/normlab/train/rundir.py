"""The run directory: what a training run writes, and the state a resumed run continues from.

::

    config.toml                the resolved configuration (every key, defaults included)
    env.json                   versions, device, seed, start time (and the times of resumes)
    metrics.jsonl              one JSON object per evaluation (see :mod:`normlab.train.loop`)
    summary.json               final and best test accuracy, steps, time per step, ... (at the end)
    checkpoint.pt              the latest checkpoint: model, optimizer, AMP scaler, counters,
                               data order (a streamed dataset: its loader position) and
                               every RNG state
    checkpoint.pt.sha256       its sha256 (``sha256sum -c checkpoint.pt.sha256`` checks it)
    checkpoint.prev.pt         the checkpoint before it, kept while the latest is written
    checkpoint.prev.pt.sha256
    events.out.tfevents.*      TensorBoard's copy of the records (``run.tensorboard = true``)

Checkpoints are written atomically and verified on load (:mod:`normlab.train.checkpoint`).
Resuming reads ``checkpoint.pt``; when it is corrupt or foreign (not a normlab training
checkpoint) the run continues from ``checkpoint.prev.pt`` with a :class:`CheckpointWarning`
naming the skipped file. When neither is good, :class:`CheckpointError` (a ``ValueError``) says
which files are corrupt and that ``--overwrite`` starts the run again. The configuration must
match the checkpoint's except for :data:`RESUME_MUTABLE_KEYS`; ``metrics.jsonl`` is cut back to
the records the checkpoint had seen.

In a multi-process run rank 0 alone has a writing :class:`RunDir`; the others' write nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab import __version__
from normlab.provenance import git_state
from normlab.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    atomic_write_json,
    atomic_write_text,
    checksum_path,
    load_checkpoint,
    save_checkpoint,
)
from normlab.train.config import Config, ConfigError, config_from_dict, diff_configs, dump_toml
from normlab.train.tblog import EVENT_FILES

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "PREVIOUS",
    "RESUME_MUTABLE_KEYS",
    "STATE_FORMAT",
    "RunDir",
    "environment",
    "read_metrics",
]

CONFIG = "config.toml"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
#: The version of the training state a checkpoint holds (1: before auxiliary losses had names).
STATE_FORMAT = 2
_STATE_KEYS = ("config", "model", "optimizer", "counters", "perm", "sums", "rng")

#: Config keys that may differ between a run and its resumption (they do not change the math).
RESUME_MUTABLE_KEYS = frozenset(
    {
        "run.progress",
        "run.device",
        "run.compile",
        "run.threads",
        "run.save_checkpoints",
        "run.checkpoint_every_steps",
        "run.dist_backend",
        "run.tensorboard",
        "run.dir",
        "run.name",
        "train.eval_batch_size",
        "data.workers",
    }
)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def environment(device: torch.device, seed: int, dist: Any = None) -> dict[str, Any]:
    """Versions, device and seed of this process, and the number of processes and backend of a
    multi-process run (``dist``: a :class:`~normlab.train.distributed.DistInfo` or
    :class:`~normlab.train.ddp.DDPContext`), as written to ``env.json``."""
    env: dict[str, Any] = {
        "started": _now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "normlab": __version__,
        **git_state(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seed": seed,
        "argv": list(sys.argv),
        "world_size": 1 if dist is None else dist.world_size,
    }
    if dist is not None and dist.enabled:
        env["dist_backend"] = dist.backend
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the run directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _training_state(path: Path) -> dict[str, Any]:
    """The verified checkpoint at ``path``; :class:`CheckpointError` unless it is a normlab
    training checkpoint."""
    ck = load_checkpoint(path)
    missing = [k for k in _STATE_KEYS if k not in ck]
    if missing or ck.get("format") not in (1, STATE_FORMAT):
        what = f"no {missing[0]!r} entry" if missing else f"format {ck.get('format')!r}"
        raise CheckpointError(path, f"is not a normlab training checkpoint ({what})")
    if ck["format"] == 1:  # the standardization loss's sum had a fixed name
        s = ck["sums"]
        ck["sums"] = {"loss": s["loss"], "correct": s["correct"], "aux": {"std_loss": s["std"]}}
    return ck


class RunDir:
    """One run directory (see the module docstring). ``writer=False``: reads only (the
    processes other than rank 0 of a multi-process run)."""

    def __init__(self, path: str | os.PathLike[str], writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @property
    def checkpoints(self) -> list[Path]:
        """The checkpoint files a resume tries, newest first."""
        return [self.path / CHECKPOINT, self.path / PREVIOUS]

    def open(
        self,
        config: Config,
        *,
        resume: bool,
        overwrite: bool,
        env: dict[str, Any],
        log: Callable[[str], None],
    ) -> dict[str, Any] | None:
        """Start the run (``config.toml``, ``env.json``) or, with ``resume`` and a checkpoint
        present, return the training state to continue from, with ``"records"``: the
        ``metrics.jsonl`` records it had seen. Raises ``FileExistsError`` for a directory
        holding a run when neither ``resume`` nor ``overwrite`` is set."""
        d = self.path
        for tmp in d.glob(".checkpoint*.tmp"):  # left by a process killed while saving
            tmp.unlink(missing_ok=True)
        present = [p for p in (*self.checkpoints, d / METRICS) if p.exists()]
        if resume and any(p.exists() for p in self.checkpoints):
            return self._resume_state(config)
        if present and not resume and not overwrite:
            raise FileExistsError(
                f"run directory {str(d)!r} already holds a run; pass --resume to continue it, "
                "--overwrite to start it again, or choose another name with --set run.name=..."
            )
        if resume:
            log(f"no checkpoint in {d}; starting from scratch")
        for p in self.checkpoints:
            p.unlink(missing_ok=True)
            checksum_path(p).unlink(missing_ok=True)
        for name in (METRICS, SUMMARY):
            (d / name).unlink(missing_ok=True)
        for events in d.glob(EVENT_FILES):  # TensorBoard's copy of the old records
            events.unlink()
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / CONFIG, dump_toml(config))
        atomic_write_json(d / ENV, env)
        return None

    def _resume_state(self, config: Config) -> dict[str, Any]:
        problems: list[CheckpointError] = []
        for path in self.checkpoints:
            try:
                ck = _training_state(path)
            except CheckpointError as e:
                problems.append(e)
                continue
            break
        else:
            first, rest = problems[0], [str(e) for e in problems[1:]]
            raise CheckpointError(
                first.path,
                "; ".join([first.reason, *rest])
                + "; cannot resume: pass --overwrite (overwrite=True) to start the run again",
            )
        for e in problems:
            step = ck["counters"].get("step")
            warnings.warn(
                f"{e}; resuming from {path} (step {step})", CheckpointWarning, stacklevel=2
            )
        diffs = {
            k: v
            for k, v in diff_configs(config_from_dict(ck["config"]), config).items()
            if k not in RESUME_MUTABLE_KEYS
        }
        if diffs:
            lines = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diffs.items())
            raise ConfigError(
                f"cannot resume {str(self.path)!r} with a different configuration ({lines})"
            )
        env_path = self.path / ENV
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
        env.setdefault("resumed", []).append(_now())
        atomic_write_json(env_path, env)
        ck["records"] = read_metrics(self.path)[: ck["counters"]["metrics_lines"]]
        return ck

    # ------------------------------------------------------------------ writing

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` as the latest checkpoint, keeping the previous one."""
        if self.writer:
            save_checkpoint(state, self.path / CHECKPOINT, previous=self.path / PREVIOUS)

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.writer:
            with open(self.path / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by ``records`` (atomically)."""
        if self.writer:
            atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / SUMMARY, summary)
