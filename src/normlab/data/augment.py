"""The papers' data augmentation as batched tensor ops on the batch's device (no torchvision).

The CIFAR experiments of all five papers use the same recipe: pad each image by 4 pixels, take a
random crop of the original size, and flip horizontally with probability 1/2. Here both steps are
vectorised over the batch — one gather with per-sample offsets computed by index arithmetic and one
``torch.where`` — so they run where the batch lives (CPU or GPU) without a loop over samples.

Padding uses zeros. The images are standardized *before* augmentation (:func:`load_dataset`
returns standardized tensors), so the zero border is the per-channel training mean — the same
reading as the usual "standardize, then pad with zeros" pipelines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment", "random_crop", "random_flip", "shift_crop"]


def _check_images(x: Tensor, fn: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: expected an (N, C, H, W) tensor, got {shape}")


def _randint(high: int, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (a CPU generator for a GPU batch is allowed), then move.
    gdev = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gdev).to(device)


def shift_crop(x: Tensor, pad: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Zero-pad ``x`` by ``pad`` on every side and crop ``H × W`` at per-sample offsets.

    ``dy``, ``dx`` are ``(N,)`` integer offsets in ``[0, 2 * pad]`` into the padded image, so output
    pixel ``(i, j)`` of sample ``n`` is the input pixel ``(i + dy[n] - pad, j + dx[n] - pad)`` (zero
    where that falls outside). ``dy = dx = pad`` is the identity.

    Shape: ``x`` ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    Example::

        >>> x = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)
        >>> shift_crop(x, 1, torch.tensor([2]), torch.tensor([1]))  # one row down: the last row
        tensor([[[[3., 4.],
                  [0., 0.]]]])
    """
    _check_images(x, "shift_crop")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"shift_crop: pad must be a non-negative integer, got {pad!r}")
    n, c, h, w = x.shape
    if pad == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = dy.to(dev).long().view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (N, H)
    cols = dx.to(dev).long().view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (N, W)
    # Gather rows then columns with index arithmetic (two gathers, no per-sample loop).
    wp = w + 2 * pad
    xr = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, wp))  # (N, C, H, W+2p)
    return xr.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def random_crop(x: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Pad by ``pad`` zeros and take a uniformly random ``H × W`` crop per sample (batched).

    Example::

        >>> x = torch.ones(16, 3, 8, 8)
        >>> torch.equal(random_crop(x, pad=0), x)  # pad 0: nothing to crop
        True
        >>> bool((random_crop(x, pad=4) == 0).any())  # pad 4: zeros come in at some border
        True
    """
    _check_images(x, "random_crop")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"random_crop: pad must be a non-negative integer, got {pad!r}")
    if pad == 0:
        return x
    n = x.shape[0]
    dy = _randint(2 * pad + 1, n, x.device, generator)
    dx = _randint(2 * pad + 1, n, x.device, generator)
    return shift_crop(x, pad, dy, dx)


def random_flip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each sample left-right with probability ``p`` (batched).

    Example::

        >>> x = torch.arange(3.0).reshape(1, 1, 1, 3)
        >>> random_flip(x, p=1.0)
        tensor([[[[2., 1., 0.]]]])
    """
    _check_images(x, "random_flip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_flip: p must be in [0, 1], got {p!r}")
    gdev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape[0], generator=generator, device=gdev).to(x.device)
    mask = (u < p).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def augment(
    x: Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """The papers' training augmentation: random ``pad``-pixel pad-and-crop, then a random
    horizontal flip, on ``x``'s device. ``pad=0`` / ``flip=False`` switch the parts off.

    ``generator`` makes it reproducible (it may live on the CPU for a GPU batch).

    Shape: ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    Example::

        >>> x = torch.randn(64, 3, 32, 32)
        >>> a = augment(x, pad=4, generator=torch.Generator().manual_seed(0))
        >>> b = augment(x, pad=4, generator=torch.Generator().manual_seed(0))
        >>> a.shape, torch.equal(a, b)
        (torch.Size([64, 3, 32, 32]), True)
    """
    _check_images(x, "augment")
    out = random_crop(x, pad, generator)
    if flip:
        out = random_flip(out, 0.5, generator)
    return out
