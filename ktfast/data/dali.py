"""The DALI loader: crop, flip and normalisation in an NVIDIA DALI pipeline, on the GPU when the
device is one (DALI's CPU-only mode otherwise, which is what CI can run).

It follows the same epoch plan as the other loaders, so it yields the same batches: the plan's
crops and flips are fed to DALI per sample. Two pipelines, as the dataset asks:
* pad, crop and flip (32 px sets): DALI pads only with a constant, so the images are
  reflect-padded once, up front, and DALI crops the padded images;
* random-resized crops (folder sets stored larger than the networks' input): a linear resize of
  each plan box (DALI's ROI, no antialiasing), which samples exactly where the device-resident
  loader's roi_align does; the evaluation's centre crop is a box of the output size.
DALI's decoding of image files into a folder set's cache is in `ktfast.data.decode`.
"""

from __future__ import annotations

import numpy as np
import torch

from ktfast.data.decode import import_dali
from ktfast.data.plan import Loader, reflect
from ktfast.data.types import PAD


class DaliLoader(Loader):
    def __init__(self, *args, num_threads: int = 2):
        super().__init__(*args)
        dali = import_dali()
        from nvidia.dali import fn, types

        size = self.image_size
        images = self.x  # [N, 3, S, S]
        if not self.stored_size:
            pos = reflect(torch.arange(-PAD, size + PAD), size)
            images = images[:, :, pos[:, None], pos[None, :]]  # reflect-padded
        self._images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # DALI reads HWC
        gpu = self.device.type == "cuda"
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None
        )
        # Synchronous: the inputs of a batch are fed right before it runs.
        self._pipe = dali.pipeline.Pipeline(
            batch_size=self.batch_size,
            num_threads=num_threads,
            device_id=device_id,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        with self._pipe:
            images = fn.external_source(name="images", layout="HWC")
            images = images.gpu() if gpu else images
            normalise = dict(
                mirror=fn.external_source(name="mirror"),
                mean=(255 * self.mean.flatten()).tolist(),
                std=(255 * self.std.flatten()).tolist(),
                dtype=types.FLOAT,
                output_layout="CHW",
            )
            if self.stored_size:
                # ROI corners in the layout's (y, x) order, in pixels of the stored image.
                boxes = fn.resize(
                    images,
                    size=(size, size),
                    roi_start=fn.external_source(name="roi_start"),
                    roi_end=fn.external_source(name="roi_end"),
                    roi_relative=False,
                    interp_type=types.INTERP_LINEAR,
                    antialias=False,
                    dtype=types.FLOAT,
                )
                out = fn.crop_mirror_normalize(boxes, **normalise)
            else:
                out = fn.crop_mirror_normalize(
                    images,
                    crop=(size, size),
                    crop_pos_x=fn.external_source(name="crop_x"),
                    crop_pos_y=fn.external_source(name="crop_y"),
                    **normalise,
                )
            self._pipe.set_outputs(out)
        self._pipe.build()

    def _feed(self, plan, batch: slice) -> None:
        offsets = plan.offsets[batch]
        if self.stored_size:
            start = offsets.float()
            self._pipe.feed_input("roi_start", start.numpy())
            self._pipe.feed_input("roi_end", (start + plan.sizes[batch]).numpy())
        else:
            # DALI's crop position is a fraction of the slack: corner / (2 PAD), exact for these sizes.
            pos = offsets.float() / (2 * PAD)
            self._pipe.feed_input("crop_y", np.ascontiguousarray(pos[:, 0].numpy()))
            self._pipe.feed_input("crop_x", np.ascontiguousarray(pos[:, 1].numpy()))
        self._pipe.feed_input("mirror", plan.flips[batch].numpy().astype(np.int32))

    def __iter__(self):
        plan = self.plan(self.epoch)
        bs = self.batch_size
        for start in range(0, len(self) * bs, bs):
            batch = slice(start, start + bs)
            idx = plan.order[batch]
            self._pipe.feed_input("images", self._images[idx.numpy()])
            self._feed(plan, batch)
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
