"""Datasets of image files (docs/ARCHITECTURE.md §5): Tiny ImageNet-200 and class folders (Stanford Dogs, Cars, CUB).

Both are decoded once into uint8 arrays `[N, 3, S, S]` (shorter side resized to S, centre square;
by DALI's mixed decoder on a GPU where DALI is installed, else by PIL) and cached beside their
folder as `<folder>.ktfast-<S>px.pt`: decoding ~100k JPEGs takes minutes, loading the cache
seconds. The cache records the folder's fingerprint (number of files, newest modification time of
any file or folder in it) and is rebuilt when that changes, e.g. when an image is added, removed
or rewritten.

Their registry entries are in `ktfast.data.datasets.DATASETS`:
* `tinyimagenet`: `<data-dir>/tiny-imagenet-200/` as distributed (train/<wnid>/images/*.JPEG,
  val/images/*.JPEG with val/val_annotations.txt, wnids.txt); val is the test set; 64 px.
* `imagefolder:path=DIR[,size=S,crop=C]`: DIR (relative to the data directory, or absolute) holds
  train/<class>/ and test/<class>/ folders of .jpg/.jpeg/.png files (nested folders allowed), or
  only <class>/ folders: then every image is in the training set, there is no test set, and runs
  use its search split (class-balanced halves). Labels are the class folder names in sorted order.
  Stored at S = 256; the networks see C = 224 px (at most S): random-resized crops in training,
  the centre crop in evaluation. The path is part of the dataset's name, so two folders never
  share a pretrain cache entry or a search study name; it cannot contain a comma.
"""

from __future__ import annotations

import fcntl
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ktfast.data import decode
from ktfast.data.types import PAD, DatasetError, DatasetInfo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TINY_FOLDER = "tiny-imagenet-200"
TINY_SIZE = 64
FINE_GRAINED_VAL_FRACTION = 0.5  # the ensemble paper's exploration split: class-balanced halves
_CACHE_VERSION = 1  # bump when decoding changes: older caches are then rebuilt


# ---- tinyimagenet -------------------------------------------------------------------------------
def _tiny_folder(root: Path) -> Path:
    folder = root / TINY_FOLDER
    if not (folder / "wnids.txt").is_file():
        raise DatasetError(
            f"dataset tinyimagenet not found: expected {folder} with train/, val/ and wnids.txt "
            f"(the unzipped tiny-imagenet-200.zip; it is never downloaded)"
        )
    return folder


def _wnids(folder: Path) -> list[str]:
    # Sorted, as torchvision's ImageFolder would label train/: the file's own order is arbitrary.
    return sorted(set((folder / "wnids.txt").read_text().split()))


def tinyimagenet_info(name: str, options: dict, root: Path) -> DatasetInfo:
    return DatasetInfo(name, len(_wnids(_tiny_folder(root))), TINY_SIZE)


def read_tinyimagenet(info: DatasetInfo, options: dict, root: Path):
    folder = _tiny_folder(root)

    def files():
        wnids = _wnids(folder)
        label = {w: i for i, w in enumerate(wnids)}
        train = [(path, label[w]) for w in wnids for path in _images(folder / "train" / w)]
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DatasetError(f"dataset tinyimagenet: {annotations} is missing")
        test = []
        for line in filter(str.strip, annotations.read_text().splitlines()):
            file, wnid, *_ = line.split("\t") + [""]  # a line without a class gets "": an error below
            if wnid not in label:
                raise DatasetError(
                    f"dataset tinyimagenet: {annotations} names class {wnid!r}, not in wnids.txt"
                )
            test.append((folder / "val" / "images" / file, label[wnid]))
        return train, test

    return _cached(folder, TINY_SIZE, files)


# ---- imagefolder --------------------------------------------------------------------------------
def _image_folder(name: str, options: dict, root: Path) -> tuple[Path, Path, Path | None]:
    """The folder, its training folder and its test folder (None when it has no train/test split)."""
    if not options["path"]:
        raise DatasetError(
            f"dataset {name!r} needs path=DIR: a folder of class folders, relative to the data directory"
        )
    folder = root / Path(options["path"]).expanduser()
    if not folder.is_dir():
        raise DatasetError(
            f"dataset {name!r}: no folder {folder} (expected train/<class>/ and test/<class>/ "
            f"image folders, or <class>/ folders)"
        )
    if (folder / "train").is_dir():
        if not (folder / "test").is_dir():
            raise DatasetError(
                f"dataset {name!r}: {folder} has train/ but no test/ (for a folder without "
                f"a test set, name its train/ folder as the path)"
            )
        return folder, folder / "train", folder / "test"
    return folder, folder, None


def _classes(name: str, folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"dataset {name!r}: {folder} has no class folders")
    return classes


def imagefolder_info(name: str, options: dict, root: Path) -> DatasetInfo:
    if options["size"] < 2 * PAD:
        raise DatasetError(f"dataset {name!r}: size must be at least {2 * PAD}")
    _, train, _ = _image_folder(name, options, root)
    crop = min(options["crop"], options["size"])  # crop=size: CIFAR's pad, crop and flip instead
    return DatasetInfo(
        name,
        len(_classes(name, train)),
        crop,
        stored_size=options["size"],
        val_fraction=FINE_GRAINED_VAL_FRACTION,
    )


def read_imagefolder(info: DatasetInfo, options: dict, root: Path):
    folder, train_dir, test_dir = _image_folder(info.name, options, root)

    def files():
        classes = _classes(info.name, train_dir)
        train = []
        for label, c in enumerate(classes):
            images = _images(train_dir / c)
            if not images:
                raise DatasetError(f"dataset {info.name!r}: class folder {train_dir / c} has no images")
            train += [(path, label) for path in images]
        test = []
        if test_dir is not None:
            for c in _classes(info.name, test_dir):
                if c not in classes:
                    raise DatasetError(f"dataset {info.name!r}: {test_dir / c} is not a class of {train_dir}")
                test += [(path, classes.index(c)) for path in _images(test_dir / c)]
        return train, test

    return _cached(folder, options["size"], files)


# ---- decoding and the cache ---------------------------------------------------------------------
def _images(folder: Path) -> list[Path]:
    """The image files under `folder`, nested folders included, in a fixed (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, f)
            for f in filenames
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
        ]
    return sorted(found)


def _decode_all(items: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On a GPU with DALI installed, DALI's mixed decoder (nvJPEG); else PIL in threads (it releases
    the GIL while it decodes and resizes). A file DALI cannot decode (a truncated JPEG) is left to
    PIL, whose error names it."""
    x = None
    if items and torch.cuda.is_available() and decode.available():
        try:
            x = decode.dali_images([path for path, _ in items], size, gpu=True)
        except RuntimeError:
            print("DALI could not decode every image: decoding with PIL", file=sys.stderr, flush=True)
    if x is None:
        x = np.empty((len(items), 3, size, size), np.uint8)
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
            for i, image in enumerate(pool.map(lambda item: decode.pil_image(item[0], size), items)):
                x[i] = image
    return torch.from_numpy(x), torch.tensor([label for _, label in items], dtype=torch.int64)


def _fingerprint(folder: Path) -> list[int]:
    """[number of files, newest mtime in ns of any file or folder]: adding, removing or renaming a
    file changes its folder's mtime; rewriting one changes its own."""
    count, newest = 0, folder.stat().st_mtime_ns
    for dirpath, _, filenames in os.walk(folder):
        newest = max(newest, os.stat(dirpath).st_mtime_ns)
        for f in filenames:
            newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime_ns)
        count += len(filenames)
    return [count, newest]


def cache_path(folder: Path, size: int) -> Path:
    """Beside the folder, not in it: writing the cache must not change the folder's fingerprint."""
    folder = folder.resolve()
    return folder.parent / f"{folder.name}.ktfast-{size}px.pt"


def _cached(folder: Path, size: int, files):
    """The decoded (train_x, train_y, test_x, test_y) of the images `files()` lists, from the cache
    when it was made from the folder as it is now; else decoded and cached (atomically)."""
    cache = cache_path(folder, size)
    try:
        lock = open(cache.with_name(cache.name + ".lock"), "w")
    except OSError as e:  # a read-only data directory: no cache, decode every time
        print(
            f"cannot write the image cache beside {folder} ({e.strerror}): decoding the images every run",
            file=sys.stderr,
            flush=True,
        )
        return _decode_sets(files(), size)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs (search workers) wait for the one that decodes
        fingerprint = _fingerprint(folder)
        if cache.exists():
            stored = torch.load(cache, mmap=True, weights_only=True)  # mapped: loads in seconds
            if stored["version"] == _CACHE_VERSION and stored["fingerprint"] == fingerprint:
                return stored["train_x"], stored["train_y"], stored["test_x"], stored["test_y"]
        train_test = files()
        print(
            f"decoding {sum(map(len, train_test))} images of {folder} once, into {cache}",
            file=sys.stderr,
            flush=True,
        )
        arrays = _decode_sets(train_test, size)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            torch.save(
                {
                    "version": _CACHE_VERSION,
                    "fingerprint": fingerprint,
                    **dict(zip(("train_x", "train_y", "test_x", "test_y"), arrays)),
                },
                tmp,
            )
            os.replace(tmp, cache)  # readers see the old cache or the new one, never half of one
        except (
            OSError,
            RuntimeError,
        ) as e:  # a full disk (RuntimeError from torch's writer) costs the cache only
            print(
                f"could not write the image cache {cache}: {str(e).splitlines()[0]}",
                file=sys.stderr,
                flush=True,
            )
        finally:
            tmp.unlink(missing_ok=True)
        return arrays


def _decode_sets(train_test, size: int):
    return tuple(t for items in train_test for t in _decode_all(items, size))
