"""The resolved settings of one training run (written to `config.json` in the run directory)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A training option that cannot be (an unknown keyword, a value out of range); one line. The
    command line's bad flags are of this kind too (`ktfast.args.UsageError`)."""


@dataclass
class TrainConfig:
    # The CIFAR recipe of the DCL papers' reference code; every number can be overridden.
    dataset: str = "digits"
    data_dir: str | None = None
    split: str = "train"  # "train": train/test; "search": search_train/search_val (docs/ARCHITECTURE.md §5)
    train_fraction: float | None = None
    # The class-balanced part of the training set held out as the run's val split (ARCHITECTURE §2); None: none.
    val_fraction: float | None = None
    epochs: int = 200
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # lr × lr_decay at these fractions of the run: 60, 120, 180 of 200 epochs.
    lr_decay_at: tuple[float, ...] = (0.3, 0.6, 0.9)
    lr_decay: float = 0.1
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    compile: bool = False
    cuda_graph: bool = True  # on CUDA the whole step is one CUDA graph (docs/ARCHITECTURE.md §2); ignored on a CPU
    reference: bool = False
    loader: str = "auto"
    # Horizontal fusion of same-architecture nodes (docs/ARCHITECTURE.md §2); None: on for the CUDA fast path.
    fuse: bool | None = None
    # Several processes (docs/ARCHITECTURE.md §10): how many, and what each holds ("data": every node, a share of
    # each batch; "nodes": a share of the nodes, every batch); BatchNorm over the global batch.
    world_size: int = 1
    place: str = "data"
    sync_bn: bool = False

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
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "lr_decay_at" in d:
            d["lr_decay_at"] = tuple(d["lr_decay_at"])
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
