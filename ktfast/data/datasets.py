"""The datasets (docs/ARCHITECTURE.md §5): one registry, `DATASETS`, of how to describe each dataset from its name
alone and how to read it into uint8 images `[N, 3, H, W]` and int64 labels (train and test sets).

Environment: `KTFAST_DATA` is the default data directory (else ~/.cache/ktfast/data);
`KTFAST_OFFLINE=1` never tries a download (a missing dataset fails at once instead of waiting on
the network).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ktfast.data import folders, user
from ktfast.data.types import PAD, Arrays, DatasetError, DatasetInfo, to_uint8
from ktfast.usercode import is_user_code

# A dataset is an entry of DATASETS: how to describe it from its name alone, how to read it, and
# the options `name:key=value,...` it takes (with their defaults): positive integers, or strings
# where the default is one.


def _digits_info(name: str, options: dict, root: Path) -> DatasetInfo:
    return DatasetInfo(name, 10, 32, flip=False)  # handwritten digits are not mirror-symmetric


def _read_digits(info: DatasetInfo, options: dict, root: Path):
    """scikit-learn's bundled 8x8 digits (real data, no network), upsampled to 32 px, grey as RGB."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    x = to_uint8(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    return x[train], y[train], x[test], y[test]


def _synthetic_info(name: str, options: dict, root: Path) -> DatasetInfo:
    if options["classes"] < 2:
        raise DatasetError(f"dataset {name!r}: classes must be at least 2")
    if options["size"] < 2 * PAD:
        raise DatasetError(f"dataset {name!r}: size must be at least {2 * PAD}")
    return DatasetInfo(name, options["classes"], options["size"])


def _read_synthetic(info: DatasetInfo, options: dict, root: Path):
    """A random low-frequency colour pattern per class plus per-image noise: learnable in a couple
    of epochs, any number of classes and any image size, and always the same (a constant seed, and
    float32 draws whatever torch's default dtype: float64 draws other numbers)."""
    gen = torch.Generator().manual_seed(12345)
    size, classes = options["size"], options["classes"]
    protos = F.interpolate(
        torch.rand(classes, 3, 4, 4, generator=gen, dtype=torch.float32),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )

    def sample(n):
        y = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]  # balanced classes
        x = 0.6 * protos[y] + 0.4 * torch.rand(n, 3, size, size, generator=gen, dtype=torch.float32)
        return to_uint8(x), y

    return *sample(options["train"]), *sample(options["test"])


def _cifar_info(name: str, options: dict, root: Path) -> DatasetInfo:
    return DatasetInfo(name, 10 if name == "cifar10" else 100, 32)


def _read_cifar(info: DatasetInfo, options: dict, root: Path):
    """torchvision's CIFAR folder under `root`, downloaded there when missing (unless offline)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if info.name == "cifar10" else torchvision.datasets.CIFAR100

    def read(download: bool):
        return [cls(root=str(root), train=train, download=download) for train in (True, False)]

    try:
        train, test = read(download=False)
    except RuntimeError:  # missing or corrupt (torchvision checks every file's MD5)
        if os.environ.get("KTFAST_OFFLINE"):
            raise DatasetError(
                f"dataset {info.name} not found in {root} (KTFAST_OFFLINE is set: no download tried)"
            ) from None
        try:
            train, test = read(download=True)
        except Exception as e:  # no network, a full disk, ...: one line either way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(
                f"dataset {info.name} not found in {root} and its download failed: {reason}"
            ) from None

    def tensors(ds):  # torchvision holds HWC uint8 numpy images
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return *tensors(train), *tensors(test)


class _Dataset(NamedTuple):
    info: Callable[[str, dict, Path], DatasetInfo]  # cheap: reads nothing it can avoid
    read: Callable[[DatasetInfo, dict, Path], tuple]  # -> train_x, train_y, test_x, test_y
    options: dict = {}


DATASETS = {
    "digits": _Dataset(_digits_info, _read_digits),
    "synthetic": _Dataset(
        _synthetic_info, _read_synthetic, {"classes": 10, "size": 32, "train": 1024, "test": 256}
    ),
    "cifar10": _Dataset(_cifar_info, _read_cifar),
    "cifar100": _Dataset(_cifar_info, _read_cifar),
    "tinyimagenet": _Dataset(folders.tinyimagenet_info, folders.read_tinyimagenet),
    "imagefolder": _Dataset(
        folders.imagefolder_info, folders.read_imagefolder, {"path": "", "size": 256, "crop": 224}
    ),
}


def _resolve(dataset: str) -> tuple[_Dataset, dict]:
    """The registry entry of `name[:key=value,...]` and its options, defaults filled in."""
    base, _, params = dataset.partition(":")
    entry = DATASETS.get(base)
    if entry is None:
        raise DatasetError(
            f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)}, or py:MODULE:FACTORY)"
        )
    options = dict(entry.options)
    for item in filter(None, params.split(",")):
        key, _, value = (s.strip() for s in item.partition("="))
        if key not in options:
            expected = f"expected {', '.join(entry.options)}" if entry.options else "it takes none"
            raise DatasetError(f"dataset {dataset!r}: unknown option {key!r} ({expected})")
        if isinstance(entry.options[key], str):
            options[key] = value
        elif not value.isdigit() or int(value) <= 0:
            raise DatasetError(f"dataset {dataset!r}: option {key} must be a positive integer, got {value!r}")
        else:
            options[key] = int(value)
    return entry, options


def data_root(data_dir=None) -> Path:
    default = os.environ.get("KTFAST_DATA") or Path.home() / ".cache" / "ktfast" / "data"
    return Path(data_dir or default).expanduser()


def dataset_info(dataset: str, data_dir=None) -> DatasetInfo:
    """What a dataset is (classes, image size), without loading it where its name says (a user's set
    is read: only its items say)."""
    if is_user_code(dataset):
        return load_arrays(dataset, data_dir).info
    entry, options = _resolve(dataset)
    return entry.info(dataset, options, data_root(data_dir))


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, exact, from each channel's histogram of the 256
    values: one counting pass, no float copy of the set (seconds for a 20k-image 256 px set)."""
    hist = torch.stack([torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])]).double()
    value = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1)
    mean = hist @ value / count
    return mean.float(), (hist @ value.square() / count - mean.square()).sqrt().float()


def load_arrays(dataset: str, data_dir=None) -> Arrays:
    """The dataset's train and test sets (read once per process and data directory)."""
    return _load_arrays(dataset, str(data_root(data_dir)))


@functools.lru_cache(maxsize=4)
def _load_arrays(dataset: str, root: str) -> Arrays:
    if is_user_code(dataset):  # statistics of a set left where it is from a sample of its images
        info, train_x, train_y, test_x, test_y, resident = user.read(dataset)
        stats = _channel_stats(train_x if resident else train_x.sample(user.STATS_SAMPLE))
        return Arrays(info, train_x, train_y, test_x, test_y, *stats)
    entry, options = _resolve(dataset)
    info = entry.info(dataset, options, Path(root))
    train_x, train_y, test_x, test_y = entry.read(info, options, Path(root))
    return Arrays(info, train_x, train_y.long(), test_x, test_y.long(), *_channel_stats(train_x))
