import hashlib
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktfast.data import (
    PAD,
    DatasetError,
    class_balanced_subset,
    dataset_info,
    datasets,
    decode,
    load_arrays,
    make_loader,
    split_indices,
)

SYN = "synthetic:classes=5,size=16,train=200,test=60"
DALI = pytest.param(
    "dali", marks=pytest.mark.skipif(not decode.available(), reason="NVIDIA DALI is not installed")
)
KINDS = ["gpu", "torch", DALI]
DATASETS = ["digits", SYN]


def epoch_batches(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5) for (xa, ya), (xb, yb) in zip(a, b)
    )


def to_uint8(ld, x):
    """Undo the normalisation of a batch: the uint8 pixels it was made from."""
    return ((x.cpu() * ld.std + ld.mean) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_train_batches_shapes_range_and_label_multiset(kind, dataset):
    info = dataset_info(dataset)
    ld = make_loader(dataset, "train", 32, torch.device("cpu"), 0, loader=kind)
    assert (ld.dataset, ld.num_classes, ld.image_size) == (dataset, info.num_classes, info.image_size)
    batches = epoch_batches(ld, 1)
    assert len(batches) == len(ld) == ld.num_samples // 32
    for x, y in batches:
        assert x.shape == (32, 3, info.image_size, info.image_size) and x.dtype == torch.float32
        assert y.shape == (32,) and y.dtype == torch.int64
        assert x.device == y.device == torch.device("cpu")
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    # Normalised with the training set's per-channel statistics: pixel range maps to this interval.
    assert (xs >= -ld.mean / ld.std - 1e-4).all() and (xs <= (1 - ld.mean) / ld.std + 1e-4).all()
    assert xs.mean((0, 2, 3)).abs().max() < 0.25 and (xs.std((0, 2, 3)) - 1).abs().max() < 0.25
    # Every sample of the split once, but for those of the dropped partial batch.
    dropped = ld.y[ld.plan(1).order[len(ys) :]]
    assert len(dropped) == ld.num_samples % 32
    assert Counter(ys.tolist()) + Counter(dropped.tolist()) == Counter(ld.y.tolist())


@pytest.mark.parametrize("dataset", DATASETS)
def test_normalisation_statistics_are_the_training_images_per_channel_mean_and_std(dataset):
    a = load_arrays(dataset)
    x = a.train_x.double() / 255
    assert torch.allclose(a.mean.double(), x.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(a.std.double(), x.std((0, 2, 3), correction=0), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_set_smaller_than_a_batch_gives_one_partial_batch(kind):
    ld = make_loader(SYN, "train", 500, "cpu", 0, loader=kind)
    ((x, y),) = list(ld)
    assert len(ld) == 1 and len(y) == ld.num_samples == 200
    assert Counter(y.tolist()) == Counter(ld.y.tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_an_epoch_is_a_pure_function_of_seed_and_epoch(kind):
    def loader(seed):
        return make_loader(SYN, "train", 20, "cpu", seed, loader=kind)

    a = epoch_batches(loader(0), 3)
    assert same_batches(a, epoch_batches(loader(0), 3))
    resumed = loader(0)
    for epoch in range(3):
        epoch_batches(resumed, epoch)
    assert same_batches(a, epoch_batches(resumed, 3))
    firsts = [epoch_batches(loader(0), epoch)[0][1].tolist() for epoch in range(5)]
    assert firsts[3] == a[0][1].tolist() and len({tuple(f) for f in firsts}) == 5
    assert not torch.equal(epoch_batches(loader(1), 3)[0][1], a[0][1])


@pytest.mark.parametrize("other", ["torch", DALI])
def test_loader_kinds_give_identical_batches_and_test_samples(other):
    for split in ("train", "search_train"):
        a = make_loader(SYN, split, 16, "cpu", 3, loader="gpu")
        b = make_loader(SYN, split, 16, "cpu", 3, loader=other)
        for epoch in (0, 2):
            assert same_batches(epoch_batches(a, epoch), epoch_batches(b, epoch))
    ta = make_loader("digits", "test", 100, "cpu", 0, loader="gpu")
    tb = make_loader("digits", "test", 100, "cpu", 0, loader=other)
    assert torch.equal(ta.indices, tb.indices)
    assert same_batches(list(ta), list(tb))


def test_auto_picks_the_resident_loader_on_the_cpu_and_a_missing_dali_says_how_to_get_it(monkeypatch):
    assert type(make_loader(SYN, "train", 16, "cpu", 0)).__name__ == "TensorLoader"
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)  # as if not installed
    assert not decode.available()
    with pytest.raises(DatasetError, match=r"pip install 'ktfast\[dali\]'"):
        make_loader(SYN, "train", 16, "cpu", 0, loader="dali")


def test_torch_loader_workers_change_nothing_and_leave_the_global_rng_alone():
    one = make_loader(SYN, "train", 32, "cpu", 0, loader="torch")
    two = make_loader(SYN, "train", 32, "cpu", 0, loader="torch", num_workers=2)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    assert same_batches(epoch_batches(one, 1), epoch_batches(two, 1))
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_test_split_is_ordered_complete_and_not_augmented(kind):
    arrays = load_arrays("digits")
    assert (len(arrays.train_y), len(arrays.test_y)) == (1437, 360)
    ld = make_loader("digits", "test", 64, "cpu", 5, loader=kind)
    assert ld.num_samples == 360 and len(ld) == 6
    batches = epoch_batches(ld, 7)
    assert [len(y) for _, y in batches] == [64] * 5 + [40]
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(ys, arrays.test_y) and torch.equal(to_uint8(ld, xs), arrays.test_x)
    other_seed = make_loader("digits", "test", 64, "cpu", 9, loader=kind)
    assert same_batches(batches, list(other_seed))


@pytest.mark.parametrize("dataset", DATASETS)
def test_search_splits_are_disjoint_balanced_fixed_and_inside_train(dataset):
    arrays = load_arrays(dataset)
    tr = make_loader(dataset, "search_train", 16, "cpu", 0)
    va = make_loader(dataset, "search_val", 16, "cpu", 0)
    train, val = set(tr.indices.tolist()), set(va.indices.tolist())
    assert not train & val and train | val == set(range(len(arrays.train_y)))
    # 20 % of each class; the same split whatever the run seed.
    per_class = Counter(arrays.train_y.tolist())
    assert Counter(va.y.tolist()) == {c: round(0.2 * n) for c, n in per_class.items()}
    assert torch.equal(make_loader(dataset, "search_val", 16, "cpu", 7).indices, va.indices)
    # Images and labels from the training set; the validation split in fixed order, unaugmented.
    assert torch.equal(tr.x, arrays.train_x[tr.indices]) and torch.equal(va.y, arrays.train_y[va.indices])
    xs, ys = torch.cat([x for x, _ in va]), torch.cat([y for _, y in va])
    assert torch.equal(ys, va.y) and torch.equal(to_uint8(va, xs), va.x)
    assert tr.train and not va.train


def test_search_splits_never_see_a_test_image():
    # The synthetic images carry independent noise, so equal bytes would mean the same sample.
    rows = lambda x: {r.numpy().tobytes() for r in x}  # noqa: E731
    test = rows(load_arrays(SYN).test_x)
    for split in ("search_train", "search_val"):
        assert not rows(make_loader(SYN, split, 16, "cpu", 0).x) & test


def test_train_fraction_keeps_a_class_balanced_seeded_fraction():
    full = make_loader("digits", "train", 16, "cpu", 0)
    ld = make_loader("digits", "train", 16, "cpu", 0, train_fraction=0.1)
    per_class = Counter(full.y.tolist())
    assert Counter(ld.y.tolist()) == {c: round(0.1 * n) for c, n in per_class.items()}
    assert torch.equal(make_loader("digits", "train", 16, "cpu", 0, train_fraction=0.1).indices, ld.indices)
    assert not torch.equal(
        make_loader("digits", "train", 16, "cpu", 1, train_fraction=0.1).indices, ld.indices
    )
    search = make_loader("digits", "search_train", 16, "cpu", 0, train_fraction=0.5)
    assert set(search.indices.tolist()) < set(
        make_loader("digits", "search_train", 16, "cpu", 0).indices.tolist()
    )
    assert make_loader("digits", "test", 16, "cpu", 0, train_fraction=0.1).num_samples == 360
    labels = torch.tensor([0] * 10 + [1] * 20 + [2])
    idx = class_balanced_subset(labels, 0.5, 0)
    assert Counter(labels[idx].tolist()) == {0: 5, 1: 10, 2: 1}  # at least one of each class


def match_augmentation(plain: torch.Tensor, aug: torch.Tensor) -> tuple[bool, bool]:
    """Which (crop, flip) of reflect-padded `plain` gives `aug`: (moved, flipped), each True only
    when no candidate without it matches. Asserts that some candidate matches."""
    size = plain.shape[-1]
    padded = F.pad(plain[None].float(), (PAD,) * 4, mode="reflect")[0].to(torch.uint8)
    found = {
        (top != PAD or left != PAD, flip)
        for top in range(2 * PAD + 1)
        for left in range(2 * PAD + 1)
        for flip in (False, True)
        if torch.equal(
            aug,
            padded[:, top : top + size, left : left + size].flip(2)
            if flip
            else padded[:, top : top + size, left : left + size],
        )
    }
    assert found, "not a crop or flip of its source image"
    return all(moved for moved, _ in found), all(flipped for _, flipped in found)


def crops_and_flips(plain: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """[N, 3] (top, left, flipped) of each image of `aug`: the one crop of its reflect-padded `plain`
    image, flipped or not, that it is (a noisy image matches only one)."""
    size = plain.shape[-1]
    padded = F.pad(plain.float(), (PAD,) * 4, mode="reflect").to(torch.uint8)
    windows = (
        padded.unfold(2, size, 1).unfold(3, size, 1).permute(0, 2, 3, 1, 4, 5)
    )  # [N, top, left, 3, H, W]
    same = torch.stack([windows, windows.flip(-1)], 1).eq(aug[:, None, None, None]).flatten(4).all(4)
    assert same.flatten(1).sum(1).eq(1).all(), "an image is not exactly one crop of its source"
    flipped, top, left = same.nonzero()[:, 1:].T  # nonzero() lists the images in order
    return torch.stack([top, left, flipped], 1)


@pytest.mark.parametrize("kind", KINDS)
def test_an_epoch_crops_at_every_offset_and_flips_half_the_images(kind):
    ld = make_loader(SYN, "train", 50, "cpu", 0, loader=kind)
    ld.set_epoch(3)
    images = torch.cat([to_uint8(ld, x) for x, _ in ld])
    top, left, flipped = crops_and_flips(ld.x[ld.plan(3).order], images).T
    n = len(images)
    assert n == ld.num_samples == 200
    # Every offset of the padded image, and no other, on both axes (each of the 9 is missed by all
    # 200 images with probability (8/9)^200 < 1e-10).
    assert set(top.tolist()) == set(left.tolist()) == set(range(2 * PAD + 1))
    # Each image flipped with probability 1/2: the count is Binomial(n, 1/2), within 5 sigma of n/2.
    assert abs(flipped.sum().item() - n / 2) <= 5 * math.sqrt(n / 4)


@pytest.mark.parametrize("kind", KINDS)
def test_digits_are_cropped_but_never_flipped(kind):
    ld = make_loader("digits", "train", 64, "cpu", 0, loader=kind)
    x, _ = next(iter(ld))
    order = ld.plan(0).order
    found = [match_augmentation(ld.x[order[i]], a) for i, a in enumerate(to_uint8(ld, x))]
    assert any(moved for moved, _ in found) and not any(flipped for _, flipped in found)


def test_datasets_are_deterministic_and_synthetic_takes_any_size():
    a = load_arrays("synthetic:size=20,train=30,test=10")
    assert a.train_x.shape == (30, 3, 20, 20) and a.train_x.dtype == torch.uint8
    datasets._load_arrays.cache_clear()
    b = load_arrays("synthetic:size=20,train=30,test=10")
    assert a is not b and torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    datasets._load_arrays.cache_clear()
    torch.set_default_dtype(torch.float64)  # as the float64 comparisons of training steps build their runs
    try:
        c = load_arrays("synthetic:size=20,train=30,test=10")
    finally:
        torch.set_default_dtype(torch.float32)
        datasets._load_arrays.cache_clear()
    assert torch.equal(a.train_x, c.train_x)
    digits = load_arrays("digits")
    assert (
        digits.train_x.shape[1:] == (3, 32, 32) and digits.train_x.max() == 255 and digits.train_x.min() == 0
    )
    assert torch.equal(digits.train_x[:, 0], digits.train_x[:, 2])  # grey replicated to RGB


def test_dataset_info_reads_nothing(tmp_path):
    assert dataset_info("digits") == dataset_info("digits", tmp_path)
    assert (dataset_info("digits").num_classes, dataset_info("digits").image_size) == (10, 32)
    info = dataset_info("synthetic:classes=100,size=64")
    assert (info.num_classes, info.image_size, info.channels) == (100, 64, 3)
    cifar = dataset_info("cifar100", tmp_path / "absent")
    assert (cifar.name, cifar.num_classes, cifar.image_size) == ("cifar100", 100, 32)
    assert not (tmp_path / "absent").exists()


def write_cifar(root, dataset, n_train=50, n_test=20):
    """A small CIFAR folder in torchvision's real format: pickled dicts of uint8 rows (RGB planes
    of 32x32) and labels, split into the same files as the real one."""
    rng = np.random.default_rng(0)
    if dataset == "cifar10":
        base, label_key, classes = root / "cifar-10-batches-py", "labels", 10
        files = [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        base, label_key, classes = root / "cifar-100-python", "fine_labels", 100
        files = [("train", n_train), ("test", n_test)]
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    base.mkdir(parents=True)
    for name, n in files:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }
        (base / name).write_bytes(pickle.dumps(batch))
    (base / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return base


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """Writes a tiny CIFAR folder; returns a function of the dataset name giving its folder.

    torchvision's reader checks each file's MD5 against the real CIFAR's digests, which no
    other file can have. So the expected digests (and only they) are set to those of the written
    files: the reader and its integrity check then run unchanged on them."""
    import torchvision

    def write(dataset):
        base = write_cifar(tmp_path, dataset)
        md5 = lambda name: hashlib.md5((base / name).read_bytes()).hexdigest()  # noqa: E731
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5(cls.meta["filename"])))
        return base

    monkeypatch.setenv("KTFAST_OFFLINE", "1")  # a mistake in the folder must not start a download
    return write


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_from_a_torchvision_folder(dataset, tiny_cifar, tmp_path):
    base = tiny_cifar(dataset)
    train_files, test_file, key = (
        (sorted(base.glob("data_batch_*")), base / "test_batch", "labels")
        if dataset == "cifar10"
        else ([base / "train"], base / "test", "fine_labels")
    )
    raw = [pickle.loads(f.read_bytes()) for f in train_files]
    test = pickle.loads(test_file.read_bytes())

    ld = make_loader(dataset, "test", 8, "cpu", 0, data_dir=tmp_path)
    assert (ld.num_samples, ld.num_classes, ld.image_size) == (20, 10 if dataset == "cifar10" else 100, 32)
    xs, ys = map(torch.cat, zip(*ld))
    assert ys.tolist() == test[key]
    # The pixels exactly as stored: rows of R, G, B planes of 32x32.
    assert torch.equal(to_uint8(ld, xs), torch.from_numpy(test["data"]).view(-1, 3, 32, 32))

    arrays = load_arrays(dataset, tmp_path)
    assert arrays.train_y.tolist() == [v for batch in raw for v in batch[key]]
    assert torch.equal(
        arrays.train_x, torch.from_numpy(np.concatenate([b["data"] for b in raw])).view(-1, 3, 32, 32)
    )
    x, y = next(iter(make_loader(dataset, "train", 16, "cpu", 0, data_dir=tmp_path)))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert split_indices(arrays, "search_val").numel() < 50


def test_missing_cifar_offline_fails_with_one_line_and_tries_no_download(tmp_path, monkeypatch):
    import socket

    import torchvision

    monkeypatch.setenv("KTFAST_OFFLINE", "1")
    tried = []  # what would wait on the network
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: tried.append("download"))
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: tried.append("connect"))
    with pytest.raises(DatasetError) as info:
        make_loader("cifar10", "train", 8, "cpu", 0, data_dir=tmp_path / "none")
    message = str(info.value)
    assert tried == []
    assert "\n" not in message and "cifar10" in message and str(tmp_path / "none") in message


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: dataset_info("mnist"), "mnist"),
        (lambda: dataset_info("synthetic:classes=x"), "'x'"),
        (lambda: dataset_info("synthetic:colours=3"), "colours"),
        (lambda: dataset_info("synthetic:size=4"), "size"),
        (lambda: dataset_info("digits:size=8"), "size"),
        (lambda: make_loader("digits", "val", 8, "cpu", 0), "val"),
        (lambda: make_loader("digits", "train", 8, "cpu", 0, loader="dali2"), "dali2"),
        (lambda: make_loader("digits", "train", 8, "cpu", 0, train_fraction=1.5), "1.5"),
        (lambda: make_loader("digits", "train", 0, "cpu", 0), "batch size"),
    ],
)
def test_bad_names_raise_one_line_dataset_errors(call, needle):
    with pytest.raises(DatasetError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and needle in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_batches_equal_cpu_batches(kind):
    for split in ("train", "test"):
        cpu = make_loader(SYN, split, 32, "cpu", 0, loader=kind)
        gpu = make_loader(SYN, split, 32, "cuda", 0, loader=kind)
        batches = epoch_batches(gpu, 2)
        assert all(x.is_cuda and y.is_cuda for x, y in batches)
        assert same_batches(epoch_batches(cpu, 2), [(x.cpu(), y.cpu()) for x, y in batches])
