"""Datasets and loaders (DESIGN §5): one interface, `make_loader(dataset, split, batch_size, device, seed)`.

A dataset is read once into uint8 images `[N, 3, H, W]` and int64 labels (train and test sets).
A split is a set of positions in one of them. The order and the augmentation of an epoch are a
pure function of (seed, epoch), drawn on the CPU: a resumed run sees exactly the batches an
uninterrupted one would, on any device and with any loader kind.

Environment: `KTFAST_DATA` is the default data directory (else ~/.cache/ktfast/data);
`KTFAST_OFFLINE=1` never tries a download (a missing dataset fails at once instead of waiting on
the network).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "search_train", "search_val")
TRAIN_SPLITS = ("train", "search_train")  # shuffled and augmented
LOADERS = ("auto", "dali", "gpu", "torch")
PAD = 4  # reflect padding before the random crop: the CIFAR recipe of the papers
# Random-resized-crop (torchvision's, the fine-grained recipe): area and aspect-ratio ranges.
CROP_SCALE, CROP_RATIO, CROP_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10
_SPLIT_SEED = 20240  # constant: every run and every search trial sees the same held-out split
# First element of every generator key, so the streams of different purposes never coincide.
_SUBSET, _EPOCH, _WORKERS = 1, 2, 3


class DatasetError(ValueError):
    """An unknown or unreadable dataset, split or loader; the message is one line."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int  # the side of the images the networks see
    channels: int = 3
    flip: bool = True  # horizontal flips are a valid augmentation for this data
    # The side of the stored images where it is larger than image_size: training then takes
    # random-resized crops of them, evaluation their centre crop (else: pad, crop and flip).
    stored_size: int = 0
    # Each class's fraction that the search split holds out for validation: CIFAR's 40k/10k, or
    # the class-balanced halves of the ensemble paper's fine-grained graph exploration.
    val_fraction: float = 0.2

    @property
    def resized_crops(self) -> bool:
        return self.stored_size > self.image_size


@dataclass
class Arrays:
    """A dataset read into CPU tensors, with its per-channel statistics (in [0, 1] units)."""
    info: DatasetInfo
    train_x: torch.Tensor  # uint8 [N, 3, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # float32 [3], of the training images
    std: torch.Tensor


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a key of ints (negative ones too): distinct keys, unrelated streams."""
    state = np.random.SeedSequence([k % 2**64 for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ---- datasets -----------------------------------------------------------------------------------
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
    x = _to_uint8(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)).repeat(1, 3, 1, 1)
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
    of epochs, any number of classes and any image size, and always the same (a constant seed)."""
    gen = torch.Generator().manual_seed(12345)
    size, classes = options["size"], options["classes"]
    protos = F.interpolate(torch.rand(classes, 3, 4, 4, generator=gen), size=(size, size),
                           mode="bilinear", align_corners=False)

    def sample(n):
        y = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]  # balanced classes
        x = 0.6 * protos[y] + 0.4 * torch.rand(n, 3, size, size, generator=gen)
        return _to_uint8(x), y

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
            raise DatasetError(f"dataset {info.name} not found in {root} (KTFAST_OFFLINE is set: "
                               f"no download tried)") from None
        try:
            train, test = read(download=True)
        except Exception as e:  # no network, a full disk, ...: one line either way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(f"dataset {info.name} not found in {root} and its download failed: "
                               f"{reason}") from None

    def tensors(ds):  # torchvision holds HWC uint8 numpy images
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return *tensors(train), *tensors(test)


class _Dataset(NamedTuple):
    info: Callable[[str, dict, Path], DatasetInfo]  # cheap: reads nothing it can avoid
    read: Callable[[DatasetInfo, dict, Path], tuple]  # -> train_x, train_y, test_x, test_y
    options: dict = {}


def _in_folders(function: str) -> Callable:
    """A function of ktfast.folders (image-file datasets), imported at its first call: that module
    builds on this one, so importing it here, at import time, would be circular."""
    def call(*args):
        from ktfast import folders

        return getattr(folders, function)(*args)
    return call


DATASETS = {
    "digits": _Dataset(_digits_info, _read_digits),
    "synthetic": _Dataset(_synthetic_info, _read_synthetic, {"classes": 10, "size": 32, "train": 1024, "test": 256}),
    "cifar10": _Dataset(_cifar_info, _read_cifar),
    "cifar100": _Dataset(_cifar_info, _read_cifar),
    "tinyimagenet": _Dataset(_in_folders("tinyimagenet_info"), _in_folders("read_tinyimagenet")),
    "imagefolder": _Dataset(_in_folders("imagefolder_info"), _in_folders("read_imagefolder"),
                            {"path": "", "size": 256, "crop": 224}),
}


def _resolve(dataset: str) -> tuple[_Dataset, dict]:
    """The registry entry of `name[:key=value,...]` and its options, defaults filled in."""
    base, _, params = dataset.partition(":")
    entry = DATASETS.get(base)
    if entry is None:
        raise DatasetError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
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
    """What a dataset is (classes, image size), without loading it: for checks before a run."""
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
    entry, options = _resolve(dataset)
    info = entry.info(dataset, options, Path(root))
    train_x, train_y, test_x, test_y = entry.read(info, options, Path(root))
    return Arrays(info, train_x, train_y.long(), test_x, test_y.long(), *_channel_stats(train_x))


# ---- splits -------------------------------------------------------------------------------------
def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Positions of `fraction` of each class (at least one), drawn with `seed`, in ascending order."""
    gen = _generator(_SUBSET, seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:max(1, round(fraction * len(idx)))]])
    return torch.cat(keep).sort().values


def split_indices(arrays: Arrays, split: str) -> torch.Tensor:
    """Positions of a split's samples: in the test set for "test", else in the training set. The
    search splits divide the training set, class-balanced (`info.val_fraction` held out), with a
    constant seed; never the test set."""
    if split == "test":
        if not len(arrays.test_y):  # a folder of class folders without a test/ folder
            raise DatasetError(f"dataset {arrays.info.name} has no test set: use its search splits (--split search)")
        return torch.arange(len(arrays.test_y))
    if split == "train":
        return torch.arange(len(arrays.train_y))
    val = class_balanced_subset(arrays.train_y, arrays.info.val_fraction, _SPLIT_SEED)
    if split == "search_val":
        return val
    keep = torch.ones(len(arrays.train_y), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten()


# ---- loaders ------------------------------------------------------------------------------------
class EpochPlan(NamedTuple):
    """The random choices of one epoch, drawn on the CPU: the same on every device and loader."""
    order: torch.Tensor  # [N] positions in the split, in batch order
    # [N, 2] crop corner (top, left): in the padded image, in [0, 2 * PAD]; with resized crops, in
    # the stored image.
    offsets: torch.Tensor
    flips: torch.Tensor  # [N] bool
    sizes: torch.Tensor | None = None  # [N, 2] (height, width) of the resized crops, else None


def resized_crop_boxes(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop for n square images of side `size`, drawn together: corners
    and sizes [n, 2] each. Each image takes the first of CROP_TRIES draws that fits, else the whole image."""
    area = size * size * torch.empty(n, CROP_TRIES).uniform_(*CROP_SCALE, generator=gen)
    log_ratio = torch.empty(n, CROP_TRIES).uniform_(*np.log(CROP_RATIO), generator=gen)
    w = (area * log_ratio.exp()).sqrt().round().long()
    h = (area / log_ratio.exp()).sqrt().round().long()
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = fits.long().argmax(1, keepdim=True)
    any_fit = fits.any(1)
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), size)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), size)
    u = torch.rand(n, 2, generator=gen)
    corner = (u * torch.stack([size - h + 1, size - w + 1], 1)).long()
    return corner, torch.stack([h, w], 1)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """The source row/column of position `i` in [-PAD, size + PAD) of a reflect-padded image."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


class _Loader:
    """What every loader kind shares: the split, the epoch plans, the batch boundaries.
    `x`, `y` are the split's images and labels on the CPU (uint8, int64), `indices` their
    positions in the dataset's test set (split "test") or training set (every other split)."""

    def __init__(self, arrays: Arrays, split: str, batch_size: int, device, seed: int, train_fraction):
        info = arrays.info
        self.dataset, self.num_classes, self.image_size = info.name, info.num_classes, info.image_size
        self.split, self.batch_size, self.device, self.seed = split, batch_size, torch.device(device), seed
        self.train = split in TRAIN_SPLITS
        self.flip = info.flip
        self.stored_size = info.stored_size if info.resized_crops else 0
        self.indices = split_indices(arrays, split)
        source_x, source_y = (arrays.test_x, arrays.test_y) if split == "test" else (arrays.train_x, arrays.train_y)
        if train_fraction is not None and self.train:
            self.indices = self.indices[class_balanced_subset(source_y[self.indices], train_fraction, seed)]
        self.x, self.y = source_x[self.indices], source_y[self.indices]
        self.num_samples = len(self.indices)
        self.mean, self.std = arrays.mean.view(1, 3, 1, 1), arrays.std.view(1, 3, 1, 1)
        # Training drops the last partial batch (constant shapes; BatchNorm never sees a batch of 1).
        self.drop_last = self.train and self.num_samples >= batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> EpochPlan:
        n, stored = self.num_samples, self.stored_size
        if not self.train:
            if stored:  # the centre crop, not resized
                side = torch.full((n, 2), self.image_size)
                return EpochPlan(torch.arange(n), (stored - side) // 2, torch.zeros(n, dtype=torch.bool), side)
            return EpochPlan(torch.arange(n), torch.full((n, 2), PAD), torch.zeros(n, dtype=torch.bool))
        gen = _generator(_EPOCH, self.seed, epoch)
        order = torch.randperm(n, generator=gen)
        if stored:
            offsets, sizes = resized_crop_boxes(n, stored, gen)
        else:
            offsets, sizes = torch.randint(0, 2 * PAD + 1, (n, 2), generator=gen), None
        flips = (torch.rand(n, generator=gen) < 0.5) & self.flip
        return EpochPlan(order, offsets, flips, sizes)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)


class TensorLoader(_Loader):
    """The whole split resident on the device; crop, flip and normalisation as one batched gather
    and one affine map per batch. The loader for sets that fit in (GPU) memory; fastest on the CPU too."""

    def __init__(self, *args):
        super().__init__(*args)
        self._x, self._y = self.x.to(self.device), self.y.to(self.device)
        self._mean, self._std = self.mean.to(self.device), self.std.to(self.device)

    def __iter__(self):
        if self.stored_size:
            yield from self._resized_crops()
            return
        order, offsets, flips = (t.to(self.device) for t in self.plan(self.epoch)[:3])
        size, bs = self.image_size, self.batch_size
        ar = torch.arange(size, device=self.device)
        channels = torch.arange(3, device=self.device)[None, :, None, None]
        for start in range(0, len(self) * bs, bs):
            idx = order[start:start + bs]
            if self.train:
                # Padded-image coordinates of the crop, mapped back through the reflection; a flip
                # reads the crop's columns right to left.
                o, f = offsets[start:start + bs], flips[start:start + bs, None]
                rows = _reflect(o[:, :1] + ar - PAD, size)
                cols = _reflect(o[:, 1:] + torch.where(f, size - 1 - ar, ar) - PAD, size)
                x = self._x[idx[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]]
            else:
                x = self._x[idx]
            yield (x.float() / 255 - self._mean) / self._std, self._y[idx]

    def _resized_crops(self):
        """Every crop of a batch resized by one bilinear `roi_align` (one sample per output pixel:
        what an interpolation of the cropped image computes), then the flips."""
        from torchvision.ops import roi_align

        order, offsets, flips, sizes = (t.to(self.device) for t in self.plan(self.epoch))
        size, bs = self.image_size, self.batch_size
        for start in range(0, len(self) * bs, bs):
            idx = order[start:start + bs]
            top_left = offsets[start:start + bs].flip(1).float()  # (x1, y1)
            boxes = torch.cat([torch.arange(len(idx), device=self.device)[:, None].float(), top_left,
                               top_left + sizes[start:start + bs].flip(1).float()], 1)
            x = roi_align(self._x[idx].float(), boxes, size, sampling_ratio=1, aligned=True)
            x = torch.where(flips[start:start + bs, None, None, None], x.flip(3), x)
            yield (x / 255 - self._mean) / self._std, self._y[idx]


class _EpochDataset(torch.utils.data.Dataset):
    """One epoch of a TorchLoader: item i is the i-th sample of the plan, transformed with torchvision."""

    def __init__(self, loader: "TorchLoader", plan: EpochPlan):
        self.loader, self.plan = loader, plan

    def __len__(self):
        return len(self.plan.order)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF

        ld = self.loader
        j = int(self.plan.order[i])
        x = ld.x[j].float() / 255
        if ld.stored_size:
            (top, left), (h, w) = self.plan.offsets[i].tolist(), self.plan.sizes[i].tolist()
            x = TF.resized_crop(x, top, left, h, w, [ld.image_size] * 2, antialias=False)
            if self.plan.flips[i]:
                x = TF.hflip(x)
        elif ld.train:
            top, left = (int(v) for v in self.plan.offsets[i])
            x = TF.crop(TF.pad(x, [PAD], padding_mode="reflect"), top, left, ld.image_size, ld.image_size)
            if self.plan.flips[i]:
                x = TF.hflip(x)
        return TF.normalize(x, ld.mean.flatten().tolist(), ld.std.flatten().tolist()), ld.y[j]


class TorchLoader(_Loader):
    """torchvision transforms in a torch DataLoader on the CPU, batches moved to the device. The
    random choices come from the epoch plan, not from the workers: any num_workers, same batches."""

    def __init__(self, *args, num_workers: int = 0):
        super().__init__(*args)
        self.num_workers = num_workers

    def __iter__(self):
        # An explicit generator: else every DataLoader iterator draws its base seed from (and
        # so moves) the global RNG, which the training step's own randomness depends on.
        dl = torch.utils.data.DataLoader(
            _EpochDataset(self, self.plan(self.epoch)), batch_size=self.batch_size, shuffle=False,
            drop_last=self.drop_last, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=_generator(_WORKERS, self.seed, self.epoch))
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_loader(dataset: str, split: str, batch_size: int, device, seed: int, *, data_dir=None,
                loader: str = "auto", train_fraction: float | None = None, num_workers: int = 0):
    """Batches `(x, y)` of a split on `device`: x float32 [B, 3, H, W] normalised, y int64 [B].
    `train_fraction` keeps that class-balanced fraction (drawn with `seed`) of a training split."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if loader not in LOADERS:
        raise DatasetError(f"unknown loader {loader!r} (expected one of {', '.join(LOADERS)})")
    if batch_size < 1:
        raise DatasetError(f"batch size must be positive, got {batch_size}")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise DatasetError(f"train fraction must be in (0, 1], got {train_fraction}")
    arrays = load_arrays(dataset, data_dir)
    args = (arrays, split, batch_size, device, seed, train_fraction)
    if loader == "auto":
        loader = _fastest_loader(arrays, torch.device(device))
    if loader == "torch":
        return TorchLoader(*args, num_workers=num_workers)
    if loader == "dali":
        from ktfast.dali import DaliLoader

        return DaliLoader(*args)
    return TensorLoader(*args)


def _fastest_loader(arrays: Arrays, device: torch.device) -> str:
    """The device-resident loader when the set fits (the fastest, benchmarks/bench_loader.py), else
    DALI when installed, else torchvision."""
    if device.type != "cuda":
        # Resident in host memory, pad-crop sets are one gather per batch (6x torchvision's images/s);
        # resized crops are 3x faster by torchvision than by the CPU's roi_align (or DALI's CPU mode).
        return "torch" if arrays.info.resized_crops else "gpu"
    free, _ = torch.cuda.mem_get_info(device)
    if arrays.train_x.numel() + arrays.test_x.numel() < free // 4:
        return "gpu"
    from ktfast.dali import available

    return "dali" if available() else "torch"
