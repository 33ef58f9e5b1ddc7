"""Layer benchmark: forward+backward time and peak memory of every registered normalization.

Each row is measured as a ratio to its baseline in the same process (nn.BatchNorm2d for 4-D input,
nn.BatchNorm1d for 2-D input, nn.GroupNorm for the per-sample norms gn/ln/in/mgn, nn.Conv2d for
WSConv2d), as the median of per-pair ratios over alternating runs. Run::

    python benchmarks/layers.py                      # every row
    python benchmarks/layers.py --only "mixture*"    # rows whose spec matches the glob
    python benchmarks/layers.py --pairs 40 --device cuda

Absolute times are printed for reference; only the ratios are comparable across machines.
TARGETS are the speed goals of the 4-D rows (a ratio to the baseline); the last full CPU run is
``benchmarks/results_cpu.txt``.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab
from _timing import paired_ratio, peak_memory, reexec_with_malloc_env

SHAPE_4D = (64, 128, 16, 16)
SHAPE_2D = (256, 512)

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
    "WSConv2d": 1.15,
}


@dataclass
class Row:
    spec: str
    shape: tuple[int, ...]
    baseline: str
    ratio: float
    ms: float
    base_ms: float
    mem: float | None
    base_mem: float | None


def _baseline(kind: str, c: int, ndim: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(normlab.nn.default_num_groups(c), c)
    return nn.BatchNorm2d(c) if ndim == 4 else nn.BatchNorm1d(c)


def _step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        y = module(x)
        y.backward(g)

    return step


def bench_norm(
    spec: str, kind: str, shape: tuple[int, ...], device: torch.device, pairs: int
) -> Row:
    c = shape[1]
    torch.manual_seed(0)
    layer = normlab.make_norm(spec, c).to(device).train()
    base = _baseline(kind, c, len(shape)).to(device).train()
    x = torch.randn(*shape, device=device, requires_grad=True)
    g = torch.randn(*shape, device=device)
    a, b = _step(layer, x, g), _step(base, x, g)
    ratio, ta, tb = paired_ratio(a, b, device, pairs=pairs)
    base_name = {"gn": "GroupNorm", "bn": "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"}
    return Row(
        spec,
        shape,
        base_name[kind],
        ratio,
        ta * 1e3,
        tb * 1e3,
        peak_memory(a, device),
        peak_memory(b, device),
    )


def bench_ws(device: torch.device, pairs: int) -> Row:
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device)
    ws = normlab.WSConv2d(128, 128, 3, padding=1, bias=False).to(device)
    x = torch.randn(*SHAPE_4D, device=device, requires_grad=True)
    g = torch.randn(*SHAPE_4D, device=device)
    a, b = _step(ws, x, g), _step(conv, x, g)
    ratio, ta, tb = paired_ratio(a, b, device, pairs=pairs)
    return Row(
        "WSConv2d",
        SHAPE_4D,
        "Conv2d",
        ratio,
        ta * 1e3,
        tb * 1e3,
        peak_memory(a, device),
        peak_memory(b, device),
    )


def rows_to_run(only: str | None) -> list[tuple[str, str]]:
    rows = [(n, "gn" if n in GN_BASELINE else "bn") for n in normlab.available_norms()]
    registered = set(normlab.available_norms())
    for spec, kind in EXTRA_ROWS:
        name, _ = normlab.parse_spec(spec)
        if name in registered and (spec, kind) not in rows:
            rows.append((spec, kind))
    if only:
        rows = [r for r in rows if fnmatch.fnmatch(r[0], only)]
    return rows


def _fmt_mem(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f}"


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'spec':<34} {'shape':<16} {'baseline':<12} {'time ratio':>10} {'target':>7} "
        f"{'ms':>8} {'base ms':>8} {'peak MiB':>9} {'base MiB':>9} {'mem ratio':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        target = TARGETS.get(r.spec) if len(r.shape) == 4 else None
        t = f"≤{target:g}" if target else ""
        mr = f"{r.mem / r.base_mem:.2f}" if r.mem is not None and r.base_mem else "n/a"
        lines.append(
            f"{r.spec:<34} {'x'.join(map(str, r.shape)):<16} {r.baseline:<12} "
            f"{r.ratio:>9.2f}x {t:>7} {r.ms:>8.2f} {r.base_ms:>8.2f} {_fmt_mem(r.mem):>9} "
            f"{_fmt_mem(r.base_mem):>9} {mr:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", help="glob over specs (e.g. 'mode*'); 'WSConv2d' selects the conv row")
    p.add_argument(
        "--pairs", type=int, default=20, help="alternating A/B pairs per row (default 20)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-2d", action="store_true", help="skip the 2-D (256, 512) rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"normlab {normlab.__version__}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, pairs {args.pairs}",
        flush=True,
    )
    rows: list[Row] = []
    shapes = [SHAPE_4D] + ([] if args.no_2d else [SHAPE_2D])
    for spec, kind in rows_to_run(args.only):
        for shape in shapes:
            try:
                rows.append(bench_norm(spec, kind, shape, device, args.pairs))
            except Exception as exc:  # a broken layer should not hide the other rows
                print(f"!! {spec} {shape}: {type(exc).__name__}: {exc}", flush=True)
            print(f"  measured {spec} {shape}", file=sys.stderr, flush=True)
    if args.only is None or fnmatch.fnmatch("WSConv2d", args.only):
        rows.append(bench_ws(device, args.pairs))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env()
    sys.exit(main())
