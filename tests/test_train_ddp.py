"""Multi-process training: ``normlab train`` under torchrun, DDP, the distributed
sampler, gathered evaluation, rank-0-only files, resume.

Oracles: a one-process run with the same global batch (same seed, same data order) — the
two-process run with synchronised statistics computes the same thing up to float32 rounding, so
its accuracy must agree within noise and its first records closely; the samples each process
trains on, concatenated in rank order, must be exactly the one-process micro-batches; an
interrupted and resumed two-process run must reproduce the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from normlab.train import load_config, read_metrics
from normlab.train.loop import Trainer

pytestmark = pytest.mark.distributed

TIME_KEYS = {"time", "train_time"}
RUN_FILES = {
    "checkpoint.pt",
    "checkpoint.pt.sha256",
    "config.toml",
    "env.json",
    "metrics.jsonl",
    "summary.json",
}
# a run that checkpointed more than once also keeps the checkpoint before the latest
WITH_PREVIOUS = RUN_FILES | {"checkpoint.prev.pt", "checkpoint.prev.pt.sha256"}

# The CLI run: small_cnn with bn on digits, global batch 64, synchronised statistics.
CLI_SET = [
    "train.epochs=3",
    "train.batch_size=64",
    "train.eval_every_steps=11",
    "run.sync_stats=true",
    "run.progress=off",
]

# The in-process runs: an odd global batch (uneven shares, 32 + 31), a final partial batch
# (1437 = 22·63 + 51: 26 + 25) kept with drop_last = false, accumulation over 2 micro-batches,
# augmentation, and a synchronised standardization loss.
SPAWN_SET = [
    "train.epochs=2",
    "train.batch_size=63",
    "train.accum_steps=2",
    "train.drop_last=false",
    "train.eval_every_steps=5",
    "data.augment=true",
    "data.pad=1",
    "model.std_loss_weight=0.1",
    "model.kwargs.width=0.5",
    "run.sync_stats=true",
    "run.progress=off",
    "run.threads=1",
    "run.checkpoint_every_steps=3",
]
STOP_AT = 7  # the interrupted run stops after step 7: it resumes from the checkpoint of step 6


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


class _Inputs:
    """Forward pre-hook on the model: the inputs of its first ``n`` training forwards."""

    def __init__(self, model: torch.nn.Module, n: int = 3) -> None:
        self.seen: list[torch.Tensor] = []
        self.n = n
        model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        if module.training and len(self.seen) < self.n:
            self.seen.append(args[0].detach().clone())


class _StopError(Exception):
    pass


def _stop_at(step: int):
    def cb(trainer: Trainer) -> None:
        if trainer.step == step:
            raise _StopError

    return cb


def _join_gloo(rank: int, world: int, init_file: str) -> None:
    """A spawned test process: one thread, in a gloo group through ``init_file``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )


def _spawn_worker(rank: int, world: int, init_file: str, out: str) -> None:
    _join_gloo(rank, world, init_file)
    try:
        res: dict = {}
        cfg = load_config(None, SPAWN_SET)
        full = Trainer(cfg, Path(out) / "full")
        inputs = _Inputs(full.model)
        full.fit()
        res["inputs"] = inputs.seen
        res["full_history"] = full.history
        res["world"] = full.dist.world_size
        with contextlib.suppress(_StopError):
            Trainer(cfg, Path(out) / "resumed", callbacks=[_stop_at(STOP_AT)]).fit()
        resumed = Trainer(cfg, Path(out) / "resumed", resume=True)
        res["resumed_from"] = resumed.step
        resumed.fit()
        res["resumed_history"] = resumed.history
        # rank 0's errors reach every process (no process is left waiting in a collective)
        errors = []
        for args, kwargs in (
            ((cfg, Path(out) / "full"), {}),  # holds a run: neither resume nor overwrite
            ((load_config(None, [*SPAWN_SET, "train.batch_size=1"]),), {"write": False}),
        ):
            try:
                Trainer(*args, **kwargs)
            except Exception as e:
                errors.append((type(e).__name__, str(e)))
        res["errors"] = errors
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_spawn_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_each_process_trains_on_its_share_of_the_one_process_batch(spawned, tmp_path):
    _, ranks = spawned
    assert [r["world"] for r in ranks] == [2, 2]
    one = Trainer(load_config(None, SPAWN_SET), tmp_path / "one")
    inputs = _Inputs(one.model)
    one.fit()
    assert len(inputs.seen) == 3
    for i, whole in enumerate(inputs.seen):
        parts = [r["inputs"][i] for r in ranks]
        assert [p.shape[0] for p in parts] == [32, 31]  # 63 split as evenly as possible
        # same samples, same augmentation, contiguous shares in rank order
        assert torch.equal(torch.cat(parts), whole), i
    # and the two-process run computes what the one-process run computes, up to float32
    # rounding (~1e-7 here; per-process batch statistics, or a loss not weighted by the shares,
    # move these by 1e-5 to 1e-3 within the first records)
    ref, two = one.history, ranks[0]["full_history"]
    assert [r["step"] for r in two] == [r["step"] for r in ref]
    for a, b in zip(two, ref, strict=True):
        for key in ("train_loss", "std_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key, a[key], b[key])
        assert abs(a["test_acc"] - b["test_acc"]) <= 0.01, (a, b)


def test_every_process_records_the_same_global_metrics(spawned):
    _, (r0, r1) = spawned
    assert _strip(r0["full_history"]) == _strip(r1["full_history"])
    # 12 steps per epoch (23 micro-batches, the last one partial), records every 5 steps + ends
    steps = [r["step"] for r in r0["full_history"]]
    assert steps == [5, 10, 12, 15, 20, 24]


def test_resumed_two_process_run_reproduces_the_uninterrupted_one(spawned):
    tmp, (r0, r1) = spawned
    assert r0["resumed_from"] == r1["resumed_from"] == 6  # mid-epoch, train sums not empty
    for res in (r0, r1):
        assert _strip(res["resumed_history"]) == _strip(res["full_history"])
    on_disk = read_metrics(tmp / "resumed")
    assert _strip(on_disk) == _strip(r0["full_history"])


def test_errors_are_raised_on_every_process(spawned):
    _, (r0, r1) = spawned
    assert r0["errors"] == r1["errors"]
    (kind0, msg0), (kind1, msg1) = r0["errors"]
    assert kind0 == "FileExistsError" and "already holds a run" in msg0
    assert kind1 == "ConfigError" and "train.batch_size" in msg1 and "2 processes" in msg1


def test_sync_stats_flag_synchronises_the_model():
    from normlab.nn.sync import synced_layers

    plain = Trainer(load_config(None, ["model.norm=mixture(k=2)"]), write=False)
    synced = Trainer(
        load_config(None, ["model.norm=mixture(k=2)", "run.sync_stats=true"]), write=False
    )
    assert synced_layers(plain.model) == []
    names = synced_layers(synced.model)
    assert names and all(
        type(synced.model.get_submodule(n)).__name__ == "MixtureNorm" for n in names
    )
    assert synced.dist.world_size == 1 and synced.ddp is None  # one process: no DDP


def test_rank_zero_alone_writes_the_run_directory(spawned):
    tmp, (r0, _) = spawned
    run = tmp / "full"
    assert {p.name for p in run.iterdir()} == WITH_PREVIOUS
    # one writer: one line per record (a second writer would append its own copies)
    assert len(read_metrics(run)) == len(r0["full_history"])
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["dist_backend"] == "gloo"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


def _torchrun(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_normlab_train_under_torchrun_matches_one_process(tmp_path):
    cfg_file = Path(__file__).resolve().parents[1] / "experiments" / "digits_bn.toml"
    sets = [f"--set={s}" for s in [*CLI_SET, f"run.dir={tmp_path}", "run.name=two"]]
    proc = _torchrun(["-m", "normlab.cli", "train", str(cfg_file), *sets], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two"
    assert {p.name for p in run.iterdir()} == WITH_PREVIOUS
    two = read_metrics(run)
    # rank 0 alone logs and prints
    assert proc.stderr.count("epoch 1 step 22/66") == 1, proc.stderr[-3000:]
    assert proc.stdout.count("final test acc") == 1, proc.stdout
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2

    one = Trainer(load_config(cfg_file, [*CLI_SET, "run.threads=1"]), tmp_path / "one").fit()
    ref = one.history
    assert len(two) == len(ref) == 6
    seen = (two, ref)
    assert two[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-3), seen
    assert one.summary["final_test_acc"] > 0.8, seen
    assert abs(two[-1]["test_acc"] - ref[-1]["test_acc"]) <= 0.03, seen


def test_normlab_run_under_torchrun(tmp_path):
    exp = tmp_path / "tiny.toml"
    exp.write_text(
        '[experiment]\ntitle = "tiny"\ncite = "x"\nsource = "none"\nseeds = 1\n'
        '[base.data]\nname = "digits"\n'
        '[base.model]\nname = "small_cnn"\nnorm = "mixture(k=2, em_iters=2)"\n'
        "kwargs = { width = 0.5 }\n"
        "[base.train]\nepochs = 1\n[base.run]\nsync_stats = true\n"
        '[[variant]]\nname = "mn"\n'
    )
    args = ["-m", "normlab.cli", "run", str(exp), "--scale", "full", "--out", "out", "--no-report"]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("training mn seed 0") == 1, proc.stderr[-3000:]
    out = tmp_path / "out"
    suite = json.loads((out / "suite.json").read_text())
    assert [r["status"] for r in suite["runs"]] == ["trained"]
    run = out / "mn" / "seed0"
    assert {p.name for p in run.iterdir()} == RUN_FILES | {"run.log"}
    assert len(read_metrics(run)) == 1
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
