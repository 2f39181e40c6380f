"""The device-resident loader (`--loader gpu`): the whole split in (GPU) memory; crop, flip and
normalisation as one batched gather and one affine map per batch."""

from __future__ import annotations

import torch

from ktfast.data.plan import Loader, reflect
from ktfast.data.types import PAD


class TensorLoader(Loader):
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
            idx = order[start : start + bs]
            if self.train:
                # Padded-image coordinates of the crop, mapped back through the reflection; a flip
                # reads the crop's columns right to left.
                o, f = offsets[start : start + bs], flips[start : start + bs, None]
                rows = reflect(o[:, :1] + ar - PAD, size)
                cols = reflect(o[:, 1:] + torch.where(f, size - 1 - ar, ar) - PAD, size)
                x = self._x[
                    idx[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]
                ]
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
            idx = order[start : start + bs]
            top_left = offsets[start : start + bs].flip(1).float()  # (x1, y1)
            boxes = torch.cat(
                [
                    torch.arange(len(idx), device=self.device)[:, None].float(),
                    top_left,
                    top_left + sizes[start : start + bs].flip(1).float(),
                ],
                1,
            )
            x = roi_align(self._x[idx].float(), boxes, size, sampling_ratio=1, aligned=True)
            x = torch.where(flips[start : start + bs, None, None, None], x.flip(3), x)
            yield (x / 255 - self._mean) / self._std, self._y[idx]
