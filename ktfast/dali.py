"""The DALI loader: crop, flip and normalisation in an NVIDIA DALI pipeline, on the GPU when the
device is one (DALI's CPU-only mode otherwise, which is what CI can run).

It follows the same epoch plan as the other loaders, so it yields the same batches: the plan's
crop corners and flips are fed to DALI per sample. DALI pads only with a constant, so the images
are reflect-padded once, up front, and DALI crops the padded images.
"""
from __future__ import annotations

import numpy as np
import torch

from ktfast.data import PAD, DatasetError, _Loader, _reflect

MISSING = "the dali loader needs NVIDIA DALI: pip install 'ktfast[dali]' (nvidia-dali-cuda130)"


def _import_dali():
    try:
        import nvidia.dali as dali
    except ImportError:
        raise DatasetError(MISSING) from None
    return dali


def available() -> bool:
    try:
        _import_dali()
    except DatasetError:
        return False
    return True


class DaliLoader(_Loader):
    def __init__(self, *args, num_threads: int = 2):
        super().__init__(*args)
        dali = _import_dali()
        from nvidia.dali import fn, types

        size = self.image_size
        src = torch.arange(-PAD, size + PAD)
        pos = _reflect(src, size)
        # [N, H + 2 PAD, W + 2 PAD, 3] uint8: DALI reads HWC.
        self._padded = np.ascontiguousarray(self.x[:, :, pos[:, None], pos[None, :]].permute(0, 2, 3, 1).numpy())
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu \
            else None
        # Synchronous: the inputs of a batch are fed right before it runs.
        self._pipe = dali.pipeline.Pipeline(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                                            exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with self._pipe:
            images = fn.external_source(name="images", layout="HWC")
            crop_x, crop_y = fn.external_source(name="crop_x"), fn.external_source(name="crop_y")
            mirror = fn.external_source(name="mirror")
            out = fn.crop_mirror_normalize(images.gpu() if gpu else images, crop=(size, size), crop_pos_x=crop_x,
                                           crop_pos_y=crop_y, mirror=mirror,
                                           mean=(255 * self.mean.flatten()).tolist(),
                                           std=(255 * self.std.flatten()).tolist(),
                                           dtype=types.FLOAT, output_layout="CHW")
            self._pipe.set_outputs(out)
        self._pipe.build()

    def __iter__(self):
        order, offsets, flips, _ = self.plan(self.epoch)
        bs = self.batch_size
        # DALI's crop position is a fraction of the slack: corner / (2 PAD), exact for these sizes.
        pos = (offsets.float() / (2 * PAD)).numpy()
        for start in range(0, len(self) * bs, bs):
            idx = order[start:start + bs]
            self._pipe.feed_input("images", self._padded[idx.numpy()])
            self._pipe.feed_input("crop_y", np.ascontiguousarray(pos[start:start + bs, 0]))
            self._pipe.feed_input("crop_x", np.ascontiguousarray(pos[start:start + bs, 1]))
            self._pipe.feed_input("mirror", flips[start:start + bs].numpy().astype(np.int32))
            (out,) = self._pipe.run()
            yield self._to_torch(out), self.y[idx].to(self.device, non_blocking=True)

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(out.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        x = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, x, cuda_stream=torch.cuda.current_stream(self.device))
        return x
