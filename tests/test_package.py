"""The package surface: what ``import normlab`` exports, and the docstrings' runnable examples.
(The command line itself — ``--version``, ``--help``, ``normlab norms``, ``python -m normlab`` —
is tested in test_cli.py.)"""

import doctest
import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab

PKG_DIR = Path(normlab.__file__).resolve().parent

FAMILIES = [
    "simple",
    "standard",
    "weight_std",
    "batch_channel",
    "std_loss",
    "mixture",
    "mode",
    "whitening",
    "switchable",
    "renorm",
    "fixedstats",
]


def test_public_api_is_exported():
    # the names the README's examples use
    for name in [
        "make_norm",
        "available_norms",
        "register_norm",
        "parse_spec",
        "convert",
        "convert_conv",
        "sync_stats",
        "unsync_stats",
        "WSConv2d",
        "WSConv1d",
        "WSLinear",
        "BCNorm",
        "set_bcn_rate",
        "StandardizationLoss",
        "MixtureNorm",
        "ModeNorm",
        "ModeGroupNorm",
        "IterNorm",
        "DBN",
    ]:
        assert hasattr(normlab, name), name
        assert name in normlab.__all__, name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_all_is_reexported_at_the_top_level(family):
    # each family file's __all__ decides what is public, and it appears as normlab.X
    mod = importlib.import_module(f"normlab.nn.{family}")
    assert mod.__all__, family
    for name in mod.__all__:
        assert getattr(normlab, name) is getattr(mod, name), (family, name)
        assert name in normlab.__all__, (family, name)


def test_star_import_gives_exactly_all():
    ns: dict = {}
    exec("from normlab import *", ns)
    exported = {k for k in ns if k != "__builtins__"}
    assert exported == set(normlab.__all__)
    assert len(normlab.__all__) == len(set(normlab.__all__)), "duplicate names in __all__"


def test_every_registered_layer_class_is_public():
    # a layer reachable by name from the registry is also importable by its class name
    for cls in normlab.nn.registry.norm_classes():
        assert issubclass(cls, nn.Module)
        assert getattr(normlab, cls.__name__, None) is cls, cls.__name__


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        if ">>> " in path.read_text(encoding="utf-8"):
            parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run_and_print_what_they_show(module):
    # every ``>>>`` example of a docstring runs as written and prints the output shown
    mod = importlib.import_module(module)
    extra = {"torch": torch, "nn": nn, "normlab": normlab}
    tests = [t for t in doctest.DocTestFinder().find(mod, module, extraglobs=extra) if t.examples]
    assert tests, f"{module} mentions '>>> ' but has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        torch.manual_seed(0)
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
