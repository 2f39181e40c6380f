"""The torchvision loader (`--loader torch`): torchvision transforms in a torch DataLoader on the CPU,
batches moved to the device."""

from __future__ import annotations

import torch

from ktfast.data.plan import WORKERS_KEY, EpochPlan, Loader
from ktfast.data.types import PAD, generator


class _EpochDataset(torch.utils.data.Dataset):
    """One epoch of a TorchLoader: item i is the i-th sample of the plan, transformed with torchvision."""

    def __init__(self, loader: TorchLoader, plan: EpochPlan):
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


class TorchLoader(Loader):
    """torchvision transforms in a torch DataLoader on the CPU, batches moved to the device. The
    random choices come from the epoch plan, not from the workers: any num_workers, same batches."""

    def __init__(self, *args, num_workers: int = 0):
        super().__init__(*args)
        self.num_workers = num_workers

    def __iter__(self):
        # An explicit generator: else every DataLoader iterator draws its base seed from (and
        # so moves) the global RNG, which the training step's own randomness depends on.
        dl = torch.utils.data.DataLoader(
            _EpochDataset(self, self.plan(self.epoch)),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=generator(WORKERS_KEY, self.seed, self.epoch),
        )
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
