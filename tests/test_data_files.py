"""Real-format loaders on tiny files written here in each official format (no network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from normlab.data import ChecksumError, MissingFileError, download_file, load_dataset


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def register(root: Path, *rels: str) -> dict[str, str]:
    return {rel: md5(root / rel) for rel in rels}


def corrupt(path: Path, offset: int = -1) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def raw(d, x: torch.Tensor) -> np.ndarray:
    """Undo the loader's standardization: pixels back in [0, 1]."""
    return (x * d.std.view(1, -1, 1, 1) + d.mean.view(1, -1, 1, 1)).numpy()


# ------------------------------------------------------------------------------------ CIFAR
def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": data,
        b"filenames": [b"a.png"] * len(labels),
    }
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [v // 5 for v in labels]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def make_cifar10(
    root: Path, n: int = 3, seed: int = 0
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        write_cifar_batch(root / "cifar-10-batches-py" / name, data, labels, b"labels")
        arrays[name] = (data, np.array(labels))
    return register(root, *[f"cifar-10-batches-py/{n_}" for n_ in names]), arrays


def test_cifar10_parses_official_pickle_layout(tmp_path):
    sums, arrays = make_cifar10(tmp_path)
    d = load_dataset("cifar10", root=tmp_path, checksums=sums)
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.num_classes == 10 and d.in_channels == 3
    train_labels = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(d.train_y.numpy(), train_labels)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 image.
    data0 = arrays["data_batch_1"][0][0].astype(np.float64) / 255
    x0 = raw(d, d.train_x)[0]
    assert np.isclose(x0[0, 0, 0], data0[0], atol=1e-5)  # red (0, 0)
    assert np.isclose(x0[1, 1, 1], data0[1024 + 33], atol=1e-5)  # green (1, 1)
    assert np.isclose(x0[2, 31, 30], data0[2048 + 31 * 32 + 30], atol=1e-5)  # blue (31, 30)
    np.testing.assert_allclose(
        raw(d, d.test_x), arrays["test_batch"][0].reshape(3, 3, 32, 32) / 255, atol=1e-5
    )
    # Standardized with the train split's per-channel statistics.
    assert torch.allclose(d.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_cifar10_corrupt_byte_is_rejected_by_checksum(tmp_path):
    sums, _ = make_cifar10(tmp_path)
    corrupt(tmp_path / "cifar-10-batches-py" / "data_batch_3", 100)
    with pytest.raises(ChecksumError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path, checksums=sums)


def test_cifar10_verifies_official_checksums_by_default(tmp_path):
    make_cifar10(tmp_path)  # tiny files are not the official ones
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_missing_file_names_file_url_and_place(tmp_path):
    sums, _ = make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(MissingFileError) as e:
        load_dataset("cifar10", root=tmp_path, checksums=sums)
    msg = str(e.value)
    assert "cifar-10-batches-py/test_batch" in msg and str(tmp_path) in msg
    assert "cifar-10-python.tar.gz" in msg and "https://" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_cifar10_is_extracted_from_its_archive(tmp_path):
    src = tmp_path / "src"
    sums, arrays = make_cifar10(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sums["cifar-10-python.tar.gz"] = md5(root / "cifar-10-python.tar.gz")
    d = load_dataset("cifar10", root=root, checksums=sums)
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    np.testing.assert_array_equal(d.test_y.numpy(), arrays["test_batch"][1])


def test_cifar_structurally_corrupt_file_is_rejected(tmp_path):
    sums, _ = make_cifar10(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    p.write_bytes(b"this is not a pickle at all")
    sums["cifar-10-batches-py/data_batch_2"] = md5(p)  # checksum "right", content wrong
    with pytest.raises(ValueError, match=r"corrupt CIFAR batch file .*data_batch_2"):
        load_dataset("cifar10", root=tmp_path, checksums=sums)
    # Right pickle, wrong shape.
    write_cifar_batch(p, np.zeros((2, 100), np.uint8), [0, 1], b"labels")
    sums["cifar-10-batches-py/data_batch_2"] = md5(p)
    with pytest.raises(ValueError, match="shape"):
        load_dataset("cifar10", root=tmp_path, checksums=sums)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a global the unpickler must refuse


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path):
    sums, _ = make_cifar10(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(p, "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    sums["cifar-10-batches-py/data_batch_1"] = md5(p)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_dataset("cifar10", root=tmp_path, checksums=sums)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    tr = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    te = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    write_cifar_batch(tmp_path / "cifar-100-python" / "train", tr, [0, 99, 42, 7], b"fine_labels")
    write_cifar_batch(tmp_path / "cifar-100-python" / "test", te, [5, 98], b"fine_labels")
    sums = register(tmp_path, "cifar-100-python/train", "cifar-100-python/test")
    d = load_dataset("cifar100", root=tmp_path, checksums=sums)
    assert (
        d.num_classes == 100
        and d.train_y.tolist() == [0, 99, 42, 7]
        and d.test_y.tolist() == [5, 98]
    )
    np.testing.assert_allclose(raw(d, d.train_x), tr.reshape(4, 3, 32, 32) / 255, atol=1e-5)
    corrupt(tmp_path / "cifar-100-python" / "test")
    with pytest.raises(ChecksumError):
        load_dataset("cifar100", root=tmp_path, checksums=sums)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(MissingFileError, match="cifar-100-python/test"):
        load_dataset("cifar100", root=tmp_path, checksums=sums)


# -------------------------------------------------------------------------------------- IDX
def write_idx(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_mnist_like(root: Path, folder: str, n_train: int = 5, n_test: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(root / folder / f"{split}-labels-idx1-ubyte.gz", y)
        arrays[split] = (x, y)
    rels = [
        f"{folder}/{s}-{k}-ubyte.gz"
        for s in ("train", "t10k")
        for k in ("images-idx3", "labels-idx1")
    ]
    return register(root, *rels), arrays


@pytest.mark.parametrize("name,folder", [("mnist", "mnist"), ("fashion-mnist", "fashion-mnist")])
def test_idx_loaders(tmp_path, name, folder):
    sums, arrays = make_mnist_like(tmp_path, folder)
    d = load_dataset(name, root=tmp_path, checksums=sums)
    assert d.train_x.shape == (5, 1, 28, 28) and d.test_x.shape == (3, 1, 28, 28)
    assert d.in_channels == 1 and d.image_size == (28, 28)
    np.testing.assert_array_equal(d.train_y.numpy(), arrays["train"][1])
    np.testing.assert_allclose(raw(d, d.test_x)[:, 0], arrays["t10k"][0] / 255, atol=1e-5)
    # Corrupt a byte of the (gzipped) test images: the checksum rejects it.
    corrupt(tmp_path / folder / "t10k-images-idx3-ubyte.gz", 20)
    with pytest.raises(ChecksumError, match="t10k-images"):
        load_dataset(name, root=tmp_path, checksums=sums)
    # Missing: the error names the file, where it goes and where to get it.
    (tmp_path / folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingFileError) as e:
        load_dataset(name, root=tmp_path, checksums=sums)
    assert f"{folder}/train-labels-idx1-ubyte.gz" in str(e.value) and str(tmp_path) in str(e.value)
    assert "http" in str(e.value)


def test_idx_structural_errors(tmp_path):
    sums, _ = make_mnist_like(tmp_path, "mnist")
    p = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:  # bad magic number
        f.write(bytes([1, 2, 3, 4]) + b"\0" * 20)
    sums["mnist/train-images-idx3-ubyte.gz"] = md5(p)
    with pytest.raises(ValueError, match="magic"):
        load_dataset("mnist", root=tmp_path, checksums=sums)
    with gzip.open(p, "wb") as f:  # truncated data
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"\0" * 100)
    sums["mnist/train-images-idx3-ubyte.gz"] = md5(p)
    with pytest.raises(ValueError, match="bytes"):
        load_dataset("mnist", root=tmp_path, checksums=sums)
    p.write_bytes(b"not gzip")
    sums["mnist/train-images-idx3-ubyte.gz"] = md5(p)
    with pytest.raises(ValueError, match="gzip"):
        load_dataset("mnist", root=tmp_path, checksums=sums)


# ------------------------------------------------------------------------------------- SVHN
def make_svhn(root: Path, n_train: int = 4, n_test: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    (root / "svhn").mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # the digit 0 is stored as label 10
        scipy.io.savemat(root / "svhn" / f"{split}_32x32.mat", {"X": X, "y": y})
        arrays[split] = (X, y)
    return register(root, "svhn/train_32x32.mat", "svhn/test_32x32.mat"), arrays


def test_svhn_mat_loader(tmp_path):
    sums, arrays = make_svhn(tmp_path)
    d = load_dataset("svhn", root=tmp_path, checksums=sums)
    X, y = arrays["train"]
    assert d.train_x.shape == (4, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert d.train_y[0].item() == 0
    np.testing.assert_array_equal(d.train_y.numpy(), y[:, 0] % 10)
    r = raw(d, d.train_x)
    assert np.isclose(
        r[2, 1, 5, 7], X[5, 7, 1, 2] / 255, atol=1e-5
    )  # X[h, w, c, n] -> (n, c, h, w)
    np.testing.assert_allclose(r, X.transpose(3, 2, 0, 1) / 255, atol=1e-5)
    corrupt(tmp_path / "svhn" / "test_32x32.mat", 300)
    with pytest.raises(ChecksumError, match="test_32x32"):
        load_dataset("svhn", root=tmp_path, checksums=sums)
    (tmp_path / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(MissingFileError, match=r"svhn/test_32x32\.mat"):
        load_dataset("svhn", root=tmp_path, checksums=sums)


def test_svhn_structural_error(tmp_path):
    sums, _ = make_svhn(tmp_path)
    p = tmp_path / "svhn" / "train_32x32.mat"
    scipy.io.savemat(p, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    sums["svhn/train_32x32.mat"] = md5(p)
    with pytest.raises(ValueError, match="corrupt SVHN"):
        load_dataset("svhn", root=tmp_path, checksums=sums)


# -------------------------------------------------------------------------------- multitask
def test_multitask_four_datasets_40_classes(tmp_path):
    s1, mn = make_mnist_like(tmp_path, "mnist", 5, 3, seed=1)
    s2, cf = make_cifar10(tmp_path, n=2, seed=2)
    s3, sv = make_svhn(tmp_path, 4, 2, seed=3)
    s4, fm = make_mnist_like(tmp_path, "fashion-mnist", 6, 3, seed=4)
    d = load_dataset("multitask", root=tmp_path, checksums={**s1, **s2, **s3, **s4})
    assert d.num_classes == 40 and d.in_channels == 3 and d.image_size == (32, 32)
    assert d.train_x.shape == (5 + 10 + 4 + 6, 3, 32, 32) and d.test_x.shape == (
        3 + 2 + 2 + 3,
        3,
        32,
        32,
    )
    # Label blocks in the order MNIST, CIFAR-10, SVHN, Fashion-MNIST.
    expected = np.concatenate(
        [
            mn["train"][1],
            np.concatenate([cf[f"data_batch_{i}"][1] for i in range(1, 6)]) + 10,
            sv["train"][1][:, 0] % 10 + 20,
            fm["train"][1] + 30,
        ]
    )
    np.testing.assert_array_equal(d.train_y.numpy(), expected)
    r = raw(d, d.train_x)
    # MNIST: grey repeated on 3 channels, 28x28 zero-padded by 2 pixels per side.
    for c in range(3):
        np.testing.assert_allclose(r[:5, c, 2:30, 2:30], mn["train"][0] / 255, atol=1e-5)
    assert np.allclose(r[:5, :, :2], 0, atol=1e-5) and np.allclose(r[:5, :, :, 30:], 0, atol=1e-5)
    # Fashion-MNIST block at the end, SVHN block before it.
    np.testing.assert_allclose(r[-6:, 1, 2:30, 2:30], fm["train"][0] / 255, atol=1e-5)
    np.testing.assert_allclose(r[15:19], sv["train"][0].transpose(3, 2, 0, 1) / 255, atol=1e-5)
    small = load_dataset(
        "multitask", root=tmp_path, checksums={**s1, **s2, **s3, **s4}, max_per_part=2
    )
    assert small.train_x.shape[0] == 8 and sorted(set((small.train_y // 10).tolist())) == [
        0,
        1,
        2,
        3,
    ]


def test_multitask_missing_part_is_named(tmp_path):
    s1, _ = make_mnist_like(tmp_path, "mnist")
    with pytest.raises(MissingFileError, match="cifar-10-batches-py"):
        load_dataset("multitask", root=tmp_path, checksums=s1)


# --------------------------------------------------------------------------------- download
def test_download_file_verifies_and_renames_atomically(tmp_path):
    src = tmp_path / "served.bin"
    src.write_bytes(b"payload" * 100)
    dest = tmp_path / "out" / "file.bin"
    download_file(src.as_uri(), dest, md5(src))  # a local file:// URL: no network involved
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(ChecksumError):
        download_file(src.as_uri(), bad, "0" * 32)
    assert not bad.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]  # no .part left
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    download_file(src.as_uri(), tmp_path / "out" / "sha.bin", sha)
    assert (tmp_path / "out" / "sha.bin").is_file()


def test_download_true_fetches_missing_files_into_the_default_root(tmp_path, monkeypatch):
    # load_dataset(..., download=True) end to end, with file:// URLs standing in for the servers:
    # the missing files are fetched, checksum-verified and parsed; the root defaults to
    # $NORMLAB_DATA. A CIFAR archive is fetched and extracted the same way.
    from normlab.data import files

    served = tmp_path / "served"
    _, arrays = make_mnist_like(served, "mnist", seed=5)
    for rel in files.FILES:
        if rel.startswith("mnist/"):
            p = served / rel
            monkeypatch.setitem(files.FILES, rel, files.RemoteFile(p.as_uri(), md5(p)))
    root = tmp_path / "data-home"
    monkeypatch.setenv("NORMLAB_DATA", str(root))
    with pytest.raises(MissingFileError, match=str(root)):  # nothing fetched without download
        load_dataset("mnist")
    d = load_dataset("mnist", download=True)
    assert (root / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    np.testing.assert_array_equal(d.test_y.numpy(), arrays["t10k"][1])
    np.testing.assert_allclose(raw(d, d.train_x)[:, 0], arrays["train"][0] / 255, atol=1e-5)
    # a served file that does not match the official checksum is refused and not kept
    bad = served / "mnist" / "train-images-idx3-ubyte.gz"
    monkeypatch.setitem(
        files.FILES, "mnist/train-images-idx3-ubyte.gz", files.RemoteFile(bad.as_uri(), "0" * 32)
    )
    (root / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ChecksumError):
        load_dataset("mnist", download=True)
    assert not (root / "mnist" / "train-images-idx3-ubyte.gz").exists()

    # CIFAR-10: the archive is downloaded, then its members are extracted and verified
    sums, cifar = make_cifar10(tmp_path / "src")
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(
        files.FILES, "cifar-10-python.tar.gz", files.RemoteFile(archive.as_uri(), md5(archive))
    )
    c = load_dataset("cifar10", download=True, checksums=sums)
    assert (root / "cifar-10-python.tar.gz").is_file()
    np.testing.assert_array_equal(c.test_y.numpy(), cifar["test_batch"][1])


@pytest.mark.parametrize("has_filter", [True, False])
def test_extract_refuses_members_outside_root_with_and_without_tarfile_filter(
    tmp_path, monkeypatch, has_filter
):
    import io
    import tarfile

    from normlab.data.files import _extract

    if not has_filter:  # Python < 3.11.4 has no extraction filters: the manual checks must hold
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def make(path, name):
        with tarfile.open(path, "w:gz") as tar:
            data = b"hello"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    good, bad = tmp_path / "good.tar.gz", tmp_path / "bad.tar.gz"
    make(good, "sub/file.txt")
    make(bad, "../escape.txt")
    root = tmp_path / "root"
    root.mkdir()
    _extract(good, root)
    assert (root / "sub" / "file.txt").read_bytes() == b"hello"
    with pytest.raises(Exception, match=r"escape|outside|unsafe"):
        _extract(bad, root)
    assert not (tmp_path / "escape.txt").exists()
