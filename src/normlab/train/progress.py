"""What a training run shows on the terminal: a progress bar and one line per epoch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress", "epoch_line", "progress_enabled"]


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


def epoch_line(rec: dict[str, Any], total_steps: int) -> str:
    """The log line of a ``metrics.jsonl`` record."""
    tl, vl = rec["train_loss"], rec["test_loss"]
    return (
        f"epoch {rec['epoch']:g} step {rec['step']}/{total_steps}  lr {rec['lr']:.4g}  "
        f"train loss {tl if tl is None else round(tl, 4)} acc {100 * (rec['train_acc'] or 0):.2f}%  "
        f"test loss {vl if vl is None else round(vl, 4)} acc {100 * rec['test_acc']:.2f}%"
    )


class Progress:
    """A progress bar over the optimizer steps (when ``enabled``) and the log, which writes
    around the bar. A context manager that closes the bar."""

    def __init__(
        self, log: Callable[[str], None], enabled: bool, total: int, initial: int, name: str
    ) -> None:
        self.log = log
        self.bar = None
        if enabled:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=name,
                unit="step",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, rec: dict[str, Any] | None) -> None:
        """One optimizer step done; ``rec``: the record it wrote, if any."""
        if self.bar is None:
            return
        self.bar.update(1)
        if rec is not None:
            self.bar.set_postfix(
                loss=f"{rec['train_loss'] or float('nan'):.3f}",
                acc=f"{(rec['train_acc'] or 0) * 100:.1f}",
                test=f"{rec['test_acc'] * 100:.1f}",
            )

    def write(self, msg: str) -> None:
        if self.bar is None:
            self.log(msg)
            return
        with tqdm.external_write_mode(file=sys.stderr):
            self.log(msg)
