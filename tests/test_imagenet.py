"""Tests for normlab.data.imagenet on a tiny tree of generated JPEGs in the ILSVRC-2012 layout."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import normlab.data.imagenet as imagenet_module
from normlab.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    MissingFileError,
    ResumableLoader,
    ResumableSampler,
    imagenet_dir,
    imagenet_loaders,
)
from normlab.data.imagenet import (
    random_resized_crop_box,
    sample_rng,
    scan_split,
    to_tensor,
    train_transform,
)

# Written out of order on purpose: the labels must follow the sorted folder names.
CLASSES = ["n03000001", "n01000001", "n02000001"]
# (width, height) of the images of each class: portrait, landscape, square, very wide.
SIZES = [(37, 53), (61, 29), (40, 40), (90, 12)]


def write_jpeg(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    # Smooth content (a ramp plus noise) so that JPEG keeps it recognisable.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1
    )
    pixels = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=95)


def make_tree(root: Path, classes=CLASSES, val_classes=None, per_class: int = 4) -> Path:
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c, wnid in enumerate(names):
            for i in range(per_class):
                w, h = SIZES[i % len(SIZES)]
                write_jpeg(root / split / wnid / f"{wnid}_{i:04d}.JPEG", w, h, seed=100 * c + i)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = make_tree(tmp_path_factory.mktemp("imagenet"))
    # a grey image, a stray non-image file and a hidden file: the reader converts / ignores them
    write_jpeg(root / "train" / "n01000001" / "n01000001_grey.JPEG", 45, 33, seed=7, mode="L")
    (root / "train" / "n01000001" / "README.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()
    return root


# --------------------------------------------------------------------------- tree and labels
def test_classes_are_sorted_wnids_and_labels_follow_them(tree):
    classes, samples = scan_split(tree / "train")
    assert classes == sorted(CLASSES)
    assert len(samples) == 3 * 4 + 1
    for path, label in samples:
        assert Path(path).parent.name == classes[label]
        assert Path(path).suffix == ".JPEG"
    # files sorted by name within a class, classes in order
    assert [Path(p).name for p, _ in samples[:5]] == [
        "n01000001_0000.JPEG",
        "n01000001_0001.JPEG",
        "n01000001_0002.JPEG",
        "n01000001_0003.JPEG",
        "n01000001_grey.JPEG",
    ]
    ds = ImageFolder(tree / "train")
    assert len(ds) == 13 and ds.targets.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    assert ds.path(5) == tree / "train" / "n02000001" / "n02000001_0000.JPEG"
    val = ImageFolder(tree / "val", classes=ds.classes)
    assert val.classes == ds.classes and val.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_dir_finds_the_tree(tree, monkeypatch, tmp_path):
    assert imagenet_dir(tree) == tree
    (tmp_path / "imagenet").symlink_to(tree)
    assert imagenet_dir(tmp_path) == tmp_path / "imagenet"
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path))
    assert imagenet_dir() == tmp_path / "imagenet"


# -------------------------------------------------------------------------------- transforms
def hand_eval(path: Path, resize: int, size: int) -> np.ndarray:
    """Short side to ``resize``, centre ``size`` crop, ImageNet standardization, by hand."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = resize, math.floor(resize * h / w)
    else:
        nw, nh = math.floor(resize * w / h), resize
    arr = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float64)
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = arr[top : top + size, left : left + size] / 255.0
    out = (crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("index", [0, 1, 3, 4])  # portrait, landscape, very wide, grey
def test_eval_transform_matches_a_hand_computation(tree, index):
    ds = ImageFolder(tree / "train")  # train=False: the evaluation transform
    x, y = ds[index]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    expected = hand_eval(ds.path(index), 256, 224)
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5)
    if index == 4:  # grey file: three equal channels after the RGB conversion
        raw = Image.open(ds.path(index))
        assert raw.mode == "L"
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        pixels = x * std + mean
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    raw_ds = ImageFolder(tree / "train", size=20, resize=24, normalize=False)
    xr, _ = raw_ds[index]
    assert xr.dtype == torch.uint8 and xr.shape == (3, 20, 20)
    expected_raw = hand_eval(ds.path(index), 24, 20)
    back = (
        expected_raw * np.array(IMAGENET_STD)[:, None, None]
        + np.array(IMAGENET_MEAN)[:, None, None]
    ) * 255
    np.testing.assert_allclose(xr.numpy(), back, atol=1e-3)


def test_random_resized_crop_boxes_stay_in_bounds():
    sizes = [(375, 500), (500, 375), (64, 64), (10, 1000), (1000, 10), (1, 1), (3, 7)]
    fractions, log_ratios = [], []
    for h, w in sizes:
        for i in range(300):
            top, left, ch, cw = random_resized_crop_box(h, w, sample_rng(1, 2, i))
            assert top >= 0 and left >= 0 and ch >= 1 and cw >= 1
            assert top + ch <= h and left + cw <= w
            if (h, w) in ((375, 500), (500, 375)):
                fractions.append(ch * cw / (h * w))
                log_ratios.append(math.log(cw / ch))
    # 8 %..100 % of the area and aspect ratio in [3/4, 4/3], up to rounding to whole pixels
    assert min(fractions) >= 0.08 - 0.01 and max(fractions) <= 1.0
    assert min(fractions) < 0.12 and max(fractions) > 0.9  # the whole range is used
    assert all(abs(r) <= math.log(4 / 3) + 0.02 for r in log_ratios)
    assert min(log_ratios) < -0.2 and max(log_ratios) > 0.2  # both orientations
    # a 10×1000 strip admits no such crop of >= 8 % area: the centred fallback, ratio 4/3
    assert random_resized_crop_box(10, 1000, sample_rng(0, 0, 0)) == (0, 493, 10, 13)
    assert random_resized_crop_box(1000, 10, sample_rng(0, 0, 0)) == (493, 0, 13, 10)


def test_train_crops_are_deterministic_per_seed_epoch_index(tree):
    ds = ImageFolder(tree / "train", train=True, seed=3, size=24)
    a = [ds[i][0] for i in range(len(ds))]
    assert all(x.shape == (3, 24, 24) for x in a)
    assert all(torch.equal(x, ds[i][0]) for i, x in enumerate(a))  # same draws again
    ds.set_epoch(1)
    b = [ds[i][0] for i in range(len(ds))]
    assert sum(not torch.equal(x, y) for x, y in zip(a, b)) >= len(ds) - 1
    other = ImageFolder(tree / "train", train=True, seed=4, size=24)
    assert sum(not torch.equal(x, other[i][0]) for i, x in enumerate(a)) >= len(ds) - 1
    # the item is the crop+resize of the drawn box, flipped or not (numpy flip as the oracle)
    flips = 0
    for i in range(len(ds)):
        img = Image.open(ds.path(i)).convert("RGB")
        top, left, h, w = random_resized_crop_box(img.height, img.width, sample_rng(3, 1, i))
        crop = img.crop((left, top, left + w, top + h)).resize((24, 24), Image.Resampling.BILINEAR)
        plain = to_tensor(crop)
        flipped = torch.from_numpy(np.ascontiguousarray(plain.numpy()[:, :, ::-1]))
        got = b[i]
        assert torch.equal(got, plain) or torch.equal(got, flipped)
        flips += torch.equal(got, flipped) and not torch.equal(plain, flipped)
        assert torch.equal(got, to_tensor(train_transform(img, sample_rng(3, 1, i), 24)))
    assert 0 < flips < len(ds)


# ----------------------------------------------------------------------------------- sampler
def test_sampler_resumes_mid_epoch_with_exactly_the_remaining_indices():
    s = ResumableSampler(23, seed=5)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(23)) and full != list(range(23))
    s.advance(7)
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 7
    fresh = ResumableSampler(23, seed=5)
    fresh.load_state_dict(state)
    assert list(fresh) == full[7:]
    fresh.set_epoch(2)  # the resumed epoch keeps its position
    assert list(fresh) == full[7:]
    fresh.set_epoch(3)  # a new epoch starts at 0 with another permutation
    assert fresh.position == 0 and sorted(fresh) == list(range(23)) and list(fresh) != full
    with pytest.raises(ValueError, match="world_size"):
        ResumableSampler(23, seed=5, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(23, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="exceeds"):
        s.advance(17)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        ResumableSampler(23, rank=2, world_size=2)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ResumableSampler(0)


@pytest.mark.parametrize("n,world", [(23, 4), (24, 4), (5, 8), (10, 1)])
def test_ddp_shards_are_disjoint_equal_and_covering(n, world):
    for epoch in (0, 3):
        shares = []
        for rank in range(world):
            s = ResumableSampler(n, seed=11, rank=rank, world_size=world)
            s.set_epoch(epoch)
            shares.append(list(s))
            # torch's DistributedSampler is the oracle (same permutation and padding)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=11)
            ref.set_epoch(epoch)
            assert shares[-1] == list(ref)
        assert len({len(x) for x in shares}) == 1 and len(shares[0]) == math.ceil(n / world)
        flat = [i for x in shares for i in x]
        assert set(flat) == set(range(n))
        assert len(flat) - n == len(shares[0]) * world - n  # only the padding repeats
        # without padding: every index exactly once
        exact = [list(ResumableSampler(n, 11, r, world, pad=False)) for r in range(world)]
        assert sorted(i for x in exact for i in x) == list(range(n))


# ------------------------------------------------------------------------------------ loaders
def batches(loader, limit=None):
    out = []
    for x, y in loader:
        out.append((x.clone(), y.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def small_loaders(tree, workers=0, **kw):
    return imagenet_loaders(tree, batch_size=3, workers=workers, seed=2, size=16, resize=20, **kw)


def test_loader_resumes_mid_epoch_exactly(tree):
    ref = small_loaders(tree)
    assert ref.num_classes == 3 and ref.classes == sorted(CLASSES)
    assert len(ref.train) == 13 // 3 and len(ref.val) == 4  # drop_last for train only
    epoch0 = batches(ref.train)
    epoch1 = batches(ref.train)  # the next pass moves on to epoch 1 by itself
    assert ref.train.state_dict()["epoch"] == 1
    assert len(epoch0) == 4 and not torch.equal(epoch0[0][1], epoch1[0][1])
    run = small_loaders(tree)
    run.train.set_epoch(0)
    assert_same(batches(run.train, limit=2), epoch0[:2])
    state = run.train.state_dict()
    assert state["epoch"] == 0 and state["position"] == 6
    resumed = small_loaders(tree)
    resumed.train.load_state_dict(state)
    resumed.train.set_epoch(0)
    assert_same(batches(resumed.train), epoch0[2:])
    resumed.train.set_epoch(1)
    assert_same(batches(resumed.train), epoch1)
    x, y = epoch0[0]
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    val = batches(ref.val)
    assert torch.cat([y for _, y in val]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert_same(batches(ref.val), val)  # evaluation passes repeat


def test_two_workers_give_the_same_batches_as_none(tree):
    serial = small_loaders(tree, workers=0)
    parallel = small_loaders(tree, workers=2)
    for data in (serial, parallel):
        data.train.set_epoch(4)
    assert_same(batches(parallel.train), batches(serial.train))
    assert_same(batches(parallel.val), batches(serial.val))


def test_ddp_loaders_split_the_validation_set_exactly(tree):
    ys = []
    for rank in range(2):
        data = small_loaders(tree, rank=rank, world_size=2)
        assert len(data.train.sampler) == 7  # 13 images padded to 14, half each
        ys += torch.cat([y for _, y in batches(data.val)]).tolist()
    assert sorted(ys) == [0] * 4 + [1] * 4 + [2] * 4


# ------------------------------------------------------------------------------------- errors
def test_missing_root_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(MissingFileError, match=r"train/<wnid>/\*\.JPEG") as e:
        imagenet_loaders(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "train") in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "only_train" / "train" / "n01").mkdir(parents=True)
    write_jpeg(tmp_path / "only_train" / "train" / "n01" / "a.JPEG", 8, 8, 0)
    with pytest.raises(MissingFileError, match="val"):
        imagenet_loaders(tmp_path / "only_train")


def test_val_with_other_classes_is_an_error_naming_them(tmp_path):
    make_tree(tmp_path, ["n01", "n02", "n03"], val_classes=["n01", "n02", "n09"], per_class=1)
    with pytest.raises(ValueError, match="missing n03; extra n09"):
        imagenet_loaders(tmp_path)


def test_flat_val_and_empty_class_folders_are_errors(tmp_path):
    make_tree(tmp_path / "a", ["n01", "n02"], per_class=1)
    for f in (tmp_path / "a" / "val").rglob("*.JPEG"):
        f.rename(tmp_path / "a" / "val" / f.name)
    for d in (tmp_path / "a" / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(ValueError, match="holds 2 images directly"):
        imagenet_loaders(tmp_path / "a")
    make_tree(tmp_path / "b", ["n01", "n02"], per_class=1)
    (tmp_path / "b" / "train" / "n03").mkdir()
    (tmp_path / "b" / "train" / "n03" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="without images: n03"):
        imagenet_loaders(tmp_path / "b")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(workers=-1), "workers must be an integer >= 0, got -1"),
        (dict(rank=2, world_size=2), "rank must be in"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(size=224, resize=200), "resize must be >= size"),
        (dict(eval_batch_size=1.5), "eval_batch_size"),
    ],
)
def test_bad_arguments_are_named(tree, kw, match):
    with pytest.raises(ValueError, match=match):
        imagenet_loaders(tree, **kw)


def test_loader_needs_a_resumable_sampler(tree):
    ds = ImageFolder(tree / "val")
    with pytest.raises(TypeError, match="ResumableSampler"):
        ResumableLoader(ds, None)
    with pytest.raises(ValueError, match="persistent_workers"):
        ResumableLoader(ds, ResumableSampler(len(ds)), num_workers=1, persistent_workers=True)


def test_docstring_examples_run():
    result = doctest.testmod(imagenet_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 9 and result.failed == 0
