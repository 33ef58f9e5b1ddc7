"""Streamed datasets in the training loop: ImageNet read from its JPEG folders.

The in-memory datasets are tensors on the device and the loop draws their order itself. A
streamed dataset (``data.name = "imagenet"``) is read by the DataLoaders of
:func:`normlab.data.imagenet_loaders`, whose worker processes (``data.workers``) decode and
augment the images; :class:`StreamedData` adapts them to the loop:

* ``train.batch_size`` stays the global batch. Each of N processes loads ``batch_size / N``
  samples of every micro-batch: its share of the epoch's permutation (rank r takes the entries
  r, r + N, ... of a permutation padded by repetition to a multiple of N, as
  ``DistributedSampler`` does), so together they load the micro-batch one process would load.
* The dataset augments (a random-resized crop and a flip while decoding); ``data.augment`` is
  not applied on top. The model is built for the dataset's classes and 3 input channels.
* The sampler's epoch and position within it are part of the checkpoint, and a sample's crop
  depends only on the seed, the epoch and its index, so a resumed run loads exactly the batches
  the uninterrupted one loads.
* Evaluation: each process its share of the validation images, not padded (every image once);
  the loop all-reduces the sums.
* ``data.kwargs`` may set the crop ``size``, the evaluation ``resize``, ``pin_memory`` (default:
  on for CUDA) and ``normalize`` (``false``: ``uint8`` batches, standardized on the device).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from normlab.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetData, imagenet_loaders, standardize
from normlab.data.imagenet import ResumableLoader
from normlab.train.config import Config, ConfigError

__all__ = ["StreamedData", "open_streamed"]


def open_streamed(config: Config, rank: int, world_size: int, device: torch.device) -> ImageNetData:
    """The ImageNet loaders ``config`` describes, for process ``rank`` of ``world_size``.

    ``train.batch_size`` (the global batch) must be a multiple of ``world_size``; the DataLoaders
    draw their worker seeds from a generator of their own, so starting a pass leaves torch's
    global generator (part of the exact-resume state) alone.
    """
    c = config
    bs = c.train.batch_size
    if bs % world_size:
        raise ConfigError(
            f"train.batch_size: the global batch of {bs} samples must be a multiple of the "
            f"{world_size} processes with data.name = {c.data.name!r} (each loads an equal share)"
        )
    kwargs: dict[str, Any] = {"pin_memory": device.type == "cuda", **c.data.kwargs}
    return imagenet_loaders(
        c.data.root or None,
        batch_size=bs // world_size,
        workers=c.data.workers,
        seed=c.run.seed,
        rank=rank,
        world_size=world_size,
        eval_batch_size=c.train.eval_batch_size,
        drop_last=c.train.drop_last,
        generator=torch.Generator().manual_seed(c.run.seed),
        **kwargs,
    )


class StreamedData:
    """The loop's view of :class:`~normlab.data.ImageNetData` (see the module docstring).

    Args:
        data: the loaders (:func:`open_streamed`, or built by the caller for this process).
        device: where batches go.
        world_size: the number of processes sharing each global micro-batch.
    """

    in_channels = 3

    def __init__(self, data: ImageNetData, device: torch.device, world_size: int) -> None:
        if not isinstance(data, ImageNetData):
            raise TypeError(f"data: expected an ImageNetData, got {type(data).__name__}")
        self.train: ResumableLoader = data.train
        self.val: ResumableLoader = data.val
        self.device, self.world_size = device, world_size
        self.num_classes = data.num_classes
        self.n_train, self.n_val = len(data.train.dataset), len(data.val.dataset)
        self.local_batch = int(data.train.batch_size)
        #: this process's micro-batches per epoch (the same on every process: equal shares)
        self.micro_per_epoch = len(data.train)
        self._mean, self._std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    def _to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # normalize = false: standardized here, on the device
            x = standardize(x.float() / 255, self._mean, self._std)
        return x, y.to(self.device, non_blocking=True)

    def _batches(self, loader: ResumableLoader) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(loader)
        try:
            for x, y in batches:
                yield self._to_device(x, y)
        finally:
            batches.close()  # stops the worker processes of an abandoned pass now

    def epoch(self, epoch: int, micro_done: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's micro-batches of ``epoch`` from the ``micro_done``-th on (the position
        a resumed loader is at), on the device. Close the iterator when leaving it early."""
        self.train.set_epoch(epoch)  # keeps the position of a resumed epoch
        position, expected = self.train.sampler.position, micro_done * self.local_batch
        if position != expected:
            raise ValueError(
                f"the data loader is at sample {position} of epoch {epoch} but the loop has "
                f"taken {micro_done} micro-batches of {self.local_batch} ({expected} samples); "
                "the checkpoint's data state does not belong to its counters"
            )
        return self._batches(self.train)

    def validation(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's share of the validation images, in batches, on the device."""
        return self._batches(self.val)

    def global_size(self, y: Tensor) -> int:
        """The samples of the global micro-batch whose local share holds the labels ``y``."""
        return int(y.shape[0]) * self.world_size

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's epoch and position (plain values, for the checkpoint)."""
        return dict(self.train.state_dict())

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ValueError(
                "the checkpoint holds no data-loader state (it was not written by a streamed run)"
            )
        self.train.load_state_dict(state)
