"""`ktfast train --tensorboard` (docs/ARCHITECTURE.md §11): TensorBoard event files beside the run's metrics.

One writer per node under `RUN/tensorboard/NODE`, so that TensorBoard overlays the nodes: each
epoch's `loss/train`, `loss/test`, `acc/train`, `acc/test`, the run's `images_per_s` and the node's
learning rate `lr` (model nodes that train). The values are those of metrics.jsonl, which stays the
contract; they are stored in double precision, so that they read back equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SUBDIR = "tensorboard"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """An `on_epoch(epoch, row)` callback of `Trainer.fit`."""

    def __init__(self, run: Path, trainer):
        from torch.utils.tensorboard import SummaryWriter

        self.trainer = trainer
        self.writers = {name: SummaryWriter(str(run / SUBDIR / name)) for name in trainer.graph.nodes}

    def __call__(self, epoch: int, row: dict) -> None:
        lrs = self.trainer.epoch_lrs
        for name, writer in self.writers.items():
            scalars = {
                f"{what}/{split}": row[split][name][what]
                for what in ("loss", "acc")
                for split in ("train", "test")
            }
            scalars["images_per_s"] = row["images_per_s"]
            if name in lrs:
                scalars["lr"] = lrs[name]
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, epoch, new_style=True, double_precision=True)
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
