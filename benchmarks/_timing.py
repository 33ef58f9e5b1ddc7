"""Shared timing and memory helpers for normlab's benchmarks.

Timing: forward+backward of candidate A and baseline B alternately (A, B, A, B, ... after a
warm-up); the reported figure is the median of the per-pair ratios, which cancels machine drift
pair by pair on a shared, noisy machine. Memory: on CUDA, ``torch.cuda.max_memory_allocated``
growth during one step; on Linux CPUs, resident-set high-water-mark growth during one step
(``/proc/self/clear_refs``), with glibc's mmap threshold pinned so freed blocks go back to the OS.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reexec_with_malloc_env() -> None:
    """Restart the interpreter once with a fixed glibc mmap threshold (stable CPU memory
    numbers)."""
    if sys.platform.startswith("linux") and MMAP_ENV not in os.environ:
        env = dict(os.environ, **{MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


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


def paired_ratio(
    step_a: Callable[[], None],
    step_b: Callable[[], None],
    device: torch.device,
    pairs: int = 20,
    warmup: int = 3,
) -> tuple[float, float, float]:
    """Median of per-pair time ratios A/B, and the medians of A's and B's times (seconds)."""
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb, ratios = [], [], []
    for i in range(pairs):
        # alternate which goes first so neither systematically benefits from a warm cache
        if i % 2 == 0:
            a = time_once(step_a, device)
            b = time_once(step_b, device)
        else:
            b = time_once(step_b, device)
            a = time_once(step_a, device)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    return statistics.median(ratios), statistics.median(ta), statistics.median(tb)
