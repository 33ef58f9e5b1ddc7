"""The ``normlab run`` and ``normlab report`` subcommands (wired into :mod:`normlab.cli`).

::

    normlab run --list                                        # the experiments and their titles
    normlab run mixture_cifar_cnn --scale small [--seeds 2] [--device cpu] [--out runs/x]
                [--variants 'c100-*'] [--set train.epochs=3] [--overwrite] [--no-report]
    normlab report runs/mixture_cifar_cnn-small [--out results/mixture_cifar_cnn]

``run`` runs every variant × seed of the experiment at the scale, skipping finished runs (so an
interrupted sweep continues where it stopped), then writes the report. ``report`` (re)writes
``report.md``, the PNG figures and ``results.json`` from a run directory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from normlab.train.distributed import is_main_process

__all__ = ["add_commands", "cmd_report", "cmd_run"]


def _log(msg: str) -> None:
    if is_main_process():  # under torchrun only rank 0 speaks
        print(msg, file=sys.stderr, flush=True)


def _err(msg: str) -> int:
    if is_main_process():
        print(f"normlab: error: {msg}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from normlab.experiments import available_experiments, load_experiment, run_experiment

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
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # incl. missing dataset files
        return _err(str(e))
    except KeyboardInterrupt:
        _log("interrupted; run the same command again to continue")
        return 130
    _log(f"runs in {suite['out']} ({suite.get('wall_time', 0):.0f} s)")
    if not args.no_report and is_main_process():
        from normlab.report.report import write_report

        path = write_report(suite["out"])
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.report.report import write_report

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
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the whole sweep (default: torch's)",
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
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "report",
        help="write a Markdown report (tables with the paper's numbers, PNG plots) of a run directory",
    )
    p.add_argument("run_dir", help="directory written by `normlab run`")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.set_defaults(func=cmd_report)
