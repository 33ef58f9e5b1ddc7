"""Network benchmark: one training step (forward, backward, SGD update) of a paper architecture
with a normalization placed where the paper puts it, as a ratio to the same network with BN
everywhere, measured alternately in the same process (median of per-pair ratios).

Default: the CIFAR CNN of Kalayeh & Shah, Table 1, batch 256, 3×32×32, MixtureNorm(k=3,
em_iters=2) at conv3 (MN-1, Kalayeh & Shah, Table 2). The target is ≤ 1.05× the all-BN step
(the paper's own implementation costs 12–16 %, Kalayeh & Shah, Table 7).

    python benchmarks/network.py
    python benchmarks/network.py --norm "mode(k=2)" --include "conv*" --batch 128
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab
from _timing import paired_ratio, peak_memory, reexec_with_malloc_env
from normlab.models import create


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = create(args.model, num_classes=10, in_channels=3, norm="bn").to(device)
    cand = create(args.model, num_classes=10, in_channels=3, norm="bn").to(device)
    cand.load_state_dict(base.state_dict())
    replaced = normlab.convert(cand, args.norm, include=args.include)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    a, b = make_step(cand, x, y), make_step(base, x, y)
    ratio, ta, tb = paired_ratio(a, b, device, pairs=args.pairs)
    ma, mb = peak_memory(a, device), peak_memory(b, device)
    print(
        f"normlab {normlab.__version__}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, pairs {args.pairs}"
    )
    print(
        f"model {args.model}, batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.norm} at {replaced} vs all-BN"
    )
    mem = "n/a" if ma is None or mb is None else f"{ma / 2**20:.0f} MiB vs {mb / 2**20:.0f} MiB"
    print(
        f"step time ratio {ratio:.3f}x  ({ta * 1e3:.1f} ms vs {tb * 1e3:.1f} ms); peak memory {mem}"
    )
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env()
    sys.exit(main())
