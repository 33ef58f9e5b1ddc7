"""normlab.data: datasets as tensors and the papers' augmentation as batched tensor ops.

::

    from normlab.data import load_dataset, augment
    d = load_dataset("digits")            # DataSplits, standardized, deterministic split
    xb = augment(d.train_x[:64], pad=4)   # random pad-and-crop + flip on the batch's device

ImageNet streams from its JPEG folders instead (it does not fit in a DataSplits)::

    data = imagenet_loaders(root, batch_size=256, workers=8, seed=0, rank=0, world_size=1)
    for x, y in data.train: ...           # resumable: data.train.state_dict() / load_state_dict()
"""

from normlab.data.augment import augment, random_crop, random_flip, shift_crop
from normlab.data.core import (
    DataSplits,
    available_datasets,
    channel_stats,
    dataset_descriptions,
    load_dataset,
    make_splits,
    register_dataset,
    standardize,
)
from normlab.data.files import (
    FILES,
    ChecksumError,
    MissingFileError,
    data_root,
    download_file,
    file_digest,
    verify_file,
)
from normlab.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    ImageNetData,
    ResumableLoader,
    ResumableSampler,
    imagenet_dir,
    imagenet_loaders,
)
from normlab.data.offline import DOMAINS, gaussian_mixture, split_indices
from normlab.data.real import MULTITASK_PARTS, read_idx, to_rgb32

__all__ = [
    "DOMAINS",
    "FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTITASK_PARTS",
    "ChecksumError",
    "DataSplits",
    "ImageFolder",
    "ImageNetData",
    "MissingFileError",
    "ResumableLoader",
    "ResumableSampler",
    "augment",
    "available_datasets",
    "channel_stats",
    "data_root",
    "dataset_descriptions",
    "download_file",
    "file_digest",
    "gaussian_mixture",
    "imagenet_dir",
    "imagenet_loaders",
    "load_dataset",
    "make_splits",
    "random_crop",
    "random_flip",
    "read_idx",
    "register_dataset",
    "shift_crop",
    "split_indices",
    "standardize",
    "to_rgb32",
    "verify_file",
]
