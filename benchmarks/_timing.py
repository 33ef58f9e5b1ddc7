"""Shared timing, memory, compile and time-budget helpers for normlab's benchmarks.

Timing: the steps to compare run in turn (A, B, A, B, ... after a warm-up; with three or more
steps the order rotates every round); a reported ratio is the median of the per-round ratios,
which cancels machine drift round by round on a shared, noisy machine. Memory: on CUDA,
``torch.cuda.max_memory_allocated`` growth during one step; on Linux CPUs, resident-set
high-water-mark growth during one step (``/proc/self/clear_refs``), with glibc's mmap threshold
pinned so freed blocks go back to the OS. Compiling: ``torch.compile`` with inductor and
``fullgraph=True``, falling back to a graph with breaks (the note says why).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def reexec_with_malloc_env() -> None:
    """Restart the interpreter once with a fixed glibc mmap threshold (stable CPU memory
    numbers)."""
    if sys.platform.startswith("linux") and MMAP_ENV not in os.environ:
        env = dict(os.environ, **{MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` or ``"bfloat16"`` as a torch dtype (``ValueError`` naming the choices)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Budget:
    """A wall-clock allowance in seconds (``None``: unlimited), started at construction."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a time budget must be positive seconds, got {seconds!r}")
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.remaining() <= 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> tuple[int, int] | None:
    try:
        with open("/proc/self/status") as f:
            s = f.read()
    except OSError:
        return None
    rss = re.search(r"VmRSS:\s+(\d+)", s)
    hwm = re.search(r"VmHWM:\s+(\d+)", s)
    if not (rss and hwm):
        return None
    return int(rss.group(1)) * 1024, int(hwm.group(1)) * 1024


def peak_memory(step: Callable[[], None], device: torch.device) -> float | None:
    """Extra bytes at the peak of one call of ``step`` (None when it cannot be measured)."""
    step()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    r0 = _rss()
    step()
    r1 = _rss()
    if r0 is None or r1 is None:
        return None
    return float(max(0, r1[1] - r0[0]))


def time_once(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def interleaved_times(
    steps: Sequence[Callable[[], None]],
    device: torch.device,
    rounds: int = 20,
    warmup: int | None = None,
) -> list[list[float]]:
    """Per-round times (seconds) of every step: ``times[i][r]`` is step ``i`` in round ``r``.

    Round ``r`` runs the steps rotated by ``r`` (for two steps: A, B, then B, A, ...), so that
    none systematically benefits from going first on a warm cache. ``warmup`` rounds run first
    (default: 3, or ``rounds`` if fewer).
    """
    for _ in range(min(3, rounds) if warmup is None else warmup):
        for step in steps:
            step()
    n = len(steps)
    times: list[list[float]] = [[] for _ in range(n)]
    for r in range(rounds):
        for j in range(n):
            i = (r + j) % n
            times[i].append(time_once(steps[i], device))
    return times


def median_ratio(times: list[list[float]], i: int, j: int) -> float:
    """Median over rounds of ``times[i][r] / times[j][r]``."""
    return statistics.median(a / b for a, b in zip(times[i], times[j], strict=True))


def paired_ratio(
    step_a: Callable[[], None],
    step_b: Callable[[], None],
    device: torch.device,
    pairs: int = 20,
    warmup: int | None = None,
) -> tuple[float, float, float]:
    """Median of per-pair time ratios A/B, and the medians of A's and B's times (seconds)."""
    times = interleaved_times([step_a, step_b], device, rounds=pairs, warmup=warmup)
    return median_ratio(times, 0, 1), statistics.median(times[0]), statistics.median(times[1])


def raise_recompile_limit(limit: int = 64) -> None:
    """Let dynamo keep more graphs per function: a benchmark compiles the same layer class for
    several configurations, shapes and dtypes (past the limit dynamo would fall back to eager)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(limit, getattr(cfg, name)))


def compile_module(
    module: nn.Module,
    trial: Callable[[nn.Module], None],
    mode: str = "default",
    backend: str = "inductor",
) -> tuple[nn.Module, str]:
    """``torch.compile(module)`` (static shapes) and a note on how it compiled.

    ``trial(compiled)`` runs one step so that forward and backward compile now. With
    ``fullgraph=True`` the note is ``"fullgraph"``; if that raises, the module is compiled again
    allowing graph breaks, and the note is ``"breaks: <first line of the fullgraph error>"``.
    An error of the second attempt propagates. ``mode`` applies to inductor only;
    ``backend="aot_eager"`` traces forward and backward without generating kernels (a fast check
    that a module compiles to one graph).
    """
    kwargs: dict = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        kwargs["mode"] = mode
    try:
        compiled = torch.compile(module, fullgraph=True, **kwargs)
        trial(compiled)
        return compiled, "fullgraph"
    except Exception as exc:
        reason = short_error(exc)
    compiled = torch.compile(module, fullgraph=False, **kwargs)
    trial(compiled)
    return compiled, f"breaks: {reason}"


def short_error(exc: BaseException, width: int = 160) -> str:
    """``Type: first line of the message``, cut to ``width`` characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= width else text[: width - 1] + "…"
