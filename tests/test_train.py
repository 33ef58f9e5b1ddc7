"""normlab.train: configs, schedules, checkpoints, the loop, resume."""

from __future__ import annotations

import io
import json
import math
import random
import tomllib

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.train import (
    Config,
    ConfigError,
    LRSchedule,
    apply_overrides,
    build_model,
    build_optimizer,
    capture_rng,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_checkpoint,
    load_config,
    parse_override,
    progress_enabled,
    read_metrics,
    restore_rng,
    save_checkpoint,
    train,
)
from normlab.train.config import ScheduleConfig
from normlab.train.loop import Trainer

TIME_KEYS = {"time", "train_time"}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions: one intra-op thread is faster than two on a shared 2-core machine.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def cfg_of(*overrides: str) -> Config:
    base = [
        "run.progress=off",
        "train.eval_every_steps=0",
        "model.kwargs.width=0.5",
    ]
    return load_config(None, [*base, *overrides])


# ---------------------------------------------------------------------------------- config


def test_defaults_validate_and_roundtrip_through_toml():
    cfg = Config().validate()
    text = dump_toml(cfg)
    again = config_from_dict(tomllib.loads(text))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_load_config_file_overrides_and_run_name(tmp_path):
    p = tmp_path / "exp1.toml"
    p.write_text(
        '[optim]\nname = "rmsprop"\nlr = 0.001\n[schedule]\nname = "exp"\ngamma = 0.93\n'
        'every_epochs = 2\n[model]\nnorm = {name = "gn", num_groups = 8}\n'
    )
    cfg = load_config(p, ["optim.lr=0.005", "train.epochs=3", "model.conv=ws"])
    assert cfg.optim.name == "rmsprop"
    assert cfg.optim.lr == 0.005
    assert cfg.train.epochs == 3
    assert cfg.model.conv == "ws"
    assert cfg.model.norm == {"name": "gn", "num_groups": 8}
    assert cfg.run.name == "exp1"
    # the written form reads back to the same config
    assert config_to_dict(config_from_dict(tomllib.loads(dump_toml(cfg)))) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("optim.lr=0.05", 0.05),
        ("train.epochs=7", 7),
        ("optim.nesterov=true", True),
        ("schedule.milestones=[0.3, 0.6, 0.8]", [0.3, 0.6, 0.8]),
        ("model.norm=gn(num_groups=8)", "gn(num_groups=8)"),
        ('model.norm="mode"', "mode"),
        ("model.norm=bn", "bn"),
    ],
)
def test_parse_override_values(item, value):
    key, v = parse_override(item)
    assert key == item.split("=", 1)[0]
    assert v == value
    assert type(v) is type(value)


def test_nested_override_into_kwargs():
    cfg = load_config(None, ["model.kwargs.width=0.5", "data.kwargs.test_fraction=0.25"])
    assert cfg.model.kwargs == {"width": 0.5}
    assert cfg.data.kwargs == {"test_fraction": 0.25}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("optimizer.lr=0.1", "optimizer.lr"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.name=lbfgs", "optim.name"),
        ("optim.nesterov=yes", "optim.nesterov"),
        ("model.norm=nosuchnorm", "model.norm"),
        ("model.norm=gn(num_groups=", "model.norm"),
        ("model.conv=fancy", "model.conv"),
        ("model.conv=ws(centre=false)", "model.conv"),
        ("model.conv=plain(eps=0.1)", "model.conv"),
        ("model.conv=3", "model.conv"),
        ("model.name=resnet9000", "model.name"),
        ("data.name=imagenet22k", "data.name"),
        ("schedule.milestones=[0.8, 0.5]", "schedule.milestones"),
        ("schedule.milestones=[50, 75]", "schedule.milestones"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("run.device=tpu", "run.device"),
        ("optim.lr.x=1", "optim.lr"),
        ("lr=0.1", "lr"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert needle in str(ei.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(None, ["optim.lrr=0.1"])


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ConfigError, match=r"optim\.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.name=adam"])
    with pytest.raises(ConfigError, match=r"optim\.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])


def test_bad_toml_file_and_unknown_section(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(p)
    p.write_text("[optimiser]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(p)
    p.write_text("[train]\nepochs = 1\nbatch = 3\n")
    with pytest.raises(ConfigError, match=r"train\.batch"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_apply_overrides_rejects_non_table_subkeys():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        apply_overrides({}, ["train.epochs.x=1"])


# ---------------------------------------------------------------------------------- schedules


def _torch_lrs(sched_factory, steps: int, base_lr: float = 1.0) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = sched_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_exp_staircase_schedule_matches_torch_steplr():
    # Kalayeh & Shah: multiply by 0.93 every 2 epochs; with 10 steps/epoch that is StepLR(step_size=20)
    cfg = ScheduleConfig(name="exp", gamma=0.93, every_epochs=2)
    s = LRSchedule(cfg, steps_per_epoch=10, total_steps=100)
    ours = s.lrs(1.0, range(100))
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=20, gamma=0.93), 100)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_exp_continuous_schedule_matches_exponentiallr():
    cfg = ScheduleConfig(name="exp", gamma=0.5, every_epochs=1, staircase=False)
    s = LRSchedule(cfg, steps_per_epoch=1, total_steps=10)
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5), 10)
    np.testing.assert_allclose(s.lrs(1.0, range(10)), ref, rtol=1e-12)


def test_step_schedule_fractions_match_multisteplr():
    # Kalayeh & Shah Inception NAG: /5 at 30%, 60%, 80% of training
    cfg = ScheduleConfig(name="step", gamma=0.2, milestones=[0.3, 0.6, 0.8])
    s = LRSchedule(cfg, steps_per_epoch=7, total_steps=140)
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[42, 84, 112], gamma=0.2),
        140,
    )
    np.testing.assert_allclose(s.lrs(1.0, range(140)), ref, rtol=1e-12)


def test_step_schedule_in_epochs():
    cfg = ScheduleConfig(name="step", gamma=0.1, milestones=[65, 80], milestone_unit="epoch")
    s = LRSchedule(cfg, steps_per_epoch=3, total_steps=300)
    assert s.factor(194) == 1.0
    assert s.factor(195) == pytest.approx(0.1)
    assert s.factor(240) == pytest.approx(0.01)


def test_linear_warmup_then_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, warmup_start=0.0)
    s = LRSchedule(cfg, steps_per_epoch=5, total_steps=100)
    # hand-computed: warm-up factor t/10 times the cosine factor
    for t in (0, 3, 9):
        assert s.factor(t) == pytest.approx(t / 10 * 0.5 * (1 + math.cos(math.pi * t / 100)))
    assert s.factor(50) == pytest.approx(0.5)
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100), 100)
    np.testing.assert_allclose(s.lrs(1.0, range(10, 100)), ref[10:], rtol=1e-9, atol=1e-12)


def test_warmup_epochs_count_in_steps():
    cfg = ScheduleConfig(name="constant", warmup_epochs=2, warmup_start=0.5)
    s = LRSchedule(cfg, steps_per_epoch=4, total_steps=40)
    assert s.warmup == 8
    assert s.factor(0) == 0.5
    assert s.factor(4) == pytest.approx(0.75)
    assert s.factor(8) == 1.0


# ---------------------------------------------------------------------------------- optimizers


def test_build_optimizer_kinds_and_param_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    cfg = load_config(None, ["optim.name=sgd", "optim.nesterov=true", "optim.weight_decay=1e-4"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is True
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    cfg = load_config(None, ["optim.name=rmsprop", "optim.momentum=0.9", "optim.alpha=0.9"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.RMSprop)
    assert (opt.defaults["momentum"], opt.defaults["alpha"]) == (0.9, 0.9)
    cfg = load_config(None, ["optim.name=adam", "optim.betas=[0.8, 0.99]"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["betas"] == (0.8, 0.99)
    cfg = load_config(None, ["optim.weight_decay=0.1", "optim.decay_norm_and_bias=false"])
    opt = build_optimizer(model, cfg.optim)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    plain = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert plain == {id(p) for p in model.parameters()} - decayed


# ---------------------------------------------------------------------------------- checkpoint


def test_rng_states_roundtrip_through_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(4)
    np.random.normal()  # leaves a cached gaussian in the legacy state
    save_checkpoint({"rng": capture_rng(gen), "x": torch.arange(3)}, tmp_path / "c.pt")
    first = (torch.rand(3), random.random(), np.random.normal(3), torch.rand(2, generator=gen))
    ck = load_checkpoint(tmp_path / "c.pt")  # weights_only=True inside
    restore_rng(ck["rng"], gen)
    again = (torch.rand(3), random.random(), np.random.normal(3), torch.rand(2, generator=gen))
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    np.testing.assert_array_equal(first[2], again[2])
    assert torch.equal(first[3], again[3])
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed away


def test_checkpoint_is_loadable_with_weights_only(tmp_path):
    cfg = cfg_of("train.epochs=1", "train.steps=3")
    res = train(cfg, tmp_path / "r")
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["counters"]["step"] == 3
    assert set(ck["model"]) == set(res.model.state_dict())


# ---------------------------------------------------------------------------------- model building


def test_build_model_placement_and_ws():
    cfg = load_config(
        None, ["model.norm=gn(num_groups=4)", "model.include=conv3.*", "model.conv=ws"]
    )
    model = build_model(cfg.model, num_classes=10, in_channels=1)
    assert isinstance(model.get_submodule("conv3.norm"), nn.GroupNorm)
    assert model.get_submodule("conv3.norm").num_groups == 4
    assert isinstance(model.get_submodule("conv1.norm"), nn.modules.batchnorm._BatchNorm)
    assert isinstance(model.get_submodule("conv1.conv"), normlab.WSConv2d)
    cfg = load_config(None, ["model.norm=gn", "model.include=layer9.*"])
    with pytest.raises(ConfigError, match=r"model\.include"):
        build_model(cfg.model, 10, 1)


@pytest.mark.parametrize(
    ("override", "flags"),
    [
        ("model.conv=ws(center=false)", (False, True, 1e-5)),
        ("model.conv=ws(scale=false)", (True, False, 1e-5)),
        ("model.conv=ws(eps=1e-4)", (True, True, 1e-4)),
        ('model.conv={name="ws", center=false, eps=0.001}', (False, True, 1e-3)),
    ],
)
def test_conv_spec_in_the_config_reaches_every_ws_layer(override, flags):
    cfg = load_config(None, [override])
    model = build_model(cfg.model, num_classes=10, in_channels=1)
    ws = [m for m in model.modules() if isinstance(m, normlab.WSConv2d)]
    assert ws and not [m for m in model.modules() if type(m) is nn.Conv2d]
    assert {(m.center, m.scale, m.eps) for m in ws} == {flags}
    # the spec survives a TOML round trip (the run directory's config.toml)
    again = config_from_dict(tomllib.loads(dump_toml(cfg)))
    assert again.model.conv == cfg.model.conv


def test_plain_and_ws_conv_unchanged():
    for conv, cls in (("plain", nn.Conv2d), ("ws", normlab.WSConv2d)):
        cfg = load_config(None, [f"model.conv={conv}"])
        assert cfg.model.conv == conv
        model = build_model(cfg.model, 10, 1)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is cls for m in convs)
        if cls is normlab.WSConv2d:
            assert all((m.center, m.scale, m.eps) == (True, True, 1e-5) for m in convs)


@pytest.mark.parametrize(
    ("conv", "needles"),
    [
        ("ws(centre=false)", ["centre", "eps, center, scale"]),
        ("ws(center=1)", ["center", "1", "true or false"]),
        ("ws(eps=-0.5)", ["eps", "-0.5"]),
        ("ws(center=", ["conv spec"]),
        ({"name": "ws", "offset": 1}, ["offset", "eps, center, scale"]),
        ({"name": "octave"}, ["octave", "'plain', 'ws'"]),
    ],
)
def test_bad_conv_spec_is_rejected_naming_model_conv(conv, needles):
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"model": {"conv": conv}})
    msg = str(ei.value)
    assert msg.startswith("model.conv:"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ---------------------------------------------------------------------------------- the loop


def test_digits_bn_reaches_90_percent(tmp_path):
    cfg = load_config(None, ["run.progress=off", "train.epochs=5", "run.name=bn"])
    res = train(cfg, tmp_path / "bn")
    assert res.summary["best_test_acc"] >= 0.90
    assert res.summary["final_test_acc"] >= 0.90
    d = tmp_path / "bn"
    for name in ("config.toml", "env.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (d / name).exists(), name
    recs = read_metrics(d)
    assert len(recs) == 5  # one evaluation per epoch
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5]
    keys = {"step", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "time"}
    assert keys <= set(recs[0])
    assert recs[-1]["step"] == res.summary["steps"] == 5 * (1437 // 64)
    env = json.loads((d / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0 and env["device"] == "cpu"
    written = config_from_dict(tomllib.loads((d / "config.toml").read_text()))
    assert config_to_dict(written) == config_to_dict(cfg)
    # the saved test accuracy is what the model actually gets
    model = res.model.eval()
    from normlab.data import load_dataset

    data = load_dataset("digits")
    with torch.no_grad():
        acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    assert acc == pytest.approx(recs[-1]["test_acc"], abs=1e-6)


class _KillError(RuntimeError):
    pass


def _kill_at(step: int):
    def cb(trainer: Trainer) -> None:
        if trainer.step == step:
            raise _KillError(f"simulated kill at step {step}")

    return cb


def _strip_time(recs):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in recs]


def _assert_same_run(res, full) -> None:
    """The resumed run ``res`` recorded (in memory and in its metrics.jsonl) and trained exactly
    what the uninterrupted run ``full`` did."""
    assert _strip_time(res.history) == _strip_time(full.history)
    assert _strip_time(read_metrics(res.run_dir)) == _strip_time(full.history)
    a, b = full.model.state_dict(), res.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


RESUME_CASES = {
    "bn+augment+nesterov+exp": [
        "train.batch_size=128",
        "data.augment=true",
        "optim.nesterov=true",
        "schedule.name=exp",
        "schedule.gamma=0.9",
    ],
    # MixtureNorm's k-means++ draws from torch's global generator: its state must come back too
    "mixture@conv3+adam+warmup": [
        "train.batch_size=128",
        "model.norm=mixture(k=2, em_iters=2)",
        "model.include=conv3.*",
        "optim.name=adam",
        "optim.lr=0.003",
        "schedule.warmup_steps=5",
    ],
    "bcn-micro+ws+std_loss+rmsprop+accum": [
        "model.norm=bcn(micro_batch=true)",
        "model.conv=ws",
        "model.std_loss_weight=0.01",
        "optim.name=rmsprop",
        "optim.lr=0.002",
        "train.accum_steps=2",
        "train.batch_size=64",
        "schedule.name=step",
        "schedule.milestones=[0.5]",
    ],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_kill_and_resume_equals_uninterrupted(tmp_path, case):
    over = [
        *RESUME_CASES[case],
        "optim.weight_decay=1e-4",
        "train.epochs=2",
        "train.eval_every_steps=5",
        "run.checkpoint_every_steps=7",
        "run.seed=3",
    ]
    full = train(cfg_of(*over), tmp_path / "full")

    # 11 steps per epoch: killed in the second epoch between checkpoints (the mid-epoch step 14
    # was saved, 17 was not)
    with pytest.raises(_KillError):
        train(cfg_of(*over), tmp_path / "killed", callbacks=[_kill_at(17)])
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["counters"]["step"] == 14
    assert read_metrics(tmp_path / "killed")[-1]["step"] == 15  # written after the checkpoint
    resumed = train(cfg_of(*over), tmp_path / "killed", resume=True)

    _assert_same_run(resumed, full)
    for k in ("final_test_acc", "best_test_acc", "best_step", "steps"):
        assert resumed.summary[k] == full.summary[k]


def test_resume_refuses_a_changed_config_and_existing_dir_needs_a_flag(tmp_path):
    over = ["train.epochs=1", "train.steps=4"]
    train(cfg_of(*over), tmp_path / "r")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train(cfg_of(*over, "optim.lr=0.3"), tmp_path / "r", resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg_of(*over), tmp_path / "r")
    res = train(cfg_of(*over), tmp_path / "r", overwrite=True)
    assert len(read_metrics(tmp_path / "r")) == len(res.history) == 1


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = train(cfg_of("train.steps=3"), tmp_path / "new", resume=True)
    assert res.summary["steps"] == 3


def test_gradient_accumulation_equals_the_large_batch():
    # No batch-dependent layer: 2 micro-batches of 32 averaged == one batch of 64 (same order).
    common = ["model.norm=none", "train.epochs=1", "optim.lr=0.01", "run.seed=5"]
    big = train(cfg_of(*common, "train.batch_size=64"), write=False)
    acc = train(cfg_of(*common, "train.batch_size=32", "train.accum_steps=2"), write=False)
    assert big.summary["steps"] == acc.summary["steps"] == 1437 // 64
    for (k, p), q in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)


def test_bcn_rate_follows_the_learning_rate():
    from normlab.nn.batch_channel import BCNorm

    seen = []

    def check(tr: Trainer) -> None:
        lr = tr.optimizer.param_groups[0]["lr"]
        rates = {m.rate for m in tr.model.modules() if isinstance(m, BCNorm)}
        seen.append((lr, rates))

    cfg = cfg_of(
        "model.norm=bcn(micro_batch=true)",
        "train.steps=12",
        "optim.lr=0.04",
        "schedule.name=step",
        "schedule.milestones=[4, 8]",
        "schedule.milestone_unit=step",
    )
    train(cfg, write=False, callbacks=[check])
    assert [r for _, r in seen] == [{lr} for lr, _ in seen]
    assert [lr for lr, _ in seen] == pytest.approx([0.04] * 4 + [0.004] * 4 + [0.0004] * 4)


def test_standardization_loss_is_logged_and_lowers_the_loss():
    on = train(
        cfg_of("model.norm=none", "model.std_loss_weight=0.01", "train.epochs=2"), write=False
    )
    recs = on.history
    assert all("std_loss" in r and math.isfinite(r["std_loss"]) and r["std_loss"] > 0 for r in recs)
    assert recs[-1]["std_loss"] < recs[0]["std_loss"]
    off = train(cfg_of("model.norm=none", "train.epochs=1"), write=False)
    assert "std_loss" not in off.history[0]


def test_step_evaluations_and_epoch_fractions():
    res = train(cfg_of("train.epochs=1", "train.eval_every_steps=10"), write=False)
    assert [r["step"] for r in res.history] == [10, 20, 22]
    assert res.history[0]["epoch"] == pytest.approx(10 / 22, abs=1e-6)


def test_progress_setting():
    assert progress_enabled("off") is False
    assert progress_enabled("on") is True
    assert progress_enabled("auto", io.StringIO()) is False

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    import os

    old = os.environ.pop("CI", None)
    try:
        assert progress_enabled("auto", Tty()) is True
        os.environ["CI"] = "true"
        assert progress_enabled("auto", Tty()) is False
    finally:
        os.environ.pop("CI", None)
        if old is not None:
            os.environ["CI"] = old
