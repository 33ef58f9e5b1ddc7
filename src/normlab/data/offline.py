"""Datasets that need no files: scikit-learn's 8×8 digits, a four-domain version of it, and
Gaussian-mixture data.

``digits-multidomain`` is a miniature of the multi-task setting of Deecke et al., Sec. 4.1, where
MNIST, CIFAR-10, SVHN and Fashion-MNIST are joined into one 40-way task whose four parts have very
different image statistics. Here the four domains are made from the same digits by transforms that
change the pixel statistics strongly (see :data:`DOMAINS`); each domain keeps its own 10 labels
(label = ``10 * domain + digit``), so there are 40 classes. The train/test split of the underlying
digits is shared by all domains, so no test digit is seen in training under any domain.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from normlab.data.core import DataSplits, make_splits, register_dataset

__all__ = ["DOMAINS", "digits_arrays", "gaussian_mixture", "split_indices"]

#: The domains of ``digits-multidomain``, in label order, with the transform of pixels x ∈ [0, 1].
DOMAINS: dict[str, str] = {
    "original": "x",
    "inverted": "1 - x",
    "low_contrast": "0.25 * x + 0.5 (low contrast, offset)",
    "noisy": "x + N(0, 0.5²) per pixel (fixed by the seed)",
}


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic train/test split of ``range(n)``: a seeded permutation, the first
    ``ceil(test_fraction * n)`` indices are the test set. Both returned sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = math.ceil(test_fraction * n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(1797, 1, 8, 8)`` float32 in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64)


@register_dataset("digits", "scikit-learn's 8x8 handwritten digits, 1x8x8, 10 classes (offline)")
def load_digits(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> DataSplits:
    """scikit-learn's 1797 8×8 digits (pixels scaled to [0, 1], then standardized); with the
    default ``test_fraction=0.2`` the split is 1437 train / 360 test, fixed by ``seed``."""
    x, y = digits_arrays()
    tr, te = split_indices(len(y), test_fraction, seed)
    return make_splits(
        "digits",
        torch.from_numpy(x[tr]),
        torch.from_numpy(y[tr]),
        torch.from_numpy(x[te]),
        torch.from_numpy(y[te]),
        10,
    )


def _domain(x: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "original":
        return x
    if name == "inverted":
        return 1.0 - x
    if name == "low_contrast":
        return 0.25 * x + 0.5
    if name == "noisy":
        return x + rng.normal(0.0, 0.5, size=x.shape).astype(np.float32)
    raise ValueError(f"unknown digits domain {name!r}; valid domains: {', '.join(DOMAINS)}")


@register_dataset(
    "digits-multidomain",
    "digits in 4 domains (original, inverted, low-contrast+offset, noisy), 40 classes (Deecke et al., Sec. 4.1 in miniature)",
)
def load_digits_multidomain(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    domains: tuple[str, ...] | list[str] | None = None,
) -> DataSplits:
    """Four domains of the digits with different image statistics, 10 labels each.

    Label ``10 * d + digit`` for domain ``d`` (index into ``domains``, default all of
    :data:`DOMAINS`). Every domain contains every digit image, transformed; the underlying split is
    that of ``digits`` with the same ``seed`` (1437 × 4 train / 360 × 4 test by default). Images are
    standardized with the statistics of the pooled training set, so the domains stay distinct.
    """
    names = list(DOMAINS) if domains is None else list(domains)
    if not names:
        raise ValueError("digits-multidomain: domains must name at least one domain")
    for nm in names:
        if nm not in DOMAINS:
            raise ValueError(f"unknown digits domain {nm!r}; valid domains: {', '.join(DOMAINS)}")
    x, y = digits_arrays()
    tr, te = split_indices(len(y), test_fraction, seed)
    rng = np.random.default_rng(seed + 1)
    xs = [_domain(x, nm, rng) for nm in names]
    ys = [y + 10 * d for d in range(len(names))]
    train_x = np.concatenate([a[tr] for a in xs])
    train_y = np.concatenate([b[tr] for b in ys])
    test_x = np.concatenate([a[te] for a in xs])
    test_y = np.concatenate([b[te] for b in ys])
    return make_splits(
        "digits-multidomain",
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        10 * len(names),
    )


def gaussian_mixture(
    n: int,
    modes: int = 4,
    dim: int = 2,
    separation: float = 4.0,
    scale_range: tuple[float, float] = (0.5, 1.5),
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` points from a mixture of ``modes`` isotropic Gaussians in ``dim`` dimensions.

    Means are ``separation * N(0, I)``, each mode's standard deviation is drawn uniformly from
    ``scale_range``, mixing weights are equal. Returns ``(x (n, dim), mode (n,), means (modes, dim),
    stds (modes,))`` as float32/int64 tensors; the same ``seed`` gives the same mixture and points.
    """
    for nm, v in (("n", n), ("modes", modes), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gaussian_mixture: {nm} must be a positive integer, got {v!r}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(
            f"gaussian_mixture: scale_range must satisfy 0 < lo <= hi, got {scale_range!r}"
        )
    rng = np.random.default_rng(seed)
    means = separation * rng.standard_normal((modes, dim))
    stds = rng.uniform(lo, hi, size=modes)
    mode = rng.integers(0, modes, size=n)
    x = means[mode] + stds[mode, None] * rng.standard_normal((n, dim))
    return (
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(mode.astype(np.int64)),
        torch.from_numpy(means.astype(np.float32)),
        torch.from_numpy(stds.astype(np.float32)),
    )


@register_dataset(
    "synthetic", "Gaussian-mixture points as (N, dim, 1, 1), label = mode (for analyses)"
)
def load_synthetic(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    modes: int = 4,
    dim: int = 2,
    n_train: int = 2000,
    n_test: int = 500,
    separation: float = 4.0,
    num_classes: int | None = None,
) -> DataSplits:
    """Gaussian-mixture data (:func:`gaussian_mixture`) laid out as ``(N, dim, 1, 1)`` — each
    sample is one ``dim``-channel point, the layout normalization layers see after a linear layer.

    The label is the mode index, or ``mode % num_classes`` when ``num_classes`` is given (several
    modes per class: the multimodal-class setting that motivates Kalayeh & Shah). Train and test are
    drawn from the same mixture.
    """
    k = modes if num_classes is None else num_classes
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= modes:
        raise ValueError(
            f"synthetic: num_classes must be an integer in [1, modes={modes}], got {k!r}"
        )
    x, mode, _, _ = gaussian_mixture(n_train + n_test, modes, dim, separation, seed=seed)
    x = x.view(-1, dim, 1, 1)
    y = mode % k
    return make_splits("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], k)
