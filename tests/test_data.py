"""Tests for normlab.data: offline datasets, augmentation, standardization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits
from sklearn.linear_model import LogisticRegression

from normlab.data import (
    DOMAINS,
    DataSplits,
    augment,
    available_datasets,
    channel_stats,
    gaussian_mixture,
    load_dataset,
    random_crop,
    random_flip,
    shift_crop,
    split_indices,
    standardize,
)


def _unstandardize(x: torch.Tensor, d: DataSplits) -> np.ndarray:
    return (x * d.std.view(1, -1, 1, 1) + d.mean.view(1, -1, 1, 1)).numpy()


# ------------------------------------------------------------------------------------ registry
def test_available_datasets_lists_contract_names():
    names = set(available_datasets())
    assert {
        "digits",
        "digits-multidomain",
        "synthetic",
        "cifar10",
        "cifar100",
        "mnist",
        "fashion-mnist",
        "svhn",
        "multitask",
    } <= names


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("imagenet")


# -------------------------------------------------------------------------------------- digits
def test_digits_shapes_labels_and_standardization():
    d = load_dataset("digits")
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.num_classes == 10 and d.in_channels == 1 and d.image_size == (8, 8)
    assert set(d.train_y.tolist()) == set(range(10)) and set(d.test_y.tolist()) <= set(range(10))
    # Statistics from the raw sklearn pixels of the train indices (numpy oracle).
    raw = sk_load_digits().images.astype(np.float64) / 16.0
    tr, te = split_indices(len(raw), 0.2, 0)
    assert np.isclose(d.mean.item(), raw[tr].mean(), atol=1e-6)
    assert np.isclose(d.std.item(), raw[tr].std(), atol=1e-6)
    assert (
        abs(d.train_x.mean().item()) < 1e-5 and abs(d.train_x.std(correction=0).item() - 1) < 1e-5
    )
    # The tensors are exactly the sklearn images of those indices, in that order.
    np.testing.assert_allclose(_unstandardize(d.train_x, d)[:, 0], raw[tr], atol=1e-5)
    np.testing.assert_allclose(_unstandardize(d.test_x, d)[:, 0], raw[te], atol=1e-5)
    np.testing.assert_array_equal(d.test_y.numpy(), sk_load_digits().target[te])


def test_digits_split_deterministic_disjoint_and_seeded():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    tr, te = split_indices(1797, 0.2, 0)
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 1797
    _, te1 = split_indices(1797, 0.2, 1)
    assert not np.array_equal(te, te1)
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.test_y, c.test_y)


def test_digits_multidomain_shapes_labels_and_domains_differ():
    d = load_dataset("digits-multidomain")
    assert d.num_classes == 40 and d.in_channels == 1
    assert d.train_x.shape == (4 * 1437, 1, 8, 8) and d.test_x.shape == (4 * 360, 1, 8, 8)
    assert set(d.train_y.tolist()) == set(range(40)) and int(d.test_y.max()) <= 39
    # Deterministic.
    d2 = load_dataset("digits-multidomain")
    assert torch.equal(d.train_x, d2.train_x) and torch.equal(d.train_y, d2.train_y)
    # Each domain keeps the digit labels of the plain split, offset by 10 per domain.
    base = load_dataset("digits")
    dom = d.train_y // 10
    for k in range(4):
        np.testing.assert_array_equal((d.train_y[dom == k] % 10).numpy(), base.train_y.numpy())
    # Domain statistics differ measurably: per-domain pixel mean and std ...
    raw = _unstandardize(d.train_x, d).reshape(len(d.train_y), -1)
    stats = np.array([[raw[dom == k].mean(), raw[dom == k].std()] for k in range(4)])
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(stats[i] - stats[j]).max() > 0.1, (
                list(DOMAINS)[i],
                list(DOMAINS)[j],
                stats,
            )
    # ... and a linear classifier on each image's (mean, std, min, max) tells the domain.
    feats = np.stack([raw.mean(1), raw.std(1), raw.min(1), raw.max(1)], 1)
    clf = LogisticRegression(max_iter=2000).fit(feats, dom.numpy())
    te_raw = _unstandardize(d.test_x, d).reshape(len(d.test_y), -1)
    te_feats = np.stack([te_raw.mean(1), te_raw.std(1), te_raw.min(1), te_raw.max(1)], 1)
    assert clf.score(te_feats, (d.test_y // 10).numpy()) > 0.95


def test_digits_multidomain_rejects_unknown_domain():
    with pytest.raises(ValueError, match="valid domains"):
        load_dataset("digits-multidomain", domains=["sepia"])


def test_synthetic_gaussian_mixture():
    d = load_dataset("synthetic", modes=3, dim=5, n_train=3000, n_test=600, seed=2)
    assert d.train_x.shape == (3000, 5, 1, 1) and d.test_x.shape == (600, 5, 1, 1)
    assert d.num_classes == 3 and set(d.train_y.tolist()) == {0, 1, 2}
    assert torch.equal(
        d.train_x,
        load_dataset("synthetic", modes=3, dim=5, n_train=3000, n_test=600, seed=2).train_x,
    )
    x, mode, means, stds = gaussian_mixture(6000, modes=3, dim=5, seed=7)
    for k in range(3):
        pts = x[mode == k].double()
        # Sample mean within 5 standard errors of the mode's mean; sample std near the mode's std.
        se = stds[k].item() / pts.shape[0] ** 0.5
        assert (pts.mean(0) - means[k].double()).abs().max() < 5 * se
        # ~2000 points x 5 dims: the standard error of the averaged std is < 1 %
        assert abs(pts.std(0).mean().item() - stds[k].item()) < 0.04 * stds[k].item()
    dd = load_dataset("synthetic", modes=4, num_classes=2)
    assert dd.num_classes == 2 and set(dd.train_y.tolist()) == {0, 1}


def test_channel_stats_and_standardize_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, 4, 5, generator=g) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    mean, std = channel_stats(x)
    xn = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean.numpy(), xn.mean(1), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), xn.std(1), rtol=1e-5)
    z = standardize(x, mean, std)
    zn = z.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(zn.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(zn.std(1), 1, atol=1e-4)
    # A constant channel standardizes to 0, not NaN.
    m2, s2 = channel_stats(torch.ones(4, 1, 2, 2))
    assert torch.equal(standardize(torch.ones(4, 1, 2, 2), m2, s2), torch.zeros(4, 1, 2, 2))


# ---------------------------------------------------------------------------------- augmentation
def _numpy_shift(x: np.ndarray, pad: int, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    n, _, h, w = x.shape
    out = np.zeros_like(x)
    for k in range(n):
        for i in range(h):
            for j in range(w):
                si, sj = i + dy[k] - pad, j + dx[k] - pad
                if 0 <= si < h and 0 <= sj < w:
                    out[k, :, i, j] = x[k, :, si, sj]
    return out


def test_shift_crop_matches_hand_computed_shift():
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).view(2, 2, 5, 6) + 1
    # Fixed offsets: sample 0 moved one row down-shift (content moves up) and two columns.
    dy, dx = torch.tensor([3, 0]), torch.tensor([4, 2])
    out = shift_crop(x, 2, dy, dx)
    np.testing.assert_array_equal(out.numpy(), _numpy_shift(x.numpy(), 2, dy.numpy(), dx.numpy()))
    # Hand-check sample 0: out[i, j] = x[i + 1, j + 2], zero past the bottom/right edges.
    assert torch.equal(out[0, :, :4, :4], x[0, :, 1:, 2:])
    assert (out[0, :, 4, :] == 0).all() and (out[0, :, :, 4:] == 0).all()
    # Sample 1: content moves down by 2: out[i, j] = x[i - 2, j], zero in the first two rows.
    assert torch.equal(out[1, :, 2:, :], x[1, :, :3, :]) and (out[1, :, :2] == 0).all()
    # The centre offset is the identity.
    assert torch.equal(shift_crop(x, 2, torch.tensor([2, 2]), torch.tensor([2, 2])), x)


def test_random_crop_is_some_shift_and_reproducible():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 6, 6, generator=g)
    out = random_crop(x, 2, torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    assert torch.equal(out, random_crop(x, 2, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, random_crop(x, 2, torch.Generator().manual_seed(6)))
    shifted = 0
    for k in range(32):  # each sample equals exactly one of the 25 shifted copies
        hits = [
            (a, b)
            for a in range(5)
            for b in range(5)
            if torch.equal(
                out[k : k + 1], shift_crop(x[k : k + 1], 2, torch.tensor([a]), torch.tensor([b]))
            )
        ]
        assert len(hits) == 1
        shifted += hits[0] != (2, 2)
    assert shifted > 16  # most samples really moved (P(centre) = 1/25)


def test_random_flip_and_augment():
    x = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = random_flip(x, 0.5, torch.Generator().manual_seed(0))
    same = torch.tensor([torch.equal(out[k], x[k]) for k in range(64)])
    flipped = torch.tensor([torch.equal(out[k], x[k].flip(-1)) for k in range(64)])
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54
    a = augment(x, pad=4, generator=torch.Generator().manual_seed(3))
    b = augment(x, pad=4, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(augment(x, pad=0, flip=False), x)
    with pytest.raises(ValueError, match="pad"):
        augment(x, pad=-1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment(x[0])


def test_augment_runs_on_the_batch_device():
    # The meta device has no data: any hidden host round trip or CPU-only op would fail here.
    x = torch.empty(8, 3, 32, 32, device="meta")
    out = augment(x, pad=4)
    assert out.device.type == "meta" and out.shape == x.shape
    # A CPU generator may drive a batch on another device; the result stays on the batch's device.
    y = augment(torch.randn(4, 3, 8, 8, dtype=torch.float64), pad=2, generator=torch.Generator())
    assert y.dtype == torch.float64
