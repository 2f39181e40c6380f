"""Image-file datasets (ktfast.data.folders): real JPEG and PNG files in the Tiny ImageNet and class-folder
layouts, their labels, sizes and cache, the exploration split, and a training run on one."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ktfast import data
from ktfast.cli import main
from ktfast.data import DatasetError, dataset_info, datasets, decode, folders, load_arrays, make_loader

COLOURS = [(220, 30, 30), (30, 190, 40), (40, 60, 220)]  # one per class: the label can be read off the pixels
# Train/test images per class: odd counts make the halves of the exploration split uneven.
TRAIN_COUNTS, TEST_COUNTS = [4, 6, 5], [2, 2, 3]
CLASSES = ["b_class", "a_class", "c_class"]  # written in this order; labelled in sorted order
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_image(path: Path, colour, size=(48, 32), grey=False):
    """The class colour in the centre square, black bands beside it: the bands must be cropped away."""
    w, h = size
    side = min(w, h)
    pixels = np.zeros((h, w, 3), np.uint8)
    top, left = (h - side) // 2, (w - side) // 2
    pixels[top : top + side, left : left + side] = colour
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("L") if grey else image).save(path)


def write_class_folder(root: Path, split: str | None, counts) -> None:
    """Images of every class under root/split/<class>/ (root/<class>/ when split is None), of
    several sizes and aspect ratios, as .jpg, .JPEG and .png, one in a nested folder."""
    sizes = [(48, 32), (32, 48), (80, 60), (32, 32)]
    for label in np.argsort(CLASSES):  # a label order unlike the sorted one
        folder = root / split / CLASSES[label] if split else root / CLASSES[label]
        for i in range(counts[label]):
            name = ["img{}.jpg", "IMG{}.JPEG", "img{}.png", "nested/img{}.png"][i % 4].format(i)
            write_image(folder / name, COLOURS[sorted(CLASSES).index(CLASSES[label])], sizes[i % 4])
        (folder / "notes.txt").write_text("not an image")


@pytest.fixture
def birds(tmp_path):
    """A class-folder set with train/ and test/, read at 32 px."""
    write_class_folder(tmp_path / "birds", "train", TRAIN_COUNTS)
    write_class_folder(tmp_path / "birds", "test", TEST_COUNTS)
    return "imagefolder:path=birds,size=32", tmp_path


def write_tiny(root: Path, per_class=3, val_per_class=2) -> Path:
    """Tiny ImageNet's layout: wnids.txt (not sorted), train/<wnid>/images/*.JPEG with a boxes file,
    val/images/*.JPEG labelled by val/val_annotations.txt; one greyscale JPEG, as the real set has."""
    folder = root / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        colour = COLOURS[sorted(wnids).index(w)]
        for i in range(per_class):
            grey = (w, i) == ("n0200", 0)
            write_image(folder / "train" / w / "images" / f"{w}_{i}.JPEG", colour, (64, 64), grey=grey)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i in range(val_per_class * len(wnids)):
        w = wnids[i % len(wnids)]
        write_image(folder / "val" / "images" / f"val_{i}.JPEG", COLOURS[sorted(wnids).index(w)], (64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def colour_labels(x: torch.Tensor) -> list[int]:
    """The class whose colour is nearest to each image's centre pixel."""
    centre = x[:, :, x.shape[2] // 2, x.shape[3] // 2].float()
    return torch.cdist(centre, torch.tensor(COLOURS, dtype=torch.float32)).argmin(1).tolist()


def reload(dataset, root):
    datasets._load_arrays.cache_clear()  # read again, not from this process's memory
    return load_arrays(dataset, root)


def test_imagefolder_classes_labels_and_sizes(birds):
    dataset, root = birds
    info = dataset_info(dataset, root)
    assert (info.num_classes, info.image_size) == (3, 32)
    a = load_arrays(dataset, root)
    assert a.train_x.shape == (sum(TRAIN_COUNTS), 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (sum(TEST_COUNTS), 3, 32, 32) and a.test_y.dtype == torch.int64
    # Labels in sorted class-name order, every image of its folder (notes.txt skipped, nested found).
    assert Counter(a.train_y.tolist()) == {sorted(CLASSES).index(c): n for c, n in zip(CLASSES, TRAIN_COUNTS)}
    assert Counter(a.test_y.tolist()) == {sorted(CLASSES).index(c): n for c, n in zip(CLASSES, TEST_COUNTS)}
    assert colour_labels(a.train_x) == a.train_y.tolist() and colour_labels(a.test_x) == a.test_y.tolist()
    # The centre square of every image, whatever its aspect ratio: no black band left.
    for x in (a.train_x, a.test_x):
        assert (x.float().mean((2, 3)) - torch.tensor(COLOURS)[colour_labels(x)]).abs().max() < 12


def test_imagefolder_default_size_and_exact_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    (tmp_path / "set" / "one").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "set" / "one" / "exact.png")
    write_image(tmp_path / "set" / "two" / "large.jpg", COLOURS[1], (400, 300))
    a = load_arrays("imagefolder:path=set", tmp_path)
    info = dataset_info("imagefolder:path=set", tmp_path)
    assert (info.image_size, info.stored_size, info.resized_crops) == (224, 256, True)  # the networks see 224
    assert a.train_x.shape == (2, 3, 256, 256) and len(a.test_y) == 0
    assert torch.equal(a.train_x[0], torch.from_numpy(pixels).permute(2, 0, 1))  # already 256: untouched
    assert colour_labels(a.train_x[1:]) == [1]


def test_tinyimagenet_layout_labels_and_64px(tmp_path):
    write_tiny(tmp_path)
    info = dataset_info("tinyimagenet", tmp_path)
    assert (info.num_classes, info.image_size) == (3, 64)
    a = load_arrays("tinyimagenet", tmp_path)
    assert a.train_x.shape == (9, 3, 64, 64) and a.test_x.shape == (6, 3, 64, 64)
    assert a.train_x.dtype == a.test_x.dtype == torch.uint8
    assert a.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted wnids
    # val_i is wnids.txt's (i mod 3)-th wnid: n0300, n0100, n0200 -> labels 2, 0, 1.
    assert a.test_y.tolist() == [2, 0, 1, 2, 0, 1]
    assert colour_labels(a.test_x) == a.test_y.tolist()
    grey = a.train_x[a.train_y == 1][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # greyscale read as RGB
    assert colour_labels(a.train_x[a.train_y != 1]) == a.train_y[a.train_y != 1].tolist()


def test_cache_is_written_once_reused_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    folder = write_tiny(tmp_path)
    first = load_arrays("tinyimagenet", tmp_path)
    cache = tmp_path / "tiny-imagenet-200.ktfast-64px.pt"
    assert cache.is_file() and not list(tmp_path.glob("*.tmp"))
    assert folders.cache_path(folder, 64) == cache

    decoded = []  # the files decoded, by PIL or DALI
    real_decode = folders._decode_all
    monkeypatch.setattr(
        folders, "_decode_all", lambda items, size: decoded.extend(items) or real_decode(items, size)
    )
    again = reload("tinyimagenet", tmp_path)
    assert (
        not decoded and torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    )

    write_image(folder / "train" / "n0300" / "images" / "n0300_9.JPEG", COLOURS[2], (64, 64))
    grown = reload("tinyimagenet", tmp_path)
    assert len(decoded) == 16 and len(grown.train_y) == 10 and grown.train_y.tolist().count(2) == 4
    decoded.clear()
    reload("tinyimagenet", tmp_path)
    assert not decoded  # the rebuilt cache is reused in turn

    write_image(folder / "val" / "images" / "val_0.JPEG", COLOURS[0], (64, 64))  # rewritten in place
    assert colour_labels(reload("tinyimagenet", tmp_path).test_x[:1]) == [0] and decoded


def write_smooth_images(folder: Path) -> list[Path]:
    """Colour ramps (what a photo is, locally) of several sizes and aspect ratios, as JPEG and PNG,
    one greyscale: decoders and resamplers then agree to a few levels."""
    paths = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (64, 64), (300, 200), (33, 47), (40, 40), (257, 31)]):
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60], -1).astype(np.uint8)
        image = Image.fromarray(pixels).convert("L" if i == 4 else "RGB")
        paths.append(folder / f"ramp{i}.{'jpg' if i % 2 == 0 else 'png'}")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        image.save(paths[-1], quality=95)
    return paths


@pytest.mark.skipif(not decode.available(), reason="NVIDIA DALI is not installed")
def test_dali_decodes_image_files_as_pil_does(tmp_path):
    paths = write_smooth_images(tmp_path)
    pil = np.stack([decode.pil_image(path, 32) for path in paths])
    decoded = decode.dali_images(paths, 32, gpu=False, batch_size=3)  # 7 files: a partial last batch
    assert decoded.shape == pil.shape == (7, 3, 32, 32) and decoded.dtype == np.uint8
    diff = np.abs(decoded.astype(int) - pil.astype(int))
    assert diff.mean() < 1 and diff.max() <= 4
    grey = decoded[4]
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="cannot read image .*bad.jpg"):
        decode.dali_images(paths + [tmp_path / "bad.jpg"], 32, gpu=False)


@pytest.mark.skipif(not (torch.cuda.is_available() and decode.available()), reason="needs a GPU and DALI")
def test_on_a_gpu_the_cache_is_decoded_by_dalis_mixed_decoder(tmp_path, monkeypatch):
    paths = write_smooth_images(tmp_path / "ramps" / "all")
    pil = torch.from_numpy(np.stack([decode.pil_image(path, 32) for path in sorted(paths)]))
    monkeypatch.setattr(decode, "pil_image", lambda path, size: pytest.fail("decoded by PIL"))
    a = load_arrays("imagefolder:path=ramps,size=32", tmp_path)
    assert (a.train_x.int() - pil.int()).abs().float().mean() < 1


def test_imagefolder_cache_is_per_size(birds):
    dataset, root = birds
    load_arrays(dataset, root)
    small = load_arrays("imagefolder:path=birds,size=16", root)
    assert small.train_x.shape[2:] == (16, 16)
    assert sorted(p.name for p in root.glob("*.pt")) == ["birds.ktfast-16px.pt", "birds.ktfast-32px.pt"]


def test_search_split_of_a_folder_set_is_disjoint_balanced_halves_of_train(birds):
    dataset, root = birds
    a = load_arrays(dataset, root)
    tr = make_loader(dataset, "search_train", 4, "cpu", 0, data_dir=root)
    va = make_loader(dataset, "search_val", 4, "cpu", 0, data_dir=root)
    train, val = set(tr.indices.tolist()), set(va.indices.tolist())
    assert not train & val and train | val == set(range(len(a.train_y)))
    halves = Counter(tr.y.tolist()), Counter(va.y.tolist())
    for c, n in Counter(a.train_y.tolist()).items():
        assert halves[0][c] + halves[1][c] == n and abs(halves[0][c] - halves[1][c]) <= 1
    # Fixed whatever the run seed; training half augmented, evaluation half not; never a test image.
    assert torch.equal(make_loader(dataset, "search_val", 4, "cpu", 9, data_dir=root).indices, va.indices)
    assert tr.train and not va.train
    assert torch.equal(tr.x, a.train_x[tr.indices]) and torch.equal(va.y, a.train_y[va.indices])


def test_train_fraction_on_a_folder_set_is_class_balanced(birds):
    dataset, root = birds
    ld = make_loader(dataset, "train", 4, "cpu", 0, data_dir=root, train_fraction=0.5)
    per_class = Counter(load_arrays(dataset, root).train_y.tolist())
    assert Counter(ld.y.tolist()) == {c: round(0.5 * n) for c, n in per_class.items()}


def test_a_folder_without_train_and_test_is_all_training_data(tmp_path):
    write_class_folder(tmp_path / "flat", None, TRAIN_COUNTS)
    dataset = "imagefolder:path=flat,size=16"
    a = load_arrays(dataset, tmp_path)
    assert len(a.train_y) == sum(TRAIN_COUNTS) and len(a.test_y) == 0
    assert colour_labels(a.train_x) == a.train_y.tolist()
    with pytest.raises(DatasetError, match="no test set"):
        make_loader(dataset, "test", 4, "cpu", 0, data_dir=tmp_path)
    assert make_loader(dataset, "search_val", 4, "cpu", 0, data_dir=tmp_path).num_samples == 7


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("tinyimagenet", "none/tiny-imagenet-200"),
        ("imagefolder:path=dogs", "none/dogs"),
        ("imagefolder", "path=DIR"),
    ],
)
def test_a_missing_folder_is_one_line_naming_the_path(tmp_path, dataset, expected):
    for call in (
        lambda: dataset_info(dataset, tmp_path / "none"),
        lambda: make_loader(dataset, "train", 4, "cpu", 0, data_dir=tmp_path / "none"),
    ):
        with pytest.raises(DatasetError) as info:
            call()
        assert "\n" not in str(info.value) and expected in str(info.value)
        if "none" in expected:
            assert str(tmp_path / expected) in str(info.value)


def test_an_unreadable_image_is_one_line_naming_the_file(birds):
    dataset, root = birds
    bad = root / "birds" / "test" / "a_class" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError) as info:
        load_arrays(dataset, root)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_train_a_graph_end_to_end_on_a_folder_set(birds, monkeypatch):
    dataset, root = birds
    monkeypatch.setenv("KTFAST_CACHE", str(root / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    out = root / "run"
    assert (
        main(
            [
                "train",
                "--graph",
                str(EXAMPLES / "dml2.json"),
                "--dataset",
                dataset,
                "--data-dir",
                str(root),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["dataset"] == dataset
    assert os.listdir(out)


def _plan_boxes_hold_torchvision_rules(plan, stored):
    (top, left), (h, w) = plan.offsets.T, plan.sizes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= stored).all() and (left + w <= stored).all()
    area, ratio = h * w / stored**2, w / h
    whole = (h == stored) & (w == stored)  # the fallback when no draw fits
    assert ((area >= 0.08 - 0.02) & (area <= 1) | whole).all()
    assert ((ratio >= 0.75 - 0.05) & (ratio <= 4 / 3 + 0.05) | whole).all()


def test_folder_sets_train_on_random_resized_crops_and_evaluate_the_centre(birds):
    dataset, root = birds
    dataset += ",crop=24"  # stored 32 px, the networks see 24 px
    train = make_loader(dataset, "train", 5, "cpu", 0, data_dir=root, loader="gpu")
    plan = train.plan(0)
    assert isinstance(
        make_loader(dataset, "train", 5, "cpu", 0, data_dir=root), data.TorchLoader
    )  # auto, on a CPU
    _plan_boxes_hold_torchvision_rules(plan, 32)
    assert plan.sizes.unique(dim=0).shape[0] > 1 and torch.equal(train.plan(0).offsets, plan.offsets)
    assert not torch.equal(train.plan(1).sizes, plan.sizes)
    # Every loader computes the plan's crops: the torch loader with torchvision's resized_crop,
    # the device-resident one with one roi_align per batch. They agree but on a crop's outermost
    # pixels, where an up-scaling interpolation clamps to the crop and roi_align reads past it.
    a = next(iter(train))
    b = next(iter(make_loader(dataset, "train", 5, "cpu", 0, data_dir=root, loader="torch")))
    assert a[0].shape == b[0].shape == (5, 3, 24, 24) and torch.equal(a[1], b[1])
    close = (a[0] - b[0]).abs() < 1e-4
    assert close.float().mean() > 0.8 and close[:, :, 4:-4, 4:-4].all()
    # The crops are of the planned images: the label's colour survives the crop.
    x = train.x[plan.order[:5]].float().mean((2, 3))
    mean, std = train.mean.view(3), train.std.view(3)
    assert torch.allclose((a[0].mean((2, 3)) * std + mean) * 255, x, atol=25)
    # Evaluation: the 24 px centre of the stored 32 px image, exactly, in every loader.
    test = make_loader(dataset, "test", 4, "cpu", 0, data_dir=root, loader="gpu")
    xt, yt = next(iter(test))
    xr, _ = next(iter(make_loader(dataset, "test", 4, "cpu", 0, data_dir=root, loader="torch")))
    centre = (test.x[:4, :, 4:28, 4:28].float() / 255 - test.mean) / test.std
    assert torch.allclose(xt, centre, atol=1e-5) and torch.allclose(xr, centre, atol=1e-5)


@pytest.mark.skipif(not decode.available(), reason="NVIDIA DALI is not installed")
def test_dali_resizes_the_plan_boxes_as_the_resident_loader_does(tmp_path):
    """DALI's ROI resize samples where roi_align does, over the whole crop, borders included:
    on images with detail (noise, not flat class colours), every epoch, flips too."""
    gen = np.random.default_rng(0)
    for label in range(3):
        for i in range(7):
            path = tmp_path / "noisy" / "train" / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
    shutil.copytree(tmp_path / "noisy" / "train", tmp_path / "noisy" / "test")
    dataset = "imagefolder:path=noisy,size=32,crop=20"
    for split, epochs in (("train", (0, 1)), ("test", (0,))):
        a = make_loader(dataset, split, 8, "cpu", 5, data_dir=tmp_path, loader="gpu")
        b = make_loader(dataset, split, 8, "cpu", 5, data_dir=tmp_path, loader="dali")
        for epoch in epochs:
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            pairs = list(zip(a, b))
            if split == "train":  # crops of several sizes, some flipped: every path is compared
                plan = b.plan(epoch)
                assert plan.flips.any() and not plan.flips.all() and plan.sizes.unique(dim=0).shape[0] > 1
            assert len(pairs) == len(a) == len(b) > 0
            for (xa, ya), (xb, yb) in pairs:
                assert xb.shape == xa.shape == (len(ya), 3, 20, 20) and torch.equal(ya, yb)
                assert torch.allclose(xa, xb, atol=1e-4)


def test_a_crop_as_large_as_the_stored_images_keeps_pad_crop_and_flip(birds):
    dataset, root = birds
    info = dataset_info(dataset, root)  # size=32, crop defaults to 224, at most 32
    assert (info.image_size, info.resized_crops) == (32, False)
    assert make_loader(dataset, "train", 4, "cpu", 0, data_dir=root).plan(0).sizes is None
