"""Loaders for the official distribution files of CIFAR-10/100, MNIST, Fashion-MNIST and SVHN, and
the four-dataset 40-way multi-task set of Deecke et al., Sec. 4.1.

Layout under the data root (see :func:`normlab.data.files.data_root`)::

    cifar-10-batches-py/{data_batch_1..5, test_batch}   (from cifar-10-python.tar.gz)
    cifar-100-python/{train, test}                       (from cifar-100-python.tar.gz)
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    svhn/{train,test}_32x32.mat

A file is parsed only after its checksum has passed; CIFAR's pickles are read with a restricted
unpickler that can build nothing but numpy arrays (and plain containers), and every parser checks
the structure (magic numbers, shapes, label ranges) and raises ``ValueError`` naming the file.
Pixels are scaled to [0, 1], then standardized per channel with the train split's statistics
(:func:`normlab.data.make_splits`). The official train/test splits are used.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from normlab.data.core import DataSplits, make_splits, register_dataset
from normlab.data.files import data_root, require

__all__ = [
    "MULTITASK_PARTS",
    "RestrictedUnpickler",
    "read_cifar",
    "read_idx",
    "read_mnist_like",
    "read_svhn",
    "to_rgb32",
]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # uint8 NCHW train/test + labels
Checksums = Mapping[str, str] | None


# --------------------------------------------------------------------------------------- CIFAR
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays.

    CIFAR's batches are Python-2 pickles of dicts holding a ``uint8`` numpy array and lists;
    anything else (functions, arbitrary classes) is refused with ``pickle.UnpicklingError``.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def read_cifar(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR python batch (already checksum-verified): ``(N, 3, 32, 32)`` uint8 images
    and int64 labels. ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100)."""
    try:
        with open(path, "rb") as f:
            d = RestrictedUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as e:
        raise ValueError(f"corrupt CIFAR batch file {path}: cannot unpickle it ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(
            f"corrupt CIFAR batch file {path}: expected a dict, got {type(d).__name__}"
        )
    try:
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, label_key))
    except KeyError as e:
        raise ValueError(f"corrupt CIFAR batch file {path}: missing key {e}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"corrupt CIFAR batch file {path}: 'data' must be uint8 of shape (N, 3072), got "
            f"{data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"corrupt CIFAR batch file {path}: {label_key!r} must be {data.shape[0]} integers, got "
            f"{labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"corrupt CIFAR batch file {path}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar10_arrays(root: Path, download: bool, checksums: Checksums) -> Arrays:
    base = "cifar-10-batches-py/"
    parts = [
        read_cifar(require(root, f"{base}data_batch_{i}", download, checksums), "labels", 10)
        for i in range(1, 6)
    ]
    xte, yte = read_cifar(require(root, base + "test_batch", download, checksums), "labels", 10)
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        xte,
        yte,
    )


def _cifar100_arrays(root: Path, download: bool, checksums: Checksums) -> Arrays:
    base = "cifar-100-python/"
    xtr, ytr = read_cifar(require(root, base + "train", download, checksums), "fine_labels", 100)
    xte, yte = read_cifar(require(root, base + "test", download, checksums), "fine_labels", 100)
    return xtr, ytr, xte, yte


def _splits(name: str, a: Arrays, num_classes: int) -> DataSplits:
    xtr, ytr, xte, yte = a
    return make_splits(
        name,
        torch.from_numpy(xtr).float().div_(255.0),
        torch.from_numpy(ytr),
        torch.from_numpy(xte).float().div_(255.0),
        torch.from_numpy(yte),
        num_classes,
    )


@register_dataset(
    "cifar10", "CIFAR-10 from the official python batches (50k/10k, 3x32x32, 10 classes)"
)
def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
) -> DataSplits:
    """CIFAR-10 (official 50 000 / 10 000 split). ``checksums`` overrides expected digests."""
    return _splits("cifar10", _cifar10_arrays(data_root(root), download, checksums), 10)


@register_dataset(
    "cifar100", "CIFAR-100 from the official python files (50k/10k, 3x32x32, 100 fine classes)"
)
def load_cifar100(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
) -> DataSplits:
    """CIFAR-100 with its 100 fine labels (official split)."""
    return _splits("cifar100", _cifar100_arrays(data_root(root), download, checksums), 100)


# ---------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (LeCun's MNIST format): magic ``00 00 <dtype> <ndim>``, ``ndim``
    big-endian int32 sizes, then the data. Raises ``ValueError`` naming the file if it is not
    valid gzip, has a bad magic number, or its size disagrees with its header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"corrupt IDX file {path}: not a valid gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex()}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"corrupt IDX file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says {dims} ({expected} bytes of data), found "
            f"{len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def read_mnist_like(root: Path, folder: str, download: bool, checksums: Checksums) -> Arrays:
    """The four IDX files of MNIST / Fashion-MNIST under ``root/folder``: ``(N, 1, 28, 28)`` uint8
    images and int64 labels in [0, 10) for the train and test splits."""
    out = []
    for split in ("train", "t10k"):
        img_path = require(root, f"{folder}/{split}-images-idx3-ubyte.gz", download, checksums)
        lab_path = require(root, f"{folder}/{split}-labels-idx1-ubyte.gz", download, checksums)
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(
                f"corrupt IDX file {img_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"corrupt IDX file {lab_path}: expected {x.shape[0]} labels, got shape {y.shape}"
            )
        if y.size and y.max() >= 10:
            raise ValueError(f"corrupt IDX file {lab_path}: labels outside [0, 10)")
        out += [x[:, None].copy(), y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


@register_dataset("mnist", "MNIST from the official gzipped IDX files (60k/10k, 1x28x28)")
def load_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
) -> DataSplits:
    """MNIST, official 60 000 / 10 000 split, files under ``root/mnist``."""
    return _splits("mnist", read_mnist_like(data_root(root), "mnist", download, checksums), 10)


@register_dataset(
    "fashion-mnist", "Fashion-MNIST from the official gzipped IDX files (60k/10k, 1x28x28)"
)
def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
) -> DataSplits:
    """Fashion-MNIST, official 60 000 / 10 000 split, files under ``root/fashion-mnist``."""
    arrays = read_mnist_like(data_root(root), "fashion-mnist", download, checksums)
    return _splits("fashion-mnist", arrays, 10)


# --------------------------------------------------------------------------------------- SVHN
def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse an SVHN cropped-digits ``.mat`` file (``X``: (32, 32, 3, N) uint8, ``y``: (N, 1) with
    labels 1..10 where 10 means the digit 0) into ``(N, 3, 32, 32)`` uint8 and labels in [0, 10)."""
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for malformed files
        raise ValueError(f"corrupt SVHN file {path}: cannot read it as a .mat file ({e})") from None
    if "X" not in m or "y" not in m:
        raise ValueError(f"corrupt SVHN file {path}: missing variable 'X' or 'y'")
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(
            f"corrupt SVHN file {path}: 'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}"
        )
    if y.shape[0] != x.shape[3]:
        raise ValueError(f"corrupt SVHN file {path}: {x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"corrupt SVHN file {path}: labels must be in 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), (y.astype(np.int64) % 10)


def _svhn_arrays(root: Path, download: bool, checksums: Checksums) -> Arrays:
    xtr, ytr = read_svhn(require(root, "svhn/train_32x32.mat", download, checksums))
    xte, yte = read_svhn(require(root, "svhn/test_32x32.mat", download, checksums))
    return xtr, ytr, xte, yte


@register_dataset("svhn", "SVHN cropped digits from the official .mat files (73k/26k, 3x32x32)")
def load_svhn(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
) -> DataSplits:
    """SVHN (train 73 257 / test 26 032; the "extra" set is not used), label 0 for the digit 0."""
    return _splits("svhn", _svhn_arrays(data_root(root), download, checksums), 10)


# ---------------------------------------------------------------------------------- multitask
#: The datasets of Deecke et al., Sec. 4.1 in label-block order: labels 10·i .. 10·i + 9 belong to
#: part i.
MULTITASK_PARTS = ("mnist", "cifar10", "svhn", "fashion-mnist")


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """Bring ``(N, C, H, W)`` uint8 images with C ∈ {1, 3} and H, W ≤ 32 to ``(N, 3, 32, 32)``:
    grey images are repeated over three channels, smaller images are zero-padded symmetrically
    (28 → 32 adds 2 pixels per side, the classic LeNet input)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] > 32 or x.shape[3] > 32:
        raise ValueError(f"to_rgb32: expected (N, 1|3, H<=32, W<=32) images, got {x.shape}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    ph, pw = 32 - x.shape[2], 32 - x.shape[3]
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    return x


@register_dataset(
    "multitask",
    "Deecke et al., Sec. 4.1: MNIST + CIFAR-10 + SVHN + Fashion-MNIST as 3x32x32, 40 classes",
)
def load_multitask(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    checksums: Checksums = None,
    max_per_part: int | None = None,
) -> DataSplits:
    """The 40-way multi-task set of Deecke et al., Sec. 4.1: the official train/test splits of
    MNIST, CIFAR-10, SVHN and Fashion-MNIST, each brought to 3×32×32 (:func:`to_rgb32`), labels
    offset by 10 per dataset in the order of :data:`MULTITASK_PARTS`. All parts are standardized
    together (pooled training statistics), so their different image statistics are kept — that
    difference is what the experiment is about. ``max_per_part`` keeps the first n train and test
    images of each part (the full set is 243 257 train images, ≈ 3 GB as float32).
    """
    r = data_root(root)
    readers = {
        "mnist": lambda: read_mnist_like(r, "mnist", download, checksums),
        "cifar10": lambda: _cifar10_arrays(r, download, checksums),
        "svhn": lambda: _svhn_arrays(r, download, checksums),
        "fashion-mnist": lambda: read_mnist_like(r, "fashion-mnist", download, checksums),
    }
    if max_per_part is not None and (
        isinstance(max_per_part, bool) or not isinstance(max_per_part, int) or max_per_part < 1
    ):
        raise ValueError(
            f"multitask: max_per_part must be a positive integer or None, got {max_per_part!r}"
        )
    parts = []
    for i, name in enumerate(MULTITASK_PARTS):
        xtr, ytr, xte, yte = readers[name]()
        k = max_per_part
        parts.append((to_rgb32(xtr[:k]), ytr[:k] + 10 * i, to_rgb32(xte[:k]), yte[:k] + 10 * i))
    arrays = tuple(np.concatenate([p[j] for p in parts]) for j in range(4))
    return _splits("multitask", arrays, 40)  # type: ignore[arg-type]
