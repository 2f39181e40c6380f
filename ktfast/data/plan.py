"""Splits and epoch plans: which samples a split holds, and the random choices of each epoch (order,
crops, flips) as a pure function of (seed, epoch), drawn on the CPU, so that a resumed run sees
exactly the batches an uninterrupted one would, on any device and with any loader kind. `Loader`
is what every loader kind shares: the split, its plans, the batch boundaries.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ktfast.data.types import PAD, Arrays, DatasetError, generator

# "val": the part of the training set a run holds out with --val-fraction (then "train" is the rest).
SPLITS = ("train", "test", "val", "search_train", "search_val")
TRAIN_SPLITS = ("train", "search_train")  # shuffled and augmented
# Random-resized-crop (torchvision's, the fine-grained recipe): area and aspect-ratio ranges.
CROP_SCALE, CROP_RATIO, CROP_TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10
_SPLIT_SEED = 20240  # constant: every run and every search trial sees the same held-out split
# First element of every generator key, so the streams of different purposes never coincide.
SUBSET_KEY, EPOCH_KEY, WORKERS_KEY = 1, 2, 3


def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Positions of `fraction` of each class (at least one), drawn with `seed`, in ascending order."""
    gen = generator(SUBSET_KEY, seed)
    keep = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[: max(1, round(fraction * len(idx)))]])
    return torch.cat(keep).sort().values


def held_out(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Positions of the class-balanced `fraction` of `labels` held out for validation, drawn with a
    constant seed (every seed of a run, every run, sees the same part); each class keeps a sample."""
    for c, n in enumerate(torch.bincount(labels).tolist()):
        if n and n - max(1, round(fraction * n)) < 1:  # what class_balanced_subset holds out of the class
            raise DatasetError(
                f"val fraction {fraction} holds out every training sample of class {c} "
                f"({n} of {n}): none of it is left to train on"
            )
    return class_balanced_subset(labels, fraction, _SPLIT_SEED)


def split_indices(arrays: Arrays, split: str, val_fraction: float | None = None) -> torch.Tensor:
    """Positions of a split's samples: in the test set for "test", else in the training set. The
    search splits divide the training set, class-balanced (`info.val_fraction` held out), with a
    constant seed; never the test set. With `val_fraction` (--val-fraction), "val" is that held-out
    part of the training set and "train" the rest."""
    if split == "test":
        if not len(arrays.test_y):  # a folder of class folders without a test/ folder
            raise DatasetError(
                f"dataset {arrays.info.name} has no test set: use its search splits (--split search)"
            )
        return torch.arange(len(arrays.test_y))
    if split in ("train", "val") and val_fraction is None:
        if split == "val":
            raise DatasetError("the val split is held out only with a val fraction (--val-fraction)")
        return torch.arange(len(arrays.train_y))
    val = (
        held_out(arrays.train_y, val_fraction)
        if split in ("train", "val")
        else class_balanced_subset(arrays.train_y, arrays.info.val_fraction, _SPLIT_SEED)
    )
    if split in ("val", "search_val"):
        return val
    keep = torch.ones(len(arrays.train_y), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten()


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


def reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """The source row/column of position `i` in [-PAD, size + PAD) of a reflect-padded image."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


class Loader:
    """What every loader kind shares: the split, the epoch plans, the batch boundaries.
    `x`, `y` are the split's images and labels on the CPU (uint8, int64), `indices` their
    positions in the dataset's test set (split "test") or training set (every other split)."""

    def __init__(
        self,
        arrays: Arrays,
        split: str,
        batch_size: int,
        device,
        seed: int,
        train_fraction,
        shard: tuple[int, int] = (0, 1),
        val_fraction: float | None = None,
    ):
        info = arrays.info
        self.dataset, self.num_classes, self.image_size = info.name, info.num_classes, info.image_size
        self.split, self.batch_size, self.device, self.seed = split, batch_size, torch.device(device), seed
        self.train = split in TRAIN_SPLITS
        self.flip = info.flip
        self.stored_size = info.stored_size if info.resized_crops else 0
        self.indices = split_indices(arrays, split, val_fraction)
        source_x, source_y = (
            (arrays.test_x, arrays.test_y) if split == "test" else (arrays.train_x, arrays.train_y)
        )
        if train_fraction is not None and self.train:
            self.indices = self.indices[class_balanced_subset(source_y[self.indices], train_fraction, seed)]
        self.x, self.y = source_x[self.indices], source_y[self.indices]
        self.num_samples = len(self.indices)
        self.mean, self.std = arrays.mean.view(1, 3, 1, 1), arrays.std.view(1, 3, 1, 1)
        # Training drops the last partial batch (constant shapes; BatchNorm never sees a batch of 1).
        self.drop_last = self.train and self.num_samples >= batch_size
        self.epoch = 0
        self.positions = None  # with a shard: the positions of every epoch plan this rank keeps
        rank, world = shard
        if world > 1:
            self._shard(rank, world)

    def _shard(self, rank: int, world: int) -> None:
        """Keep this rank's share of every epoch (docs/ARCHITECTURE.md §10, place data): of each training batch
        its slice, so that the global batch stays the batch size and the plan is one process's; of
        an evaluation split, a contiguous block, each sample evaluated once."""
        if not self.train:
            n = self.num_samples
            self.positions = torch.arange(n)[rank * n // world : (rank + 1) * n // world]
            return
        if self.batch_size % world or not self.drop_last:
            raise DatasetError(
                f"batch size {self.batch_size} does not split into {world} equal shares of a "
                f"training set of {self.num_samples} images"
            )
        share = self.batch_size // world
        steps = torch.arange(len(self) * self.batch_size).view(len(self), self.batch_size)
        self.positions = steps[:, rank * share : (rank + 1) * share].reshape(-1)
        self.batch_size = share

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan, of this rank's positions only when the loader is a shard."""
        plan = self._full_plan(epoch)
        if self.positions is None:
            return plan
        return EpochPlan(*(None if a is None else a[self.positions] for a in plan))

    def _full_plan(self, epoch: int) -> EpochPlan:
        n, stored = self.num_samples, self.stored_size
        if not self.train:
            if stored:  # the centre crop, not resized
                side = torch.full((n, 2), self.image_size)
                return EpochPlan(
                    torch.arange(n), (stored - side) // 2, torch.zeros(n, dtype=torch.bool), side
                )
            return EpochPlan(torch.arange(n), torch.full((n, 2), PAD), torch.zeros(n, dtype=torch.bool))
        gen = generator(EPOCH_KEY, self.seed, epoch)
        order = torch.randperm(n, generator=gen)
        if stored:
            offsets, sizes = resized_crop_boxes(n, stored, gen)
        else:
            offsets, sizes = torch.randint(0, 2 * PAD + 1, (n, 2), generator=gen), None
        flips = (torch.rand(n, generator=gen) < 0.5) & self.flip
        return EpochPlan(order, offsets, flips, sizes)

    def __len__(self) -> int:
        n = self.num_samples if self.positions is None else len(self.positions)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)
