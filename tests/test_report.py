"""normlab report: the metrics against hand-computed curves, and a report (tables with the paper's
numbers, claims, PNG figures) produced from tiny finished run directories; the CLI commands."""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import textwrap
from pathlib import Path

import pytest

from normlab.cli import add_commands
from normlab.experiments import load_experiment, run_experiment
from normlab.report import write_report
from normlab.report.metrics import aggregate, evaluate_claims, load_suite_data, run_metric
from normlab.report.plots import plot_percentile_runs

ROOT = Path(__file__).resolve().parents[1] / "experiments"
PNG = b"\x89PNG\r\n\x1a\n"

FAKE = """
[experiment]
title = "fake"
cite = "Kalayeh & Shah, Table 3"
source = "none"
seeds = 2

[base.data]
name = "digits"

[[variant]]
name = "BN"

[[variant]]
name = "MN"
set = { model.norm = "mixture(k=2)" }

[scale.small]
seeds = 2

[[table]]
title = "T"
columns = ["steps_to:BN", "best_acc", "reduction:BN", "speedup:BN", "best_acc_after:0.5"]
paper = { BN = [100, 80.0, 0.0, 1.0, 70.0], MN = [50, 90.0, 50.0, 2.0, 85.0] }

[[claim]]
text = "MN is faster"
metric = "steps_to:BN"
a = "MN"
op = "<"
b = "BN"

[[claim]]
text = "MN is more accurate than 1.2 x BN"
metric = "best_acc"
a = "MN"
op = ">"
b = { BN = 1.2 }
"""

# test accuracy per step (10 steps apart): seed 0 and seed 1 of each variant
CURVES = {
    ("BN", 0): [0.50, 0.70, 0.80, 0.75],  # best 0.80 first at step 30
    ("BN", 1): [0.40, 0.60, 0.70, 0.70],  # best 0.70 first at step 30
    ("MN", 0): [0.60, 0.82, 0.85, 0.90],  # reaches 0.80 at step 20
    ("MN", 1): [0.72, 0.65, 0.71, 0.69],  # reaches 0.70 at step 10
}


def _fake_suite(tmp_path: Path) -> Path:
    exp_path = tmp_path / "fake_exp.toml"
    exp_path.write_text(textwrap.dedent(FAKE))
    root = tmp_path / "run"
    root.mkdir()
    suite = {
        "experiment": "fake_exp",
        "experiment_path": str(exp_path),
        "scale": "small",
        "seeds": 2,
    }
    (root / "suite.json").write_text(json.dumps(suite))
    for (v, seed), accs in CURVES.items():
        d = root / v / f"seed{seed}"
        d.mkdir(parents=True)
        recs = [
            {
                "step": 10 * (i + 1),
                "epoch": i + 1,
                "test_acc": a,
                "train_acc": a - 0.05,
                "train_loss": 1 - a,
            }
            for i, a in enumerate(accs)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "summary.json").write_text(json.dumps({"steps": 40, "final_train_loss": 1 - accs[-1]}))
    return root


def test_metrics_match_hand_computed_values(tmp_path):
    data = load_suite_data(_fake_suite(tmp_path))
    mn0, mn1 = data.runs["MN"]
    bn0 = data.runs["BN"][0]
    assert run_metric(data, mn0, "best_acc") == pytest.approx(90.0)
    assert run_metric(data, bn0, "final_error") == pytest.approx(25.0)
    assert run_metric(data, mn0, "steps_to:BN") == 20  # 0.82 >= BN seed 0's best 0.80
    assert run_metric(data, mn1, "steps_to:BN") == 10  # 0.72 >= BN seed 1's best 0.70
    assert run_metric(data, bn0, "steps_to:BN") == 30
    assert run_metric(data, mn0, "reduction:BN") == pytest.approx(100 * (1 - 20 / 30))
    assert run_metric(data, mn1, "speedup:BN") == pytest.approx(3.0)
    assert run_metric(data, mn0, "best_acc_after:0.5") == pytest.approx(82.0)  # steps <= 20
    assert run_metric(data, mn1, "best_acc_after:0.25") == pytest.approx(72.0)
    assert run_metric(data, mn1, "best_acc_after:0.75") == pytest.approx(72.0)
    with pytest.raises(ValueError, match="unknown metric"):
        run_metric(data, mn0, "nonsense")


def test_aggregate_mean_std_and_never_reached():
    a = aggregate([1.0, 2.0, 4.0])
    assert a.mean == pytest.approx(statistics.fmean([1, 2, 4]))
    assert a.std == pytest.approx(statistics.stdev([1, 2, 4]))
    b = aggregate([10.0, math.inf])
    assert (b.mean, b.n, b.total, b.value) == (10.0, 1, 2, math.inf)


def test_claims_including_trends_and_weighted_sums():
    vals = {"A": [(1, 3.0), (2, 2.0), (4, 1.0)], "B": [(1, 4.0), (2, 3.0), (4, 0.5)]}
    look = lambda c, side: vals[side]  # noqa: E731
    claims = [
        {"text": "a<b everywhere", "metric": "m", "a": "A", "op": "<", "b": "B"},
        {"text": "a<b where checked", "metric": "m", "a": "A", "op": "<", "b": "B", "at": [1, 2]},
        {"text": "A decreases", "metric": "m", "a": "A", "op": "decreasing"},
        {"text": "A increases", "metric": "m", "a": "A", "op": "increasing"},
        {"text": "A > mean", "metric": "m", "a": "A", "op": ">", "b": {"A": 0.5, "B": 0.5}},
        {"text": "other scale", "metric": "m", "a": "A", "op": "<", "b": 9, "scale": "full"},
    ]

    def look_at(c, side):
        pts = look(c, side)
        return [p for p in pts if "at" not in c or p[0] in c["at"]]

    rows = evaluate_claims(claims, look_at, "small")
    assert [r["holds"] for r in rows] == [False, True, True, False, False]
    assert "fails at 4" in rows[0]["ours"]


def test_claims_without_a_possible_t_test_say_so():
    per_seed = {"A": [1.0, 1.0], "B": [2.0, 2.0], "C": [1.5], "D": [1.0, 1.4], "E": [3.0, 3.4]}
    mean = lambda c, side: [(None, statistics.fmean(per_seed[side]))]  # noqa: E731
    samples = lambda c, side: per_seed[side]  # noqa: E731
    claims = [
        {"text": "no spread", "metric": "m", "a": "A", "op": "<", "b": "B"},
        {"text": "one seed", "metric": "m", "a": "C", "op": "<", "b": "B"},
        {"text": "tested", "metric": "m", "a": "D", "op": "<", "b": "E"},
    ]
    rows = evaluate_claims(claims, mean, "small", samples)
    assert [r["holds"] for r in rows] == [True, True, True]
    assert rows[0]["note"] == "untested: no spread over seeds" and "p" not in rows[0]
    assert rows[1]["note"] == "untested: one seed"
    assert "note" not in rows[2] and rows[2]["p"] < 0.05


def test_report_of_fake_suite_has_tables_paper_numbers_and_claims(tmp_path):
    root = _fake_suite(tmp_path)
    report = write_report(root, tmp_path / "out")
    text = report.read_text()
    assert "## Results" in text and "| T" not in text
    # ours: steps_to:BN of MN = mean(20, 10) ± stdev, beside the paper's 50
    row = next(line for line in text.splitlines() if line.startswith("| MN |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"15 ± {statistics.stdev([20, 10]):.0f}" and cells[3] == "50"
    assert cells[4].startswith(f"{statistics.fmean([90, 72]):.2f} ±") and cells[5] == "90.00"
    assert "MN is faster" in text and "✓" in text
    assert "| MN is more accurate than 1.2 x BN | 81.00 vs 90.00 | ✗ |" in text  # 1.2 * 75
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["claims"][0]["holds"] is True
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG for p in pngs)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / "out" / link).is_file()


def test_report_from_a_tiny_real_run(tmp_path):
    exp = load_experiment(ROOT / "stdloss_mnist.toml")
    over = ["train.steps=3", "train.eval_every_steps=1", "train.eval_batch_size=512"]
    run_experiment(exp, tmp_path / "run", "small", seeds=2, overrides=over, variants=["cnn-*"])
    report = write_report(tmp_path / "run")
    text = report.read_text()
    assert "| CNN (Fig. 1) | batch norm |" in text
    assert "85.6 ± 1.1" in text  # the paper's number beside ours
    assert "## The paper's claims, checked on our runs" in text
    assert "MLP" not in text.split("## The paper")[0].split("## Results")[1]  # not run: no rows
    figs = {p.name for p in (tmp_path / "run").glob("*.png")}
    assert {"curves_CNN_Fig_1.png", "losses_CNN_Fig_1.png", "percentiles_CNN_Fig_1.png"} <= figs
    for p in figs:
        assert (tmp_path / "run" / p).read_bytes()[:8] == PNG
        assert f"({p})" in text


def test_percentile_figures_keep_groups_with_shared_labels_apart(tmp_path):
    # cnn-bn and mlp-bn share the label "batch norm": one figure per group, each from its runs
    exp = load_experiment(ROOT / "stdloss_mnist.toml")
    over = ["train.steps=2", "train.eval_every_steps=1"]
    run_experiment(
        exp, tmp_path / "run", "small", seeds=1, overrides=over, variants=["cnn-bn", "mlp-bn"]
    )
    data = load_suite_data(tmp_path / "run")
    assert data.runs["cnn-bn"][0].percentiles and data.runs["mlp-bn"][0].percentiles
    assert data.runs["cnn-bn"][0].percentiles != data.runs["mlp-bn"][0].percentiles
    paths = plot_percentile_runs(data, tmp_path / "figs")
    assert sorted(p.name for p in paths) == [
        "percentiles_CNN_Fig_1.png",
        "percentiles_MLP_Fig_3.png",
    ]


def test_report_of_an_analysis_run(tmp_path):
    exp = load_experiment(ROOT / "iternorm_snd.toml")
    small = exp.scales["small"].analysis
    small.update(pool=64, num_samples=2, num_draws=3, num_batches=2)
    small["sweeps"] = [
        {"name": "fig4", "x": "dim", "values": [2, 4], "batch_size": 32, "metrics": ["cond", "snd"]}
    ]
    run_experiment(exp, tmp_path / "run", "small", seeds=1)
    text = write_report(tmp_path / "run").read_text()
    assert "| dim | BN condition number | DBN condition number |" in text
    assert (tmp_path / "run" / "fig4_cond.png").read_bytes()[:8] == PNG
    assert (tmp_path / "run" / "fig4_snd.png").is_file()
    assert "DBN has the best conditioning" in text


def _cli(argv):
    p = argparse.ArgumentParser(prog="normlab")
    add_commands(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_run_and_report(tmp_path, capsys):
    assert _cli(["run", "--list"]) == 0
    assert "stdloss_mnist" in capsys.readouterr().out
    out = tmp_path / "r"
    rc = _cli([
        "run", str(ROOT / "stdloss_mnist.toml"), "--scale", "small", "--seeds", "1",
        "--variants", "mlp-bn,mlp-none", "--set", "train.steps=2", "--threads", "1",
        "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    assert Path(capsys.readouterr().out.strip()) == out / "report.md"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mlp-bn", "mlp-none"]
    assert _cli(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert _cli(["run", "no_such_experiment"]) == 2
    assert "not found" in capsys.readouterr().err
    assert _cli(["report", str(tmp_path)]) == 2
    assert "not an experiment run directory" in capsys.readouterr().err
