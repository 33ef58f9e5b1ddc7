"""The dataset container, the dataset registry and :func:`load_dataset`.

Every loader returns a :class:`DataSplits`: float32 ``(N, C, H, W)`` images standardized per
channel with the *train* split's mean and standard deviation, int64 labels, and the statistics used
(so a user can standardize new images the same way, or undo it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DataSplits",
    "available_datasets",
    "channel_stats",
    "load_dataset",
    "make_splits",
    "register_dataset",
    "standardize",
]


@dataclass
class DataSplits:
    """A dataset as tensors: standardized images and labels of a train and a test split.

    Attributes:
        name: the dataset name it was loaded under.
        train_x, test_x: ``(N, C, H, W)`` float32, standardized per channel with ``mean``/``std``.
        train_y, test_y: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes, in_channels, image_size: what a model needs to be built for the data.
        mean, std: ``(C,)`` per-channel statistics of the train split before standardization.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: Tensor
    std: Tensor

    def __repr__(self) -> str:
        return (
            f"DataSplits(name={self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, num_classes={self.num_classes})"
        )

    def to(self, device: torch.device | str) -> DataSplits:
        """A copy with every tensor moved to ``device``."""
        return DataSplits(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
            self.in_channels,
            self.image_size,
            self.mean.to(device),
            self.std.to(device),
        )


def channel_stats(x: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, *)`` data.

    The standard deviation is floored at ``eps`` so a constant channel standardizes to 0, not NaN.
    """
    if x.dim() < 2:
        raise ValueError(f"channel_stats: expected (N, C, *) data, got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    xf = x.double()
    mean = xf.mean(dim=dims)
    std = xf.var(dim=dims, correction=0).sqrt().clamp_min(eps)
    return mean.to(torch.float32), std.to(torch.float32)


def standardize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` per channel for ``(N, C, *)`` ``x`` and ``(C,)`` ``mean``/``std``.

    A batched tensor op: runs on ``x``'s device (``mean``/``std`` are moved there).

    Example::

        >>> standardize(torch.tensor([[2.0], [4.0]]), torch.tensor([3.0]), torch.tensor([0.5]))
        tensor([[-2.],
                [ 2.]])
    """
    if x.dim() < 2 or x.shape[1] != mean.numel() or mean.shape != std.shape:
        raise ValueError(
            f"standardize: x of shape {tuple(x.shape)} needs (C,) mean/std with C = x.shape[1], "
            f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}"
        )
    view = (1, -1) + (1,) * (x.dim() - 2)
    m = mean.to(device=x.device, dtype=x.dtype).reshape(view)
    s = std.to(device=x.device, dtype=x.dtype).reshape(view)
    return (x - m) / s


def make_splits(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
) -> DataSplits:
    """Standardize raw float images with the train split's per-channel statistics and pack them."""
    train_x = train_x.to(torch.float32)
    test_x = test_x.to(torch.float32)
    if train_x.dim() != 4 or test_x.dim() != 4 or train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"{name}: expected (N, C, H, W) train/test images of the same shape, got "
            f"{tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    mean, std = channel_stats(train_x)
    return DataSplits(
        name=name,
        train_x=standardize(train_x, mean, std).contiguous(),
        train_y=train_y.to(torch.int64).contiguous(),
        test_x=standardize(test_x, mean, std).contiguous(),
        test_y=test_y.to(torch.int64).contiguous(),
        num_classes=int(num_classes),
        in_channels=int(train_x.shape[1]),
        image_size=(int(train_x.shape[2]), int(train_x.shape[3])),
        mean=mean,
        std=std,
    )


Loader = Callable[..., DataSplits]
_DATASETS: dict[str, tuple[Loader, str]] = {}


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader ``fn(root, download, seed, **kwargs) -> DataSplits``."""

    def deco(fn: Loader) -> Loader:
        _DATASETS[name] = (fn, description)
        return fn

    return deco


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, in registration order."""
    return list(_DATASETS)


def dataset_descriptions() -> dict[str, str]:
    """Names mapped to one-line descriptions."""
    return {k: d for k, (_, d) in _DATASETS.items()}


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    **kwargs: object,
) -> DataSplits:
    """Load dataset ``name`` as a :class:`DataSplits`.

    ``digits``, ``digits-multidomain`` and ``synthetic`` need no files. The others read their
    official distribution files from ``root`` (default ``$NORMLAB_DATA`` or ``~/.normlab/data``);
    ``download=True`` fetches missing files first (checksum-verified). ``seed`` fixes the
    train/test split where the dataset has no official one. ``kwargs`` go to the loader.

    Example::

        >>> d = load_dataset("digits")
        >>> d.train_x.shape, d.test_x.shape, d.num_classes
        (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]), 10)
        >>> [round(float(v), 4) + 0.0 for v in d.train_x.mean((0, 2, 3))]  # standardized
        [0.0]
    """
    if not isinstance(name, str) or name.lower() not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_DATASETS)}")
    fn, _ = _DATASETS[name.lower()]
    return fn(root=root, download=download, seed=seed, **kwargs)
