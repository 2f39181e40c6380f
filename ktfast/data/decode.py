"""Image files into uint8 arrays `[3, S, S]`: RGB, the centre square resized to S. Two decoders
that agree within a few levels: PIL (any machine), and NVIDIA DALI's (nvJPEG on the GPU with its
mixed decoder; its CPU decoder elsewhere). Folder sets use them to fill their cache; the DALI
loader takes `import_dali` from here too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ktfast.data.types import DatasetError
from ktfast.paths import dali_available as available  # noqa: F401  (the folder sets and tests ask here)

MISSING = "the dali loader needs NVIDIA DALI: pip install 'ktfast[dali]' (nvidia-dali-cuda130)"


def import_dali():
    try:
        import nvidia.dali as dali
    except ImportError:
        raise DatasetError(MISSING) from None
    return dali


def unreadable(path: Path, e: Exception) -> DatasetError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DatasetError(f"cannot read image {path}: {reason}")


def centre_square(path: Path) -> tuple[float, float, int]:
    """(top, left, side) of the image's centre square, from the file's header alone."""
    try:
        with Image.open(path) as img:
            return _centre_square(*img.size)
    except (OSError, ValueError) as e:  # not an image
        raise unreadable(path, e) from None


def _centre_square(w: int, h: int) -> tuple[float, float, int]:
    side = min(w, h)
    return (h - side) / 2, (w - side) / 2, side


def pil_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 [3, size, size]: RGB, the shorter side resized to `size`, the centre square."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 2/4/8, staying >= size
            img = img.convert("RGB")
    except (OSError, ValueError) as e:  # unreadable, truncated, not an image
        raise unreadable(path, e) from None
    if img.size != (size, size):
        top, left, side = _centre_square(*img.size)
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(img).transpose(2, 0, 1)


def dali_images(paths: list, size: int, gpu: bool, batch_size: int = 128, num_threads: int = 4) -> np.ndarray:
    """Image files as uint8 [N, 3, size, size]: RGB, the centre square resized to `size` (linear,
    antialiased when shrinking): what `pil_image` computes, within a few levels.
    `gpu`: DALI's mixed decoder (nvJPEG, then the resize on the GPU); else DALI's CPU decoder.
    Each image's centre square is read off its header, so an unreadable file fails here, with
    PIL's one-line error naming it."""
    dali = import_dali()
    from nvidia.dali import fn, types

    pipe = dali.pipeline.Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=torch.cuda.current_device() if gpu else None,
        exec_async=False,
        exec_pipelined=False,
        prefetch_queue_depth=1,
    )
    with pipe:
        images = fn.decoders.image(
            fn.external_source(name="files"), device="mixed" if gpu else "cpu", output_type=types.RGB
        )
        pipe.set_outputs(
            fn.resize(
                images,
                size=(size, size),
                roi_start=fn.external_source(name="roi_start"),
                roi_end=fn.external_source(name="roi_end"),
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
        )
    pipe.build()
    out = np.empty((len(paths), 3, size, size), np.uint8)
    for start in range(0, len(paths), batch_size):
        batch = paths[
            start : start + batch_size
        ]  # the last one may be smaller: DALI takes any size up to batch_size
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
        out[start : start + len(batch)] = decoded.as_array().transpose(0, 3, 1, 2)
    return out
