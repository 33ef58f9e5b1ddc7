"""Network benchmark: one training step (forward, backward, SGD update) of a paper architecture
with a normalization placed where the paper puts it, as a ratio to the same network with BN
everywhere, measured alternately in the same process (median of per-pair ratios).

Default: the CIFAR CNN of Kalayeh & Shah, Table 1, batch 256, 3×32×32, MixtureNorm(k=3,
em_iters=2) at conv3 (MN-1, Kalayeh & Shah, Table 2). The target is ≤ 1.05× the all-BN step
(the paper's own implementation costs 12–16 %, Kalayeh & Shah, Table 7). ``--compile`` then
compiles both networks (``torch.compile``, inductor, ``fullgraph=True`` where possible) and
measures the compiled candidate against the compiled all-BN network and against its eager self
(target ≤ 1.05× both); the eager line comes first, so a compile that fails or runs out of time
leaves it standing.

    python benchmarks/network.py
    python benchmarks/network.py --norm "mode(k=2)" --include "conv*" --batch 128
    python benchmarks/network.py --compile --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab
from _timing import (
    compile_module,
    interleaved_times,
    median_ratio,
    paired_ratio,
    peak_memory,
    reexec_with_malloc_env,
    short_error,
)
from normlab.models import create

TARGET = 1.05


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _mem(ma: float | None, mb: float | None) -> str:
    return "n/a" if ma is None or mb is None else f"{ma / 2**20:.0f} MiB vs {mb / 2**20:.0f} MiB"


def _verdict(ratio: float) -> str:
    return "ok" if ratio <= TARGET else "MISSED"


def _compiled(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> tuple[Callable[[], None], str]:
    compiled, how = compile_module(
        model, lambda m: make_step(m, x, y)(), args.compile_mode, args.compile_backend
    )
    return make_step(compiled, x, y), how


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="cifar_cnn")
    p.add_argument("--norm", default="mixture(k=3, em_iters=2)")
    p.add_argument("--include", default="conv3.*", help="glob of the norm layers to replace")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also compare the compiled networks")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be at least 1, got {args.pairs}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = create(args.model, num_classes=10, in_channels=3, norm="bn").to(device)
    cand = create(args.model, num_classes=10, in_channels=3, norm="bn").to(device)
    cand.load_state_dict(base.state_dict())
    replaced = normlab.convert(cand, args.norm, include=args.include)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    # copies for --compile, taken before any step, so that all networks start alike
    copies = (copy.deepcopy(cand), copy.deepcopy(base)) if args.compile else None
    a, b = make_step(cand, x, y), make_step(base, x, y)
    print(
        f"normlab {normlab.__version__}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, pairs {args.pairs}"
    )
    print(
        f"model {args.model}, batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.norm} at {replaced} vs all-BN",
        flush=True,
    )
    ratio, ta, tb = paired_ratio(a, b, device, pairs=args.pairs)
    ma, mb = peak_memory(a, device), peak_memory(b, device)
    print(
        f"step time ratio {ratio:.3f}x  ({ta * 1e3:.1f} ms vs {tb * 1e3:.1f} ms); "
        f"peak memory {_mem(ma, mb)}",
        flush=True,
    )
    if copies is not None:
        compiled_comparison(cand, *copies, x, y, args)
    return 0


def compiled_comparison(
    cand: torch.nn.Module,
    cand_c: torch.nn.Module,
    base_c: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
) -> None:
    """Compile ``cand_c`` and ``base_c`` (copies of the candidate and the all-BN network); print
    the compiled candidate's step vs the compiled all-BN step and vs the eager ``cand``'s step
    (the three in turn in one loop)."""
    device = x.device
    try:
        ac, how_a = _compiled(cand_c, x, y, args)
        bc, how_b = _compiled(base_c, x, y, args)
    except Exception as exc:
        print(f"compiled: FAILED  compile failed: {short_error(exc)}")
        return
    a = make_step(cand, x, y)
    times = interleaved_times([ac, bc, a], device, rounds=args.pairs)
    comp, self_ratio = median_ratio(times, 0, 1), median_ratio(times, 0, 2)
    ms = [statistics.median(t) * 1e3 for t in times]
    mem = _mem(peak_memory(ac, device), peak_memory(bc, device))
    print(
        f"compiled step time ratio {comp:.3f}x ({ms[0]:.1f} ms vs {ms[1]:.1f} ms; target "
        f"≤{TARGET:g}: {_verdict(comp)}); peak memory {mem}; graph: {how_a} / {how_b}"
    )
    print(
        f"compiled/eager candidate step {self_ratio:.3f}x (target ≤{TARGET:g}: "
        f"{_verdict(self_ratio)})"
    )


if __name__ == "__main__":
    reexec_with_malloc_env()
    sys.exit(main())
