"""The experiment suite: every experiment file validates, every small-scale protocol runs a few
steps, the runner skips finished runs and resumes interrupted ones, the file format's rules."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from normlab.experiments import (
    ExperimentError,
    available_experiments,
    experiments_dir,
    load_experiment,
    plan_runs,
    run_experiment,
)
from normlab.experiments.analyses import activation_pool, get_runner
from normlab.experiments.spec import Variant
from normlab.report import write_report
from normlab.train import Trainer, build_model

ROOT = Path(__file__).resolve().parents[1] / "experiments"
EXPS = list(available_experiments(ROOT))
TRAIN = [n for n in EXPS if load_experiment(ROOT / f"{n}.toml").kind == "train"]
ANALYSIS = [n for n in EXPS if n not in TRAIN]

# tiny overrides that keep every small-scale protocol but stop it after a few steps
FEW_STEPS = ["train.steps=2", "train.eval_every_steps=1", "train.eval_batch_size=512"]


def test_the_issue_s_experiments_are_present():
    assert experiments_dir() is not None
    required = {
        "mixture_cifar_cnn", "mixture_inception", "mixture_inception_nesterov", "mixture_densenet", "mixture_dcgan",
        "mixture_cost", "mode_multitask", "mode_small_batch", "mode_single_task", "iternorm_mlp",
        "iternorm_snd", "iternorm_vgg", "iternorm_wrn", "stdloss_mnist", "stdloss_weight_sweep",
        "stdloss_batch_size", "ws_singularity", "ws_statdiff", "ws_ablation",
        "bcn_micro_batch", "ws_imagenet_norms", "ws_imagenet", "ws_imagenet_weight_norms",
        "ws_resnext", "iternorm_imagenet", "stdloss_resnet50", "mode_imagenet", "snd_all_layers",
    }  # fmt: skip
    assert required <= set(EXPS), sorted(required - set(EXPS))
    assert "digits_bn" not in EXPS  # plain training configs are not experiments


PAPERS = {"Kalayeh & Shah", "Deecke et al.", "Huang et al.", "Collins et al.", "Qiao et al."}


@pytest.mark.parametrize("name", EXPS)
def test_experiment_validates_at_every_scale(name):
    exp = load_experiment(ROOT / f"{name}.toml", validate=True)
    assert exp.variants and exp.cite and exp.source
    assert "small" in exp.scales, "every experiment needs an offline small-scale counterpart"
    # the source is one of the five papers, by the short form the README's References define
    assert exp.source in PAPERS, exp.source
    for t in exp.tables:  # the paper's numbers line up with the columns
        for vals in (t.get("paper") or {}).values():
            assert len(vals) == len(t["columns"])
    if exp.kind == "train":
        small = exp.config(exp.variants_at("small")[0], "small")
        assert small.data.name in ("digits", "digits-multidomain", "synthetic")


def test_every_training_variant_builds_its_model():
    """Each distinct model of every variant at every scale is built (on the meta device, so
    WRN-28-10 costs nothing): catches kwargs a model does not take, which config validation
    cannot see."""
    classes = {"cifar100": 100, "multitask": 40, "digits-multidomain": 40}
    gray = {"digits", "digits-multidomain", "mnist", "fashion-mnist"}
    seen = set()
    for name in TRAIN:
        exp = load_experiment(ROOT / f"{name}.toml")
        for sc in ("full", *exp.scales):
            for v in exp.variants_at(sc):
                if v.disabled:
                    continue
                cfg = exp.config(v, sc)
                key = json.dumps([cfg.model.__dict__, cfg.data.name], sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.add(key)
                with torch.device("meta"):
                    build_model(
                        cfg.model,
                        classes.get(cfg.data.name, 10),
                        1 if cfg.data.name in gray else 3,
                    )
    assert len(seen) > 30


def _small_variants(exp):
    vs = [v.name for v in exp.variants_at("small") if not v.disabled]
    return sorted({vs[0], vs[-1]}, key=vs.index)


@pytest.mark.parametrize("name", TRAIN)
def test_small_scale_runs_a_few_steps(name, tmp_path):
    exp = load_experiment(ROOT / f"{name}.toml")
    variants = _small_variants(exp)[-1:]  # the last one: usually the paper's method
    if name in ("stdloss_mnist", "ws_statdiff", "mixture_cifar_cnn"):
        variants = _small_variants(exp)  # and the baseline (their collectors are checked too)
    suite = run_experiment(
        exp, tmp_path / "run", scale="small", seeds=1, overrides=FEW_STEPS, variants=variants
    )
    assert [r["status"] for r in suite["runs"]] == ["trained"] * len(variants)
    for r in suite["runs"]:
        d = tmp_path / "run" / r["dir"]
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == 2
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == [1, 2]
        assert all(0.0 <= x["test_acc"] <= 1.0 for x in recs)
        if "statdiff" in exp.collect:
            assert (d / "statdiff.jsonl").read_text().strip()
        if "percentiles" in exp.collect:
            assert (d / "percentiles.jsonl").read_text().strip()
        if "gmm" in exp.collect:
            snap = torch.load(d / "gmm_snapshot.pt", weights_only=True)
            assert snap["values"].shape[0] == exp.collect["gmm"]["channels"]


def _shrink_analysis(exp):
    a = exp.scales["small"].analysis
    if exp.name == "snd_all_layers":
        a.update(pool=64, num_samples=2, num_draws=2, warmup=2)
        a["sweeps"] = [
            {"name": "batch", "x": "batch_size", "values": [2, 8], "dim": 4,
             "metrics": ["snd", "rel_snd"], "layout": "variants"},
        ]  # fmt: skip
    elif exp.analysis["runner"] == "snd_conditioning":
        a.update(pool=64, num_samples=2, num_draws=2, num_batches=2)
        a["sweeps"] = [
            {"name": "fig4", "x": "dim", "values": [2, 4], "batch_size": 16, "metrics": ["cond", "snd"]},
            {"name": "fig5a", "x": "batch_size", "values": [2, 8], "dim": 4, "metrics": ["snd"],
             "variants": ["BN", "IterNorm"]},
        ]  # fmt: skip
    elif exp.analysis["runner"] == "cost":
        a.update(iters=1, warmup=0, batch_size=2, image_size=8)
    elif exp.analysis["runner"] == "gan":
        a.update(steps=2, eval_every=1, batch_size=4)
    return exp


@pytest.mark.parametrize("name", ANALYSIS)
def test_small_scale_analysis_runs(name, tmp_path):
    exp = _shrink_analysis(load_experiment(ROOT / f"{name}.toml"))
    variants = _small_variants(exp)
    suite = run_experiment(exp, tmp_path / "run", scale="small", seeds=1, variants=variants)
    assert [r["status"] for r in suite["runs"]] == ["analysed"] * len(variants)
    for r in suite["runs"]:
        res = json.loads((tmp_path / "run" / r["dir"] / "result.json").read_text())
        assert res["variant"] == r["variant"]
        if name == "iternorm_snd":
            fig4 = res["sweeps"]["fig4"]
            assert fig4["x"] == [2, 4] and len(fig4["snd"]) == 2 and min(fig4["cond"]) >= 1.0 - 1e-6
        if name == "snd_all_layers":
            batch = res["sweeps"]["batch"]
            assert batch["x"] == [2, 8] and len(batch["rel_snd"]) == 2
            if r["variant"] in ("GN", "LN", "IN"):  # no batch dependence: exactly 0
                assert batch["snd"] == [0.0, 0.0] and batch["rel_snd"] == [0.0, 0.0]
            else:
                assert min(batch["snd"]) > 0
        if name == "mixture_cost":
            assert res["ratio"] > 0 and res["it_per_s"] > 0
        if name == "mixture_dcgan":
            assert [h["step"] for h in res["history"]] == [1, 2] and res["best_fid"] is None


def test_snd_all_layers_reports_one_row_per_layer(tmp_path):
    exp = _shrink_analysis(load_experiment(ROOT / "snd_all_layers.toml"))
    variants = ["BN", "MN", "MN-warm", "GN"]
    run_experiment(exp, tmp_path / "run", scale="small", seeds=1, variants=variants)
    text = write_report(tmp_path / "run").read_text()
    assert "| layer | setting | B = 2 | B = 8 |" in text
    assert "**relative SND (% of the output's std)**" in text
    assert "| GN | 4 groups | 0 ± 0 | 0 ± 0 |" in text
    assert "SND exactly 0 at every point (left out of the figures): GN." in text
    for fig in ("batch_snd.png", "batch_rel_snd.png"):
        assert (tmp_path / "run" / fig).read_bytes()[:4] == b"\x89PNG"
    assert "init='warm' reduces MixtureNorm's SND" in text


def test_activation_pools_and_snd_runner_parameters():
    a = activation_pool(50, 3, seed=1, kind="digits_conv")
    assert a.shape == (50, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, activation_pool(50, 3, seed=1, kind="digits_conv"))
    assert not torch.equal(a, activation_pool(50, 3, seed=2, kind="digits_conv"))
    assert (a > 0).any() and (a < 0).any()  # a convolution's output, before any ReLU
    with pytest.raises(ExperimentError, match="pool must be <= 1437"):
        activation_pool(2000, 3, seed=0, kind="digits_conv")
    with pytest.raises(ExperimentError, match="gaussian, correlated, digits_conv"):
        activation_pool(5, 3, seed=0, kind="uniform")
    runner = get_runner("snd_conditioning", "test")
    sweep = {"name": "s", "x": "batch_size", "values": [2], "dim": 4}
    base = {"norm": "bn", "pool": 64, "data": "digits_conv", "sweeps": [sweep]}
    runner.validate(base, Variant("v"))
    for bad, match in [
        ({"warmup": -1}, "warmup must be a non-negative integer"),
        ({"pool": 5000}, "pool must be <= 1437"),
        ({"sweeps": [{**sweep, "metrics": ["snd", "spread"]}]}, "snd, rel_snd, cond"),
        ({"sweeps": [{**sweep, "layout": "rows"}]}, "layout must be 'x' or 'variants'"),
    ]:
        with pytest.raises(ExperimentError, match=match):
            runner.validate({**base, **bad}, Variant("v"))


def test_finished_runs_are_skipped_and_interrupted_runs_resume(tmp_path):
    exp = load_experiment(ROOT / "stdloss_mnist.toml")
    over = ["train.steps=4", "train.eval_every_steps=2", "run.checkpoint_every_steps=1"]
    out = tmp_path / "run"
    # interrupt seed 0 of cnn-bn after 2 of its 4 steps (its checkpoint stays behind)
    cfg = exp.config("cnn-bn", "small", seed=0, extra=over)

    def stop(trainer):
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, out / "cnn-bn" / "seed0", callbacks=[stop]).fit()
    assert not (out / "cnn-bn" / "seed0" / "summary.json").exists()

    first = run_experiment(exp, out, "small", seeds=1, overrides=over, variants=["cnn-*"])
    status = {r["variant"]: r["status"] for r in first["runs"]}
    assert status == {"cnn-none": "trained", "cnn-stdloss": "trained", "cnn-bn": "resumed"}
    recs = [json.loads(x) for x in (out / "cnn-bn/seed0/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]

    again = run_experiment(exp, out, "small", seeds=1, overrides=over, variants=["cnn-*"])
    assert {r["status"] for r in again["runs"]} == {"skipped"}
    # a finished run with a different configuration is not silently reused
    with pytest.raises(ExperimentError, match="different configuration"):
        run_experiment(
            exp, out, "small", seeds=1, overrides=[*over, "optim.lr=0.5"], variants=["cnn-bn"]
        )
    # nor is a directory of another scale
    with pytest.raises(ExperimentError, match="at scale"):
        run_experiment(exp, out, "full", seeds=1, overrides=over, variants=["cnn-bn"])


def _write(tmp_path, text, name="exp_x.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BASE = """
[experiment]
title = "t"
cite = "x"
source = "none"
seeds = 2

[base.data]
name = "digits"
[base.model]
name = "small_cnn"
norm = "bn"
kwargs = { width = 0.5 }
[base.optim]
lr = 0.05
[base.train]
epochs = 3
"""


def test_override_order_grid_and_placement(tmp_path):
    p = _write(
        tmp_path,
        BASE
        + """
[[variant]]
name = "a"
set = { optim.lr = 0.2, model.kwargs = { width = 0.25 } }

[[variant]]
name = "inc"
placement = "mixture/cifar_cnn/conv2+conv3"
set = { model.name = "cifar_cnn", model.norm = "mixture(k=2)", model.kwargs = {} }

[[grid]]
name = "g-{m}-{lr}"
label = "{m}"
set = { model.norm = "{spec}", optim.lr = "{lr}" }
[grid.axes]
method = [ { m = "BN", spec = "bn" }, { m = "GN", spec = "gn(num_groups=4)" } ]
lr = [0.1, 0.3]

[scale.small]
seeds = 1
defaults = { optim.lr = 0.9, train.epochs = 7 }
set = { train.epochs = 2 }
[scale.small.variant."g-GN-*"]
set = { optim.lr = 0.01 }
""",
    )
    exp = load_experiment(p, validate=True)
    assert [v.name for v in exp.variants] == [
        "a",
        "inc",
        "g-BN-0.1",
        "g-BN-0.3",
        "g-GN-0.1",
        "g-GN-0.3",
    ]
    # base -> scale defaults -> variant -> scale set -> scale per-variant -> command line
    a = exp.config("a", "small")
    assert a.optim.lr == 0.2 and a.train.epochs == 2 and a.model.kwargs == {"width": 0.25}
    assert exp.config("g-BN-0.3", "small").optim.lr == 0.3  # typed value, not the string "0.3"
    assert exp.config("g-GN-0.3", "small").optim.lr == 0.01
    assert exp.config("g-GN-0.3", "small", extra=["optim.lr=0.02"]).optim.lr == 0.02
    assert exp.config("g-GN-0.1", "full").model.norm == "gn(num_groups=4)"
    assert exp.config("g-BN-0.1", "full").train.epochs == 3
    inc = exp.config("inc", "full", seed=1)
    assert inc.model.include == ["conv2.norm", "conv3.norm"] and inc.model.kwargs == {}
    assert inc.run.seed == 1
    specs = plan_runs(exp, tmp_path / "o", "full", variants=["g-*"])
    assert len(specs) == 2 * 4 and specs[0].run_dir == tmp_path / "o" / "g-BN-0.1" / "seed0"
    assert [s.seed for s in specs[:4]] == [0, 0, 0, 0]  # seed-major order


@pytest.mark.parametrize(
    "extra, match",
    [
        ('[[variant]]\nname = "a"\nset = { optim.lrr = 1 }\n', "unknown key"),
        ('[[variant]]\nname = "a"\nbogus = 1\n', "unknown key"),
        ('[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n', "duplicate"),
        ('[[variant]]\nname = "a/b"\n', "plain directory name"),
        ('[[variant]]\nname = "a"\nplacement = "mixture/nope"\n', "placement"),
        (
            '[[variant]]\nname = "a"\n[[claim]]\ntext = "t"\nmetric = "best_acc"\na = "a"\nop = "~"\nb = 1\n',
            "op",
        ),
        (
            '[[variant]]\nname = "a"\n[[claim]]\ntext = "t"\nmetric = "best_acc"\na = "zz"\nop = "<"\nb = 1\n',
            "not a variant",
        ),
        (
            '[[variant]]\nname = "a"\n[[table]]\ncolumns = ["best_acc"]\npaper = { a = [1, 2] }\n',
            "one value per column",
        ),
        ('[[variant]]\nname = "a"\n[scale.small]\nvariants = ["q*"]\n', "matches no variant"),
        ('[[variant]]\nname = "a"\nset = { model.norm = "nosuchnorm" }\n', "nosuchnorm"),
    ],
)
def test_bad_experiment_files_name_the_problem(tmp_path, extra, match):
    p = _write(tmp_path, BASE + extra)
    with pytest.raises(ExperimentError, match=match):
        load_experiment(p, validate=True)


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(ExperimentError, match=r"available experiments: .*mixture_cifar_cnn"):
        load_experiment("no_such_experiment")
