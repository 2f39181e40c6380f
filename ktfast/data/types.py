"""What every part of the data layer shares: its error, what a dataset is, the arrays it is read
into, and the seeded generators its random choices come from. Imports nothing of ktfast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD = 4  # reflect padding before the random crop: the CIFAR recipe of the papers


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


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a key of ints (negative ones too): distinct keys, unrelated streams."""
    state = np.random.SeedSequence([k % 2**64 for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
