"""TensorBoard event files beside ``metrics.jsonl`` (``run.tensorboard = true``).

Every ``metrics.jsonl`` record becomes scalars at the record's step::

    loss/train, loss/test     train_loss, test_loss
    loss/<name>               each auxiliary loss (e.g. loss/std_loss)
    accuracy/train, /test     train_acc, test_acc
    lr                        the learning rate of the step
    time/step                 training seconds per optimizer step since the previous record

(a value the record holds as ``null`` is left out). ``tensorboard --logdir runs`` shows each run
directory as one run. Only the process that writes the run directory (rank 0) writes events, and
it flushes them with every record. A resumed run purges the events after its checkpoint's step
(TensorBoard drops them when it reads the files), so TensorBoard shows what ``metrics.jsonl``
holds; a run started again (``overwrite``) deletes the old event files.

TensorBoard is an optional dependency: ``pip install 'normlab[tensorboard]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from normlab.train.config import ConfigError

__all__ = ["EVENT_FILES", "TAGS", "TensorBoardLog", "record_scalars"]

#: The glob pattern of TensorBoard's event file names.
EVENT_FILES = "events.out.tfevents.*"
#: ``metrics.jsonl`` key -> TensorBoard tag (auxiliary losses: ``loss/<name>``).
TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "lr": "lr",
}


def record_scalars(
    record: dict[str, Any], aux_names: Sequence[str], previous: dict[str, Any] | None = None
) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` record, by tag (see the module docstring);
    ``previous`` is the record before it (``None``: the run's first).

    Example::

        >>> rec = {"step": 10, "lr": 0.1, "train_loss": 0.5, "train_acc": None, "std_loss": 0.2,
        ...        "test_loss": 0.7, "test_acc": 0.8, "train_time": 2.0}
        >>> s = record_scalars(rec, ["std_loss"], {"step": 5, "train_time": 1.5})
        >>> s["loss/train"], s["loss/std_loss"], s["time/step"], "accuracy/train" in s
        (0.5, 0.2, 0.1, False)
    """
    out = {tag: float(record[key]) for key, tag in TAGS.items() if record.get(key) is not None}
    for name in aux_names:
        if record.get(name) is not None:
            out[f"loss/{name}"] = float(record[name])
    step0, time0 = (0, 0.0) if previous is None else (previous["step"], previous["train_time"])
    if record["step"] > step0:
        out["time/step"] = (record["train_time"] - time0) / (record["step"] - step0)
    return out


class TensorBoardLog:
    """Writes the records of a run into TensorBoard event files in ``log_dir``.

    Args:
        log_dir: the run directory.
        aux_names: the auxiliary losses the records hold.
        resumed_at: the checkpoint step a resumed run continues from (its later events are
            purged), or ``None`` for a new run.
        previous: the last record before this process's first (for ``time/step``).

    Raises :class:`~normlab.train.config.ConfigError` naming ``run.tensorboard`` and
    ``pip install 'normlab[tensorboard]'`` when the tensorboard package is missing.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        aux_names: Sequence[str],
        resumed_at: int | None = None,
        previous: dict[str, Any] | None = None,
    ) -> None:
        try:
            # optional dependency (the tensorboard extra): imported only when a run asks for it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "run.tensorboard: writing TensorBoard files needs the tensorboard package, which "
                "is not installed; pip install 'normlab[tensorboard]' (or set run.tensorboard = "
                "false)"
            ) from None
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(os.fspath(log_dir), purge_step=purge)
        self.aux_names = list(aux_names)
        self.previous = previous

    def write(self, record: dict[str, Any]) -> None:
        """Add the scalars of ``record`` and flush them to disk."""
        for tag, value in record_scalars(record, self.aux_names, self.previous).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()
        self.previous = record

    def close(self) -> None:
        self.writer.close()
