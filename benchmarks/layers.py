"""Layer benchmark: forward+backward time and peak memory of every registered normalization.

Each row is measured as a ratio to its baseline in the same process (nn.BatchNorm2d for 4-D input,
nn.BatchNorm1d for 2-D input, nn.GroupNorm for the per-sample norms gn/ln/in/mgn, nn.Conv2d for
WSConv2d), as the median of per-pair ratios over alternating runs. Run::

    python benchmarks/layers.py                      # every row, eager, float32
    python benchmarks/layers.py --only "mixture*"    # rows whose spec matches the glob
    python benchmarks/layers.py --pairs 40 --device cuda
    python benchmarks/layers.py --compile            # compiled layer vs compiled baseline
    python benchmarks/layers.py --dtype bfloat16 --shape 64,128,32,32 --budget 120
    python benchmarks/layers.py --channels-last --only "mixture*" --only "mode*"

``--compile`` compiles every layer and its baseline (``torch.compile``, inductor,
``fullgraph=True``, or with graph breaks where that fails: the ``graph`` column says which) and
adds the ratio of the compiled layer to its own eager self (and the eager time, measured in
the same rounds). A first line gives the fixed per-call cost of a compiled layer on this
machine (a compiled ``x·w`` vs the eager one): that cost weighs on a small layer compiled on its
own and not on a layer inside a compiled model. ``--dtype bfloat16`` feeds bfloat16
inputs to float32 layers (they keep float32 statistics; the conv row runs under autocast). A
layer that fails (to compile) gets its error in its row; the other rows go on. ``--channels-last`` stores the 4-D input and output
gradient of every row (layer and baseline alike) as ``torch.channels_last``. ``--only`` may be
repeated: rows come in the order of the first pattern they match. ``--budget`` stops starting
rows after that many seconds; the rows left are listed as skipped.

Absolute times are printed for reference; only the ratios are comparable across machines.
TARGETS are the speed goals of the 4-D rows (a ratio to the baseline, eager or compiled alike);
a compiled layer should also be at most COMPILED_VS_EAGER times its eager self. The last full
CPU run is ``benchmarks/results_cpu.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab
from _timing import (
    Budget,
    compile_module,
    interleaved_times,
    median_ratio,
    paired_ratio,
    parse_dtype,
    peak_memory,
    raise_recompile_limit,
    reexec_with_malloc_env,
    short_error,
)

SHAPE_4D = (64, 128, 16, 16)
SHAPE_2D = (256, 512)
WS_ROW = "WSConv2d"

# Configurations with a speed target or kept as reference rows: (spec, baseline kind).
EXTRA_ROWS: list[tuple[str, str]] = [
    ("bcn(micro_batch=true, rate=0.1)", "bn"),
    ("mixture(k=3, em_iters=2)", "bn"),
    ("mode(k=2)", "bn"),
    ("mgn(k=2)", "gn"),
    ("iternorm(group_size=64, iters=5)", "bn"),
    ("dbn(group_size=16)", "bn"),
    ("dbn(group_size=64)", "bn"),
]
GN_BASELINE = {"gn", "ln", "in", "mgn"}

TARGETS = {
    "bcn": 2.5,
    "mixture(k=3, em_iters=2)": 3.0,
    "mode(k=2)": 2.5,
    "mgn(k=2)": 2.5,
    "iternorm(group_size=64, iters=5)": 3.0,
    WS_ROW: 1.15,
}
COMPILED_VS_EAGER = 1.05


@dataclass
class Row:
    spec: str
    shape: tuple[int, ...]
    baseline: str
    ratio: float = float("nan")
    ms: float = float("nan")
    base_ms: float = float("nan")
    mem: float | None = None
    base_mem: float | None = None
    vs_eager: float | None = None  # compiled layer / eager layer (--compile only)
    eager_ms: float = float("nan")  # the eager layer's time in the same rounds (--compile only)
    graph: str = ""  # how the layer compiled (--compile only)
    error: str | None = None  # the row failed: why

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.spec) if len(self.shape) == 4 else None


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    pairs: int
    compile: bool
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    channels_last: bool = False

    def memory(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` stored as the rows are measured (channels last for 4-D under --channels-last)."""
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def compile_with(
        self, module: nn.Module, trial: Callable[[nn.Module], None]
    ) -> tuple[nn.Module, str]:
        return compile_module(module, trial, self.compile_mode, self.compile_backend)


def _baseline(kind: str, c: int, ndim: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(normlab.nn.default_num_groups(c), c)
    if kind == "conv":
        return nn.Conv2d(c, c, 3, padding=1, bias=False)
    return nn.BatchNorm2d(c) if ndim == 4 else nn.BatchNorm1d(c)


def _baseline_name(kind: str, ndim: int) -> str:
    names = {"gn": "GroupNorm", "conv": "Conv2d"}
    return names.get(kind, "BatchNorm2d" if ndim == 4 else "BatchNorm1d")


def _candidate(spec: str, c: int) -> nn.Module:
    if spec == WS_ROW:
        return normlab.WSConv2d(c, c, 3, padding=1, bias=False)
    return normlab.make_norm(spec, c)


def _step(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast: bool = False
) -> Callable[[], None]:
    ctx = (
        (lambda: torch.autocast(x.device.type, dtype=x.dtype))
        if autocast
        else contextlib.nullcontext
    )

    def step() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        with ctx():
            y = module(x)
        y.backward(g)

    return step


class CompiledBaselines:
    """One compiled baseline per (kind, shape, dtype), shared by the rows that use it."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._cache: dict[tuple, tuple[nn.Module, str]] = {}

    def get(self, kind: str, x: torch.Tensor, g: torch.Tensor) -> nn.Module:
        key = (kind, tuple(x.shape), x.dtype)
        if key not in self._cache:
            torch.manual_seed(0)
            base = _baseline(kind, x.shape[1], x.dim()).to(self.opts.device).train()
            autocast = kind == "conv" and x.dtype != torch.float32
            self._cache[key] = self.opts.compile_with(base, lambda m: _step(m, x, g, autocast)())
        return self._cache[key][0]


def bench_row(
    spec: str,
    kind: str,
    shape: tuple[int, ...],
    opts: Options,
    compiled_bases: CompiledBaselines | None = None,
) -> Row:
    """One row: ``spec`` vs its baseline at ``shape`` (eager, or both compiled)."""
    row = Row(spec, shape, _baseline_name(kind, len(shape)))
    c, dev = shape[1], opts.device
    autocast = kind == "conv" and opts.dtype != torch.float32
    torch.manual_seed(0)
    layer = _candidate(spec, c).to(dev).train()
    base = None if opts.compile else _baseline(kind, c, len(shape)).to(dev).train()
    x = opts.memory(torch.randn(*shape, device=dev).to(opts.dtype)).requires_grad_(True)
    g = opts.memory(torch.randn(*shape, device=dev).to(opts.dtype))
    if base is not None:
        a, b = _step(layer, x, g, autocast), _step(base, x, g, autocast)
        row.ratio, ta, tb = paired_ratio(a, b, dev, pairs=opts.pairs)
    else:
        assert compiled_bases is not None
        eager = _step(layer, x, g, autocast)
        try:
            compiled, row.graph = opts.compile_with(layer, lambda m: _step(m, x, g, autocast)())
        except Exception as exc:  # the row shows why the layer does not compile
            row.error = f"compile failed: {short_error(exc)}"
            return row
        a = _step(compiled, x, g, autocast)
        b = _step(compiled_bases.get(kind, x, g), x, g, autocast)
        times = interleaved_times([a, b, eager], dev, rounds=opts.pairs)
        row.ratio, row.vs_eager = median_ratio(times, 0, 1), median_ratio(times, 0, 2)
        ta, tb = statistics.median(times[0]), statistics.median(times[1])
        row.eager_ms = statistics.median(times[2]) * 1e3
    row.ms, row.base_ms = ta * 1e3, tb * 1e3
    row.mem, row.base_mem = peak_memory(a, dev), peak_memory(b, dev)
    return row


class _Scale(nn.Module):
    """``x · w`` per channel: about the least a layer can do."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def call_overhead(opts: Options, rounds: int = 60) -> tuple[float, float]:
    """The fixed cost of calling a compiled layer: medians (µs) of one forward+backward of
    :class:`_Scale` on a ``(4, 8)`` input, eager and compiled, measured in alternation. The
    difference (guard evaluation, the compiled autograd wrapper) is paid once per compiled
    call, so it weighs on a small layer compiled alone, not on a layer inside a compiled
    model."""
    torch.manual_seed(0)
    layer = _Scale(8).to(opts.device)
    x = torch.randn(4, 8, device=opts.device, requires_grad=True)
    g = torch.randn(4, 8, device=opts.device)
    compiled, _ = opts.compile_with(layer, lambda m: _step(m, x, g)())
    times = interleaved_times([_step(layer, x, g), _step(compiled, x, g)], opts.device, rounds)
    eager, comp = (statistics.median(t) * 1e6 for t in times)
    return eager, comp


def _matches(spec: str, patterns: list[str]) -> int | None:
    """Index of the first pattern ``spec`` matches (None: none does)."""
    return next((i for i, p in enumerate(patterns) if fnmatch.fnmatch(spec, p)), None)


def rows_to_run(only: str | list[str] | None) -> list[tuple[str, str]]:
    """(spec, baseline kind) of every row, in table order; ``only``: globs, rows ordered by the
    first glob they match."""
    rows = [(n, "gn" if n in GN_BASELINE else "bn") for n in normlab.available_norms()]
    registered = set(normlab.available_norms())
    for spec, kind in EXTRA_ROWS:
        name, _ = normlab.parse_spec(spec)
        if name in registered and (spec, kind) not in rows:
            rows.append((spec, kind))
    rows.append((WS_ROW, "conv"))
    if only:
        patterns = [only] if isinstance(only, str) else list(only)
        keyed = [(_matches(r[0], patterns), i, r) for i, r in enumerate(rows)]
        rows = [r for k, _, r in sorted((k, i, r) for k, i, r in keyed if k is not None)]
    return rows


def _fmt_mem(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f}"


def _met(value: float | None, target: float | None) -> bool | None:
    if value is None or target is None or value != value:
        return None
    return value <= target


def header(compiled: bool) -> str:
    head = (
        f"{'spec':<34} {'shape':<16} {'baseline':<12} {'time ratio':>10} {'target':>7} "
        f"{'ms':>8} {'base ms':>8} {'peak MiB':>9} {'base MiB':>9} {'mem ratio':>9}"
    )
    if compiled:
        head += f" {'eager ms':>8} {'vs eager':>9} {'target':>7}  graph"
    return f"{head}\n{'-' * len(head)}"


def format_row(r: Row, compiled: bool) -> str:
    lead = f"{r.spec:<34} {'x'.join(map(str, r.shape)):<16} {r.baseline:<12} "
    if r.error is not None:
        return lead + f"FAILED  {r.error}"
    t = f"≤{r.target:g}" if r.target else ""
    mr = f"{r.mem / r.base_mem:.2f}" if r.mem is not None and r.base_mem else "n/a"
    line = (
        f"{lead}{r.ratio:>9.2f}x {t:>7} {r.ms:>8.2f} {r.base_ms:>8.2f} {_fmt_mem(r.mem):>9} "
        f"{_fmt_mem(r.base_mem):>9} {mr:>9}"
    )
    if compiled:
        ve = "n/a" if r.vs_eager is None else f"{r.vs_eager:.2f}x"
        em = f"{r.eager_ms:>8.2f}"
        line += f" {em} {ve:>9} {'≤' + format(COMPILED_VS_EAGER, 'g'):>7}  {r.graph}"
    return line


def format_table(rows: list[Row], compiled: bool = False) -> str:
    return "\n".join([header(compiled), *(format_row(r, compiled) for r in rows)])


def target_summary(rows: list[Row], compiled: bool, skipped: int = 0) -> str:
    """One line: how many targets the rows met, which they missed, and the failed rows."""
    met, missed = 0, []
    for r in rows:
        checks = [(r.ratio, r.target, "")]
        if compiled:
            checks.append((r.vs_eager, COMPILED_VS_EAGER, " vs eager"))
        for value, target, what in checks:
            ok = _met(value, target)
            if ok:
                met += 1
            elif ok is not None:
                shape = "x".join(map(str, r.shape))
                missed.append(f"{r.spec} {shape}{what} {value:.2f}x > {target:g}")
    failed = [f"{r.spec} {'x'.join(map(str, r.shape))}" for r in rows if r.error]
    parts = [f"targets: {met} met, {len(missed)} missed"]
    if missed:
        parts.append("missed: " + "; ".join(missed))
    if failed:
        parts.append(f"{len(failed)} failed: " + "; ".join(failed))
    if skipped:
        parts.append(f"{skipped} rows skipped (time budget spent)")
    return " | ".join(parts)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"--shape must be N,C or N,C,H,W with positive integers, got {text!r}"
        )
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        action="append",
        help="glob over specs (e.g. 'mode*'; 'WSConv2d' selects the conv row); repeatable",
    )
    p.add_argument(
        "--pairs", type=int, default=20, help="alternating A/B pairs per row (default 20)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-2d", action="store_true", help="skip the 2-D (256, 512) rows")
    p.add_argument(
        "--shape",
        action="append",
        type=_shape,
        help="N,C,H,W or N,C; repeatable (default 64,128,16,16 and 256,512)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--channels-last", action="store_true", help="4-D inputs in torch.channels_last memory"
    )
    p.add_argument("--compile", action="store_true", help="compiled layers vs compiled baselines")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager"],
        help="aot_eager: trace forward and backward only (a fast check, no fused kernels)",
    )
    p.add_argument("--budget", type=float, help="seconds after which no new row starts")
    p.add_argument(
        "--by-shape", action="store_true", help="every row at the first shape, then the next"
    )
    return p


def row_plan(
    rows: list[tuple[str, str]], shapes: list[tuple[int, ...]], by_shape: bool
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(spec, baseline kind, shape) in measuring order; the conv row at the first 4-D shape."""
    ws_shape = next((s for s in shapes if len(s) == 4), SHAPE_4D)
    per_row = [[ws_shape] if kind == "conv" else shapes for _, kind in rows]
    plan = [(spec, kind, s) for (spec, kind), ss in zip(rows, per_row) for s in ss]
    if by_shape:
        order: dict[tuple[int, ...], int] = {}
        for s in [*shapes, ws_shape]:
            order.setdefault(s, len(order))
        plan.sort(key=lambda r: order[r[2]])  # stable: row order within a shape
    return plan


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    budget = Budget(args.budget)
    torch.set_num_threads(args.threads)
    opts = Options(
        torch.device(args.device),
        parse_dtype(args.dtype),
        args.pairs,
        args.compile,
        args.compile_mode,
        args.compile_backend,
        args.channels_last,
    )
    if opts.compile:
        raise_recompile_limit()
    how = opts.compile_mode if opts.compile_backend == "inductor" else opts.compile_backend
    mode = f"compiled ({how})" if opts.compile else "eager"
    print(
        f"normlab {normlab.__version__}, torch {torch.__version__}, device {opts.device}, "
        f"threads {torch.get_num_threads()}, pairs {opts.pairs}, {mode}, {args.dtype}"
        + (", channels last" if opts.channels_last else ""),
        flush=True,
    )
    shapes = args.shape or [SHAPE_4D] + ([] if args.no_2d else [SHAPE_2D])
    bases = CompiledBaselines(opts) if opts.compile else None
    if opts.compile:
        eager_us, comp_us = call_overhead(opts)
        print(
            f"per-call cost of a compiled layer: {comp_us - eager_us:+.0f} µs (forward+backward of "
            f"x·w on a 4x8 input: {comp_us:.0f} µs compiled, {eager_us:.0f} µs eager)",
            flush=True,
        )
    print(header(opts.compile), flush=True)
    rows: list[Row] = []
    skipped = 0
    for spec, kind, shape in row_plan(rows_to_run(args.only), shapes, args.by_shape):
        if budget.spent():
            skipped += 1
            continue
        try:
            row = bench_row(spec, kind, shape, opts, bases)
        except Exception as exc:  # a broken layer should not hide the other rows
            row = Row(spec, shape, _baseline_name(kind, len(shape)), error=short_error(exc))
        rows.append(row)
        print(format_row(row, opts.compile), flush=True)
    print(target_summary(rows, opts.compile, skipped), flush=True)
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env()
    sys.exit(main())
