"""Datasets and loaders (DESIGN §5): one interface, `make_loader(dataset, split, batch_size, device, seed)`.

Every split is held as uint8 images `[N, 3, H, W]` and int64 labels. The order and the
augmentation of an epoch are a pure function of (seed, epoch): a resumed run sees exactly the
batches an uninterrupted one would, and every loader kind sees the same samples in the same order.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "search_train", "search_val")
LOADERS = ("auto", "tensor", "torch")
PAD = 4
_SPLIT_SEED = 20240  # constant: every run and every search trial sees the same held-out split


class DatasetError(ValueError):
    """An unknown or unreadable dataset, split or loader; the message is one line."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    channels: int = 3
    flip: bool = True  # horizontal flips are a valid augmentation for this data


@dataclass
class Arrays:
    """The train and test sets of a dataset as uint8 CPU tensors."""
    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# ---- datasets ---------------------------------------------------------------------------------
def _parse(name: str) -> tuple[str, dict]:
    base, _, params = name.partition(":")
    options = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not value.isdigit() or int(value) <= 0:
            raise DatasetError(f"dataset {name!r}: expected key=positive integer options, got {item!r}")
        options[key.strip()] = int(value)
    return base, options


def _synthetic_options(name: str, options: dict) -> dict:
    known = {"classes": 10, "size": 32, "train": 1024, "test": 256}
    unknown = set(options) - set(known)
    if unknown:
        raise DatasetError(f"dataset {name!r}: unknown option {sorted(unknown)[0]!r} "
                           f"(expected classes, size, train, test)")
    known.update(options)
    if known["classes"] < 2:
        raise DatasetError(f"dataset {name!r}: classes must be at least 2")
    return known


def dataset_info(dataset: str, data_dir=None) -> DatasetInfo:
    """What a dataset is (classes, image size) without loading it."""
    base, options = _parse(dataset)
    if base == "synthetic":
        o = _synthetic_options(dataset, options)
        return DatasetInfo(dataset, o["classes"], o["size"])
    if options:
        raise DatasetError(f"dataset {dataset!r}: {base} takes no options")
    if base == "digits":
        return DatasetInfo(dataset, 10, 32, flip=False)  # handwritten digits are not mirror-symmetric
    if base in ("cifar10", "cifar100"):
        return DatasetInfo(dataset, 10 if base == "cifar10" else 100, 32)
    raise DatasetError(f"unknown dataset {dataset!r} (expected digits, cifar10, cifar100 or synthetic[:...])")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _digits(info: DatasetInfo, data_dir) -> Arrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(), random_state=0)
    x = _to_uint8(x)
    return Arrays(info, x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def _synthetic(info: DatasetInfo, data_dir) -> Arrays:
    """Class prototypes of low-frequency colour patterns plus noise: learnable, any shape."""
    o = _synthetic_options(info.name, _parse(info.name)[1])
    gen = torch.Generator().manual_seed(12345)
    protos = F.interpolate(torch.rand(o["classes"], 3, 4, 4, generator=gen), size=(o["size"], o["size"]),
                           mode="bilinear", align_corners=False)

    def sample(n):
        y = torch.arange(n) % o["classes"]  # balanced classes
        y = y[torch.randperm(n, generator=gen)]
        x = 0.6 * protos[y] + 0.4 * torch.rand(n, 3, o["size"], o["size"], generator=gen)
        return _to_uint8(x), y

    train_x, train_y = sample(o["train"])
    test_x, test_y = sample(o["test"])
    return Arrays(info, train_x, train_y, test_x, test_y)


def _cifar(info: DatasetInfo, data_dir) -> Arrays:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if info.name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(data_dir or os.environ.get("KTFAST_DATA", Path.home() / ".cache" / "ktfast" / "data"))

    def read(train: bool):
        try:
            return cls(root=str(root), train=train, download=False)
        except RuntimeError:
            if os.environ.get("KTFAST_OFFLINE"):
                raise
            return cls(root=str(root), train=train, download=True)

    try:
        train, test = read(True), read(False)
    except Exception as e:  # not found, corrupt, or no network to download: one line either way
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"cannot read dataset {info.name} from {root}: {reason}") from None

    def tensors(ds):
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    return Arrays(info, *tensors(train), *tensors(test))


_READERS = {"digits": _digits, "synthetic": _synthetic, "cifar10": _cifar, "cifar100": _cifar}


@functools.lru_cache(maxsize=4)
def load_arrays(dataset: str, data_dir=None) -> Arrays:
    info = dataset_info(dataset, data_dir)
    return _READERS[_parse(dataset)[0]](info, data_dir)


# ---- splits -------------------------------------------------------------------------------------
def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of each class, drawn with `seed`, in ascending order."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(keep).sort().values


def split_indices(arrays: Arrays, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a split. The search splits divide the training set: CIFAR 40k/10k,
    other sets 80 %/20 %, class-balanced; the test set is never part of them."""
    if split == "test":
        return arrays.test_x, arrays.test_y
    if split == "train":
        return arrays.train_x, arrays.train_y
    n = len(arrays.train_y)
    val_fraction = 10_000 / n if arrays.info.name in ("cifar10", "cifar100") else 0.2
    val = class_balanced_subset(arrays.train_y, val_fraction, _SPLIT_SEED)
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    idx = val if split == "search_val" else mask.nonzero().flatten()
    return arrays.train_x[idx], arrays.train_y[idx]


# ---- loaders ------------------------------------------------------------------------------------
def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class EpochPlan:
    """The random choices of one epoch, drawn on the CPU: the same on every device and loader."""
    order: torch.Tensor  # sample indices, in batch order
    offsets: torch.Tensor  # [N, 2] crop corners in the padded image
    flips: torch.Tensor  # [N] bool


def plan_epoch(n: int, seed: int, epoch: int, train: bool, flip: bool) -> EpochPlan:
    if not train:
        return EpochPlan(torch.arange(n), torch.full((n, 2), PAD), torch.zeros(n, dtype=torch.bool))
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=gen)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return EpochPlan(order, offsets, flips & flip)


class _Loader:
    """What every loader kind shares: the split, the per-epoch plan, the batch boundaries."""

    def __init__(self, arrays: Arrays, split: str, batch_size: int, device, seed: int, train_fraction):
        self.dataset = arrays.info.name
        self.num_classes = arrays.info.num_classes
        self.image_size = arrays.info.image_size
        self.split = split
        self.train = split in ("train", "search_train")
        self.flip = arrays.info.flip
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        x, y = split_indices(arrays, split)
        if train_fraction is not None and self.train:
            keep = class_balanced_subset(y, train_fraction, seed)
            x, y = x[keep], y[keep]
        self.x, self.y = x, y
        self.num_samples = len(y)
        mean = arrays.train_x.float().mean((0, 2, 3)) / 255
        std = arrays.train_x.float().std((0, 2, 3)) / 255
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        # Training drops the last partial batch (constant shapes; BatchNorm never sees a batch of 1).
        self.drop_last = self.train and self.num_samples >= batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _batches(self):
        for i in range(len(self)):
            yield slice(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples))


class TensorLoader(_Loader):
    """The whole split resident on the device; crop, flip and normalisation as batched tensor ops.
    The GPU-resident loader for sets that fit in memory, and the fastest one on the CPU too."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)

    def __iter__(self):
        plan = plan_epoch(self.num_samples, self.seed, self.epoch, self.train, self.flip)
        order, offsets, flips = (t.to(self.device) for t in (plan.order, plan.offsets, plan.flips))
        size = self.image_size
        ar = torch.arange(size, device=self.device)
        for s in self._batches():
            idx = order[s]
            x = self.x[idx].float()
            if self.train:
                x = F.pad(x, (PAD,) * 4, mode="reflect")
                rows = (offsets[s, 0, None] + ar)[:, None, :, None]
                cols = (offsets[s, 1, None] + ar)[:, None, None, :]
                b = torch.arange(len(idx), device=self.device)[:, None, None, None]
                c = torch.arange(3, device=self.device)[None, :, None, None]
                x = x[b, c, rows, cols]
                x = torch.where(flips[s, None, None, None], x.flip(3), x)
            yield (x / 255 - self.mean) / self.std, self.y[idx]


class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, loader: "TorchLoader", plan: EpochPlan):
        self.loader, self.plan = loader, plan

    def __len__(self):
        return len(self.plan.order)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF

        ld = self.loader
        j = int(self.plan.order[i])
        x = ld.x[j].float() / 255
        if ld.train:
            x = TF.pad(x, [PAD], padding_mode="reflect")
            top, left = (int(v) for v in self.plan.offsets[i])
            x = TF.crop(x, top, left, ld.image_size, ld.image_size)
            if self.plan.flips[i]:
                x = TF.hflip(x)
        return TF.normalize(x, ld.mean.flatten().tolist(), ld.std.flatten().tolist()), ld.y[j]


class TorchLoader(_Loader):
    """torchvision transforms in a DataLoader on the CPU, batches moved to the device."""

    def __init__(self, *args, num_workers: int = 0, **kw):
        super().__init__(*args, **kw)
        self.num_workers = num_workers

    def __iter__(self):
        plan = plan_epoch(self.num_samples, self.seed, self.epoch, self.train, self.flip)
        n = len(self) * self.batch_size if self.drop_last else self.num_samples
        plan = EpochPlan(plan.order[:n], plan.offsets[:n], plan.flips[:n])
        dl = torch.utils.data.DataLoader(_TorchvisionDataset(self, plan), batch_size=self.batch_size,
                                         shuffle=False, num_workers=self.num_workers,
                                         pin_memory=self.device.type == "cuda")
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_loader(dataset: str, split: str, batch_size: int, device, seed: int, *, data_dir=None,
                loader: str = "auto", train_fraction: float | None = None, num_workers: int = 0):
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if loader not in LOADERS:
        raise DatasetError(f"unknown loader {loader!r} (expected one of {', '.join(LOADERS)})")
    if train_fraction is not None and not 0 < train_fraction <= 1:
        raise DatasetError(f"train fraction must be in (0, 1], got {train_fraction}")
    arrays = load_arrays(dataset, str(data_dir) if data_dir else None)
    args = (arrays, split, batch_size, device, seed, train_fraction)
    if loader == "torch":
        return TorchLoader(*args, num_workers=num_workers)
    return TensorLoader(*args)  # "auto": the device-resident loader, fastest for sets that fit
