"""normlab.report: paper-format reports of experiment runs (rendering only).

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
* :mod:`~normlab.report.analyses` — the report sections of the analysis runners (SND /
  conditioning, cost, DCGAN);
* :mod:`~normlab.report.quickstart` — the quickstart's table and figure;
* :mod:`~normlab.report.markdown` — Markdown tables and links.

The package reads what :mod:`normlab.experiments` wrote; it runs nothing itself.
"""

from normlab.report.markdown import markdown_table
from normlab.report.quickstart import write_quickstart_report
from normlab.report.report import paper_reference, write_report

__all__ = ["markdown_table", "paper_reference", "write_quickstart_report", "write_report"]
