"""Official dataset files: where they live, their checksums, verification and an opt-in download.

Every file a real-format loader reads is listed in :data:`FILES` by its path relative to the data
root, with the URL it comes from and its known MD5. Loaders call :func:`require`, which

* raises :class:`MissingFileError` (a ``FileNotFoundError``) naming the file, where to put it and
  where to download it, when it is absent and ``download=False``;
* downloads it (``urllib``, to a temporary file, checksum-verified, then an atomic rename) when
  ``download=True`` — this never happens implicitly, at import time or in the tests;
* verifies its checksum and raises :class:`ChecksumError` (a ``ValueError``) on a mismatch.

``checksums`` arguments (a mapping from the relative path to an MD5 or SHA-256 hex digest) add to
or override the table, so a test can write a tiny file in the official format, register its
checksum, load it, then corrupt a byte and watch it being rejected.

The MD5 values are those published with the datasets (and mirrored by the common loaders).
normlab's tests run offline, so they check the verification on files they write themselves, not
the published digests against downloaded files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FILES",
    "ChecksumError",
    "MissingFileError",
    "RemoteFile",
    "data_root",
    "download_file",
    "file_digest",
    "require",
    "verify_file",
]


@dataclass(frozen=True)
class RemoteFile:
    """An official file: ``url`` to fetch it from, ``md5`` of its content, and — for a member of
    an archive — the ``archive`` (a key of :data:`FILES`) that contains it."""

    url: str | None
    md5: str
    archive: str | None = None


_CIFAR = "https://www.cs.toronto.edu/~kriz/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"

#: Relative path (under the data root) -> official file.
FILES: dict[str, RemoteFile] = {
    # CIFAR-10: one archive, python pickle batches inside.
    "cifar-10-python.tar.gz": RemoteFile(_CIFAR + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar-10-batches-py/data_batch_1": RemoteFile(None, "c99cafc152244af753f735de768cd75f", "cifar-10-python.tar.gz"),
    "cifar-10-batches-py/data_batch_2": RemoteFile(None, "d4bba439e000b95fd0a9bffe97cbabec", "cifar-10-python.tar.gz"),
    "cifar-10-batches-py/data_batch_3": RemoteFile(None, "54ebc095f3ab1f0389bbae665268c751", "cifar-10-python.tar.gz"),
    "cifar-10-batches-py/data_batch_4": RemoteFile(None, "634d18415352ddfa80567beed471001a", "cifar-10-python.tar.gz"),
    "cifar-10-batches-py/data_batch_5": RemoteFile(None, "482c414d41f54cd18b22e5b47cb7c3cb", "cifar-10-python.tar.gz"),
    "cifar-10-batches-py/test_batch": RemoteFile(None, "40351d587109b95175f43aff81a1287e", "cifar-10-python.tar.gz"),
    # CIFAR-100.
    "cifar-100-python.tar.gz": RemoteFile(_CIFAR + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    "cifar-100-python/train": RemoteFile(None, "16019d7e3df5f24257cddd939b257f8d", "cifar-100-python.tar.gz"),
    "cifar-100-python/test": RemoteFile(None, "f0ef6b0ae62326f3e7ffdfab6717acfc", "cifar-100-python.tar.gz"),
    # MNIST (IDX, gzipped).
    "mnist/train-images-idx3-ubyte.gz": RemoteFile(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "mnist/train-labels-idx1-ubyte.gz": RemoteFile(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "mnist/t10k-images-idx3-ubyte.gz": RemoteFile(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "mnist/t10k-labels-idx1-ubyte.gz": RemoteFile(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    # Fashion-MNIST (IDX, gzipped, same names as MNIST).
    "fashion-mnist/train-images-idx3-ubyte.gz": RemoteFile(_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "fashion-mnist/train-labels-idx1-ubyte.gz": RemoteFile(_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "fashion-mnist/t10k-images-idx3-ubyte.gz": RemoteFile(_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": RemoteFile(_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    # SVHN (MATLAB .mat, cropped digits).
    "svhn/train_32x32.mat": RemoteFile(_SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "svhn/test_32x32.mat": RemoteFile(_SVHN + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}  # fmt: skip


class ChecksumError(ValueError):
    """A file's content does not match its expected checksum (corrupt or not the official file)."""


class MissingFileError(FileNotFoundError):
    """A dataset file is absent; the message says which, where to put it and where to get it."""


def data_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else ``$NORMLAB_DATA``, else ``~/.normlab/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("NORMLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".normlab" / "data"


def file_digest(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
    """Hex digest of a file's content, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _algorithm(expected: str) -> str:
    n = len(expected)
    if n == 32:
        return "md5"
    if n == 64:
        return "sha256"
    raise ValueError(
        f"a checksum must be an MD5 (32 hex digits) or SHA-256 (64 hex digits), got {expected!r}"
    )


def verify_file(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`ChecksumError` unless the file's MD5/SHA-256 (by digest length) is
    ``expected``."""
    expected = expected.strip().lower()
    actual = file_digest(path, _algorithm(expected))
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {os.fspath(path)}: expected {_algorithm(expected)} {expected}, "
            f"got {actual}. The file is corrupt or not the official one; delete it and download it "
            "again (download=True), or pass checksums={...} if you deliberately use another file."
        )


def download_file(url: str, dest: str | os.PathLike[str], expected: str | None) -> Path:
    """Fetch ``url`` to ``dest``: into a temporary file in the same directory, verify ``expected``
    (if given), then atomically rename. On any failure ``dest`` is left untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        if expected is not None:
            verify_file(tmp, expected)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _extract(archive: Path, root: Path) -> None:
    """Extract a (checksum-verified) tar archive under ``root``, refusing links, devices and
    members that would land outside ``root``. Uses tarfile's "data" filter where Python has it
    (3.11.4+) and the same checks by hand otherwise."""
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
            return
        base = root.resolve()
        for member in tar.getmembers():
            target = (base / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(base):
                raise ValueError(f"{archive}: refusing unsafe archive member {member.name!r}")
        tar.extractall(root)  # every member was checked above


def _expected(rel: str, checksums: Mapping[str, str] | None) -> str | None:
    if checksums is not None and rel in checksums:
        return checksums[rel]
    entry = FILES.get(rel)
    return entry.md5 if entry is not None else None


def require(
    root: Path,
    rel: str,
    download: bool = False,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """The verified path of dataset file ``rel`` under ``root`` (see the module docstring)."""
    path = root / rel
    entry = FILES.get(rel)
    expected = _expected(rel, checksums)
    if not path.is_file():
        archive = entry.archive if entry is not None else None
        if archive is not None and (download or (root / archive).is_file()):
            arch_path = require(root, archive, download, checksums)
            _extract(arch_path, root)
        elif download and entry is not None and entry.url is not None:
            download_file(entry.url, path, expected)
        if not path.is_file():
            source = FILES.get(archive) if archive else entry
            url = source.url if source is not None else None
            what = (
                f"download {url} and extract it into {root}"
                if archive
                else (f"download {url} and put it there" if url else "put it there")
            )
            raise MissingFileError(
                f"dataset file {rel!r} not found: expected it at {path}. Either {what}, or call "
                f"load_dataset(..., root={os.fspath(root)!r}, download=True) on a machine with a network."
            )
    if expected is None:
        raise ChecksumError(
            f"no known checksum for {rel!r}; pass checksums={{{rel!r}: '<md5 or sha256>'}}"
        )
    verify_file(path, expected)
    return path
