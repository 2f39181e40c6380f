"""Training a graph: the epochs around one training step (`ktfast.engine.step`: one forward of every node
per batch, Σ L_t back-propagated once, every trainable node stepped together; the DCL algorithm,
docs/ARCHITECTURE.md §2), evaluation of every node each epoch, and the run directory (graph.json,
config.json, metrics.jsonl, checkpoint.pt written atomically; with a val split, checkpoint-best.pt
at the target's best val accuracy). Over several processes (torchrun) the step's collectives are
those of `ktfast.engine.distributed.Placement`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktfast.config import TrainConfig
from ktfast.engine.checkpoint import (
    CheckpointError,
    append_line,
    load_models,
    read_checkpoint,
    save_atomic,
    truncate,
    write_text_atomic,
)
from ktfast.engine.distributed import Placement
from ktfast.engine.fuse import Unit, forward_unit
from ktfast.engine.optim import load_keeping_lr_tensors, plain_lrs, plain_schedule
from ktfast.engine.step import Step
from ktfast.graph import Graph
from ktfast.hold import hold
from ktfast.internals import uncompiled
from ktfast.losses import node_logits
from ktfast.paths import amp_dtype, fall_back

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"
METRICS = "metrics.jsonl"


class NonFiniteLoss(RuntimeError):
    """A node's training loss became NaN or infinite (docs/ARCHITECTURE.md §2, numerical health); one line."""


def splits(cfg: TrainConfig) -> tuple[str, str]:
    """The (training, evaluation) splits: the search never touches the test set."""
    return ("search_train", "search_val") if cfg.split == "search" else ("train", "test")


def forward(units: list[Unit], x, want_attention: set[str]):
    """Logits of every model node (and branch, where wanted) on one batch, and the attention maps
    where wanted."""
    logits, attention = {}, {}
    for unit in units:
        out, att = forward_unit(unit, x, unit.name in want_attention)
        logits.update(out)
        attention.update(att)
    return logits, attention


def autocast(cfg: TrainConfig):
    if not cfg.amp:
        return nullcontext()
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type, dtype=amp_dtype(cfg))


@torch.no_grad()
def evaluate(
    graph: Graph, models, units: list[Unit], loader, cfg: TrainConfig, placement: Placement | None = None
) -> dict:
    """{node: {"loss": cross-entropy, "acc": top-1}} for every model and ensemble node, the
    `units` (the nodes' models, fused or not) run in eval mode; over several ranks, each image of
    the split counted once (`placement`)."""
    placement = placement or Placement(graph, "data", 0, 1)
    models.eval()
    sums = torch.zeros(len(graph.nodes) * 2 + 1, device=cfg.device)  # loss and correct per node, count
    for x, y in loader:
        with autocast(cfg):
            logits, _ = placement.exchange(*forward(units, x, set()), grad=False, phase="eval")
        z = node_logits(graph, logits)
        per_node = [
            torch.stack(
                [
                    F.cross_entropy(z[name].to(sums.dtype), y, reduction="sum"),
                    (z[name].argmax(1) == y).sum().to(sums.dtype),
                ]
            )
            for name in graph.nodes
        ]
        sums[:-1] += torch.cat(per_node)
        sums[-1] += y.shape[0]
    sums = placement.reduce_sums(sums).tolist()
    models.train()
    for node in graph.model_nodes:
        if node.frozen:
            models[node.name].eval()
    count = sums[-1]
    return {
        name: {"loss": sums[2 * i] / count, "acc": sums[2 * i + 1] / count}
        for i, name in enumerate(graph.nodes)
    }


class RunPaths(dict):
    """The path each switch takes (config.json's "paths", `ktfast.paths`). A fast component that cannot
    run here changes it (`fall_back`): one line says so (also with --quiet), and once the run records
    (`start`), config.json follows at once (KTFAST_STRICT=1: an error instead)."""

    def __init__(self, paths: dict, out: Path | None = None, cfg: TrainConfig | None = None):
        super().__init__(paths)
        self.out, self.cfg, self.recording = out, cfg, False

    def fall_back(self, switch: str, path: str, error: BaseException) -> None:
        fall_back(self, switch, path, f"{type(error).__name__}: {error}")
        self.record()

    def start(self) -> None:
        """From here on config.json follows (a resume that failed before left its directory as it was)."""
        self.recording = True
        self.record()

    def record(self) -> None:
        """config.json's `"paths"`, rewritten atomically when they change (a fallback, a resume
        elsewhere). The rest of config.json is the command's (the config the run was started with)."""
        if self.out is None or not self.recording:
            return
        path = self.out / "config.json"
        config = json.loads(path.read_text()) if path.exists() else self.cfg.to_dict()
        if config.get("paths") != self:
            write_text_atomic(path, json.dumps({**config, "paths": dict(self)}, indent=2) + "\n")


class Trainer:
    """One run of one graph with one seed: the epochs around its `Step`, evaluation, the run
    directory. `fit()` trains to the end. `ktfast.engine.build.build_trainer` builds one from a config."""

    def __init__(
        self,
        graph: Graph,
        cfg: TrainConfig,
        out: Path | None,
        *,
        step: Step,
        models,
        units: list[Unit],
        loaders: tuple,
        scheduler,
        paths: RunPaths,
        placement: Placement,
        keeps_state: bool,
        log=print,
        progress=True,
    ):
        """`out`: the run directory, None but on the rank that writes it (`keeps_state`: the run
        has one); `units`: the nodes' models as evaluation runs them; `loaders`: (train, eval, val
        or None)."""
        self.graph, self.cfg, self.out, self.log, self.progress = graph, cfg, out, log, progress
        self.step, self.models, self.units, self.paths, self.placement = step, models, units, paths, placement
        self.train_loader, self.eval_loader, self.val_loader = loaders
        self.optimizer, self.scheduler, self.scaler = step.optimizer, scheduler, step.scaler
        (self.sums,) = step.sums
        self.keeps_state = keeps_state
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = step.total_steps
        self.epoch = 0  # epochs completed
        self.epoch_lrs: dict[str, float] = {}  # each trained node's learning rate in the current epoch
        # {"epoch", "acc"}: the epoch of checkpoint-best.pt and its target val accuracy (first best on ties).
        self.best_val: dict | None = None

    # The epoch's sums the step adds into on the device (`ktfast.engine.step.Sums`).
    loss_sums = property(lambda self: self.sums.loss_sums)
    correct = property(lambda self: self.sums.correct)
    skipped = property(lambda self: self.sums.skipped)

    def train_step(self, x, y, step) -> None:
        """One step (`ktfast.engine.step.Step`); `step` is the 1-based optimizer step."""
        self.step(x, y, step)

    def fall_back(self, switch: str, path: str, error: BaseException) -> None:
        self.paths.fall_back(switch, path, error)

    def node_lrs(self) -> dict[str, float]:
        """The learning rate of each trainable node: that of the parameter group holding its weights."""
        if self.optimizer is None:
            return {}
        lr = {id(p): float(g["lr"]) for g in self.optimizer.param_groups for p in g["params"]}
        return {n.name: lr[id(next(self.models[n.name].parameters()))] for n in self.graph.trainable}

    def train_epoch(self) -> tuple[dict, float, int]:
        """(per-node loss and accuracy, images/s, steps the grad scaler skipped) of one epoch."""
        self.start_epoch()
        seen = steps = 0
        start = time.perf_counter()
        for x, y in self.bar(self.train_loader):
            steps += 1
            self.train_step(x, y, self.epoch * self.steps_per_epoch + steps)
            seen += y.shape[0]
            hold(self.epoch + 1, steps)  # returns at once outside the tests
        return self.close_epoch(seen, steps, start)

    def start_epoch(self) -> None:
        self.train_loader.set_epoch(self.epoch)
        self.sums.zero()
        self.epoch_lrs = self.node_lrs()

    def bar(self, batches):
        cfg = self.cfg
        return tqdm(
            batches,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            unit="img",
            unit_scale=cfg.batch_size,
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
            total=self.steps_per_epoch,
        )

    def close_epoch(self, seen: int, steps: int, start: float) -> tuple[dict, float, int]:
        """The epoch's metrics (`train_epoch`) from the device sums, `seen` images in `steps` steps
        begun at `start`; the lr schedule steps."""
        graph = self.graph
        n = len(graph.nodes)
        loss_sums, correct, skipped, seen = self.placement.reduce_epoch(
            self.loss_sums, self.correct, self.skipped, seen
        )
        sums = torch.cat([loss_sums, correct, skipped.view(1)]).tolist()  # the epoch's one sync
        elapsed = time.perf_counter() - start
        train = {
            name: {"loss": sums[i] / steps, "acc": sums[n + i] / seen} for i, name in enumerate(graph.nodes)
        }
        if self.scheduler is not None:
            self.scheduler.step()
        return train, seen / elapsed, int(sums[-1])

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs. `on_epoch(epoch, row)` may stop the run by raising."""
        rows = []
        self.paths.start()
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            rows.append(self.end_epoch(start, *self.train_epoch(), on_epoch))
        return rows

    def end_epoch(self, start: float, train: dict, images_per_s: float, skipped: int, on_epoch=None) -> dict:
        """An epoch trained since `start`: checked, evaluated, written, logged; its metrics row."""
        bad = [name for name, v in train.items() if not math.isfinite(v["loss"])]
        if bad:  # nothing of this epoch is written: the last checkpoint is the last finite one
            raise NonFiniteLoss(
                f"non-finite training loss of node {', '.join(bad)} in epoch {self.epoch + 1}"
                + (
                    f"; {self.out} keeps the checkpoint of epoch {self.epoch}"
                    if self.out is not None and self.epoch
                    else ""
                )
            )
        self.placement.share_buffers(self.models)
        test = evaluate(self.graph, self.models, self.units, self.eval_loader, self.cfg, self.placement)
        val = (
            evaluate(self.graph, self.models, self.units, self.val_loader, self.cfg, self.placement)
            if self.val_loader is not None
            else None
        )
        self.epoch += 1
        row = {
            "epoch": self.epoch,
            "time_s": time.perf_counter() - start,
            "images_per_s": images_per_s,
            "train": train,
            "test": test,
            **({"val": val} if val else {}),
        }
        best = bool(val) and (self.best_val is None or val[self.graph.target]["acc"] > self.best_val["acc"])
        if best:
            self.best_val = {"epoch": self.epoch, "acc": val[self.graph.target]["acc"]}
        if self.scaler.is_enabled():
            row["skipped_steps"] = skipped
        if self.keeps_state:
            self.placement.collect_state({k: uncompiled(m) for k, m in self.models.items()}, self.optimizer)
        if self.out is not None:
            self.write_epoch(row, best)
        if self.progress:
            self.log(epoch_line(self.graph, row, self.cfg.epochs))
        if on_epoch is not None:
            on_epoch(self.epoch, row)
        return row

    def write_epoch(self, row: dict, best: bool = False) -> None:
        """The metrics row, then the checkpoint (and the best one, when the target's val accuracy is the
        best yet); if a checkpoint cannot be written the row is taken back, so the run directory stays at
        the previous epoch, whole (a best checkpoint ahead of it is that epoch's, trained again alike)."""
        size = append_line(self.out / METRICS, json.dumps(row))
        try:
            if best:
                save_atomic(self.state_dict(), self.out / BEST_CHECKPOINT)
            self.save_checkpoint()
        except Exception:
            truncate(self.out / METRICS, size)
            raise

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "graph": self.graph.to_dict(),
            "config": self.cfg.to_dict(),
            # Copies: a fused node's tensors are views of its group's stacks, which torch.save would write whole.
            "models": {
                k: {n: v.clone() for n, v in uncompiled(m).state_dict().items()}
                for k, m in self.models.items()
            },
            "optimizer": plain_lrs(self.optimizer.state_dict()) if self.optimizer else None,
            "scheduler": plain_schedule(self.scheduler.state_dict()) if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "best_val": self.best_val,
        }

    def save_checkpoint(self) -> None:
        save_atomic(self.state_dict(), self.out / CHECKPOINT)

    def load_checkpoint(self, path) -> None:
        """Raises CheckpointError for a checkpoint that is not this run's (nothing on disk changes)."""
        path = Path(path)
        state = read_checkpoint(path, self.graph.to_dict(), self.cfg.to_dict(), self.cfg.device)
        load_models(state, {k: uncompiled(m) for k, m in self.models.items()}, path)
        try:
            if self.optimizer is not None:
                load_keeping_lr_tensors(self.optimizer, state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit the graph: {e}") from None
        self.epoch = state["epoch"]
        self.best_val = state.get("best_val")


def epoch_line(graph: Graph, row: dict, epochs: int) -> str:
    parts = [f"{name} {row['test'][name]['acc'] * 100:.2f}%" for name in graph.nodes]
    return (
        f"epoch {row['epoch']}/{epochs}  test acc: "
        + ", ".join(parts)
        + f"  ({row['images_per_s']:.0f} img/s, {row['time_s']:.1f}s)"
    )
