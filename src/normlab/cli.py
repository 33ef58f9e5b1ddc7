"""The ``normlab`` command line.

::

    normlab norms                                   # list the normalization layers
    normlab train experiments/digits_bn.toml --set optim.lr=0.1 [--resume]
    torchrun --nproc_per_node=2 -m normlab.cli train experiments/digits_bn.toml --set run.sync_stats=true
    normlab quickstart [--out DIR] [--seeds 3] [--epochs N] [--methods bn,mode] [--jobs N]
    normlab run --list                              # the experiments and their titles
    normlab run mixture_cifar_cnn --scale small [--seeds 2] [--device cpu] [--out runs/x]
                [--variants 'c100-*'] [--set train.epochs=3] [--jobs 2] [--overwrite] [--no-report]
    normlab report runs/mixture_cifar_cnn-small [--out results/mixture_cifar_cnn]

``run`` runs every variant × seed of an experiment at a scale, skipping finished runs (so an
interrupted sweep continues where it stopped), then writes the report; ``report`` (re)writes
``report.md``, the PNG figures and ``results.json`` from a run directory. ``quickstart`` runs the
packaged ``quickstart`` experiment and prints its comparison table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import normlab
from normlab.experiments import (
    available_experiments,
    load_experiment,
    run_experiment,
    run_quickstart,
)
from normlab.report import write_quickstart_report, write_report
from normlab.train import Trainer, load_config
from normlab.train.distributed import is_main_process

__all__ = ["add_commands", "build_parser", "main"]


def _err(msg: str) -> int:
    if is_main_process():  # the other processes of a torchrun job stay quiet
        print(f"normlab: error: {msg}", file=sys.stderr)
    return 2


def _log(msg: str) -> None:
    if is_main_process():  # the other processes of a torchrun job stay quiet
        print(msg, file=sys.stderr, flush=True)


def _cmd_norms(args: argparse.Namespace) -> int:
    names = normlab.available_norms()
    width = max(len(n) for n in names)
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set or [])
        trainer = Trainer(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, log=_log)
    except (ValueError, FileExistsError) as e:
        return _err(str(e))
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
        return _err(str(e))
    table, plot = write_quickstart_report(res)
    print()
    print(table)
    print()
    for r in res.rows:
        for e in r["errors"]:
            print(f"{r['method']}: {e}")
    print(f"test-error curves: {plot}")
    print(f"table and data:    {res.out / 'results.md'}, {res.out / 'results.json'}")
    print(f"total time: {res.wall_time:.1f} s")
    return 0 if all(r["seeds"] > 0 for r in res.rows) else 1


def _cmd_run(args: argparse.Namespace) -> int:
    if args.list or not args.experiment:
        exps = available_experiments()
        if not exps:
            return _err("no experiments found (looked in $NORMLAB_EXPERIMENTS and ./experiments)")
        width = max(len(n) for n in exps)
        for name, title in exps.items():
            print(f"{name:<{width}}  {title}")
        return 0 if args.list else _err("the EXPERIMENT argument is required (see the list above)")
    try:
        exp = load_experiment(args.experiment)
        variants = [v for p in (args.variants or []) for v in p.split(",") if v]
        suite = run_experiment(
            exp,
            out=args.out,
            scale=args.scale,
            seeds=args.seeds,
            device=args.device,
            overrides=args.set or [],
            variants=variants,
            overwrite=args.overwrite,
            log=_log,
            progress=args.progress,
            threads=args.threads,
            jobs=args.jobs,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # incl. missing dataset files
        return _err(str(e))
    except KeyboardInterrupt:
        _log("interrupted; run the same command again to continue")
        return 130
    _log(f"runs in {suite['out']} ({suite.get('wall_time', 0):.0f} s)")
    if not args.no_report and is_main_process():
        print(write_report(suite["out"]))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        path = write_report(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    print(path)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``run`` and ``report`` to an ``argparse`` subparsers object (``add_subparsers()``)."""
    p = subparsers.add_parser(
        "run",
        help="run every variant and seed of an experiment (skips finished runs), then report",
        description="Run an experiment of experiments/ (a file path or a name such as "
        "mixture_cifar_cnn). Finished runs are skipped and unfinished ones resumed, so running the "
        "same command again continues an interrupted sweep.",
    )
    p.add_argument("experiment", nargs="?", help="experiment name or path to its TOML file")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument(
        "--scale",
        default="small",
        help="'small' (offline, CPU, minutes; default) or 'full' (the paper's protocol)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default: the experiment's, per scale)",
    )
    p.add_argument(
        "--device", default=None, help="run.device for every run: auto, cpu, cuda, cuda:1, ..."
    )
    p.add_argument("--out", default=None, help="run directory (default runs/<experiment>-<scale>)")
    p.add_argument(
        "--variants",
        action="append",
        metavar="GLOBS",
        help="only these variants (comma-separated globs; repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="config override applied to every run (after the experiment's)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parallel worker processes, --threads torch threads each (default 1: one run after "
        "the other in this process)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of the sweep, or of each worker with --jobs (default: torch's; "
        "1 per worker)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start every run again instead of skipping/resuming",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument(
        "--progress",
        default="off",
        choices=("auto", "on", "off"),
        help="per-run progress bars (default off)",
    )
    p.set_defaults(func=_cmd_run)

    p = subparsers.add_parser(
        "report",
        help="write a Markdown report (tables with the paper's numbers, PNG plots) of a run directory",
    )
    p.add_argument("run_dir", help="directory written by `normlab run`")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.set_defaults(func=_cmd_report)


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
        "mixture (as in the paper, and with warm-started fits), mode, iternorm, the "
        "standardization loss and no normalization (3 seeds each), print a table (final/best "
        "test accuracy, steps to reach BN's best, time per step vs BN) and write test-error "
        "curves to OUT/test_error.png. The runs are the packaged experiment 'quickstart' "
        "(`normlab run quickstart` runs it with the general report).",
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
