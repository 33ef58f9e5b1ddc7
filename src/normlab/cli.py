"""The ``normlab`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import normlab


def _cmd_norms(args: argparse.Namespace) -> int:
    names = normlab.available_norms()
    width = max(len(n) for n in names)
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: Mixture, Mode, Iterative and Batch-Channel normalization, Weight "
        "Standardization and the Standardization Loss — layers, experiments and analyses.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("norms", help="list the registered normalization layers")
    p.set_defaults(func=_cmd_norms)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
