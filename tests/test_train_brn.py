"""Batch Renormalization's r_max/d_max ramps driven by the training loop (a wiring rule).

Oracles: Ioffe's linear ramps computed by hand (r_max from 1 to 3 and d_max from 0 to 5 over
steps 0..10: r_max = 1 + 0.2·t, d_max = 0.5·t), the step count the loop reports, and an
uninterrupted run for a killed and resumed one.
"""

from __future__ import annotations

import pytest
import torch

from normlab.nn.renorm import BatchRenorm
from normlab.train import build_training_model, load_checkpoint, load_config, train
from normlab.train.loop import Trainer
from test_train import _assert_same_run, _kill_at, _KillError, _one_thread  # noqa: F401

SPEC = "brn(r_max_ramp=(0, 10), d_max_ramp=(0, 10))"


def cfg_of(*overrides: str):
    base = [
        "run.progress=off",
        f"model.norm={SPEC}",
        "model.kwargs.width=0.25",
        "train.batch_size=128",
        "run.seed=4",
    ]
    return load_config(None, [*base, *overrides])


def hand_limits(t: int) -> tuple[float, float]:
    f = min(t / 10, 1.0)
    return 1.0 + 2.0 * f, 5.0 * f


def _layers(model: torch.nn.Module) -> list[BatchRenorm]:
    return [m for m in model.modules() if isinstance(m, BatchRenorm)]


def test_five_steps_move_every_layer_to_step_five():
    trainer = Trainer(cfg_of("train.steps=5"), write=False)
    layers = _layers(trainer.model)
    assert len(layers) == 3
    seen: list[tuple[int, float, float]] = []  # (step, r_max, d_max) at each training forward

    def pre_hook(module, args) -> None:
        if module.training:
            r, d = module.limits()
            seen.append((int(module.step), float(r), float(d)))

    layers[0].register_forward_pre_hook(pre_hook)
    trainer.fit()
    # the forward of step t clips with the limits of step t
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4]
    for t, r, d in seen:
        assert (r, d) == pytest.approx(hand_limits(t), abs=1e-6)
    # after 5 optimizer steps every layer is at step 5, half way up both ramps
    for m in layers:
        assert int(m.step) == 5
        assert [float(v) for v in m.limits()] == pytest.approx([2.0, 2.5], abs=1e-6)


def test_only_models_with_brn_get_the_hooks():
    device = torch.device("cpu")
    plain = build_training_model(load_config(None, ["model.norm=bn"]), 10, 1, device)
    assert plain.wiring.step_hooks == [] and plain.wiring.after_step == []
    brn = build_training_model(cfg_of(), 10, 1, device)
    assert len(brn.wiring.step_hooks) == len(brn.wiring.after_step) == 1
    brn.wiring.step_hooks[0](7, 0.1)
    assert {int(m.step) for m in _layers(brn.model)} == {7}


def test_resume_continues_the_ramps_exactly(tmp_path):
    # 11 steps per epoch; the ramps end at step 10, so the run crosses their end
    over = ["train.steps=14", "train.eval_every_steps=3", "run.checkpoint_every_steps=4"]
    full = train(cfg_of(*over), tmp_path / "full")

    with pytest.raises(_KillError):
        train(cfg_of(*over), tmp_path / "killed", callbacks=[_kill_at(7)])
    ck = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ck["counters"]["step"] == 4
    steps = {k: int(v) for k, v in ck["model"].items() if k.endswith(".step")}
    assert len(steps) == 3 and set(steps.values()) == {4}  # the buffer is in the checkpoint

    resumed = train(cfg_of(*over), tmp_path / "killed", resume=True)
    _assert_same_run(resumed, full)
    assert {int(m.step) for m in _layers(resumed.model)} == {14}
    assert [float(v) for v in _layers(resumed.model)[0].limits()] == pytest.approx([3.0, 5.0])
