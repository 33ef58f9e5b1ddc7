"""ILSVRC-2012 (ImageNet) from its class-folder layout, decoded with Pillow in DataLoader workers.

Layout, in ``root`` or in ``<data root>/imagenet`` (``$NORMLAB_DATA``, see :func:`data_root`)::

    train/n01440764/n01440764_10026.JPEG      one folder per class (WordNet id), 1000 of them
    val/n01440764/ILSVRC2012_val_00000293.JPEG

The classes are the sorted folder names of ``train/``; label ``i`` is the i-th of them, and
``val/`` must have the same folders. The standard augmentation: for training a random crop of
8–100 % of the area with aspect ratio in [3/4, 4/3] (Szegedy et al. 2015, Sec. 6), resized to
224×224, and a horizontal flip with probability 1/2; for evaluation the short side is resized to
256 and the centre 224×224 is cut out. Then pixels are scaled to [0, 1] and
standardized with the usual ImageNet channel statistics (:data:`IMAGENET_MEAN`, ``IMAGENET_STD``).

The random draws for sample ``i`` in epoch ``e`` come from a generator seeded by ``(seed, e, i)``,
so a sample's crop depends on nothing else: not on the worker that decodes it, not on the batch,
not on whether the run was resumed. :class:`ResumableSampler` shards an epoch's permutation over
DDP ranks (as ``DistributedSampler`` does) and starts mid-epoch; :class:`ResumableLoader` counts
the samples it has delivered, so its ``state_dict()`` after a batch resumes at the next one::

    data = imagenet_loaders(root, batch_size=256, workers=8, seed=0, rank=rank, world_size=world)
    data.train.load_state_dict(checkpoint["data"])        # on resume
    for epoch in range(start_epoch, epochs):
        data.train.set_epoch(epoch)                       # keeps the position on a resumed epoch
        for x, y in data.train:
            ...
            checkpoint["data"] = data.train.state_dict()
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from normlab.data.files import MissingFileError, data_root

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "ImageNetData",
    "ResumableLoader",
    "ResumableSampler",
    "center_crop_box",
    "eval_transform",
    "imagenet_dir",
    "imagenet_loaders",
    "random_resized_crop_box",
    "sample_rng",
    "scan_split",
    "short_side_size",
    "to_tensor",
    "train_transform",
]

#: Per-channel (R, G, B) mean and standard deviation of ImageNet pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_LAYOUT = (
    "expected the ILSVRC-2012 class-folder layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
    "(one folder per class, the same folders in both)"
)


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ the tree
def imagenet_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The ImageNet folder: ``root`` itself when it holds ``train/``, else ``root/imagenet``;
    ``root=None`` means the data root (``$NORMLAB_DATA`` or ``~/.normlab/data``).

    Raises :class:`normlab.data.MissingFileError` naming both places and the expected layout.

    Example::

        imagenet_dir("/datasets/ILSVRC2012")   # -> Path("/datasets/ILSVRC2012") if it has train/
    """
    base = data_root(root)
    for candidate in (base, base / "imagenet"):
        if (candidate / "train").is_dir():
            return candidate
    raise MissingFileError(
        f"ImageNet not found: neither {base / 'train'} nor {base / 'imagenet' / 'train'} is a "
        f"directory; {_LAYOUT}. Pass root=<folder> or set $NORMLAB_DATA."
    )


def _images(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        names = [
            e.name
            for e in it
            if e.is_file() and not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]  # fmt: skip
    return sorted(names)


def _names(items: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return shown + (f", ... ({len(items)} in all)" if len(items) > most else "")


def scan_split(
    split_dir: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes and ``(path, label)`` samples of one split folder.

    Classes are the sorted sub-folder names; when ``classes`` is given (those of ``train/``) the
    folder must have exactly these, else ``ValueError`` names the missing and the extra ones.
    Files are ``.JPEG``/``.jpg``/``.png`` in any case, sorted by name within a class; a class
    folder without images is an error (an interrupted extraction, usually).

    Example::

        classes, train = scan_split(imagenet_dir() / "train")
        _, val = scan_split(imagenet_dir() / "val", classes)   # the same class order
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise MissingFileError(f"ImageNet split folder {split_dir} not found; {_LAYOUT}")
    with os.scandir(split_dir) as it:
        found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not found:
        loose = _images(split_dir)
        hint = (
            f" It holds {len(loose)} images directly: sort them into one folder per class first "
            "(the validation labels come with the ILSVRC-2012 devkit)."
            if loose
            else ""
        )
        raise ValueError(f"{split_dir} has no class folders; {_LAYOUT}.{hint}")
    if classes is not None and found != list(classes):
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise ValueError(
            f"{split_dir} has other classes than train/: missing {_names(missing) or '(none)'}; "
            f"extra {_names(extra) or '(none)'}"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, wnid in enumerate(found):
        files = _images(split_dir / wnid)
        if not files:
            empty.append(wnid)
        samples += [(os.path.join(split_dir, wnid, f), label) for f in files]
    if empty:
        raise ValueError(f"{split_dir}: class folders without images: {_names(empty)}")
    return found, samples


# ---------------------------------------------------------------------------------- transforms
def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s random draws in ``epoch`` (non-negative integers).

    Example::

        >>> float(sample_rng(0, 1, 2).random()) == float(sample_rng(0, 1, 2).random())
        True
    """
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    r"""A random crop ``(top, left, h, w)`` of an ``height × width`` image (Szegedy et al., Sec. 6).

    The crop's area is ``U(scale) · height · width`` and its aspect ratio ``w / h`` is
    ``exp(U(log ratio))`` (log-uniform, so ``r`` and ``1/r`` are equally likely); its position is
    uniform. A draw that does not fit is redrawn, up to ``attempts`` times; then the crop is the
    centred largest one with the aspect ratio clamped into ``ratio``.

    Example::

        >>> random_resized_crop_box(375, 500, sample_rng(0, 0, 0))
        (35, 302, 171, 129)
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, max(1, round(width / ratio[0])))
    elif aspect > ratio[1]:
        w, h = min(width, max(1, round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the short side to ``size`` and the long side in proportion
    (rounded down).

    Example::

        >>> short_side_size(375, 500, 256)
        (256, 341)
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``(top, left, size, size)`` of the centred square crop (offsets rounded down).

    Example::

        >>> center_crop_box(256, 341, 224)
        (16, 58, 224, 224)
    """
    return (height - size) // 2, (width - size) // 2, size, size


def train_transform(img: Image.Image, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """Random-resized crop (:func:`random_resized_crop_box`) to ``size × size`` (bilinear), then
    a horizontal flip with probability 1/2; the box is drawn first, then the flip.

    Example::

        >>> train_transform(Image.new("RGB", (500, 375)), sample_rng(0, 0, 0)).size
        (224, 224)
    """
    top, left, h, w = random_resized_crop_box(img.height, img.width, rng)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def eval_transform(img: Image.Image, resize: int = 256, size: int = 224) -> Image.Image:
    """Resize the short side to ``resize`` (bilinear), then cut out the centre ``size × size``.

    Example::

        >>> eval_transform(Image.new("RGB", (500, 375))).size
        (224, 224)
    """
    h, w = short_side_size(img.height, img.width, resize)
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    top, left, _, _ = center_crop_box(h, w, size)
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, normalize: bool = True) -> Tensor:
    """``(3, H, W)`` tensor of an RGB image: float32 ``(x / 255 − mean) / std`` with the ImageNet
    statistics, or the raw ``uint8`` pixels when ``normalize=False`` (standardize on the GPU).

    Example::

        >>> to_tensor(Image.new("RGB", (4, 3), (255, 0, 0)), normalize=False)[:, 0, 0]
        tensor([255,   0,   0], dtype=torch.uint8)
    """
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if not normalize:
        return x
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.to(torch.float32) / 255 - mean) / std


# ------------------------------------------------------------------------------------- dataset
class ImageFolder(Dataset):
    """A class-folder image dataset (an ImageNet split), decoded with Pillow.

    Args:
        split_dir: the split folder (``<imagenet>/train`` or ``<imagenet>/val``).
        classes: the class order to require (``train/``'s for ``val/``); default: its own.
        train: training augmentation (:func:`train_transform`) instead of :func:`eval_transform`.
        seed: seed of the per-sample draws, with the epoch (:meth:`set_epoch`) and the index.
        size, resize: output side, and the short side before the centre crop (evaluation).
        normalize: standardized float32 (default) or raw ``uint8`` pixels (:func:`to_tensor`).

    Item ``i``: ``(image (3, size, size), label)``; images are converted to RGB (grey and CMYK
    files occur in ImageNet).

    Example::

        train = ImageFolder(imagenet_dir() / "train", train=True, seed=0)
        train.set_epoch(3)
        x, y = train[0]                        # x: (3, 224, 224) float32, y: int
    """

    def __init__(
        self,
        split_dir: str | os.PathLike[str],
        classes: Sequence[str] | None = None,
        train: bool = False,
        seed: int = 0,
        size: int = 224,
        resize: int = 256,
        normalize: bool = True,
    ) -> None:
        self.seed = _check_int(seed, "seed", 0)
        self.size = _check_int(size, "size", 1)
        self.resize = _check_int(resize, "resize", 1)
        if not train and resize < size:
            raise ValueError(f"resize must be >= size for the centre crop, got {resize} < {size}")
        self.root = Path(split_dir)
        self.classes, samples = scan_split(split_dir, classes)
        # One bytes array instead of a list of tuples: worker processes share it without
        # copy-on-write growth (a list's reference counts would touch every page).
        self._files = np.array(
            [os.fsencode(os.path.relpath(p, self.root)) for p, _ in samples], dtype=bytes
        )
        self.targets = np.array([label for _, label in samples], dtype=np.int64)
        self.train, self.normalize, self.epoch = bool(train), bool(normalize), 0

    def path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.root / os.fsdecode(self._files[index])

    def set_epoch(self, epoch: int) -> None:
        """Use the random draws of ``epoch`` (training augmentation only)."""
        self.epoch = _check_int(epoch, "epoch", 0)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.path(index)) as f:
            img = f.convert("RGB")
        if self.train:
            img = train_transform(img, sample_rng(self.seed, self.epoch, int(index)), self.size)
        else:
            img = eval_transform(img, self.resize, self.size)
        return to_tensor(img, self.normalize), int(self.targets[index])


# ------------------------------------------------------------------------------------- sampler
class ResumableSampler(Sampler[int]):
    """Epoch-wise shuffled indices, sharded over DDP ranks, that can start mid-epoch.

    Each epoch permutes ``range(n)`` with a generator seeded by ``seed + epoch`` (the same on every
    rank), pads it by repetition to a multiple of ``world_size`` and gives rank ``r`` the entries
    ``r, r + world_size, ...``: disjoint, equal-size shares covering every index, as
    ``torch.utils.data.DistributedSampler``. ``pad=False`` leaves out the padding (shares differ
    by at most one; every index exactly once, for evaluation); ``shuffle=False`` keeps the order.

    ``position`` is how many of this rank's indices of the epoch have been consumed; iteration
    yields the rest. :class:`ResumableLoader` advances it as it delivers batches.
    ``state_dict()`` = ``{"epoch", "position", ...}``; :meth:`load_state_dict` checks that ``n``,
    ``seed``, ``world_size``, ``shuffle`` and ``pad`` match.

    Example::

        >>> s = ResumableSampler(10, seed=0, rank=1, world_size=2)
        >>> s.set_epoch(3); s.advance(2); len(list(s))
        3
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad: bool = True,
    ) -> None:
        self.n = _check_int(n, "n", 1)
        self.seed = _check_int(seed, "seed", 0)
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.shuffle, self.pad = bool(shuffle), bool(pad)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """This rank's share of one epoch (the full share, whatever ``position`` is)."""
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            total = len(self) * self.world_size
            order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position :])

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` at position 0; the current epoch keeps its position (a resumed run
        calls ``set_epoch`` with the epoch it resumes in)."""
        if _check_int(epoch, "epoch", 0) != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, count: int) -> None:
        """Mark ``count`` more indices of the epoch as consumed."""
        _check_int(count, "count", 0)
        if self.position + count > len(self):
            raise ValueError(
                f"cannot advance by {count}: position {self.position} + {count} exceeds this "
                f"rank's {len(self)} indices of the epoch"
            )
        self.position += count

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "seed": self.seed,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "pad": self.pad,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("n", "seed", "world_size", "shuffle", "pad"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved sampler has {key}={state[key]!r}, this one "
                    f"{key}={getattr(self, key)!r}; the position within the epoch would not mean "
                    "the same samples"
                )
        epoch = _check_int(state["epoch"], "state['epoch']", 0)
        position = _check_int(state["position"], "state['position']", 0)
        if position > len(self):
            raise ValueError(
                f"state['position']={position} exceeds the epoch's {len(self)} indices"
            )
        self.epoch, self.position = epoch, position


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that advances the sampler by each batch
    it delivers and carries the epoch to the dataset (``dataset.set_epoch``), so that
    ``state_dict()`` taken after a batch resumes exactly at the next one.

    An epoch that has been iterated to its end continues with the next epoch on the next pass,
    also without ``set_epoch``. Workers are not persistent: they are started per pass and see the
    dataset's current epoch.

    Example::

        loader = ResumableLoader(train, ResumableSampler(len(train)), batch_size=256, num_workers=8)
        loader.load_state_dict(checkpoint["data"])          # resume mid-epoch
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        if kwargs.get("persistent_workers"):
            raise ValueError("ResumableLoader does not support persistent_workers=True")
        super().__init__(dataset, sampler=sampler, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._sync_epoch()

    def _sync_epoch(self) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.sampler.epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._sync_epoch()

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if sampler.position >= len(sampler):
            sampler.set_epoch(sampler.epoch + 1)
        self._sync_epoch()
        for batch in super().__iter__():
            sampler.advance(min(self.batch_size, len(sampler) - sampler.position))
            yield batch
        sampler.position = len(sampler)  # a dropped last batch is part of the finished epoch


# ----------------------------------------------------------------------------------- loaders
@dataclass
class ImageNetData:
    """The two loaders and the class order (WordNet ids) of :func:`imagenet_loaders`."""

    train: ResumableLoader
    val: ResumableLoader
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def imagenet_loaders(
    root: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    workers: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int | None = None,
    size: int = 224,
    resize: int = 256,
    drop_last: bool = True,
    pin_memory: bool = False,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> ImageNetData:
    """Training and validation loaders for ImageNet in ``root`` (see :func:`imagenet_dir`).

    Args:
        root: the ImageNet folder or the data root; default ``$NORMLAB_DATA``.
        batch_size: samples per batch and process; ``eval_batch_size`` for ``val`` (default the
            same).
        workers: DataLoader worker processes decoding the images (0 = in the main process).
        seed: seed of the epoch permutations and of the per-sample augmentation draws.
        rank, world_size: this process's place in a DDP job; each rank gets its share of every
            epoch (training: padded to equal shares; validation: every image exactly once).
        size, resize: crop side, and the short side before the centre crop.
        drop_last: drop the last incomplete training batch of each epoch.
        pin_memory, normalize: passed to the DataLoaders and to :class:`ImageFolder`.
        generator: what the DataLoaders draw their worker base seeds from at the start of each
            pass (default: torch's global generator). The samples do not depend on it; pass one
            so that starting a pass leaves the global generator's state alone.

    Batches are ``(x, y)``: ``x`` ``(B, 3, size, size)`` float32 (``uint8`` when
    ``normalize=False``), ``y`` ``(B,)`` int64.

    Example::

        data = imagenet_loaders("/datasets/ILSVRC2012", batch_size=64, workers=8)
        model = normlab.models.create("resnet50", data.num_classes, norm="gn", conv="ws")
    """
    _check_int(batch_size, "batch_size", 1)
    _check_int(workers, "workers", 0)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_int(eval_batch_size, "eval_batch_size", 1)
    base = imagenet_dir(root)
    common = dict(seed=seed, size=size, resize=resize, normalize=normalize)
    train = ImageFolder(base / "train", train=True, **common)
    val = ImageFolder(base / "val", classes=train.classes, **common)
    loader = dict(num_workers=workers, pin_memory=pin_memory, generator=generator)
    train_sampler = ResumableSampler(len(train), seed, rank, world_size)
    val_sampler = ResumableSampler(len(val), seed, rank, world_size, shuffle=False, pad=False)
    return ImageNetData(
        train=ResumableLoader(
            train, train_sampler, batch_size=batch_size, drop_last=drop_last, **loader
        ),
        val=ResumableLoader(val, val_sampler, batch_size=eval_batch_size, **loader),
        classes=list(train.classes),
    )
