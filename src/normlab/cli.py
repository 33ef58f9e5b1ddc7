"""The ``normlab`` command line.

::

    normlab norms                                   # list the normalization layers
    normlab train experiments/digits_bn.toml --set optim.lr=0.1 [--resume]
    torchrun --nproc_per_node=2 -m normlab.cli train experiments/digits_bn.toml --set run.sync_stats=true
    normlab quickstart [--out DIR] [--seeds 3] [--epochs N] [--methods bn,mode] [--jobs N]
    normlab run --list                              # the experiments and their titles
    normlab run mixture_cifar_cnn --scale small [--seeds 2] [--device cpu] [--out runs/x]
                [--variants 'c100-*'] [--set train.epochs=3] [--jobs 2] [--overwrite] [--no-report]
    normlab run mixture_cifar_cnn --scale full --launcher slurm --partition gpu --gpus-per-run 1
                --time 8:00:00 [--mem 32G] [--account A] [--qos Q] [--slurm-param constraint=a100]
                [--wait] [--slurm-cluster local]
    normlab run mixture_cifar_cnn --scale full --launcher ray [--ray-address auto] --gpus-per-run 1
    normlab status runs/mixture_cifar_cnn-full
    normlab report runs/mixture_cifar_cnn-small [--out results/mixture_cifar_cnn]

``run`` runs every variant × seed of an experiment at a scale, skipping finished runs and runs
another launcher is training (so an interrupted sweep continues where it stopped and failed runs
are retried), then writes the report; ``--launcher`` trains the runs here (``serial``), as a
Slurm job array (``slurm``) or as Ray tasks (``ray``). ``status`` shows what each run is doing;
``report`` (re)writes ``report.md``, the PNG figures and ``results.json`` from a run directory.
``quickstart`` runs the packaged ``quickstart`` experiment and prints its comparison table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import normlab
from normlab.experiments import (
    Experiment,
    ExperimentError,
    available_experiments,
    load_experiment,
    run_experiment,
    run_quickstart,
)
from normlab.experiments.launchers import LAUNCHERS, SLURM_CLUSTERS, LaunchOptions
from normlab.experiments.spec import Launcher, slurm_minutes
from normlab.experiments.status import format_status, suite_status
from normlab.report import write_quickstart_report, write_report
from normlab.report.index import write_index
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
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # incl. missing dataset files
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


def _slurm_params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ExperimentError(
                f"--slurm-param: {item!r} is not KEY=VALUE with an sbatch option as KEY "
                "(e.g. constraint=a100, or exclusive)"
            )
        out[key] = value if eq else True
    return out


def _resources(exp: Experiment, args: argparse.Namespace) -> Launcher:
    """The experiment's ``[launcher]``, then ``--launcher-config``'s, then the flags."""
    res = exp.launcher
    if args.launcher_config:
        path = Path(args.launcher_config)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ExperimentError(f"--launcher-config: cannot read {str(path)!r}: {e}") from None
        if not isinstance(doc.get("launcher"), dict):
            raise ExperimentError(f"--launcher-config: {str(path)!r} has no [launcher] table")
        res = res.merged(doc["launcher"], f"{path}: launcher")
    flags: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("partition", "account", "qos", "mem", "time", "gpus_per_run", "cpus_per_run")
        if getattr(args, k) is not None
    }
    if args.ray_address is not None:
        flags["ray_address"] = args.ray_address
    if args.slurm_param:
        flags["slurm_params"] = _slurm_params(args.slurm_param)
    return res.merged(flags, "command line")


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
        options = LaunchOptions(
            resources=_resources(exp, args), wait=args.wait, cluster=args.slurm_cluster
        )
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
            keep_going=True,
            launcher=args.launcher,
            options=options,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # incl. missing dataset files
        return _err(str(e))
    except KeyboardInterrupt:
        _log("interrupted; run the same command again to continue")
        return 130
    runs = suite["runs"]
    if any(r["status"] == "submitted" for r in runs):
        return 0  # the launcher said where to follow the jobs
    _log(f"runs in {suite['out']} ({suite.get('wall_time', 0):.0f} s)")
    busy = [r for r in runs if r["status"] == "busy"]
    if busy:
        _log(
            f"{len(busy)} run(s) are being trained by another launcher; follow them with "
            f"`normlab status {suite['out']}`"
        )
    if not args.no_report and is_main_process():
        print(write_report(suite["out"]))
    failed = [r for r in runs if r["status"] == "failed"]
    for r in failed:
        _log(f"FAILED {r['variant']} seed {r['seed']}: {r.get('error')}")
    if failed:
        _log(
            f"{len(failed)} run(s) failed (their logs: `normlab status {suite['out']}`); run the "
            "same command again to retry them"
        )
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        if args.json:
            _, runs = suite_status(args.run_dir, lines=args.lines)
            print(json.dumps([asdict(r) for r in runs], indent=2))
        else:
            print(format_status(args.run_dir, lines=args.lines))
    except ValueError as e:
        return _err(str(e))
    return 0


def _time_arg(text: str) -> str:
    try:
        slurm_minutes(text, "--time")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--time: ")) from None
    return text


def _mem_arg(text: str) -> str:
    if not re.fullmatch(r"\d+[KMGT]?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Slurm size; use e.g. 32G or 4000M")
    return text


def _count_arg(least: int) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return n

    return parse


def _add_launcher_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "launchers", "where the runs train; resources default to the experiment's [launcher] table"
    )
    g.add_argument(
        "--launcher",
        default="serial",
        choices=tuple(LAUNCHERS),
        help="serial: here (default); slurm: a job array through submitit; ray: one Ray task "
        "per run",
    )
    g.add_argument(
        "--launcher-config",
        metavar="FILE",
        help="a TOML file whose [launcher] table overrides the experiment's",
    )
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--mem", type=_mem_arg, help="memory per Slurm job, e.g. 32G")
    g.add_argument(
        "--time", type=_time_arg, help="Slurm time limit per job (90, 4:00:00, 1-12:00:00)"
    )
    g.add_argument(
        "--gpus-per-run",
        type=_count_arg(0),
        help="GPUs per run (Slurm: more than 1 trains the run with DDP, one task per GPU)",
    )
    g.add_argument("--cpus-per-run", type=_count_arg(1), help="CPU cores per run (default 1)")
    g.add_argument(
        "--slurm-param",
        action="append",
        metavar="KEY=VALUE",
        help="an extra sbatch option, e.g. constraint=a100 (repeatable)",
    )
    g.add_argument(
        "--slurm-cluster",
        default="slurm",
        choices=SLURM_CLUSTERS,
        help="submitit executor: slurm (default), local (subprocesses here, for testing), debug",
    )
    g.add_argument(
        "--wait",
        action="store_true",
        help="slurm: block until every job has ended, then write the report",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (e.g. auto, ray://head:10001; default: start one here)",
    )


def _cmd_report(args: argparse.Namespace) -> int:
    if (args.run_dir is None) == (args.index is None):
        return _err("report: give a run directory or --index RESULTS_DIR (one of them)")
    if args.readme is not None and args.index is None:
        return _err("report: --readme goes with --index")
    try:
        if args.index is not None:
            for p in write_index(args.index, args.readme):
                print(p)
            return 0
        path = write_report(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    print(path)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``run``, ``status`` and ``report`` to an ``argparse`` subparsers object."""
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
        default=None,
        help="parallel worker processes, --threads torch threads each (default 1: one run after "
        "the other in this process); with --launcher ray and no --ray-address: runs at once",
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
    _add_launcher_flags(p)
    p.set_defaults(func=_cmd_run)

    p = subparsers.add_parser(
        "status",
        help="show what each run of a run directory is doing (finished, running, queued, failed)",
        description="Per run: finished (its accuracy), running (host, pid or job id, since when, "
        "last step), queued (not started, waiting for its Slurm job, or stopped with a "
        "checkpoint) or failed (the error and the end of its log); then the totals.",
    )
    p.add_argument("run_dir", help="directory written by `normlab run`")
    p.add_argument(
        "--lines", type=int, default=8, help="log lines shown per failed run (default 8)"
    )
    p.add_argument("--json", action="store_true", help="print the states as JSON")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser(
        "report",
        help="write a Markdown report (tables with the paper's numbers, PNG plots) of a run directory",
    )
    p.add_argument("run_dir", nargs="?", default=None, help="directory written by `normlab run`")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.add_argument(
        "--index",
        metavar="RESULTS_DIR",
        default=None,
        help="instead: write RESULTS_DIR/README.md, one row per experiment, from the committed "
        "results.json and discussion.md files",
    )
    p.add_argument(
        "--readme",
        default=None,
        help="with --index: also regenerate the quickstart table in this README",
    )
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
