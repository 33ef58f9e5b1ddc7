"""The training loop shared by every experiment, and its run directory.

A run directory holds::

    config.toml      the resolved configuration (every key, defaults included)
    env.json         versions, device, seed, start time (and the times of resumes)
    metrics.jsonl    one JSON object per evaluation: step, epoch, lr, train_loss, train_acc,
                     [std_loss,] test_loss, test_acc, time (wall seconds), train_time
    summary.json     final and best test accuracy, steps, time per step, ... (written at the end)
    checkpoint.pt    model, optimizer, AMP scaler, counters, data order and every RNG state,
                     written atomically; ``resume=True`` continues from it

Data live on the training device as tensors; each epoch's order is a permutation drawn from a
seeded ``torch.Generator`` (the same generator drives augmentation), so no DataLoader is needed.
A step is one optimizer update: ``train.accum_steps`` micro-batches of ``train.batch_size`` whose
gradients are averaged (Qiao et al., Sec. 8.1.3 "iteration size"). The learning rate is set from the
schedule before every step and, when the model has :class:`~normlab.nn.batch_channel.BCNorm`
layers, their micro-batch rate is set to it (Qiao et al., Sec. 7.2.2: r = the learning rate).

Resuming restores the model, optimizer (learning rates included), AMP scaler, the step/epoch
counters and the position within the epoch, the epoch's permutation, the running train-metric sums,
and the torch / CUDA / Python / numpy / data-generator RNG states, so on the CPU a killed and
resumed run produces exactly the metrics of an uninterrupted one. The standardization loss keeps
no state across steps (its accumulator is emptied every step) and BCN's estimates are buffers in
the model's ``state_dict``; its rate is set again from the restored optimizer.

Multi-process training. Launched by ``torchrun --nproc_per_node=N normlab train cfg.toml`` (any
launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
every process joins the job (:func:`normlab.train.distributed.init_distributed`: gloo on CPU, NCCL on
CUDA, ``run.dist_backend`` to choose; with ``run.device = "auto"``/``"cuda"`` process ``LOCAL_RANK``
uses ``cuda:LOCAL_RANK``) and trains the same model wrapped in ``DistributedDataParallel``:

* **Data.** ``train.batch_size`` is the *global* batch. Every process draws the same per-epoch
  permutation from the shared seeded generator — the distributed sampler: reshuffled every epoch,
  identical to the one-process order — and takes a contiguous share of each global micro-batch
  (``torch.tensor_split``: sizes differ by at most one when the batch does not divide by the
  number of processes, the larger shares on the lower ranks). With ``data.augment`` each process
  augments the whole global micro-batch with the shared generator and keeps its share, so the
  samples *and* their augmentation are those of a one-process run (and the generator stays in
  step on every process, which is what lets any process resume from rank 0's checkpoint). The
  batch size must be at least the number of processes; with ``drop_last = false`` a final partial
  batch smaller than that is dropped.
* **Gradients.** Each process's loss is its mean cross-entropy times ``n_local · N / n_global``,
  so DDP's averaging yields the gradient of the global batch's mean loss even for uneven shares;
  accumulation steps skip DDP's all-reduce (``no_sync``) except on the last micro-batch.
* **Statistics.** ``run.sync_stats = true`` applies :func:`normlab.sync_stats` (and synchronises
  the standardization loss): every batch-statistics layer then normalizes with the statistics of
  the global batch, so the run computes what a one-process run with the same batch computes.
  Without it each process normalizes with its own share's statistics (plain DDP) and DDP
  broadcasts rank 0's buffers at every forward.
* **Evaluation and logging.** Each process evaluates a contiguous shard of the test set with the
  unwrapped model and rank 0's buffers; loss sums and correct counts are all-reduced, as are the
  running train sums, so every record is the global one and ``metrics.jsonl`` has the same format.
  Rank 0 alone creates the run directory and writes ``config.toml``, ``env.json`` (with
  ``world_size``), ``metrics.jsonl``, ``summary.json``, checkpoints, log lines and the progress bar.
* **Resume.** Rank 0 reads the checkpoint and broadcasts it, so the run directory need only be on
  rank 0's machine; the train sums are made global before each checkpoint. The checkpoint does
  not depend on the number of processes. Callbacks run on every process (a callback that raises
  must raise on all of them).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import normlab
from normlab.nn.sync import sync_stats
from normlab.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from normlab.train.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    diff_configs,
    dump_toml,
)
from normlab.train.distributed import (
    DistInfo,
    broadcast_object,
    env_world_size,
    init_distributed,
    shard,
)
from normlab.train.optim import LRSchedule, build_optimizer

__all__ = [
    "RESUME_MUTABLE_KEYS",
    "RunResult",
    "Trainer",
    "build_model",
    "environment",
    "progress_enabled",
    "read_metrics",
    "select_device",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

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
        "run.dir",
        "run.name",
        "train.eval_batch_size",
    }
)


def select_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(spec)`` (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {spec!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: {spec!r} requested but MPS is not available")
    return dev


def progress_enabled(setting: str = "auto", stream: Any = None) -> bool:
    """Whether to draw a progress bar: ``"on"``/``"off"``, or ``"auto"`` = the stream is a terminal
    and the ``CI`` environment variable is not set."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    stream = sys.stderr if stream is None else stream
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _patterns(value: str | list) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    return list(value)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Build ``cfg.name`` with ``cfg.norm`` in every normalization slot, or — when
    ``include``/``exclude`` select only some slots — with ``cfg.base_norm`` and then
    ``normlab.convert(model, cfg.norm, include, exclude)`` on the selected slots."""
    from normlab.models import create

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
            normlab.convert(model, cfg.norm, include=include or None, exclude=exclude or None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.include: {e}") from None
    return model


def environment(device: torch.device, seed: int, dist: DistInfo | None = None) -> dict[str, Any]:
    """Versions, device and seed of this process, and the number of processes and backend of a
    multi-process run (written to ``env.json``)."""
    env: dict[str, Any] = {
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "normlab": normlab.__version__,
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


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path | None
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    model: nn.Module = field(repr=False)
    config: Config = field(repr=False)


class Trainer:
    """One training run. Most users call :func:`train`; the class exposes the state a callback
    (called after every optimizer step with the trainer) may read: ``step``, ``epoch``,
    ``history``, ``model``, ``optimizer``, ``config``. Raising in a callback stops the run (the
    last checkpoint stays valid for ``resume``)."""

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        data: Any = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
        log: Callable[[str], None] | None = None,
        write: bool = True,
    ) -> None:
        self.config = config.validate()
        self.log = log or (lambda msg: None)
        self.callbacks = list(callbacks)
        self.write = write
        c = self.config
        if run_dir is None and write:
            run_dir = Path(c.run.dir) / (c.run.name or "run")
        self.run_dir = Path(run_dir) if (run_dir is not None and write) else None
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        self.device = select_device(c.run.device)
        if env_world_size() > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        self.dist = init_distributed(self.device, c.run.dist_backend)
        if not self.dist.is_main:
            self.log = lambda msg: None
        # rank 0 alone writes into the run directory
        self._writer = self.run_dir is not None and self.dist.is_main

        ckpt = self._prepare_dir_everywhere(resume, overwrite)

        _seed_everything(c.run.seed)
        self.data = self._load_data(data)
        self.model = build_model(c.model, self.data.num_classes, self.data.in_channels).to(
            self.device
        )
        if c.run.sync_stats:  # before the std loss hooks: torch BatchNorms may be replaced
            self.model = sync_stats(self.model)
        self.std_loss = None
        if c.model.std_loss_weight > 0:
            from normlab.nn.std_loss import StandardizationLoss

            mods = _patterns(c.model.std_loss_include) or None
            self.std_loss = StandardizationLoss(
                self.model, modules=mods, weight=c.model.std_loss_weight
            )
            if c.run.sync_stats:
                self.std_loss.sync()
        self._bcn = self._bcn_setter()
        self.optimizer = build_optimizer(self.model, c.optim)

        n = int(self.data.train_y.shape[0])
        bs, accum = c.train.batch_size, c.train.accum_steps
        world = self.dist.world_size
        if bs < world:
            raise ConfigError(
                f"train.batch_size: the global batch of {bs} samples cannot be shared by {world} "
                "processes (at least one sample each)"
            )
        # a final partial batch smaller than the number of processes is dropped (1 process: none)
        tail = n % bs
        n_micro = n // bs if (c.train.drop_last or tail < world) else math.ceil(n / bs)
        if n_micro == 0:
            raise ConfigError(
                f"train.batch_size: {bs} is larger than the training set ({n} samples) with "
                "train.drop_last = true"
            )
        self.n_train = n
        self.micro_per_epoch = n_micro
        self.steps_per_epoch = math.ceil(n_micro / accum)
        self.total_steps = c.train.steps or c.train.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(c.schedule, self.steps_per_epoch, self.total_steps)

        amp_on = c.run.amp and self.device.type == "cuda"
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[c.run.amp_dtype]
        self.amp_on = amp_on
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=amp_on and self.amp_dtype == torch.float16
        )
        self.forward_model: nn.Module = self.model
        if c.run.compile:
            self.forward_model = torch.compile(self.model)
        # evaluation: on a shard per process, outside DDP (no collectives in the forward)
        self.eval_model: nn.Module = self.forward_model
        self.ddp: DistributedDataParallel | None = None
        self._wrap_ddp()

        self.data_gen = torch.Generator().manual_seed(c.run.seed + 0x5EED)

        # counters and running sums
        self.step = 0  # optimizer updates done
        self.epoch = 0  # completed epochs
        self.pos = 0  # optimizer steps done within the current epoch
        self.perm: Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.best_step = 0
        self.train_time = 0.0
        self.elapsed = 0.0
        self.last_lr = c.optim.lr * self.schedule.factor(0)
        self._t_start = self._t_seg = time.perf_counter()
        self._reset_sums()
        if ckpt is not None:
            self._restore(ckpt)

    # ------------------------------------------------------------------ setup helpers

    def _wrap_ddp(self) -> None:
        """Training forwards through DistributedDataParallel (multi-process runs only; a
        collective: every process calls it)."""
        if not self.dist.enabled or self.ddp is not None:
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        # a conv with one input channel gets weight gradients whose stride along that size-1
        # dimension differs from the parameter's: same layout, but DDP warns on every process
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.forward_model = torch.compile(self.ddp) if self.config.run.compile else self.ddp

    def _unwrap_ddp(self) -> None:
        """Drop the DDP wrapper at the end of :meth:`fit`: one still alive when the process
        group is destroyed (at exit) can abort the process in its destructor, and it sits in
        reference cycles, hence the collection."""
        if self.ddp is None:
            return
        self.ddp = None
        self.forward_model = self.eval_model
        gc.collect()

    def _prepare_dir_everywhere(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """:meth:`_prepare_dir` on rank 0; its checkpoint (or its error) reaches every process."""
        if not self.dist.enabled:
            return self._prepare_dir(resume, overwrite)
        payload: tuple = ("ok", None)
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                payload = ("ok", self._prepare_dir(resume, overwrite))
            except Exception as e:  # every process must leave the broadcast
                error = e
                payload = ("error", type(e).__name__, str(e))
        payload = broadcast_object(payload)
        if error is not None:
            raise error
        if payload[0] == "error":
            kinds = {"ConfigError": ConfigError, "FileExistsError": FileExistsError}
            kind = kinds.get(payload[1], ValueError if payload[1] == "ValueError" else RuntimeError)
            raise kind(payload[2] if kind is not RuntimeError else f"rank 0: {payload[2]}")
        return payload[1]

    def _prepare_dir(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        if self.run_dir is None:
            if resume:
                raise ValueError("resume=True needs a run directory")
            return None
        d = self.run_dir
        ck_path = d / CHECKPOINT
        if resume and ck_path.exists():
            ckpt = load_checkpoint(ck_path)
            saved = ckpt["config"]
            diffs = {
                k: v
                for k, v in diff_configs(config_from_dict(saved), self.config).items()
                if k not in RESUME_MUTABLE_KEYS
            }
            if diffs:
                lines = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diffs.items())
                raise ConfigError(
                    f"cannot resume {str(d)!r} with a different configuration ({lines})"
                )
            env_path = d / "env.json"
            env = json.loads(env_path.read_text()) if env_path.exists() else {}
            env.setdefault("resumed", []).append(
                _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
            )
            atomic_write_json(env_path, env)
            # metrics.jsonl: exactly the records the checkpoint had seen
            ckpt["records"] = read_metrics(d)[: ckpt["counters"]["metrics_lines"]]
            return ckpt
        existing = [p for p in (ck_path, d / METRICS) if p.exists()]
        if existing and not resume and not overwrite:
            raise FileExistsError(
                f"run directory {str(d)!r} already holds a run; pass --resume to continue it, "
                "--overwrite to start it again, or choose another name with --set run.name=..."
            )
        if resume:
            self.log(f"no checkpoint in {d}; starting from scratch")
        for name in (CHECKPOINT, METRICS, "summary.json"):
            if (d / name).exists():
                (d / name).unlink()
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "config.toml", dump_toml(self.config))
        atomic_write_json(d / "env.json", environment(self.device, self.config.run.seed, self.dist))
        return None

    def _load_data(self, data: Any) -> Any:
        from normlab.data import load_dataset

        c = self.config.data

        def load() -> Any:
            try:
                return load_dataset(
                    c.name,
                    root=c.root or None,
                    download=c.download,
                    seed=c.split_seed,
                    **c.kwargs,
                )
            except TypeError as e:
                raise ConfigError(f"data.kwargs: {e}") from None

        if data is None and self.dist.enabled and c.download:
            # rank 0 downloads, then the others read its files (on a shared file system)
            error = None
            if self.dist.is_main:
                try:
                    data = load()
                except Exception as e:
                    error = e
            failed = broadcast_object(None if error is None else str(error))
            if error is not None:
                raise error
            if failed is not None:
                raise RuntimeError(f"rank 0 could not load the dataset: {failed}")
        if data is None:
            data = load()
        return data.to(self.device)

    def _bcn_setter(self) -> Callable[[], None] | None:
        try:
            from normlab.nn.batch_channel import BCNorm, set_bcn_rate
        except ImportError:  # pragma: no cover - layer not available
            return None
        if not any(isinstance(m, BCNorm) for m in self.model.modules()):
            return None
        return lambda: set_bcn_rate(self.model, self.optimizer)

    def _reset_sums(self) -> None:
        z = torch.zeros((), device=self.device)
        self._sum_loss = z.clone()
        self._sum_std = z.clone()
        self._sum_correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0
        self._steps_since_eval = 0

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": config_to_dict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "counters": {
                "step": self.step,
                "epoch": self.epoch,
                "pos": self.pos,
                "metrics_lines": len(self.history),
                "best_acc": self.best_acc,
                "best_step": self.best_step,
                "train_time": self.train_time,
                "elapsed": self.elapsed + (time.perf_counter() - self._t_start),
                "last_lr": self.last_lr,
                "seen": self._seen,
                "steps_since_eval": self._steps_since_eval,
            },
            "perm": self.perm,
            "sums": {
                "loss": self._sum_loss.detach().cpu(),
                "std": self._sum_std.detach().cpu(),
                "correct": self._sum_correct.detach().cpu(),
            },
            "rng": capture_rng(self.data_gen),
        }

    def _restore(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        k = ck["counters"]
        self.step, self.epoch, self.pos = k["step"], k["epoch"], k["pos"]
        self.best_acc, self.best_step = k["best_acc"], k["best_step"]
        self.train_time, self.elapsed, self.last_lr = k["train_time"], k["elapsed"], k["last_lr"]
        self.perm = ck["perm"]
        s = ck["sums"]
        self._sum_loss = s["loss"].to(self.device)
        self._sum_std = s["std"].to(self.device)
        self._sum_correct = s["correct"].to(self.device)
        self._seen, self._steps_since_eval = k["seen"], k["steps_since_eval"]
        if not self.dist.is_main:  # the checkpoint holds the global sums: rank 0 keeps them
            self._sum_loss.zero_()
            self._sum_std.zero_()
            self._sum_correct.zero_()
            self._seen = 0
        restore_rng(ck["rng"], self.data_gen)
        # metrics.jsonl: keep exactly the records the checkpoint had seen (read by rank 0)
        records = ck["records"]
        if self._writer:
            assert self.run_dir is not None
            text = "".join(json.dumps(r) + "\n" for r in records)
            atomic_write_text(self.run_dir / METRICS, text)
        self.history = records
        self.log(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch})")

    def save(self) -> None:
        """Write the checkpoint (rank 0; in a multi-process run every process must call it)."""
        if self.run_dir is not None and self.config.run.save_checkpoints:
            if self.dist.enabled:
                self._globalize_sums()
            if self._writer:
                save_checkpoint(self.state_dict(), self.run_dir / CHECKPOINT)

    # ------------------------------------------------------------------ multi-process helpers

    def _all_sums(self) -> tuple[float, float, float, int]:
        """(train loss sum, std-loss sum, correct, seen) over every process (one all-reduce)."""
        t = torch.stack(
            [
                self._sum_loss.double(),
                self._sum_std.double(),
                self._sum_correct.double(),
                torch.tensor(float(self._seen), dtype=torch.float64, device=self.device),
            ]
        )
        if self.dist.enabled:
            torch.distributed.all_reduce(t)
        loss, std, correct, seen = t.tolist()
        return loss, std, correct, round(seen)

    def _globalize_sums(self) -> None:
        """Make rank 0 hold the global train sums and the other processes zero (their sum is
        unchanged), so a checkpoint written by rank 0 holds the global ones."""
        loss, std, correct, seen = self._all_sums()
        keep = self.dist.is_main
        self._sum_loss.fill_(loss if keep else 0.0)
        self._sum_std.fill_(std if keep else 0.0)
        self._sum_correct.fill_(round(correct) if keep else 0)
        self._seen = seen if keep else 0

    def _sync_buffers(self) -> None:
        """Rank 0's buffers on every process (as DDP does before each training forward)."""
        for b in self.model.buffers():
            torch.distributed.broadcast(b, 0)

    # ------------------------------------------------------------------ evaluation

    def _autocast(self):
        if self.amp_on:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self, x: Tensor | None = None, y: Tensor | None = None) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on ``(x, y)`` (default: the test split) in eval mode.

        In a multi-process run every process must call it: each evaluates its contiguous shard
        with rank 0's buffers and the sums are all-reduced."""
        x = self.data.test_x if x is None else x
        y = self.data.test_y if y is None else y
        n_total = int(x.shape[0])
        if self.dist.enabled:
            world, rank = self.dist.world_size, self.dist.rank
            x, y = shard(x, world, rank), shard(y, world, rank)
            self._sync_buffers()
        was_training = self.model.training
        self.model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        bs = self.config.train.eval_batch_size
        try:
            for i in range(0, x.shape[0], bs):
                xb, yb = x[i : i + bs], y[i : i + bs]
                with self._autocast():
                    out = self.eval_model(xb)
                loss += F.cross_entropy(out.float(), yb, reduction="sum")
                correct += (out.argmax(1) == yb).sum()
        finally:
            self.model.train(was_training)
            if self.std_loss is not None:
                self.std_loss.reset()
        n = max(n_total, 1)
        if self.dist.enabled:
            both = torch.stack([loss.double(), correct.double()])
            torch.distributed.all_reduce(both)
            total_loss, total_correct = both.tolist()
            return total_loss / n, round(total_correct) / n
        return loss.item() / n, correct.item() / n

    def _record(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.train_time += now - self._t_seg
        test_loss, test_acc = self.evaluate()
        if self.dist.enabled:  # the global train sums
            sum_loss, sum_std, sum_correct, n_seen = self._all_sums()
        else:
            sum_loss, sum_std = self._sum_loss.item(), self._sum_std.item()
            sum_correct, n_seen = self._sum_correct.item(), self._seen
        seen = max(n_seen, 1)
        rec: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.epoch + self.pos / self.steps_per_epoch, 6),
            "lr": self.last_lr,
            "train_loss": _finite(sum_loss / seen) if n_seen else None,
            "train_acc": round(sum_correct) / seen if n_seen else None,
        }
        if self.std_loss is not None:
            steps = max(self._steps_since_eval, 1)
            rec["std_loss"] = _finite(sum_std / steps)
        rec["test_loss"] = _finite(test_loss)
        rec["test_acc"] = test_acc
        rec["time"] = round(self.elapsed + (time.perf_counter() - self._t_start), 4)
        rec["train_time"] = round(self.train_time, 4)
        if test_acc > self.best_acc:
            self.best_acc, self.best_step = test_acc, self.step
        self.history.append(rec)
        if self._writer:
            assert self.run_dir is not None
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        self._reset_sums()
        self._t_seg = time.perf_counter()
        return rec

    # ------------------------------------------------------------------ training

    def _micro_batches(self) -> list[Tensor]:
        assert self.perm is not None
        bs = self.config.train.batch_size
        idx = self.perm.to(self.device)
        return [idx[i * bs : (i + 1) * bs] for i in range(self.micro_per_epoch)]

    def _train_step(self, group: list[Tensor]) -> None:
        c = self.config
        self.last_lr = self.schedule.apply(self.optimizer, self.step)
        if self._bcn is not None:
            self._bcn()
        self.optimizer.zero_grad(set_to_none=True)
        world, rank = self.dist.world_size, self.dist.rank
        for j, idx in enumerate(group):  # idx: a global micro-batch; this process takes its share
            if c.data.augment:  # augment the global batch (shared generator), keep the share
                from normlab.data import augment

                x = augment(
                    self.data.train_x[idx],
                    pad=c.data.pad,
                    flip=c.data.flip,
                    generator=self.data_gen,
                )
                x, y = shard(x, world, rank), shard(self.data.train_y[idx], world, rank)
            else:
                local = shard(idx, world, rank)
                x, y = self.data.train_x[local], self.data.train_y[local]
            last = j == len(group) - 1  # DDP all-reduces the gradients once per step
            with nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with self._autocast():
                    out = self.forward_model(x)
                    task = F.cross_entropy(out.float(), y, label_smoothing=c.train.label_smoothing)
                    # share-weighted, so DDP's average is the global batch's mean loss
                    loss = task if world == 1 else task * (y.shape[0] * world / idx.shape[0])
                    if self.std_loss is not None:
                        std = self.std_loss.loss()
                        loss = loss + std
                        self._sum_std += std.detach().float() / (len(group) * world)
                self.scaler.scale(loss / len(group)).backward()
            self._sum_loss += task.detach().float() * y.shape[0]
            self._sum_correct += (out.detach().argmax(1) == y).sum()
            self._seen += int(y.shape[0])
        if c.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.pos += 1
        self._steps_since_eval += 1

    def fit(self) -> RunResult:
        """Train to ``total_steps`` (evaluating, logging and checkpointing on the way)."""
        self._t_start = self._t_seg = time.perf_counter()
        self.model.train()
        self._wrap_ddp()
        try:
            return self._fit()
        finally:
            self._unwrap_ddp()

    def _fit(self) -> RunResult:
        c = self.config
        bar = None
        if self.dist.is_main and progress_enabled(c.run.progress):
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=c.run.name or "train",
                unit="step",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
        every = c.train.eval_every_steps
        ck_every = c.run.checkpoint_every_steps
        try:
            while self.step < self.total_steps:
                if self.perm is None:
                    self.perm = torch.randperm(self.n_train, generator=self.data_gen)
                micro = self._micro_batches()
                accum = c.train.accum_steps
                groups = [micro[i : i + accum] for i in range(0, len(micro), accum)]
                while self.pos < len(groups) and self.step < self.total_steps:
                    self._train_step(groups[self.pos])
                    epoch_end = self.pos == len(groups)
                    if epoch_end:
                        self.epoch += 1
                        self.pos = 0
                        self.perm = None
                    last = self.step == self.total_steps
                    rec = None
                    if epoch_end or last or (every and self.step % every == 0):
                        rec = self._record()
                        if epoch_end:
                            self._emit(self._line(rec), bar)
                    if epoch_end or last or (ck_every and self.step % ck_every == 0):
                        self.save()
                    if bar is not None:
                        bar.update(1)
                        if rec is not None:
                            bar.set_postfix(
                                loss=f"{rec['train_loss'] or float('nan'):.3f}",
                                acc=f"{(rec['train_acc'] or 0) * 100:.1f}",
                                test=f"{rec['test_acc'] * 100:.1f}",
                            )
                    for cb in self.callbacks:
                        cb(self)
                    if epoch_end:
                        break
        finally:
            if bar is not None:
                bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self._record()
            self.save()
        summary = self.summary()
        if self._writer:
            assert self.run_dir is not None
            atomic_write_json(self.run_dir / "summary.json", summary)
        if self.std_loss is not None:
            # the returned model must not keep accumulating loss graphs in later training forwards
            self.std_loss.remove()
        return RunResult(self.run_dir, list(self.history), summary, self.model, c)

    def _emit(self, msg: str, bar: Any) -> None:
        if bar is None:
            self.log(msg)
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            self.log(msg)

    def _line(self, rec: dict[str, Any]) -> str:
        tl = rec["train_loss"]
        return (
            f"epoch {rec['epoch']:g} step {rec['step']}/{self.total_steps}  lr {rec['lr']:.4g}  "
            f"train loss {tl if tl is None else round(tl, 4)} acc {100 * (rec['train_acc'] or 0):.2f}%  "
            f"test loss {rec['test_loss'] if rec['test_loss'] is None else round(rec['test_loss'], 4)} "
            f"acc {100 * rec['test_acc']:.2f}%"
        )

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 6),
            "steps_per_epoch": self.steps_per_epoch,
            "final_test_acc": last.get("test_acc"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "best_test_acc": self.best_acc if self.history else None,
            "best_step": self.best_step,
            "train_time": round(self.train_time, 4),
            "time_per_step": self.train_time / max(self.step, 1),
            "params": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }


def train(
    config: Config,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: Any = None,
    callbacks: Sequence[Callable[[Trainer], None]] = (),
    log: Callable[[str], None] | None = None,
    write: bool = True,
) -> RunResult:
    """Run one experiment described by ``config``.

    Args:
        run_dir: where to write (default ``config.run.dir / config.run.name``).
        resume: continue from ``run_dir/checkpoint.pt`` (starts from scratch when there is none).
        overwrite: start again in a directory that already holds a run.
        data: a :class:`normlab.data.DataSplits` to use instead of loading ``config.data``.
        callbacks: called with the :class:`Trainer` after every optimizer step.
        log: receives one line per epoch and status messages.
        write: ``False`` keeps everything in memory (no run directory).
    """
    return Trainer(
        config,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        data=data,
        callbacks=callbacks,
        log=log,
        write=write,
    ).fit()
