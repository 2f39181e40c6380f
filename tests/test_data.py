import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from ktfast.data import DatasetError, class_balanced_subset, dataset_info, load_arrays, make_loader

SYN = "synthetic:classes=5,size=16,train=200,test=60"


def labels_of(loader):
    return Counter(torch.cat([y for _, y in loader]).tolist())


@pytest.mark.parametrize("kind", ["tensor", "torch"])
@pytest.mark.parametrize("dataset", ["digits", SYN])
def test_batches_shapes_ranges_and_label_multiset(kind, dataset):
    ld = make_loader(dataset, "train", 32, "cpu", 0, loader=kind)
    info = dataset_info(dataset)
    batches = list(ld)
    assert len(batches) == len(ld) == ld.num_samples // 32
    for x, y in batches:
        assert x.shape == (32, 3, info.image_size, info.image_size) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < info.num_classes
    xs = torch.cat([x for x, _ in batches])
    assert abs(xs.mean().item()) < 0.3 and 0.6 < xs.std().item() < 1.5
    ys = torch.cat([y for _, y in batches])
    # Every sample but the dropped partial batch, each once.
    full = Counter(ld.y.tolist())
    assert not Counter(ys.tolist()) - full and sum(full.values()) - len(ys) < 32


def test_loader_kinds_give_identical_batches():
    a = make_loader(SYN, "train", 16, "cpu", 3, loader="tensor")
    b = make_loader(SYN, "train", 16, "cpu", 3, loader="torch")
    for ep in (0, 2):
        a.set_epoch(ep), b.set_epoch(ep)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb)
    ta = make_loader("digits", "test", 100, "cpu", 0, loader="tensor")
    tb = make_loader("digits", "test", 100, "cpu", 0, loader="torch")
    assert torch.equal(torch.cat([y for _, y in ta]), torch.cat([y for _, y in tb]))


def test_epochs_are_a_pure_function_of_seed_and_epoch():
    def epoch(seed, ep, warm=0):
        ld = make_loader(SYN, "train", 20, "cpu", seed)
        for e in range(warm):
            ld.set_epoch(e)
            list(ld)
        ld.set_epoch(ep)
        return [b for b in ld]

    a = epoch(0, 3)
    b = epoch(0, 3, warm=3)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(epoch(0, 4)[0][1], a[0][1])
    assert not torch.equal(epoch(1, 3)[0][1], a[0][1])


def test_test_split_is_ordered_complete_and_not_augmented():
    arrays = load_arrays("digits")
    ld = make_loader("digits", "test", 64, "cpu", 5)
    assert ld.num_samples == 360 and len(arrays.train_y) == 1437
    xs, ys = zip(*ld)
    assert torch.equal(torch.cat(ys), arrays.test_y)
    again = torch.cat([x for x, _ in make_loader("digits", "test", 64, "cpu", 9)])
    assert torch.equal(torch.cat(xs), again)


def test_search_splits_are_disjoint_balanced_and_inside_train():
    arrays = load_arrays(SYN)
    tr = make_loader(SYN, "search_train", 16, "cpu", 0)
    va = make_loader(SYN, "search_val", 16, "cpu", 0)
    assert tr.num_samples + va.num_samples == len(arrays.train_y) and va.num_samples == 40
    assert set(Counter(va.y.tolist()).values()) == {8}
    as_rows = lambda x: {bytes(r.numpy().tobytes()) for r in x}  # noqa: E731
    train_rows, val_rows, test_rows = as_rows(tr.x), as_rows(va.x), as_rows(arrays.test_x)
    assert not train_rows & val_rows and not val_rows & test_rows and not train_rows & test_rows
    assert (train_rows | val_rows) == as_rows(arrays.train_x)


def test_train_fraction_is_class_balanced_and_seeded():
    ld = make_loader("digits", "train", 16, "cpu", 0, train_fraction=0.1)
    counts = Counter(ld.y.tolist())
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1
    assert 130 <= ld.num_samples <= 150
    other = make_loader("digits", "train", 16, "cpu", 1, train_fraction=0.1)
    assert not torch.equal(ld.x, other.x)
    idx = class_balanced_subset(torch.tensor([0] * 10 + [1] * 20), 0.5, 0)
    assert Counter(int(i) >= 10 for i in idx) == {False: 5, True: 10}


def test_augmentation_crops_everywhere_flips_synthetic_but_never_digits():
    def plain_and_augmented(dataset):
        ld = make_loader(dataset, "train", 1000, "cpu", 0)
        x, _ = next(iter(ld))
        order = torch.randperm(ld.num_samples, generator=torch.Generator().manual_seed(0))
        plain = ((ld.x[order[: len(x)]].float() / 255) - ld.mean) / ld.std
        return plain, x

    plain, aug = plain_and_augmented(SYN)
    flipped = [torch.allclose(a, p.flip(2), atol=1e-5) for p, a in zip(plain, aug)]
    same = [torch.allclose(a, p, atol=1e-5) for p, a in zip(plain, aug)]
    assert any(flipped) and not all(same)
    plain, aug = plain_and_augmented("digits")
    assert not any(torch.allclose(a, p.flip(2), atol=1e-5) and not torch.allclose(a, p, atol=1e-5)
                   for p, a in zip(plain, aug))
    assert not all(torch.allclose(a, p, atol=1e-5) for p, a in zip(plain, aug))


def write_cifar10(root, n_train=50, n_test=20):
    """A small CIFAR-10 folder in torchvision's real format (pickled batches)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return base


def test_cifar10_from_a_torchvision_folder(tmp_path, monkeypatch):
    import torchvision

    import hashlib

    base = write_cifar10(tmp_path)
    # torchvision checks each file's MD5 against the real CIFAR-10's: give it these files' digests.
    md5 = lambda name: hashlib.md5((base / name).read_bytes()).hexdigest()  # noqa: E731
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5("batches.meta")))
    ld = make_loader("cifar10", "test", 8, "cpu", 0, data_dir=tmp_path)
    x, y = next(iter(ld))
    assert ld.num_samples == 20 and ld.num_classes == 10 and x.shape == (8, 3, 32, 32)
    with open(base / "test_batch", "rb") as f:
        assert y.tolist() == [int(v) for v in pickle.load(f)["labels"][:8]]
    load_arrays.cache_clear()


def test_bad_names_raise_dataset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KTFAST_OFFLINE", "1")
    for call in (lambda: dataset_info("mnist"), lambda: make_loader("digits", "val", 8, "cpu", 0),
                 lambda: make_loader("digits", "train", 8, "cpu", 0, loader="dali2"),
                 lambda: dataset_info("synthetic:classes=x"), lambda: dataset_info("synthetic:colours=3"),
                 lambda: make_loader("cifar100", "train", 8, "cpu", 0, data_dir=tmp_path / "none")):
        with pytest.raises(DatasetError) as info:
            call()
        assert "\n" not in str(info.value)
