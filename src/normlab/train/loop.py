"""The training loop shared by every experiment.

In-memory datasets live on the training device as tensors; each epoch's order is a permutation
drawn from a seeded ``torch.Generator`` (the same generator drives augmentation), so no
DataLoader is needed. A streamed dataset (ImageNet) comes from DataLoaders instead
(:mod:`normlab.train.stream`). A step is one optimizer update: ``train.accum_steps``
micro-batches of ``train.batch_size`` whose gradients are averaged (Qiao et al., Sec. 8.1.3
"iteration size"). Every step:

1. the learning rate is set from the schedule and the model's step hooks run;
2. each micro-batch: forward, cross-entropy plus the model's auxiliary losses, backward;
3. gradient clipping (``optim.grad_clip``), optimizer step, the after-step hooks;
4. at epoch ends, every ``train.eval_every_steps`` and at the last step: evaluation, one record
   in ``metrics.jsonl``; at epoch ends, every ``run.checkpoint_every_steps`` and at the last
   step: a checkpoint; then the callbacks.

Which layers need hooks or auxiliary losses is the model builder's business
(:mod:`normlab.train.build`); the files are the run directory's (:mod:`normlab.train.rundir`).
A ``metrics.jsonl`` record holds step, epoch, lr, train_loss, train_acc, one entry per
auxiliary loss (``std_loss``), test_loss, test_acc, time (wall seconds) and train_time;
``run.tensorboard`` copies it into TensorBoard event files (:mod:`normlab.train.tblog`).

Resuming restores the model, optimizer (learning rates included), AMP scaler, the step/epoch
counters and the position within the epoch, the epoch's permutation (or the streamed
loader's position), the running train sums and the torch / CUDA / Python / numpy /
data-generator RNG states, so on the CPU a killed and resumed run produces exactly the metrics
of an uninterrupted one.

Multi-process training (``torchrun --nproc_per_node=N normlab train cfg.toml``; the collectives
are :mod:`normlab.train.ddp`'s): ``train.batch_size`` is the *global* batch. Every process draws
the same permutation and takes a contiguous share of each global micro-batch (sizes differ by at
most one); with ``data.augment`` each augments the whole global micro-batch with the shared
generator and keeps its share, so samples and augmentation are those of a one-process run. Each
process's loss is weighted by its share, so DDP's average is the gradient of the global batch's
mean loss; accumulation steps skip DDP's all-reduce except on the last micro-batch. With
``run.sync_stats`` every batch-statistics layer (and the standardization loss) uses the global
batch's statistics. Evaluation runs on a shard per process with rank 0's buffers; the sums are
all-reduced, so every record is the global one. Rank 0 alone writes files and logs; on resume it
reads the checkpoint and hands it to the others. Callbacks run on every process; an exception on
one process reaches the others as :class:`~normlab.train.ddp.RemoteRankError`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.data import ImageNetData, augment, load_dataset
from normlab.train.build import build_model, build_training_model
from normlab.train.checkpoint import capture_rng, restore_rng
from normlab.train.config import Config, ConfigError, config_to_dict, is_streamed
from normlab.train.ddp import DDPContext, TrainSums, process_device, select_device
from normlab.train.optim import LRSchedule, build_optimizer
from normlab.train.progress import Progress, epoch_line, progress_enabled
from normlab.train.rundir import (
    RESUME_MUTABLE_KEYS,
    STATE_FORMAT,
    RunDir,
    environment,
    read_metrics,
)
from normlab.train.stream import StreamedData, open_streamed
from normlab.train.tblog import TensorBoardLog

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


def _quiet(msg: str) -> None:
    pass


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
    (called after every optimizer step with the trainer) may read: ``step``, ``epoch``, ``pos``,
    ``history``, ``model``, ``optimizer``, ``config``, ``total_steps``. Raising in a callback stops
    the run (the last checkpoint stays valid for ``resume``). Arguments: see :func:`train`."""

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
        self.config = c = config.validate()
        self.log = log or _quiet
        self.callbacks = list(callbacks)
        if run_dir is None and write:
            run_dir = Path(c.run.dir) / (c.run.name or "run")
        self.run_dir = Path(run_dir) if (run_dir is not None and write) else None
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        self.device = process_device(c.run.device)
        self.dist = DDPContext(self.device, c.run.dist_backend)
        if not self.dist.is_main:
            self.log = _quiet
        # the run directory's files (rank 0 alone writes them)
        self.files = None if self.run_dir is None else RunDir(self.run_dir, self.dist.is_main)
        with self.dist.guard():
            self._setup(resume, overwrite, data)

    @property
    def ddp(self) -> nn.Module | None:
        """The ``DistributedDataParallel`` wrapper while :meth:`fit` runs on several processes."""
        return self.dist.module

    def _setup(self, resume: bool, overwrite: bool, data: Any) -> None:
        c = self.config
        if resume and self.files is None:
            raise ValueError("resume=True needs a run directory")
        ckpt = self.dist.on_main(lambda: self._open_run_dir(resume, overwrite))
        _seed_everything(c.run.seed)
        self.data = self._load_data(data)
        self.stream: StreamedData | None = None  # a streamed dataset's loaders
        if isinstance(self.data, ImageNetData):
            self.stream = StreamedData(self.data, self.device, self.dist.world_size)
        shape = self.data if self.stream is None else self.stream
        built = build_training_model(c, shape.num_classes, shape.in_channels, self.device)
        self.model, self.wiring = built.model, built.wiring
        self.optimizer = build_optimizer(self.model, c.optim)

        bs, world = c.train.batch_size, self.dist.world_size
        if bs < world:
            raise ConfigError(
                f"train.batch_size: the global batch of {bs} samples cannot be shared by {world} "
                "processes (at least one sample each)"
            )
        if self.stream is not None:
            n, n_micro = self.stream.n_train, self.stream.micro_per_epoch
            if self.stream.local_batch * world != bs:
                raise ConfigError(
                    f"train.batch_size: {bs}, but the given loaders load "
                    f"{self.stream.local_batch} samples per process on {world} processes"
                )
        else:
            n = int(self.data.train_y.shape[0])
            # a final partial batch smaller than the number of processes is dropped (1 process:
            # none)
            tail = n % bs
            n_micro = n // bs if (c.train.drop_last or tail < world) else math.ceil(n / bs)
        if n_micro == 0:
            raise ConfigError(
                f"train.batch_size: {bs} is larger than the training set ({n} samples) with "
                "train.drop_last = true"
            )
        self.n_train, self.micro_per_epoch = n, n_micro
        self.steps_per_epoch = math.ceil(n_micro / c.train.accum_steps)
        self.total_steps = c.train.steps or c.train.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(c.schedule, self.steps_per_epoch, self.total_steps)

        self.amp_on = c.run.amp and self.device.type == "cuda"
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[c.run.amp_dtype]
        fp16 = self.amp_on and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # evaluation: the unwrapped model, on a shard per process (no collectives in the forward)
        self.eval_model: nn.Module = torch.compile(self.model) if c.run.compile else self.model
        self.forward_model: nn.Module = self.eval_model  # DDP's wrapper while fit() runs
        self.data_gen = torch.Generator().manual_seed(c.run.seed + 0x5EED)

        self.step = 0  # optimizer updates done
        self.epoch = 0  # completed epochs
        self.pos = 0  # optimizer steps done within the current epoch
        self.perm: Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.best_acc, self.best_step = -1.0, 0
        self.train_time = self.elapsed = 0.0
        self.last_lr = c.optim.lr * self.schedule.factor(0)
        self._t_start = self._t_seg = time.perf_counter()
        self.sums = TrainSums(self.device, list(self.wiring.aux_losses))
        if ckpt is not None:
            self._restore(ckpt)
        self.tensorboard: TensorBoardLog | None = None
        if c.run.tensorboard and self.files is not None and self.dist.is_main:
            self.tensorboard = TensorBoardLog(
                self.files.path,
                list(self.wiring.aux_losses),
                resumed_at=self.step if ckpt is not None else None,
                previous=self.history[-1] if self.history else None,
            )

    def _open_run_dir(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        if self.files is None:
            return None
        env = environment(self.device, self.config.run.seed, self.dist)
        return self.files.open(
            self.config, resume=resume, overwrite=overwrite, env=env, log=self.log
        )

    def _load_data(self, data: Any) -> Any:
        c = self.config.data
        if isinstance(data, ImageNetData):
            return data
        if data is None and is_streamed(c.name):
            return open_streamed(self.config, self.dist.rank, self.dist.world_size, self.device)

        def load() -> Any:
            try:
                return load_dataset(
                    c.name, root=c.root or None, download=c.download, seed=c.split_seed, **c.kwargs
                )
            except TypeError as e:
                raise ConfigError(f"data.kwargs: {e}") from None

        if data is None and self.dist.enabled and c.download:
            # rank 0 downloads, then the others read its files (on a shared file system)
            data = self.dist.on_main(load, share=False)
        return (load() if data is None else data).to(self.device)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (see :mod:`normlab.train.rundir`); a streamed
        dataset's loader position is under ``"data"``."""
        state = {
            "format": STATE_FORMAT,
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
                "seen": self.sums.seen,
                "steps_since_eval": self.sums.steps,
            },
            "perm": self.perm,
            "sums": self.sums.state(),
            "rng": capture_rng(self.data_gen),
        }
        if self.stream is not None:
            state["data"] = self.stream.state_dict()
        return state

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
        self.sums.load(ck["sums"], k["seen"], k["steps_since_eval"], keep=self.dist.is_main)
        restore_rng(ck["rng"], self.data_gen)
        if self.stream is not None:
            self.stream.load_state_dict(ck.get("data"))
        self.history = ck["records"]  # metrics.jsonl: exactly the records the checkpoint had seen
        if self.files is not None:
            self.files.write_metrics(self.history)
        self.log(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch})")

    def save(self) -> None:
        """Write the checkpoint (rank 0; in a multi-process run every process must call it)."""
        if self.files is None or not self.config.run.save_checkpoints:
            return
        if self.dist.enabled:
            self.sums.globalize(self.dist)
        if self.files.writer:
            self.files.save(self.state_dict())

    # ------------------------------------------------------------------ evaluation

    def _autocast(self) -> Any:
        if self.amp_on:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self, x: Tensor | None = None, y: Tensor | None = None) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on ``(x, y)`` (default: the test split, or a streamed
        dataset's validation images) in eval mode.

        In a multi-process run every process must call it: each evaluates its shard (a streamed
        dataset: its share of the validation images) with rank 0's buffers and the sums are
        all-reduced."""
        if self.stream is not None and x is None and y is None:
            n, batches = max(self.stream.n_val, 1), self.stream.validation()
        else:
            if self.stream is not None and (x is None or y is None):
                raise ValueError("evaluate: give both x and y, or neither (the validation images)")
            x = self.data.test_x if x is None else x
            y = self.data.test_y if y is None else y
            n = max(int(x.shape[0]), 1)
            x, y = self.dist.shard(x), self.dist.shard(y)
            bs = self.config.train.eval_batch_size
            batches = ((x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs))
        self.dist.sync_buffers(self.model)
        was_training = self.model.training
        self.model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        try:
            for xb, yb in batches:
                with self._autocast():
                    out = self.eval_model(xb)
                loss += F.cross_entropy(out.float(), yb, reduction="sum")
                correct += (out.argmax(1) == yb).sum()
        finally:
            batches.close()
            self.model.train(was_training)
        total_loss, total_correct = self.dist.all_sum(
            torch.stack([loss.double(), correct.double()])
        )
        return total_loss.item() / n, round(total_correct.item()) / n

    def _record(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_time += time.perf_counter() - self._t_seg
        test_loss, test_acc = self.evaluate()
        loss, correct, seen, aux = self.sums.totals(self.dist)
        n = max(seen, 1)
        rec: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.epoch + self.pos / self.steps_per_epoch, 6),
            "lr": self.last_lr,
            "train_loss": _finite(loss / n) if seen else None,
            "train_acc": round(correct) / n if seen else None,
        }
        for name, total in aux.items():
            rec[name] = _finite(total / max(self.sums.steps, 1))
        rec["test_loss"] = _finite(test_loss)
        rec["test_acc"] = test_acc
        rec["time"] = round(self.elapsed + (time.perf_counter() - self._t_start), 4)
        rec["train_time"] = round(self.train_time, 4)
        if test_acc > self.best_acc:
            self.best_acc, self.best_step = test_acc, self.step
        self.history.append(rec)
        if self.files is not None:
            self.files.append_metrics(rec)
        if self.tensorboard is not None:
            self.tensorboard.write(rec)
        self.sums.reset()
        self._t_seg = time.perf_counter()
        return rec

    # ------------------------------------------------------------------ training

    def _batch(self, item: Any) -> tuple[Tensor, Tensor, int]:
        """This process's share of a global micro-batch (augmented when configured) and the
        global micro-batch's size. ``item``: the global batch's indices into the in-memory
        training split, or this process's ``(x, y)`` of a streamed dataset."""
        if self.stream is not None:
            x, y = item
            return x, y, self.stream.global_size(y)
        c, d, idx = self.config.data, self.data, item
        if c.augment:  # augment the global batch (shared generator), keep the share
            x = augment(d.train_x[idx], pad=c.pad, flip=c.flip, generator=self.data_gen)
            return self.dist.shard(x), self.dist.shard(d.train_y[idx]), int(idx.shape[0])
        local = self.dist.shard(idx)
        return d.train_x[local], d.train_y[local], int(idx.shape[0])

    def _epoch_groups(self) -> Iterator[list[Any]]:
        """The rest of the current epoch from step ``pos`` on: one list of micro-batches (see
        :meth:`_batch`) per optimizer step."""
        bs, accum = self.config.train.batch_size, self.config.train.accum_steps
        if self.stream is not None:
            return self._streamed_groups(accum)
        if self.perm is None:  # a new epoch
            self.perm = torch.randperm(self.n_train, generator=self.data_gen)
        idx = self.perm.to(self.device)
        micro = [idx[i * bs : (i + 1) * bs] for i in range(self.micro_per_epoch)]
        groups = [micro[i : i + accum] for i in range(0, len(micro), accum)]
        return iter(groups[self.pos :])

    def _streamed_groups(self, accum: int) -> Iterator[list[Any]]:
        first, n_micro = self.pos * accum, self.micro_per_epoch
        batches = self.stream.epoch(self.epoch, first)  # checks the loader's position now

        def groups() -> Iterator[list[Any]]:
            try:
                for start in range(first, n_micro, accum):
                    yield [next(batches) for _ in range(min(accum, n_micro - start))]
            finally:
                batches.close()

        return groups()

    def _train_step(self, group: list[Any]) -> None:
        c, world, k = self.config, self.dist.world_size, len(group)
        self.last_lr = self.schedule.apply(self.optimizer, self.step)
        for hook in self.wiring.step_hooks:
            hook(self.step, self.last_lr)
        self.optimizer.zero_grad(set_to_none=True)
        for j, item in enumerate(group):  # item: a global micro-batch (or this share of it)
            x, y, n_global = self._batch(item)
            with self.dist.no_sync(last=j == k - 1):  # DDP all-reduces once per step
                with self._autocast():
                    out = self.forward_model(x)
                    task = F.cross_entropy(out.float(), y, label_smoothing=c.train.label_smoothing)
                    loss = task
                    if world > 1:  # share-weighted: DDP's average is the global batch's mean
                        loss = task * self.dist.share_scale(y.shape[0], n_global)
                    for name, aux_loss in self.wiring.aux_losses.items():
                        value = aux_loss()
                        loss = loss + value
                        self.sums.aux[name] += value.detach().float() / (k * world)
                self.scaler.scale(loss / k).backward()
            self.sums.loss += task.detach().float() * y.shape[0]
            self.sums.correct += (out.detach().argmax(1) == y).sum()
            self.sums.seen += int(y.shape[0])
        if c.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.pos += 1
        self.sums.steps += 1
        for hook in self.wiring.after_step:
            hook(self.step, self.last_lr)

    def fit(self) -> RunResult:
        """Train to ``total_steps`` (evaluating, logging and checkpointing on the way)."""
        with self.dist.guard():
            self._t_start = self._t_seg = time.perf_counter()
            self.model.train()
            # no local reference to DDP's wrapper: a failure's traceback would keep it (and the
            # process group, which then cannot be torn down to wake the others) alive
            self.forward_model = self._training_forward()
            try:
                return self._fit()
            finally:
                self.forward_model = self.eval_model
                self.dist.unwrap()
                if self.tensorboard is not None:
                    self.tensorboard.close()

    def _training_forward(self) -> nn.Module:
        wrapped = self.dist.wrap(self.model)
        if wrapped is self.model:
            return self.eval_model
        return torch.compile(wrapped) if self.config.run.compile else wrapped

    def _fit(self) -> RunResult:
        c = self.config
        every, ck_every = c.train.eval_every_steps, c.run.checkpoint_every_steps
        bar = self.dist.is_main and progress_enabled(c.run.progress)
        with Progress(self.log, bar, self.total_steps, self.step, c.run.name or "train") as shown:
            while self.step < self.total_steps:
                groups = self._epoch_groups()
                try:
                    while self.pos < self.steps_per_epoch and self.step < self.total_steps:
                        self._train_step(next(groups))
                        epoch_end = self.pos == self.steps_per_epoch
                        if epoch_end:
                            self.epoch, self.pos, self.perm = self.epoch + 1, 0, None
                        last = self.step == self.total_steps
                        rec = None
                        if epoch_end or last or (every and self.step % every == 0):
                            rec = self._record()
                            if epoch_end:
                                shown.write(epoch_line(rec, self.total_steps))
                        if epoch_end or last or (ck_every and self.step % ck_every == 0):
                            self.save()
                        shown.step(rec)
                        for cb in self.callbacks:
                            cb(self)
                        if epoch_end:
                            break
                finally:
                    close = getattr(groups, "close", None)
                    if close is not None:  # a streamed epoch's loader and its workers
                        close()
        if not self.history or self.history[-1]["step"] != self.step:
            self._record()
            self.save()
        summary = self.summary()
        if self.files is not None:
            self.files.write_summary(summary)
        for end in self.wiring.on_end:
            end()
        return RunResult(self.run_dir, list(self.history), summary, self.model, c)

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` of the run so far."""
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
        config: the run (:func:`~normlab.train.config.load_config`).
        run_dir: where to write (default ``config.run.dir / config.run.name``).
        resume: continue from the run directory's checkpoint (from scratch when there is none).
        overwrite: start again in a directory that already holds a run.
        data: a :class:`normlab.data.DataSplits` to use instead of loading ``config.data``,
            or this process's streamed loaders (:class:`normlab.data.ImageNetData`, a
            ``batch_size`` of ``train.batch_size`` / processes).
        callbacks: called with the :class:`Trainer` after every optimizer step.
        log: receives one line per epoch and status messages.
        write: ``False`` keeps everything in memory (no run directory).

    Example::

        >>> from normlab.train import load_config, train
        >>> cfg = load_config(None, ["train.steps=2", "run.progress=off"])
        >>> train(cfg, write=False).summary["steps"]
        2
    """
    trainer = Trainer(
        config,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        data=data,
        callbacks=callbacks,
        log=log,
        write=write,
    )
    return trainer.fit()
