"""normlab.report: paper-format reports of experiment runs.

::

    from normlab.experiments import run_experiment
    from normlab.report import write_report
    suite = run_experiment("stdloss_mnist", scale="small", out="runs/stdloss_mnist")
    write_report("runs/stdloss_mnist", out="results/stdloss_mnist")   # report.md + PNGs + results.json

* :mod:`~normlab.report.report` — :func:`write_report` (the Markdown report);
* :mod:`~normlab.report.metrics` — loading a run directory, the metric vocabulary of the tables
  (best / final accuracy, best after a fraction of training, steps to a reference's best,
  reduction, speed-up, StatDiff), aggregation over seeds and the claim checks;
* :mod:`~normlab.report.plots` — error curves with ±1 std shading, losses, StatDiff, GMM fits;
* :mod:`~normlab.report.analyses` — the non-training experiment kinds (SND/conditioning, cost,
  DCGAN) with their report sections;
* :mod:`~normlab.report.commands` — ``add_commands(subparsers)`` for ``normlab run`` / ``report``.
"""

from normlab.report.commands import add_commands
from normlab.report.report import markdown_table, write_report

__all__ = ["add_commands", "markdown_table", "write_report"]
