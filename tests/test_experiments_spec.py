"""The experiment file's typed records: bad values are rejected naming the key, records read like
the tables they came from, the packaged quickstart experiment is the quickstart's protocol."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import field

import pytest
import torch

from normlab.experiments import (
    ExperimentError,
    find_experiment,
    load_experiment,
)
from normlab.experiments.analyses import frechet_distance
from normlab.experiments.catalog import PACKAGED
from normlab.experiments.collectors import COLLECTORS
from normlab.experiments.quickstart import METHODS
from normlab.experiments.spec import COLLECT_OPTIONS, GMMCollect, Table
from normlab.train import apply_overrides, config_from_dict, config_to_dict
from normlab.train.config import ConfigError, dataclass_from_table

BASE = """
[experiment]
title = "t"
cite = "Kalayeh & Shah, Table 3"
source = "Kalayeh & Shah"

[base.data]
name = "digits"

[[variant]]
name = "a"
"""


def _load(tmp_path, extra: str):
    p = tmp_path / "exp_x.toml"
    p.write_text(textwrap.dedent(BASE) + textwrap.dedent(extra))
    return load_experiment(p, validate=True)


@pytest.mark.parametrize(
    "extra, match",
    [
        ('[collect]\ngmm = { modul = "conv1" }\n', r"collect\.gmm\.modul: unknown key"),
        ("[collect]\ngmm = { at = 0.5 }\n", r"collect\.gmm: needs 'module'"),
        ("[collect]\nstatdiff = { every = -1 }\n", r"collect\.statdiff\.every: must be >= 0"),
        ("[collect]\nhistogram = {}\n", r"collect\.histogram: unknown collector"),
        ('[plots]\ncurves = { x = "time" }\n', r"plots\.curves\.x: 'time' is not one of"),
        ("[plots]\ncurves = 3\n", r"plots\.curves: expected true, false or a table"),
        ("[plots]\nbars = true\n", r"plots\.bars: unknown key"),
        (
            '[[claim]]\ntext = "t"\nmetric = "best_acc"\na = "a"\nop = "<"\nb = 1\npick = "avg"\n',
            r"claim\[0\]\.pick: 'avg' is not one of",
        ),
        ('[[claim]]\ntext = "t"\nmetric = "best_acc"\na = "a"\nop = "<"\n', "needs 'b'"),
        ('[[table]]\ncolumns = ["best_acc"]\nheaders = ["x", "y"]\n', "headers and columns"),
        ('[[table]]\ncolumns = "best_acc"\n', r"table\[0\]\.columns: expected a list"),
        ("[scale.small]\nseeds = 0\n", r"\[scale\.small\]\.seeds: must be >= 1"),
        (
            '[scale.small.variant."a"]\nset = { train.epochs = 1 }\nnotes = ["misplaced"]\n',
            r"variant\.a: expected a table with 'set' only",
        ),
        ('[[grid]]\nname = "g{x}"\n', r"grid\[0\]: needs \[grid.axes\] with non-empty lists"),
    ],
)
def test_bad_records_name_the_key(tmp_path, extra, match):
    with pytest.raises(ExperimentError, match=match):
        _load(tmp_path, extra)


def test_header_keys_are_checked_with_a_suggestion(tmp_path):
    p = tmp_path / "exp_y.toml"
    p.write_text(textwrap.dedent(BASE).replace('title = "t"', 'titel = "t"'))
    with pytest.raises(
        ExperimentError, match=r"experiment\.titel: unknown key \(did you mean 'title'\?\)"
    ):
        load_experiment(p)
    p.write_text(textwrap.dedent(BASE).replace('source = "Kalayeh & Shah"', 'kind = "sweep"'))
    with pytest.raises(ExperimentError, match=r"experiment\.kind: 'sweep' is not one of"):
        load_experiment(p)


def test_records_read_like_the_tables_they_came_from(tmp_path):
    exp = _load(
        tmp_path,
        '[[table]]\ncolumns = ["best_acc"]\nrows = "a"\npaper = { a = [1.5] }\n'
        '[collect]\ngmm = { module = "conv1", channels = 2 }\nstatdiff = false\n'
        '[plots]\ncurves = false\ngmm = ["a*"]\nlosses = true\n',
    )
    (t,) = exp.tables
    assert isinstance(t, Table) and t["columns"] is t.columns and t.get("paper") == {"a": [1.5]}
    assert t.rows == ["a"] and "columns" in t and "colour" not in t
    with pytest.raises(KeyError):
        t["colour"]
    assert set(exp.collect) == {"gmm"}  # false switches a collector off
    g = exp.collect["gmm"]
    assert isinstance(g, GMMCollect) and (g["channels"], g.at, g.max_points) == (2, 0.5, 20000)
    assert exp.plots.curves is None and exp.plots.gmm == ["a*"] and exp.plots.losses.x == "step"
    assert set(COLLECTORS) == set(COLLECT_OPTIONS)


def test_dataclass_from_table_coerces_and_checks_like_a_config_section():
    @dataclasses.dataclass
    class Opts:
        n: int = field(default=1, metadata={"ge": 1})
        lr: float = 0.1
        mode: str = field(default="a", metadata={"choices": ("a", "b")})
        tags: list = field(default_factory=list)

    o = dataclass_from_table(Opts, {"n": 3.0, "lr": 1, "tags": ("x",)}, "opts")
    assert (o.n, o.lr, o.mode, o.tags) == (3, 1.0, "a", ["x"])
    assert isinstance(o.n, int) and isinstance(o.lr, float)
    for table, match in [
        ({"n": 0}, r"opts\.n: must be >= 1, got 0"),
        ({"n": True}, r"opts\.n: expected an integer"),
        ({"mode": "c"}, r"opts\.mode: 'c' is not one of 'a', 'b'"),
        ({"lr": float("inf")}, r"opts\.lr: expected a finite number"),
        ({"nn": 2}, r"opts\.nn: unknown key \(did you mean 'n'\?\); valid keys: n, lr, mode, tags"),
        ([1], r"opts: expected a table"),
    ]:
        with pytest.raises(ConfigError, match=match):
            dataclass_from_table(Opts, table, "opts")


# the quickstart's protocol, written out as plain overrides (MixtureNorm at one middle layer, as in
# Kalayeh & Shah's CIFAR CNN; mixture-all in every slot)
_OLD_BASE = {
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1},
    "train": {"epochs": 12, "batch_size": 64, "eval_every_steps": 11},
    "run": {"progress": "off", "save_checkpoints": False, "threads": 1},
}
_OLD_METHODS = {
    "bn": {"model.norm": "bn"},
    "gn+ws": {"model.norm": "gn", "model.conv": "ws"},
    "bcn+ws": {"model.norm": "bcn", "model.conv": "ws"},
    "mixture": {"model.norm": "mixture(k=3, em_iters=2)", "model.include": "conv2.norm"},
    "mixture+warm": {
        "model.norm": "mixture(k=3, em_iters=2, init=warm)",
        "model.include": "conv2.norm",
    },
    "mixture-all": {"model.norm": "mixture"},
    "mode": {"model.norm": "mode"},
    "iternorm": {"model.norm": "iternorm"},
    "std-loss": {"model.norm": "none", "model.std_loss_weight": 0.01},
    "none": {"model.norm": "none"},
}


def test_the_packaged_quickstart_experiment_is_the_quickstart_protocol(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMLAB_EXPERIMENTS", str(tmp_path))  # found without experiments/
    assert find_experiment("quickstart") == PACKAGED / "quickstart.toml"
    exp = load_experiment("quickstart", validate=True)
    assert list(METHODS) == list(_OLD_METHODS) == [v.name for v in exp.variants]
    for name, over in _OLD_METHODS.items():
        d = {k: dict(v) for k, v in _OLD_BASE.items()}
        apply_overrides(d, [*over.items(), ("run.seed", 2), ("run.name", f"{name}-seed2")])
        want = config_to_dict(config_from_dict(d))
        assert config_to_dict(exp.config(name, "small", 2)) == want, name
        assert config_to_dict(exp.config(name, "full", 2)) == want, name


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g).double(), torch.randn(5, generator=g).double()
    v1, v2 = torch.rand(5, generator=g).double() + 0.1, torch.rand(5, generator=g).double() + 0.1
    want = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    got = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, torch.diag(v1), mu1, torch.diag(v1)) == pytest.approx(0, abs=1e-9)
