"""The experiment suite: declarative experiment files and the runner behind ``normlab run``.

An *experiment file* (``experiments/*.toml``) describes one table or figure of a paper: a base
training configuration (the sections of :mod:`normlab.train.config`), the variants compared, the
seeds, a small-scale counterpart that runs offline on a CPU, the paper's numbers and the claims
the report checks. ``experiments/README.md`` documents every key; in short::

    [experiment]  title, cite ("Kalayeh & Shah, Tables 2-3"), source ("Kalayeh & Shah"),
                  kind ("train" | "analysis"), seeds, description, notes
    [base.data] / [base.model] / ...                  a normlab.train config
    [[variant]]   name, label, group, setting, set = { model.norm = "..." }, placement, disabled
    [[grid]]      variants from the product of [grid.axes]; "{field}" filled in per point
    [scale.small] seeds, variants (globs), defaults, set, [scale.small.variant."glob"], notes
    [collect]     statdiff / gmm / percentiles, recorded while training
    [[table]]     columns (metrics of normlab.report.metrics), headers, rows, paper numbers
    [[claim]]     text, metric, a, op, b: the paper's statements, checked on our numbers
    [plots]       curves, losses, gmm, speedup
    [analysis]    runner = "snd_conditioning" | "cost" | "gan" and its parameters

Modules, each importing only those above it:

* :mod:`~normlab.experiments.spec` — the typed records and the parser;
* :mod:`~normlab.experiments.analyses` — the analysis runners (computing and writing results);
* :mod:`~normlab.experiments.catalog` — finding and loading files (validated);
* :mod:`~normlab.experiments.collectors` — analyses recorded during training;
* :mod:`~normlab.experiments.runner` — run, skip finished runs, resume, parallel workers;
* :mod:`~normlab.experiments.quickstart` — ``normlab quickstart`` (``quickstart.toml``).

:mod:`normlab.report` renders what these write; nothing here imports it.
"""

from normlab.experiments.analyses import (
    ANALYSES,
    AnalysisRunner,
    get_runner,
    register_analysis,
)
from normlab.experiments.catalog import (
    available_experiments,
    experiments_dir,
    find_experiment,
    load_experiment,
    validate_experiment,
)
from normlab.experiments.quickstart import METHODS, QuickstartResult, run_quickstart
from normlab.experiments.runner import (
    EXPERIMENT_COPY,
    SUITE_FILE,
    RunSpec,
    default_jobs,
    execute_run,
    load_suite,
    plan_runs,
    run_experiment,
)
from normlab.experiments.spec import (
    Claim,
    Experiment,
    ExperimentError,
    Plots,
    Scale,
    Table,
    Variant,
    is_glob,
    match_variants,
    parse_experiment,
)

__all__ = [
    "ANALYSES",
    "EXPERIMENT_COPY",
    "METHODS",
    "SUITE_FILE",
    "AnalysisRunner",
    "Claim",
    "Experiment",
    "ExperimentError",
    "Plots",
    "QuickstartResult",
    "RunSpec",
    "Scale",
    "Table",
    "Variant",
    "available_experiments",
    "default_jobs",
    "execute_run",
    "experiments_dir",
    "find_experiment",
    "get_runner",
    "is_glob",
    "load_experiment",
    "load_suite",
    "match_variants",
    "parse_experiment",
    "plan_runs",
    "register_analysis",
    "run_experiment",
    "run_quickstart",
    "validate_experiment",
]
