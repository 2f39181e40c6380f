"""The resolved settings of one training run (written to `config.json` in the run directory)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A training option that cannot be (an unknown keyword, a value out of range); one line. The
    command line's bad flags are of this kind too (`ktfast.args.UsageError`)."""


def setting(
    default,
    *,
    recipe: bool = False,
    resume: bool = False,
    cache: bool | str = False,
    data: bool = False,
    flag: bool = True,
):
    """A field of TrainConfig with the facts that the rules about settings read, one place per setting
    (docs/ARCHITECTURE.md, "A setting"). recipe: it joins a study's recipe (`study.recipe`: a study is
    joined only with the same); resume: its flag, given with --resume, must agree with the run; cache:
    it keys the pretrain cache (`pretrain.cache_path`; "if set": only when not None, so that the keys
    made before it existed stay); data: the weights were trained on it (a checkpoint of other data is
    another run's); flag: a flag of its name (and a `ktfast.train` keyword) sets it."""
    facts = {"recipe": recipe, "resume": resume, "cache": cache, "data": data, "flag": flag}
    return field(default=default, metadata=facts)


@dataclass
class TrainConfig:
    # The CIFAR recipe of the DCL papers' reference code; every number can be overridden.
    dataset: str = setting("digits", recipe=True, resume=True, cache=True, data=True)
    data_dir: str | None = setting(None)
    # "train": train/test; "search": search_train/search_val (docs/ARCHITECTURE.md §5)
    split: str = setting("train", recipe=True, resume=True, cache=True, data=True)
    train_fraction: float | None = setting(None, recipe=True, resume=True, cache=True, data=True)
    # The class-balanced part of the training set held out as the run's val split (ARCHITECTURE §2); None: none.
    # Not in a study's recipe: the search scores on its own split, never a val fraction.
    val_fraction: float | None = setting(None, resume=True, cache="if set", data=True)
    epochs: int = setting(200, recipe=True, resume=True, cache=True)
    batch_size: int = setting(64, recipe=True, resume=True, cache=True)
    optimizer: str = setting("sgd", recipe=True, resume=True, cache=True)  # sgd (Nesterov) | adam
    lr: float = setting(0.1, recipe=True, resume=True, cache=True)
    momentum: float = setting(0.9, recipe=True, resume=True, cache=True)
    weight_decay: float = setting(5e-4, recipe=True, resume=True, cache=True)
    # lr × lr_decay at these fractions of the run: 60, 120, 180 of 200 epochs.
    lr_decay_at: tuple[float, ...] = setting((0.3, 0.6, 0.9), recipe=True, resume=True, cache=True)
    lr_decay: float = setting(0.1, recipe=True, resume=True, cache=True)
    # From --seeds; it draws the fraction's subset (the pretrain cache keys that on its own), the order of
    # the samples and their augmentation.
    seed: int = setting(0, recipe=True, data=True, flag=False)
    device: str = setting("cpu")
    amp: bool = setting(False, recipe=True, cache=True)
    compile: bool = setting(False)
    # On CUDA the whole step is one CUDA graph (docs/ARCHITECTURE.md §2); ignored on a CPU.
    cuda_graph: bool = setting(True)
    reference: bool = setting(False)
    loader: str = setting("auto")
    # Horizontal fusion of same-architecture nodes (docs/ARCHITECTURE.md §2); None: on for the CUDA fast path.
    fuse: bool | None = setting(None, recipe=True)
    # Several processes (docs/ARCHITECTURE.md §10): how many, and what each holds ("data": every node, a share of
    # each batch; "nodes": a share of the nodes, every batch); BatchNorm over the global batch.
    world_size: int = setting(1, recipe=True, flag=False)  # from the launch
    place: str = setting("data", recipe=True)
    sync_bn: bool = setting(False, recipe=True)

    def __post_init__(self):
        # The whole training set is no subset: its runs share the pretrained teachers across seeds,
        # as the runs without a fraction do (the subset of each class would be all of it anyway).
        if self.train_fraction == 1:
            self.train_fraction = None

    def milestones(self) -> list[int]:
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_decay_at})

    def fused(self) -> bool:
        return not self.unfused_reason()

    def unfused_reason(self) -> str:
        """Why model nodes of one model do not run fused ("" where they do): by default they do on
        the CUDA fast path."""
        if self.sync_bn:
            return "--sync-bn (the global BatchNorm's all-reduce does not run under vmap)"
        if self.fuse is not None:
            return "" if self.fuse else "--no-fuse"
        if self.reference:
            return "--reference"
        return "" if self.device.startswith("cuda") else "CPU (--fuse to turn it on)"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_decay_at"] = list(self.lr_decay_at)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lr_decay_at" in d:
            d["lr_decay_at"] = tuple(d["lr_decay_at"])
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _having(fact: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata[fact])


def recipe_fields() -> tuple[str, ...]:
    """What every worker of a study must share (`study.recipe`)."""
    return _having("recipe")


def resume_checked() -> tuple[str, ...]:
    """The settings whose flag, given with --resume, must agree with the run: it continues as it started."""
    return _having("resume")


def data_fields() -> tuple[str, ...]:
    """What a run's weights were trained on: a checkpoint whose config differs here is another run's."""
    return _having("data")


def flag_fields() -> tuple[str, ...]:
    """The settings set by a flag of their name (`--batch-size`: batch_size) and a `ktfast.train` keyword."""
    return _having("flag")


def cache_key_fields() -> tuple[str, ...]:
    """The settings that change what a pretrained teacher learns (`pretrain.cache_path`)."""
    return _having("cache")


def cache_key(cfg: TrainConfig) -> dict:
    """{setting: value} of `cache_key_fields`, less those marked "if set" that are None."""
    values, fields = cfg.to_dict(), TrainConfig.__dataclass_fields__
    return {
        k: values[k]
        for k in cache_key_fields()
        if fields[k].metadata["cache"] is True or values[k] is not None
    }
