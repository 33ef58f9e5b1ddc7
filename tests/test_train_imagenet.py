"""The training loop on a streamed dataset: ImageNet folders read by DataLoaders.

A tiny tree of generated JPEGs in the ILSVRC-2012 layout (3 classes, 6 training images each, an
odd number of validation images), 16×16 crops and a quarter-width ``small_cnn``. Oracles: the
dataset and the sampler used directly (which samples, which crops, in which order), the final
model evaluated by hand on every validation image, an uninterrupted run for a killed and resumed
one, and a one-process run for a two-process one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from normlab.data import ImageFolder, ResumableSampler
from normlab.train import ConfigError, load_checkpoint, load_config, read_metrics, train
from normlab.train.loop import Trainer
from normlab.train.stream import open_streamed
from test_imagenet import make_tree, write_jpeg
from test_train import (
    _assert_same_run,
    _kill_at,
    _KillError,
    _one_thread,  # noqa: F401 (autouse fixture)
    _strip_time,
)
from test_train_ddp import _Inputs, _join_gloo, _stop_at, _StopError

PER_CLASS = 6  # 18 training images: 4 micro-batches of 4 per epoch (drop_last)
SIZE, RESIZE = 16, 18


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = make_tree(tmp_path_factory.mktemp("imagenet"), per_class=PER_CLASS)
    # 19 validation images: two processes get 10 and 9 (a padded share would repeat one)
    write_jpeg(root / "val" / "n02000001" / "n02000001_extra.JPEG", 41, 35, seed=99)
    return root


def cfg_of(root: Path, *overrides: str):
    base = [
        "data.name=imagenet",
        f"data.root={root}",
        "data.workers=0",
        f"data.kwargs.size={SIZE}",
        f"data.kwargs.resize={RESIZE}",
        "model.kwargs.width=0.25",
        "train.batch_size=4",
        "train.eval_batch_size=5",
        "run.progress=off",
        "run.seed=2",
    ]
    return load_config(None, [*base, *overrides])


def expected_batches(root: Path, seed: int, epochs: int, batch: int) -> list[torch.Tensor]:
    """The training micro-batches from the dataset and the sampler themselves (no loader)."""
    ds = ImageFolder(root / "train", train=True, seed=seed, size=SIZE, resize=RESIZE)
    sampler = ResumableSampler(len(ds), seed)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        order = sampler.indices(epoch)
        for i in range(len(order) // batch):
            out.append(torch.stack([ds[j][0] for j in order[i * batch : (i + 1) * batch]]))
    return out


def hand_evaluation(root: Path, model: torch.nn.Module) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on every validation image, one at a time."""
    train_classes = ImageFolder(root / "train").classes
    val = ImageFolder(root / "val", classes=train_classes, size=SIZE, resize=RESIZE)
    model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for i in range(len(val)):
            x, y = val[i]
            out = model(x[None])
            losses.append(F.cross_entropy(out, torch.tensor([y])).item())
            correct += int(out.argmax(1).item() == y)
    return sum(losses) / len(val), correct / len(val)


# --------------------------------------------------------------------------------- one process
def test_the_model_is_built_for_the_dataset_and_trained_on_the_sampler_batches(tree):
    # data.augment = true: the dataset augments while decoding, the loop adds nothing
    trainer = Trainer(cfg_of(tree, "train.epochs=2", "data.augment=true"), write=False)
    assert trainer.model.fc.out_features == 3
    assert trainer.model.conv1.conv.in_channels == 3
    assert trainer.steps_per_epoch == 4
    inputs = _Inputs(trainer.model, n=100)
    res = trainer.fit()
    assert res.summary["steps"] == 8
    expected = expected_batches(tree, seed=2, epochs=2, batch=4)
    assert len(inputs.seen) == len(expected) == 8
    for i, (got, want) in enumerate(zip(inputs.seen, expected, strict=True)):
        assert torch.equal(got, want), i


def test_evaluation_is_the_mean_over_every_validation_image(tree):
    res = train(cfg_of(tree, "train.steps=3"), write=False)
    loss, acc = hand_evaluation(tree, res.model)
    rec = res.history[-1]
    assert rec["test_acc"] * 19 == pytest.approx(round(rec["test_acc"] * 19), abs=1e-9)
    assert rec["test_acc"] == pytest.approx(acc, abs=1e-12)
    assert rec["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_uint8_batches_are_standardized_on_the_device(tree):
    seen = []
    for normalize in ("true", "false"):
        cfg = cfg_of(tree, "train.steps=2", f"data.kwargs.normalize={normalize}")
        trainer = Trainer(cfg, write=False)
        inputs = _Inputs(trainer.model, n=100)
        trainer.fit()
        seen.append(inputs.seen)
    for a, b in zip(*seen, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


RESUME_CASES = {
    # 4 steps per epoch; MixtureNorm's k-means++ draws from torch's global generator, which a
    # loader pass must leave alone; two worker processes decode
    "mixture+workers": (
        ["model.norm=mixture(k=2, em_iters=2)", "model.include=conv3.*", "data.workers=2"],
        12,
        3,
        7,
        {"epoch": 1, "position": 8},
    ),
    # 5 micro-batches per epoch (the last of 2 images) in steps of 2, 2 and 1
    "accum+partial": (
        ["train.accum_steps=2", "train.drop_last=false", "schedule.name=cosine"],
        9,
        2,
        5,
        {"epoch": 1, "position": 8},
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_kill_and_resume_equals_uninterrupted(tree, tmp_path, case):
    over, steps, ck_every, kill, data_state = RESUME_CASES[case]
    over = [*over, f"train.steps={steps}", "train.eval_every_steps=2"]
    over.append(f"run.checkpoint_every_steps={ck_every}")
    full = train(cfg_of(tree, *over), tmp_path / "full")
    with pytest.raises(_KillError):
        train(cfg_of(tree, *over), tmp_path / "killed", callbacks=[_kill_at(kill)])
    ck = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ck["counters"]["step"] == kill - kill % ck_every
    assert {k: ck["data"][k] for k in data_state} == data_state  # mid-epoch

    resumed = train(cfg_of(tree, *over, "data.workers=0"), tmp_path / "killed", resume=True)
    _assert_same_run(resumed, full)


def test_streamed_config_errors_name_the_key(tree):
    with pytest.raises(ConfigError, match=r"data\.kwargs\.batch_size"):
        cfg_of(tree, "data.kwargs.batch_size=8")
    with pytest.raises(ConfigError, match=r"data\.download"):
        cfg_of(tree, "data.download=true")
    with pytest.raises(ConfigError, match=r"data\.workers"):
        cfg_of(tree, "data.workers=-1")
    with pytest.raises(ConfigError, match=r"train\.batch_size.*multiple of the 3 processes"):
        open_streamed(cfg_of(tree), 0, 3, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train\.batch_size: 40 is larger"):
        Trainer(cfg_of(tree, "train.batch_size=40"), write=False)
    with pytest.raises(FileNotFoundError, match="ImageNet not found"):
        Trainer(cfg_of(tree / "nowhere"), write=False)


# ------------------------------------------------------------------------------- two processes
SPAWN_SET = [
    "train.steps=8",
    "train.eval_every_steps=3",
    "run.checkpoint_every_steps=5",
    "run.threads=1",
    "run.sync_stats=true",
    "run.tensorboard=true",
]
# 4 steps per epoch, records at steps 3, 4, 6 and 8, checkpoints at 4, 5 and 8: the interrupted
# run resumes from step 5 (mid-epoch, with the train sums of step 5)
STOP_AT = 6


def _spawn_worker(rank: int, world: int, init_file: str, out: str, root: str) -> None:
    _join_gloo(rank, world, init_file)
    try:
        cfg = cfg_of(Path(root), *SPAWN_SET)
        full = Trainer(cfg, Path(out) / "full")
        inputs = _Inputs(full.model, n=100)
        full.fit()
        res: dict = {"inputs": inputs.seen, "history": full.history}
        res["model"] = full.model.state_dict()
        with contextlib.suppress(_StopError):
            Trainer(cfg, Path(out) / "resumed", callbacks=[_stop_at(STOP_AT)]).fit()
        resumed = Trainer(cfg, Path(out) / "resumed", resume=True)
        res["resumed_from"] = resumed.step
        resumed.fit()
        res["resumed_history"] = resumed.history
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tree, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp_imagenet")
    args = (2, str(tmp / "init"), str(tmp), str(tree))
    mp.spawn(_spawn_worker, args=args, nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.distributed
def test_each_process_loads_its_sampler_share_of_the_global_batch(spawned, tree):
    _, ranks = spawned
    one = Trainer(cfg_of(tree, *SPAWN_SET), write=False)
    inputs = _Inputs(one.model, n=100)
    one.fit()
    assert len(inputs.seen) == 8
    for i, whole in enumerate(inputs.seen):
        parts = [r["inputs"][i] for r in ranks]
        assert [p.shape[0] for p in parts] == [2, 2]
        # rank r takes the entries r, r + 2, ... of the epoch's permutation
        assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2]), i
    # synchronised statistics: the same computation as one process, up to float32 rounding
    for a, b in zip(ranks[0]["history"], one.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


@pytest.mark.distributed
def test_two_process_evaluation_counts_every_validation_image_once(spawned, tree):
    _, (r0, r1) = spawned
    assert _strip_time(r0["history"]) == _strip_time(r1["history"])
    model = Trainer(cfg_of(tree, *SPAWN_SET), write=False).model
    model.load_state_dict(r0["model"])
    loss, acc = hand_evaluation(tree, model)
    assert r0["history"][-1]["test_acc"] == pytest.approx(acc, abs=1e-12)
    assert r0["history"][-1]["test_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.distributed
def test_two_process_resume_and_rank_zero_files(spawned):
    tmp, (r0, r1) = spawned
    assert r0["resumed_from"] == r1["resumed_from"] == 5
    for res in (r0, r1):
        assert _strip_time(res["resumed_history"]) == _strip_time(res["history"])
    assert _strip_time(read_metrics(tmp / "resumed")) == _strip_time(r0["history"])
    # one process wrote TensorBoard events (once per Trainer: full; killed and resumed)
    assert len(list((tmp / "full").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp / "resumed").glob("events.out.tfevents.*"))) == 2
