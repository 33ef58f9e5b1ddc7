"""The ``normlab`` command line.

::

    normlab norms                                   # list the normalization layers
    normlab train experiments/digits_bn.toml --set optim.lr=0.1 [--resume]
    torchrun --nproc_per_node=2 -m normlab.cli train experiments/digits_bn.toml --set run.sync_stats=true
    normlab quickstart [--out DIR] [--seeds 3] [--epochs N] [--methods bn,mode] [--jobs N]
    normlab run EXPERIMENT / normlab report RUN_DIR   (see normlab.report.commands)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import normlab
from normlab.train.distributed import is_main_process


def _err(msg: str) -> None:
    if is_main_process():  # the other processes of a torchrun job stay quiet
        print(f"normlab: error: {msg}", file=sys.stderr)


def _cmd_norms(args: argparse.Namespace) -> int:
    names = normlab.available_norms()
    width = max(len(n) for n in names)
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _log(msg: str) -> None:
    if is_main_process():  # the other processes of a torchrun job stay quiet
        print(msg, file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from normlab.train import load_config

    try:
        cfg = load_config(args.config, args.set or [])
    except ValueError as e:
        _err(str(e))
        return 2
    run_dir = args.run_dir
    try:
        from normlab.train.loop import Trainer

        trainer = Trainer(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, log=_log)
    except (ValueError, FileExistsError) as e:
        _err(str(e))
        return 2
    c = trainer.config
    _log(
        f"normlab train: {c.model.name} with norm {c.model.norm!r} (conv {c.model.conv}) on "
        f"{c.data.name} — {trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), "
        f"{c.optim.name} lr {c.optim.lr:g}, seed {c.run.seed}, device {trainer.device}"
    )
    _log(f"run directory: {trainer.run_dir}")
    result = trainer.fit()
    s = result.summary
    if not trainer.dist.is_main:
        return 0
    print(
        f"final test acc {100 * s['final_test_acc']:.2f}%  best {100 * s['best_test_acc']:.2f}% "
        f"(step {s['best_step']})  {s['steps']} steps, {1000 * s['time_per_step']:.1f} ms/step  "
        f"-> {result.run_dir}"
    )
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from normlab.train.quickstart import run_quickstart

    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        res = run_quickstart(
            out=args.out,
            seeds=args.seeds,
            epochs=args.epochs,
            methods=methods,
            jobs=args.jobs,
            overrides=args.set or [],
            log=_log,
        )
    except ValueError as e:
        _err(str(e))
        return 2
    print()
    print(res.table)
    print()
    for r in res.rows:
        for e in r["errors"]:
            print(f"{r['method']}: {e}")
    print(f"test-error curves: {res.plot}")
    print(f"table and data:    {res.out / 'results.md'}, {res.out / 'results.json'}")
    print(f"total time: {res.wall_time:.1f} s")
    return 0 if all(r["seeds"] > 0 for r in res.rows) else 1


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

    p = sub.add_parser(
        "train",
        help="train one experiment from a TOML config",
        description="Train the experiment a TOML config describes, writing config.toml, env.json, "
        "metrics.jsonl, summary.json and checkpoint.pt to run.dir/run.name (default "
        "runs/<config stem>).",
    )
    p.add_argument("config", help="TOML config file (see experiments/)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=0.1 --set model.norm=gn (repeatable; "
        "values are TOML, bare words are strings)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="start again in a directory that holds a run"
    )
    p.add_argument("--run-dir", default=None, help="run directory (default run.dir/run.name)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "quickstart",
        help="compare every method on digits (offline, a few minutes)",
        description="Train the same small CNN on scikit-learn's 8x8 digits with bn, gn+WS, bcn+WS, "
        "mixture (as in the paper, and with warm-started fits), mode, iternorm, the standardization loss and no normalization (3 seeds each), "
        "print a table (final/best test accuracy, steps to reach BN's best, time per step vs BN) "
        "and write test-error curves to OUT/test_error.png.",
    )
    p.add_argument(
        "--out", default="quickstart_out", help="output directory (default: %(default)s)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 12)")
    p.add_argument(
        "--methods", default=None, help="comma-separated subset, e.g. bn,mode,none (default: all)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel worker processes, one torch thread each (default: CPU count, max 8)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="config override for every run"
    )
    p.set_defaults(func=_cmd_quickstart)

    try:  # `normlab run` / `normlab report` (the paper experiments) live in normlab.report
        from normlab.report.commands import add_commands
    except ImportError:  # pragma: no cover - optional part not installed
        pass
    else:
        add_commands(sub)
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
