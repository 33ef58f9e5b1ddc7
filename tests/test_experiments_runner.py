"""The experiment runner: worker processes give the numbers of one process, a failing run is
recorded (or stops the sweep), one run directory is the unit of work, the report names the paper."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from normlab.experiments import (
    ExperimentError,
    execute_run,
    load_experiment,
    plan_runs,
    run_experiment,
)
from normlab.report import paper_reference, write_report

EXP = """
[experiment]
title = "runner test"
cite = "Table 9"
source = "Collins et al."
seeds = 1

[base.data]
name = "digits"
[base.model]
name = "small_cnn"
kwargs = { width = 0.25 }
[base.train]
steps = 3
eval_every_steps = 1
[base.run]
progress = "off"
save_checkpoints = false

[[variant]]
name = "bn"
set = { model.norm = "bn" }

[[variant]]
name = "gn"
set = { model.norm = "gn(num_groups=2)", optim.lr = 0.2 }

[[variant]]
name = "broken"
set = { data.name = "cifar10", data.root = "__ROOT__" }

[scale.small]
"""


@pytest.fixture
def exp(tmp_path):
    p = tmp_path / "runner_exp.toml"
    empty = tmp_path / "no_data"
    empty.mkdir()
    p.write_text(textwrap.dedent(EXP).replace("__ROOT__", str(empty)))
    return load_experiment(p, validate=True)


def _results(out, names):
    res = {}
    for n in names:
        recs = [
            json.loads(x) for x in (out / n / "seed0" / "metrics.jsonl").read_text().splitlines()
        ]
        res[n] = [(r["step"], r["test_acc"], r["train_loss"]) for r in recs]
    return res


def test_worker_processes_match_one_process_and_failures_are_recorded(exp, tmp_path):
    prev = torch.get_num_threads()
    serial = run_experiment(exp, tmp_path / "serial", variants=["bn", "gn"], threads=1)
    assert torch.get_num_threads() == prev  # restored after the sweep
    assert [r["status"] for r in serial["runs"]] == ["trained", "trained"]
    lines: list[str] = []
    par = run_experiment(exp, tmp_path / "par", jobs=2, keep_going=True, log=lines.append)
    status = {r["variant"]: r for r in par["runs"]}
    assert status["bn"]["status"] == status["gn"]["status"] == "trained"
    assert status["broken"]["status"] == "failed" and "cifar" in status["broken"]["error"].lower()
    assert par["jobs"] == 2
    saved = json.loads((tmp_path / "par" / "suite.json").read_text())
    assert [r["status"] for r in saved["runs"]] == [r["status"] for r in par["runs"]]
    assert any("FAILED" in line for line in lines)
    assert _results(tmp_path / "par", ["bn", "gn"]) == _results(tmp_path / "serial", ["bn", "gn"])
    # without keep_going the failure stops the sweep and propagates
    with pytest.raises(FileNotFoundError):
        run_experiment(exp, tmp_path / "stop", variants=["broken"])


def test_one_run_directory_is_the_unit_of_work(exp, tmp_path):
    (spec,) = plan_runs(exp, tmp_path / "out", variants=["bn"])
    outcome = execute_run(exp, spec)
    assert outcome["status"] == "trained" and outcome["summary"]["steps"] == 3
    assert spec.finished
    again = run_experiment(exp, tmp_path / "out", variants=["bn"])
    assert [r["status"] for r in again["runs"]] == ["skipped"]
    with pytest.raises(ExperimentError, match="--jobs"):
        run_experiment(exp, tmp_path / "out", variants=["bn"], jobs=0)


def test_the_report_presents_the_source_as_the_paper(exp, tmp_path):
    assert paper_reference(exp) == "Collins et al., Table 9"
    exp.cite = "Collins et al., Fig. 2"
    assert paper_reference(exp) == "Collins et al., Fig. 2"
    exp.source = ""
    assert paper_reference(exp) == "Collins et al., Fig. 2"
    run_experiment(load_experiment(exp.path), tmp_path / "r", variants=["bn"])
    text = write_report(tmp_path / "r").read_text()
    assert "Reproduces **Collins et al., Table 9**." in text
    assert "paper text" not in text
