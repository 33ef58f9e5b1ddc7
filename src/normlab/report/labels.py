"""What a report's tables and figures say about the data that actually ran.

A small-scale run of a paper's table trains on a stand-in (the 8×8 digits for CIFAR-100, ...), so
every table and figure names the data it used beside the paper's label:
``"CIFAR-100 rows (Kalayeh & Shah, Tables 2-3, Fig. 2-3), run on scikit-learn's 8×8 digits,
small scale"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from normlab.report.metrics import SuiteData

__all__ = ["DATA_NAMES", "DATA_SHORT", "data_name", "data_short", "data_used", "run_label"]

# dataset registry names and analysis data kinds -> how a reader knows them
DATA_NAMES: dict[str, str] = {
    "digits": "scikit-learn's 8×8 digits",
    "digits-multidomain": "four-domain 8×8 digits",
    "synthetic": "synthetic Gaussian mixtures",
    "gaussian": "synthetic Gaussian data",
    "correlated": "synthetic correlated Gaussian data",
    "digits_conv": "conv features of the 8×8 digits",
    "random": "random tensors",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "svhn": "SVHN",
    "multitask": "MNIST + CIFAR-10 + SVHN + Fashion-MNIST",
    "imagenet": "ImageNet",
}


# the same, in a table header's few words
DATA_SHORT: dict[str, str] = {
    "digits": "digits",
    "digits-multidomain": "4-domain digits",
    "synthetic": "synthetic",
    "gaussian": "synthetic",
    "correlated": "synthetic",
    "digits_conv": "digits features",
    "random": "random tensors",
}


def data_short(data: SuiteData, names: Iterable[str]) -> str:
    """The data of the runs of ``names`` in a table header's few words (``"digits"``)."""
    found = _run_data(data, names)
    return "/".join(dict.fromkeys(DATA_SHORT.get(d, data_name(d)) for d in found)) or "?"


def data_name(name: str) -> str:
    """A dataset's readable name (the registry name itself when it has none here).

    Example::

        >>> data_name("digits"), data_name("cifar100"), data_name("my_data")
        ("scikit-learn's 8×8 digits", 'CIFAR-100', 'my_data')
    """
    return DATA_NAMES.get(name, name)


def _run_data(data: SuiteData, names: Iterable[str]) -> list[str]:
    """The registry names of the data the runs of ``names`` used, in first-seen order."""
    found: list[str] = []
    for n in names:
        for r in data.runs.get(n, []):
            if r.config:
                d = r.config.get("data", {}).get("name")
            else:
                params = r.params
                if params.get("runner") == "cost":
                    d = "random"
                else:
                    d = params.get("dataset") or params.get("data") or "gaussian"
            if d and d not in found:
                found.append(str(d))
    return found


def data_used(data: SuiteData, names: Iterable[str] | None = None) -> str:
    """The readable names of the data the runs of ``names`` (default: all) used, joined."""
    names = [v.name for v in data.variants] if names is None else list(names)
    return " and ".join(data_name(d) for d in _run_data(data, names)) or "no data recorded"


def _paper_ref(data: SuiteData) -> str:
    """The paper's table / figure: the title's last parenthesis when it names the paper."""
    exp = data.experiment
    if not exp.source:
        return exp.name
    m = re.search(r"\(([^()]*)\)\s*$", exp.title)
    if m and m.group(1).startswith(exp.source):
        return m.group(1)
    return exp.source


def run_label(data: SuiteData, group: str | None = None) -> str:
    """``"<group> rows (<paper, table>), run on <data>, <scale> scale"`` for the runs of
    ``group`` (all runs when ``None``); parts that do not apply are left out."""
    names = [v.name for v in data.variants if group is None or v.group == group]
    ref = _paper_ref(data)
    head = f"{group} rows" if group else ""
    if ref:
        head = f"{head} ({ref})" if head else ref
    scale = data.suite.get("scale") or "full"
    tail = f"run on {data_used(data, names)}, {scale} scale"
    return f"{head}, {tail}" if head else tail
