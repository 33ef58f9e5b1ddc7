"""``run.tensorboard``: TensorBoard event files beside ``metrics.jsonl``.

Oracle: ``metrics.jsonl`` itself. The event files are read back with TensorBoard's own reader
(``event_accumulator``, which applies the purge a resumed run asks for) and every scalar must be
the record's value rounded to float32 (TensorBoard stores float32), at the record's step.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from normlab.train import ConfigError, load_config, read_metrics, train
from test_train import _kill_at, _KillError, _one_thread  # noqa: F401

# the reader of TensorBoard's own package (the optional tensorboard extra; a dev dependency)
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


def cfg_of(*overrides: str):
    base = [
        "run.progress=off",
        "run.tensorboard=true",
        "model.kwargs.width=0.25",
        "model.std_loss_weight=0.01",  # an auxiliary loss
        "train.batch_size=256",  # 5 steps per epoch
        "train.eval_every_steps=2",
        "schedule.name=cosine",
    ]
    return load_config(None, [*base, *overrides])


def read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(v: float) -> float:
    return float(np.float32(v))


def expected_events(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The scalars each record should have produced, from the records alone."""
    keys = {
        "loss/train": "train_loss",
        "loss/test": "test_loss",
        "loss/std_loss": "std_loss",
        "accuracy/train": "train_acc",
        "accuracy/test": "test_acc",
        "lr": "lr",
    }
    out: dict[str, list[tuple[int, float]]] = {tag: [] for tag in [*keys, "time/step"]}
    prev_step, prev_time = 0, 0.0
    for r in records:
        for tag, key in keys.items():
            out[tag].append((r["step"], f32(r[key])))
        per_step = (r["train_time"] - prev_time) / (r["step"] - prev_step)
        out["time/step"].append((r["step"], f32(per_step)))
        prev_step, prev_time = r["step"], r["train_time"]
    return out


def test_event_scalars_equal_the_metrics_records(tmp_path):
    res = train(cfg_of("train.epochs=2"), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    events = read_events(tmp_path / "run")
    assert events == expected_events(records)
    assert res.history == records


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    over = ["train.epochs=2", "run.checkpoint_every_steps=3"]

    # the record of step 8 is newer than the checkpoint of step 6
    with pytest.raises(_KillError):
        train(cfg_of(*over), tmp_path / "run", callbacks=[_kill_at(8)])
    assert [s for s, _ in read_events(tmp_path / "run")["loss/train"]] == [2, 4, 5, 6, 8]
    train(cfg_of(*over), tmp_path / "run", resume=True)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    # step 8 once, with the resumed run's values; the time per step of the resumed records
    # is measured from the last record the checkpoint had seen
    assert read_events(tmp_path / "run") == expected_events(records)


def test_starting_a_run_again_deletes_the_old_event_files(tmp_path):
    train(cfg_of("train.steps=4"), tmp_path / "run")
    train(cfg_of("train.steps=2"), tmp_path / "run", overwrite=True)
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in read_events(tmp_path / "run")["loss/train"]] == [2]


def test_off_by_default_and_nothing_without_a_run_directory(tmp_path):
    train(cfg_of("train.steps=2", "run.tensorboard=false"), tmp_path / "off")
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))
    res = train(cfg_of("train.steps=2"), write=False)
    assert res.run_dir is None


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(
        ConfigError, match=r"run\.tensorboard: .*pip install 'normlab\[tensorboard\]'"
    ):
        train(cfg_of("train.steps=2"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # failed before training
