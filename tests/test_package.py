"""The package surface: what ``import normlab`` exports. (The command line itself — ``--version``,
``--help``, ``normlab norms``, ``python -m normlab`` — is tested in test_cli.py.)"""

import importlib

import pytest
from torch import nn

import normlab

FAMILIES = [
    "simple",
    "standard",
    "weight_std",
    "batch_channel",
    "std_loss",
    "mixture",
    "mode",
    "whitening",
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
    # DESIGN: each family file's __all__ decides what is public, and it appears as normlab.X
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
