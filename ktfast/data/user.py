"""Data from the user's code (docs/ARCHITECTURE.md §5): `--dataset py:MODULE:FACTORY`, `FACTORY()` returning
`(train, test)` torch Datasets whose items are `(image [3, S, S] uint8 or float in [0, 1], int label)`.

The number of classes is the train set's `classes` attribute (a count, or a sequence of names), else
one more than the largest label; a `flip` attribute (bool) says whether horizontal flips are a valid
augmentation (default true). A set that fits the memory budget (a quarter of the host's available
memory; `KTFAST_DATA_MEMORY` bytes overrides it) is read once into uint8 arrays, as the built-in sets
are, and every loader kind serves it. A larger one stays where it is: `LazyImages` reads its images on
demand, for the torch loader's workers; its labels come from a `targets` attribute where it has one
(else one pass reads them), its normalisation statistics from `STATS_SAMPLE` images drawn with a
constant seed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ktfast import usercode
from ktfast.data.types import PAD, DatasetError, DatasetInfo, generator, to_uint8

MEMORY_ENV = "KTFAST_DATA_MEMORY"
STATS_SAMPLE = 1024
_STATS_SEED = 4711  # constant: every run of a set normalises it alike


def memory_budget() -> int:
    """Bytes a user's set may take in memory as uint8 arrays."""
    if os.environ.get(MEMORY_ENV):
        return int(os.environ[MEMORY_ENV])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf here
        return 4 << 30


def _image(item, name: str, where: str) -> tuple[torch.Tensor, int]:
    """(uint8 [3, H, W], label) of one item, or a DatasetError naming it."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DatasetError(f"dataset {name}: {where} is {type(item).__name__}, not a pair (image, label)")
    x, y = item
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DatasetError(f"dataset {name}: {where}'s image is {shape}, not a tensor [3, H, W]")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise DatasetError(f"dataset {name}: {where}'s image is {x.dtype}, not uint8 or float")
        if x.numel() and not 0 <= float(x.min()) <= float(x.max()) <= 1:
            raise DatasetError(
                f"dataset {name}: {where}'s float image has values outside [0, 1] "
                "(hand over unnormalised images: ktfast normalises them)"
            )
        x = to_uint8(x)
    try:
        label = int(y)
    except (TypeError, ValueError, RuntimeError):
        raise DatasetError(f"dataset {name}: {where}'s label is {type(y).__name__}, not an int") from None
    if label < 0 or label != y:
        raise DatasetError(f"dataset {name}: {where}'s label {y!r} is not a non-negative int")
    return x, label


class LazyImages:
    """The images of a user's Dataset, read on demand: what the loaders need of a uint8 tensor
    `[N, 3, S, S]` (indexing by a position or by a tensor of positions, len, shape, numel)."""

    def __init__(self, dataset, positions: torch.Tensor, image_shape: tuple, name: str):
        self.dataset, self.positions, self.image_shape, self.name = (
            dataset,
            positions,
            tuple(image_shape),
            name,
        )

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.image_shape)

    def numel(self) -> int:
        return len(self) * math.prod(self.image_shape)

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.dim() == 1:
            return LazyImages(self.dataset, self.positions[index], self.image_shape, self.name)
        position = int(self.positions[index])
        x, _ = _image(self.dataset[position], self.name, f"item {position}")
        if tuple(x.shape) != self.image_shape:
            raise DatasetError(
                f"dataset {self.name}: item {position}'s image is {list(x.shape)}, "
                f"not {list(self.image_shape)} as the first"
            )
        return x

    def sample(self, n: int) -> torch.Tensor:
        """n images drawn with a constant seed (all where there are fewer), stacked."""
        pick = torch.randperm(len(self), generator=generator(_STATS_SEED))[:n].sort().values
        return torch.stack([self[int(i)] for i in pick])


def _load(name: str):
    try:
        sets = usercode.call(name, usercode.factory(name))
    except usercode.UserCodeError as e:
        raise DatasetError(f"dataset {e}") from None
    if not isinstance(sets, (tuple, list)) or len(sets) != 2:
        raise DatasetError(
            f"dataset {name}: the factory returned {type(sets).__name__}, not a pair (train, test) "
            "of torch Datasets"
        )
    for which, ds in zip(("train", "test"), sets):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise DatasetError(
                f"dataset {name}: its {which} set is {type(ds).__name__}, not a torch Dataset "
                "(with __len__ and __getitem__)"
            )
    if not len(sets[0]):
        raise DatasetError(f"dataset {name}: its train set is empty")
    return sets


def _read_all(ds, name: str, which: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for i in range(len(ds)):
        x, y = _image(ds[i], name, f"{which} item {i}")
        if tuple(x.shape) != shape:
            raise DatasetError(
                f"dataset {name}: {which} item {i}'s image is {list(x.shape)}, not {list(shape)} as the first"
            )
        images.append(x)
        labels.append(y)
    if not images:
        return torch.empty(0, *shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _labels(ds, name: str, which: str) -> torch.Tensor:
    """A large set's labels: its `targets` attribute where it has one of the right length, else one pass."""
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    return torch.tensor(
        [_image(ds[i], name, f"{which} item {i}")[1] for i in range(len(ds))], dtype=torch.int64
    )


def read(name: str):
    """(info, train_x, train_y, test_x, test_y, resident): the x are uint8 tensors where the set fits
    the memory budget (`resident`), else LazyImages."""
    train, test = _load(name)
    first, _ = _image(train[0], name, "train item 0")
    shape = tuple(first.shape)
    if shape[1] != shape[2] or shape[1] < 2 * PAD:
        raise DatasetError(
            f"dataset {name}: images must be square, at least {2 * PAD} pixels, not {list(shape)}"
        )
    resident = (len(train) + len(test)) * math.prod(shape) <= memory_budget()
    if resident:
        train_x, train_y = _read_all(train, name, "train", shape)
        test_x, test_y = _read_all(test, name, "test", shape)
    else:
        train_x, train_y = (
            LazyImages(train, torch.arange(len(train)), shape, name),
            _labels(train, name, "train"),
        )
        test_x, test_y = LazyImages(test, torch.arange(len(test)), shape, name), _labels(test, name, "test")
    largest = int(max(train_y.max(), test_y.max() if len(test_y) else 0))
    classes = getattr(train, "classes", None)
    num_classes = (
        classes if isinstance(classes, int) else len(classes) if classes is not None else largest + 1
    )
    if num_classes < 2 or largest >= num_classes:
        raise DatasetError(
            f"dataset {name}: {num_classes} classes (its 'classes' attribute or labels), "
            f"and the largest label is {largest}"
        )
    flip = getattr(train, "flip", True)
    info = DatasetInfo(name, num_classes, shape[1], flip=flip if isinstance(flip, bool) else True)
    return info, train_x, train_y, test_x, test_y, resident
