"""The DALI loader: crop, flip and normalisation in an NVIDIA DALI pipeline, on the GPU when the
device is one (DALI's CPU-only mode otherwise, which is what CI can run).

It follows the same epoch plan as the other loaders, so it yields the same batches: the plan's
crops and flips are fed to DALI per sample. Two pipelines, as the dataset asks:
* pad, crop and flip (32 px sets): DALI pads only with a constant, so the images are
  reflect-padded once, up front, and DALI crops the padded images;
* random-resized crops (folder sets stored larger than the networks' input): a linear resize of
  each plan box (DALI's ROI, no antialiasing), which samples exactly where the device-resident
  loader's roi_align does; the evaluation's centre crop is a box of the output size.

`decode_images` decodes image files (JPEG with nvJPEG on the GPU: DALI's mixed decoder) into the
uint8 arrays of a folder set's cache, as ktfast.folders does with PIL where there is no GPU.
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
        images = self.x  # [N, 3, S, S]
        if not self.stored_size:
            pos = _reflect(torch.arange(-PAD, size + PAD), size)
            images = images[:, :, pos[:, None], pos[None, :]]  # reflect-padded
        self._images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # DALI reads HWC
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu \
            else None
        # Synchronous: the inputs of a batch are fed right before it runs.
        self._pipe = dali.pipeline.Pipeline(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                                            exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with self._pipe:
            images = fn.external_source(name="images", layout="HWC")
            images = images.gpu() if gpu else images
            normalise = dict(mirror=fn.external_source(name="mirror"), mean=(255 * self.mean.flatten()).tolist(),
                             std=(255 * self.std.flatten()).tolist(), dtype=types.FLOAT, output_layout="CHW")
            if self.stored_size:
                # ROI corners in the layout's (y, x) order, in pixels of the stored image.
                boxes = fn.resize(images, size=(size, size), roi_start=fn.external_source(name="roi_start"),
                                  roi_end=fn.external_source(name="roi_end"), roi_relative=False,
                                  interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
                out = fn.crop_mirror_normalize(boxes, **normalise)
            else:
                out = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=fn.external_source(name="crop_x"),
                                               crop_pos_y=fn.external_source(name="crop_y"), **normalise)
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


def decode_images(paths: list, size: int, gpu: bool, batch_size: int = 128, num_threads: int = 4) -> np.ndarray:
    """Image files as uint8 [N, 3, size, size]: RGB, the centre square resized to `size` (linear,
    antialiased when shrinking): what ktfast.folders' PIL decoding computes, within a few levels.
    `gpu`: DALI's mixed decoder (nvJPEG, then the resize on the GPU); else DALI's CPU decoder.
    Each image's centre square is read off its header, so an unreadable file fails here, with
    PIL's one-line error naming it."""
    dali = _import_dali()
    from nvidia.dali import fn, types

    from ktfast.folders import centre_square

    pipe = dali.pipeline.Pipeline(batch_size=batch_size, num_threads=num_threads,
                                  device_id=torch.cuda.current_device() if gpu else None,
                                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    with pipe:
        images = fn.decoders.image(fn.external_source(name="files"), device="mixed" if gpu else "cpu",
                                   output_type=types.RGB)
        pipe.set_outputs(fn.resize(images, size=(size, size), roi_start=fn.external_source(name="roi_start"),
                                   roi_end=fn.external_source(name="roi_end"), roi_relative=False,
                                   interp_type=types.INTERP_LINEAR, antialias=True))
    pipe.build()
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]  # the last one may be smaller: DALI takes any size up to batch_size
        starts, ends = [], []
        for path in batch:
            top, left, side = centre_square(path)
            top_left = np.array([top, left], np.float32)  # (y, x), as the layout HWC
            starts.append(top_left)
            ends.append(top_left + side)
        pipe.feed_input("files", [np.fromfile(path, np.uint8) for path in batch])
        pipe.feed_input("roi_start", starts)
        pipe.feed_input("roi_end", ends)
        (decoded,) = pipe.run()
        if gpu:
            decoded = decoded.as_cpu()
        out[start:start + len(batch)] = decoded.as_array().transpose(0, 3, 1, 2)
    return out
