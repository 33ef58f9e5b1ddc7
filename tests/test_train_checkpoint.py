"""Sound checkpoints: checksums beside the file, the previous checkpoint kept, damaged or foreign
files detected on load, resume falling back to the previous checkpoint, one clear error.

Oracles: ``hashlib.sha256`` of the bytes on disk and a plain ``torch.load`` for what was written;
an uninterrupted run for what a resumed one must reproduce exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from normlab.train import (
    CheckpointError,
    CheckpointWarning,
    load_checkpoint,
    load_config,
    save_checkpoint,
    train,
)
from normlab.train.loop import Trainer

# the loop's tests: one intra-op thread (an autouse fixture), simulated kills, records sans times
from test_train import _assert_same_run, _kill_at, _KillError, _one_thread  # noqa: F401

# 22 steps per epoch on digits: step 5 is killed after the checkpoints of steps 2 and 4
RUN_SET = [
    "run.progress=off",
    "model.kwargs.width=0.5",
    "train.steps=8",
    "train.eval_every_steps=2",
    "run.checkpoint_every_steps=2",
    "run.seed=1",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _zero_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    p.write_bytes(bytes(data))


def _garbage(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


DAMAGE = {"truncated": _truncate, "zeroed-64-bytes": _zero_middle, "garbage": _garbage}


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"i": i, "w": torch.randn(4096, generator=g)}


# ---------------------------------------------------------------------------------- files


def test_sha256_is_recorded_beside_the_checkpoint(tmp_path):
    p = tmp_path / "ck.pt"
    digest = save_checkpoint(_state(0), p)
    assert digest == _sha(p)
    assert _sidecar(p).read_text() == f"{_sha(p)}  ck.pt\n"  # sha256sum's format
    ref = torch.load(p, weights_only=True)
    got = load_checkpoint(p)
    assert got["i"] == ref["i"] == 0 and torch.equal(got["w"], ref["w"])
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ck.pt", "ck.pt.sha256"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_detected(tmp_path, damage):
    p = tmp_path / "ck.pt"
    save_checkpoint(_state(0), p)
    DAMAGE[damage](p)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    msg = str(ei.value)
    assert ei.value.path == p and msg.startswith(str(p)) and "corrupt" in msg, msg
    assert "sha256" in msg and "weights_only" not in msg, msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_without_checksum_fails_in_the_safe_unpickler(tmp_path, damage):
    p = tmp_path / "ck.pt"
    save_checkpoint(_state(0), p)
    _sidecar(p).unlink()
    DAMAGE[damage](p)
    with (
        pytest.warns(CheckpointWarning, match="without verifying"),
        pytest.raises(CheckpointError) as ei,
    ):
        load_checkpoint(p)
    msg = str(ei.value)
    assert "corrupt" in msg and "not a readable torch checkpoint" in msg, msg
    assert "weights_only" not in msg and "\n" not in msg, msg


def test_previous_checkpoint_is_kept(tmp_path):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    for i in range(3):
        save_checkpoint(_state(i), last, previous=prev)
    assert torch.load(last, weights_only=True)["i"] == 2
    assert torch.load(prev, weights_only=True)["i"] == 1
    for p in (last, prev):
        assert _sidecar(p).read_text() == f"{_sha(p)}  {p.name}\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_damaged_latest_checkpoint_never_replaces_the_previous_one(tmp_path):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    save_checkpoint(_state(0), last, previous=prev)
    save_checkpoint(_state(1), last, previous=prev)
    _zero_middle(last)
    save_checkpoint(_state(2), last, previous=prev)
    assert load_checkpoint(prev)["i"] == 0  # the good one stays
    assert load_checkpoint(last)["i"] == 2


def test_a_save_interrupted_at_any_point_leaves_a_good_checkpoint(tmp_path, monkeypatch):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    real = os.replace
    n_calls = 0

    def counting(a, b):
        nonlocal n_calls
        n_calls += Path(b).parent == tmp_path  # only this save's renames: another thread of the
        real(a, b)  # test process (a claim's heartbeat left by an earlier test) may rename too

    save_checkpoint(_state(0), last, previous=prev)
    save_checkpoint(_state(1), last, previous=prev)
    monkeypatch.setattr(os, "replace", counting)
    save_checkpoint(_state(2), last, previous=prev)
    monkeypatch.setattr(os, "replace", real)
    assert n_calls >= 3
    for k in range(n_calls):  # the process dies before its k-th rename
        d = tmp_path / f"kill{k}"
        d.mkdir()
        a, b = d / "last.pt", d / "prev.pt"
        save_checkpoint(_state(0), a, previous=b)
        save_checkpoint(_state(1), a, previous=b)
        calls = 0

        def dying(x, y, k=k, d=d):
            nonlocal calls
            if Path(y).parent != d:  # not this save's rename (see above)
                return real(x, y)
            if calls == k:
                raise KeyboardInterrupt
            calls += 1
            real(x, y)

        monkeypatch.setattr(os, "replace", dying)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(_state(2), a, previous=b)
        monkeypatch.setattr(os, "replace", real)
        good = []
        for p in (a, b):
            with contextlib.suppress(CheckpointError):
                good.append(load_checkpoint(p)["i"])
        assert good and set(good) <= {0, 1, 2}, (k, good)
        assert 1 in good or 2 in good, (k, good)  # the newest complete state survives


def test_checkpoint_errors_survive_pickling():
    e = CheckpointError(Path("runs/x/checkpoint.pt"), "is corrupt (sha256)")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is CheckpointError and str(again) == str(e) and again.path == e.path


# ---------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed after step 5 (checkpoints of steps 4 and 2)."""
    tmp = tmp_path_factory.mktemp("ck")
    torch.set_num_threads(1)  # (module scope: before the autouse fixture)
    full = train(load_config(None, RUN_SET), tmp / "full")
    with pytest.raises(_KillError):
        train(load_config(None, RUN_SET), tmp / "killed", callbacks=[_kill_at(5)])
    killed = tmp / "killed"
    assert load_checkpoint(killed / "checkpoint.pt")["counters"]["step"] == 4
    assert load_checkpoint(killed / "checkpoint.prev.pt")["counters"]["step"] == 2
    return full, killed


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_resume_falls_back_to_the_previous_checkpoint(runs, tmp_path):
    full, killed = runs
    d = _copy(killed, tmp_path / "r")
    _zero_middle(d / "checkpoint.pt")
    (d / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a save cut short
    with pytest.warns(CheckpointWarning) as rec:
        res = train(load_config(None, RUN_SET), d, resume=True)
    assert not list(d.glob("*.tmp"))
    (w,) = [str(r.message) for r in rec if issubclass(r.category, CheckpointWarning)]
    assert str(d / "checkpoint.pt") in w and "corrupt" in w and "step 2" in w, w
    _assert_same_run(res, full)  # exact, from step 2


def test_a_foreign_checkpoint_is_skipped(runs, tmp_path):
    full, killed = runs
    d = _copy(killed, tmp_path / "r")
    p = d / "checkpoint.pt"
    torch.save({"state_dict": full.model.state_dict()}, p)  # a valid torch file, not ours
    _sidecar(p).write_text(f"{_sha(p)}  checkpoint.pt\n")
    with pytest.warns(CheckpointWarning, match="not a normlab training checkpoint"):
        res = train(load_config(None, RUN_SET), d, resume=True)
    _assert_same_run(res, full)


def test_resume_from_an_intact_checkpoint_warns_nothing(runs, tmp_path):
    full, killed = runs
    d = _copy(killed, tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        res = train(load_config(None, RUN_SET), d, resume=True)
    _assert_same_run(res, full)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_no_good_checkpoint_is_one_clear_error(runs, tmp_path, damage):
    _, killed = runs
    d = _copy(killed, tmp_path / "r")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        DAMAGE[damage](d / name)
    with pytest.raises(CheckpointError) as ei:
        Trainer(load_config(None, RUN_SET), d, resume=True)
    msg = str(ei.value)
    assert "\n" not in msg and "weights_only" not in msg, msg
    for needle in (
        str(d / "checkpoint.pt"),
        str(d / "checkpoint.prev.pt"),
        "corrupt",
        "--overwrite",
    ):
        assert needle in msg, (needle, msg)
    # --overwrite starts over
    res = train(load_config(None, RUN_SET), d, overwrite=True)
    assert res.summary["steps"] == 8 and load_checkpoint(d / "checkpoint.pt")


def test_cli_resume_of_a_corrupt_run_prints_one_line(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        '[model]\nkwargs = { width = 0.5 }\n[train]\nsteps = 2\n[run]\nprogress = "off"\n'
    )
    run = tmp_path / "run"
    train(load_config(cfg), run)
    assert not (run / "checkpoint.prev.pt").exists()  # one checkpoint only
    _garbage(run / "checkpoint.pt")
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "normlab.cli",
        "train",
        str(cfg),
        "--resume",
        "--run-dir",
        str(run),
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr, proc.stderr
    for needle in (str(run / "checkpoint.pt"), "corrupt", "--overwrite"):
        assert needle in line, (needle, line)
