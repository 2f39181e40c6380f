"""The data layer (docs/ARCHITECTURE.md §5): one interface, `make_loader(dataset, split, batch_size, device, seed)`.

Bottom to top, each module importing only those above it in this list:
* `types`: the error, `DatasetInfo`, `Arrays`, seeded generators;
* `decode`: image files into uint8 arrays (PIL, or DALI's nvJPEG decoder);
* `folders`: Tiny ImageNet and class-folder sets, decoded once into a cache;
* `user`: a user's own set (`py:MODULE:FACTORY`), read into arrays or read on demand;
* `datasets`: the registry of every dataset (digits, cifar10/100, tinyimagenet, imagefolder,
  synthetic) and `load_arrays`;
* `plan`: splits, epoch plans (order, crops, flips) and the `Loader` every kind shares;
* `resident`, `torchvision`, `dali`: the three loader kinds, which yield the same batches.
"""

from __future__ import annotations

import os

from ktfast.data.dali import DaliLoader
from ktfast.data.datasets import DATASETS, data_root, dataset_info, load_arrays
from ktfast.data.plan import SPLITS, Loader, class_balanced_subset, split_indices
from ktfast.data.resident import TensorLoader
from ktfast.data.torchvision import TorchLoader
from ktfast.data.types import PAD, Arrays, DatasetError, DatasetInfo
from ktfast.data.user import MEMORY_ENV, LazyImages
from ktfast.paths import fall_back, loader_path
from ktfast.usercode import is_user_code

LOADERS = ("auto", "dali", "gpu", "torch")
KIND_NAMES = {"gpu": "device-resident", "dali": "DALI", "torch": "torch"}
__all__ = [
    "DATASETS",
    "LOADERS",
    "PAD",
    "SPLITS",
    "Arrays",
    "DaliLoader",
    "DatasetError",
    "DatasetInfo",
    "Loader",
    "TensorLoader",
    "TorchLoader",
    "class_balanced_subset",
    "data_root",
    "dataset_info",
    "load_arrays",
    "make_loader",
    "split_indices",
]


def make_loader(
    dataset: str,
    split: str,
    batch_size: int,
    device,
    seed: int,
    *,
    data_dir=None,
    loader: str = "auto",
    train_fraction: float | None = None,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    paths: dict | None = None,
    val_fraction: float | None = None,
):
    """Batches `(x, y)` of a split on `device`: x float32 [B, 3, H, W] normalised, y int64 [B].
    `train_fraction` keeps that class-balanced fraction (drawn with `seed`) of a training split;
    `shard` (rank, world size) keeps rank's share of every batch (`Loader._shard`); `val_fraction` holds
    that class-balanced part of the training set out of "train" as the split "val". `auto` takes
    `ktfast.paths.loader_path`'s kind; where that is DALI and DALI is missing or fails, it falls
    back to torchvision (`ktfast.paths.fall_back`, recorded in `paths["loader"]`)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if loader not in LOADERS:
        raise DatasetError(f"unknown loader {loader!r} (expected one of {', '.join(LOADERS)})")
    if batch_size < 1:
        raise DatasetError(f"batch size must be positive, got {batch_size}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise DatasetError(f"train fraction must be in (0, 1], got {train_fraction}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DatasetError(f"val fraction must be in (0, 1), got {val_fraction}")
    arrays = load_arrays(dataset, data_dir)
    args = (arrays, split, batch_size, device, seed, train_fraction, shard, val_fraction)
    announce = paths is not None  # the training loader's call: its choices are said once
    paths = {} if paths is None else paths
    kind = loader
    if loader == "auto":
        kind, missing = loader_path(loader, device, arrays)
        if missing:
            fall_back(paths, "loader", kind, missing)
    lazy = isinstance(arrays.train_x, LazyImages)
    if lazy and kind != "torch":
        raise DatasetError(
            f"--loader {kind}: dataset {dataset} is larger than the memory budget ({MEMORY_ENV} "
            f"or a quarter of the available memory): only the torch loader reads it"
        )
    if lazy:
        num_workers = num_workers or min(4, os.cpu_count() or 1)
    if announce and is_user_code(dataset):
        size = (arrays.train_x.numel() + arrays.test_x.numel()) / 2**20
        where = (
            f"read on demand by the torch loader with {num_workers} workers"
            if lazy
            else f"in memory, the {KIND_NAMES.get(kind, kind)} loader"
        )
        print(
            f"ktfast: dataset {dataset}: {len(arrays.train_y)} train and {len(arrays.test_y)} test images "
            f"({size:.1f} MiB as uint8) {where}",
            flush=True,
        )
    if kind == "dali":
        try:
            return DaliLoader(*args)
        except Exception as e:
            if loader != "auto":
                raise  # asked for by name: its error says what is missing
            fall_back(paths, "loader", "torch", f"DALI: {type(e).__name__}: {e}")
            kind = "torch"
    if kind == "torch":
        return TorchLoader(*args, num_workers=num_workers)
    return TensorLoader(*args)
