"""Data from the user's code (docs/ARCHITECTURE.md §5): `--dataset py:MODULE:FACTORY`. A user's copy of digits
gives the built-in digits' batches exactly (fractions, search splits, seeds, augmentation); a set
over the memory budget is read on demand by the torch loader's workers; bad sets are one line."""

import json
from pathlib import Path

import pytest
import torch
import user_data

from ktfast.cli import main
from ktfast.data import DatasetError, TensorLoader, TorchLoader, dataset_info, make_loader
from ktfast.data.datasets import _load_arrays
from ktfast.data.user import MEMORY_ENV

DATA = Path(user_data.__file__).resolve()
GRAPH = {
    "version": 1,
    "name": "one",
    "target": "n",
    "nodes": [{"name": "n", "model": "resnet8"}],
    "edges": [{"from": "label", "to": "n", "loss": "ce", "gate": "through"}],
}
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(autouse=True)
def fresh_sets():
    """Each test reads the sets anew (a process keeps what it has read, per name)."""
    _load_arrays.cache_clear()
    yield
    _load_arrays.cache_clear()


def batches(dataset: str, split: str, **kw) -> list:
    loader = make_loader(dataset, split, 64, "cpu", 3, **kw)
    loader.set_epoch(1)
    return loader, list(loader)


@pytest.mark.parametrize("factory", ["digits", "digits_float"])
def test_a_users_digits_gives_the_builtin_digits_batches(factory):
    """uint8 images, or float ones in [0, 1] (k/255 maps back to k exactly): equal to the bit."""
    name = f"py:{DATA}:{factory}"
    assert dataset_info(name) == dataset_info("digits").__class__(name, 10, 32, flip=False)
    splits = (("train", 0.5), ("search_train", None), ("search_val", None), ("test", None))
    for split, fraction in splits if factory == "digits" else splits[:1]:
        mine, got = batches(name, split, train_fraction=fraction)
        _, want = batches("digits", split, train_fraction=fraction)
        assert isinstance(mine, TensorLoader) and len(got) == len(want) > 0, split
        for (x, y), (x0, y0) in zip(got, want):
            assert torch.equal(y, y0) and torch.equal(x, x0), split


@pytest.mark.parametrize("factory", ["digits", "digits_targets"])
def test_a_set_over_the_memory_budget_is_read_on_demand_by_workers(factory, monkeypatch, capsys):
    """Labels from `targets` or from one pass. Its normalisation comes from 1,024 of the 1,437
    images, so the batches equal the built-in's once each is mapped back by its own statistics
    (float32: 1e-5 of pixel values in [0, 1])."""
    monkeypatch.setenv(MEMORY_ENV, "0")
    name = f"py:{DATA}:{factory}"
    mine, got = batches(name, "train", train_fraction=0.25, paths={})
    assert isinstance(mine, TorchLoader) and mine.num_workers >= 1
    assert "read on demand by the torch loader" in capsys.readouterr().out
    builtin, want = batches("digits", "train", train_fraction=0.25, loader="torch")
    assert len(got) == len(want) > 0
    for (x, y), (x0, y0) in zip(got, want):
        assert torch.equal(y, y0)
        torch.testing.assert_close(
            x * mine.std + mine.mean, x0 * builtin.std + builtin.mean, rtol=0, atol=1e-5
        )
    with pytest.raises(DatasetError, match="only the torch loader reads it"):
        make_loader(name, "train", 64, "cpu", 0, loader="gpu")


@pytest.mark.parametrize(
    "factory,needle",
    [
        ("not_a_pair", "returned Images, not a pair (train, test)"),
        ("normalised", "values outside [0, 1]"),
        ("grey", "is [1, 8, 8], not a tensor [3, H, W]"),
        ("nothing", "has no callable 'nothing'"),
    ],
)
def test_bad_sets_exit_2_in_one_line(factory, needle, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    code = main(
        [
            "train",
            "--graph",
            str(tmp_path / "g.json"),
            "--dataset",
            f"py:{DATA}:{factory}",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"dataset py:{DATA}:{factory}" in err and needle in err, err
    assert not out.exists()


def test_a_run_on_a_users_set_names_it_first_and_trains(tmp_path, capsys):
    name = f"py:{DATA}:digits"
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    assert (
        main(
            [
                "train",
                "--graph",
                str(tmp_path / "g.json"),
                "--dataset",
                name,
                "--epochs",
                "1",
                "--train-fraction",
                "0.05",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].endswith(f"runs user code: {name}") and "in memory, the device-resident loader" in lines[1]
    )
    [row] = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= v["acc"] <= 1 for v in row["test"].values())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["paths"]["loader"] == "gpu"
