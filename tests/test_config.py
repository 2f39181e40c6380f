"""What each TrainConfig setting is (its field metadata, docs/ARCHITECTURE.md "A setting") and the rules
that read it. The lists, cache paths, study recipes and config.json below were printed by the code
before the facts moved into the metadata (one literal list per rule), and must not change: existing
caches, studies and run directories depend on them."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from ktfast import config
from ktfast.api import train_options
from ktfast.args import UsageError
from ktfast.config import TrainConfig
from ktfast.engine.pretrain import cache_path
from ktfast.engine.session import _check_resume_flags
from ktfast.graph_search.study import recipe

FOLDER = TrainConfig(
    dataset="imagefolder:path=/x y,size=64",
    epochs=7,
    fuse=True,
    world_size=2,
    place="nodes",
    loader="torch",
    compile=True,
    cuda_graph=False,
    reference=True,
    data_dir="/d",
)
CONFIGS = {  # name: (config, its pretrain cache file under $KTFAST_CACHE/pretrained)
    "default": (TrainConfig(), "resnet8-digits-train-e200-0f415a9c88.pt"),
    "run": (
        TrainConfig(dataset="cifar10", epochs=5, batch_size=32, lr=0.05, seed=3, device="cuda", amp=True),
        "resnet8-cifar10-train-e5-dcbd40502c.pt",
    ),
    "fraction": (
        TrainConfig(train_fraction=0.1, seed=2, lr_decay_at=(0.5, 0.75), split="search"),
        "resnet8-digits-search-e200-e82343ce81.pt",
    ),
    "val": (
        TrainConfig(val_fraction=0.2, optimizer="adam", momentum=0.5, weight_decay=0.0, lr_decay=0.2),
        "resnet8-digits-train-e200-ab3bba0b38.pt",
    ),
    "folder": (FOLDER, "resnet8-imagefolder_path_x_y_size_64-train-e7-2dcdbe78e7.pt"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_pretrain_cache_keeps_every_existing_path(name, monkeypatch):
    monkeypatch.setenv("KTFAST_CACHE", "/CACHE")
    cfg, file = CONFIGS[name]
    assert cache_path("resnet8", cfg) == Path("/CACHE/pretrained") / file


def test_a_study_recipe_keeps_its_keys_and_values():
    """The recipe an existing study stored (its user attribute "ktfast"): a study is joined only with an
    equal one."""
    assert list(recipe(FOLDER).items()) == [
        ("dataset", "imagefolder:path=/x y,size=64"),
        ("split", "train"),
        ("train_fraction", None),
        ("epochs", 7),
        ("batch_size", 64),
        ("optimizer", "sgd"),
        ("lr", 0.1),
        ("momentum", 0.9),
        ("weight_decay", 0.0005),
        ("lr_decay_at", [0.3, 0.6, 0.9]),
        ("lr_decay", 0.1),
        ("seed", 0),
        ("amp", False),
        ("fuse", True),
        ("world_size", 2),
        ("place", "nodes"),
        ("sync_bn", False),
    ]  # "extra" (always {}) is gone: old studies join (study.RETIRED)
    cfg = CONFIGS["val"][0].replace(train_fraction=0.5, seed=4, amp=True, sync_bn=True)
    assert recipe(cfg) == {
        **recipe(FOLDER),
        "dataset": "digits",
        "train_fraction": 0.5,
        "epochs": 200,
        "optimizer": "adam",
        "momentum": 0.5,
        "weight_decay": 0.0,
        "lr_decay": 0.2,
        "seed": 4,
        "amp": True,
        "fuse": None,
        "world_size": 1,
        "place": "data",
        "sync_bn": True,
    }


def test_config_json_keeps_its_keys_in_their_order(tmp_path):
    FOLDER.save(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert list(written.items()) == [
        ("dataset", "imagefolder:path=/x y,size=64"),
        ("data_dir", "/d"),
        ("split", "train"),
        ("train_fraction", None),
        ("val_fraction", None),
        ("epochs", 7),
        ("batch_size", 64),
        ("optimizer", "sgd"),
        ("lr", 0.1),
        ("momentum", 0.9),
        ("weight_decay", 0.0005),
        ("lr_decay_at", [0.3, 0.6, 0.9]),
        ("lr_decay", 0.1),
        ("seed", 0),
        ("device", "cpu"),
        ("amp", False),
        ("compile", True),
        ("cuda_graph", False),
        ("reference", True),
        ("loader", "torch"),
        ("fuse", True),
        ("world_size", 2),
        ("place", "nodes"),
        ("sync_bn", False),
    ]  # "extra" (always {}) is gone: old files with it load
    assert TrainConfig.load(tmp_path / "config.json") == FOLDER


def test_each_rule_reads_the_settings_the_literal_lists_named():
    recipe_flags = (
        "dataset",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "lr_decay_at",
        "lr_decay",
    )  # args.RECIPE, which session.RESUME_CHECKED extended
    assert config.resume_checked() == (
        *recipe_flags[:1],
        "split",
        "train_fraction",
        "val_fraction",
        *recipe_flags[1:],
    )
    assert config.data_fields() == ("dataset", "split", "train_fraction", "val_fraction", "seed")  # DATA_KEYS
    assert config.cache_key_fields() == (
        "dataset",
        "split",
        "train_fraction",
        "val_fraction",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "lr_decay_at",
        "lr_decay",
        "amp",
    )
    assert config.recipe_fields() == tuple(recipe(TrainConfig()))
    assert train_options() == (
        "graph",
        "seeds",
        "seeds_one_by_one",
        "out",
        "resume",
        "like",
        "tensorboard",
        "dataset",
        "data_dir",
        "split",
        "train_fraction",
        "val_fraction",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "lr_decay_at",
        "lr_decay",
        "device",
        "amp",
        "compile",
        "cuda_graph",
        "reference",
        "loader",
        "fuse",
        "place",
        "sync_bn",
    )


def flip(monkeypatch, name: str, **facts) -> None:
    f = TrainConfig.__dataclass_fields__[name]
    monkeypatch.setattr(f, "metadata", MappingProxyType({**f.metadata, **facts}))


def test_the_resume_check_follows_the_metadata(monkeypatch):
    run, cfg = Path("runs/r"), TrainConfig(lr=0.05)
    given = SimpleNamespace(seeds=None, lr=0.3, amp=True)
    with pytest.raises(UsageError, match=r"^--lr: the run in runs/r has 0.05, not 0.3 \(--resume"):
        _check_resume_flags(run, given, cfg)
    flip(monkeypatch, "lr", resume=False)
    _check_resume_flags(run, given, cfg)  # --amp is not checked either
    flip(monkeypatch, "amp", resume=True)
    with pytest.raises(UsageError, match="^--amp: the run in runs/r has False, not True"):
        _check_resume_flags(run, given, cfg)


def test_the_cache_key_follows_the_metadata(monkeypatch):
    """A field marked cache "if set" joins the key only when it is not None: val_fraction came after
    the caches it would otherwise have re-keyed."""
    monkeypatch.setenv("KTFAST_CACHE", "/CACHE")
    cfg, file = CONFIGS["default"]
    flip(monkeypatch, "data_dir", cache="if set")
    assert cache_path("resnet8", cfg).name == file
    assert cache_path("resnet8", cfg.replace(data_dir="/d")).name != file
    flip(monkeypatch, "amp", cache=False)
    assert cache_path("resnet8", CONFIGS["run"][0]) == cache_path(
        "resnet8", CONFIGS["run"][0].replace(amp=False)
    )
