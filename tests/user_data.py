"""Data sets a user might write, for `--dataset py:` (tests/test_user_data.py): torch Datasets that
know nothing of ktfast, and factories that go wrong."""

import torch
from torch.utils.data import Dataset

from ktfast.data import load_arrays


class Images(Dataset):
    """Images [3, H, W] (uint8, or float in [0, 1]) and int labels; `targets` only when asked."""

    def __init__(self, x, y, as_float=False, targets=False):
        self.x, self.y, self.as_float = x, y, as_float
        if targets:
            self.targets = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.float() / 255 if self.as_float else x), int(self.y[i])


def _digits(**kwargs):
    a = load_arrays("digits")
    train, test = Images(a.train_x, a.train_y, **kwargs), Images(a.test_x, a.test_y, **kwargs)
    train.flip = False  # as the built-in digits: handwriting is not mirror-symmetric
    return train, test


def digits():
    return _digits()


def digits_float():
    return _digits(as_float=True)


def digits_targets():
    return _digits(targets=True)


def not_a_pair():
    return Images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))


def normalised():
    x = torch.randn(8, 3, 8, 8)
    return Images(x, torch.arange(8) % 2), Images(x, torch.arange(8) % 2)


def grey():
    x = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    return Images(x, torch.arange(8) % 2), Images(x, torch.arange(8) % 2)
