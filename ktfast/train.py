"""Training a graph: one forward of every node per batch, Σ L_t back-propagated once, every trainable
node stepped together (the DCL algorithm, docs/ARCHITECTURE.md §2), evaluation of every node each epoch, and the
run directory (graph.json, config.json, metrics.jsonl, checkpoint.pt written atomically; with a val
split, checkpoint-best.pt at the target's best val accuracy). Over
several processes (torchrun) the step's collectives are those of `ktfast.distributed.Placement`.
"""
from __future__ import annotations

import json
import math
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ktfast.checkpoint import (CheckpointError, append_line, load_models, read_checkpoint, save_atomic, truncate,
                               write_text_atomic)
from ktfast.config import TrainConfig
from ktfast.data import dataset_info, load_arrays, make_loader
from ktfast.distributed import Placement
from ktfast.graph import Graph
from ktfast.sync_bn import global_batchnorm
from ktfast.fast import FastStep, loss_function
from ktfast.fuse import Unit, forward_unit, fusion_fault, make_units, unfuse
from ktfast.hold import hold
from ktfast.internals import scaler_tensors, uncompiled
from ktfast.losses import loss_targets, node_logits, reference_graph_losses
from ktfast.optim import load_keeping_lr_tensors, make_optimizer, param_groups, plain_lrs, plain_schedule
from ktfast.nodes import attention_nodes, branch_nodes, build_models, check_attention_sizes, check_logits
from ktfast.paths import Compiled, amp_dtype, fall_back, resolve_paths

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
def evaluate(graph: Graph, models, units: list[Unit], loader, cfg: TrainConfig,
             placement: Placement | None = None) -> dict:
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
        per_node = [torch.stack([F.cross_entropy(z[name].to(sums.dtype), y, reduction="sum"),
                                 (z[name].argmax(1) == y).sum().to(sums.dtype)]) for name in graph.nodes]
        sums[:-1] += torch.cat(per_node)
        sums[-1] += y.shape[0]
    sums = placement.reduce_sums(sums).tolist()
    models.train()
    for node in graph.model_nodes:
        if node.frozen:
            models[node.name].eval()
    count = sums[-1]
    return {name: {"loss": sums[2 * i] / count, "acc": sums[2 * i + 1] / count} for i, name in enumerate(graph.nodes)}


class Trainer:
    """One run of one graph with one seed. `fit()` trains to the end, writing the run directory."""

    def __init__(self, graph: Graph, cfg: TrainConfig, out: Path | None, log=print, progress=True,
                 pretrained: dict | None = None, placement: Placement | None = None):
        """`placement`: this process's part in a run of several (`ktfast.distributed`); there, rank 0
        alone writes `out`."""
        self.placement = placement = placement or Placement(graph, "data", 0, 1)
        self.keeps_state = out is not None
        out = out if placement.rank == 0 else None
        self.graph, self.cfg, self.out, self.log, self.progress = graph, cfg, out, log, progress
        info = dataset_info(cfg.dataset, cfg.data_dir)
        # The path each switch takes (config.json's "paths"); a fallback changes it during the run.
        self.paths = {k: v["path"] for k, v in resolve_paths(cfg, load_arrays(cfg.dataset, cfg.data_dir)).items()}
        self.recording = False  # config.json follows the paths once `fit` runs
        train_split, eval_split = splits(cfg)
        shard = (placement.rank, placement.world) if not placement.nodes else (0, 1)
        self.train_loader = make_loader(cfg.dataset, train_split, cfg.batch_size, cfg.device, cfg.seed,
                                        data_dir=cfg.data_dir, loader=cfg.loader,
                                        train_fraction=cfg.train_fraction, shard=shard, paths=self.paths,
                                        val_fraction=cfg.val_fraction)
        # The kind the training loader took (after a fallback, if any): the fallback is said once.
        self.eval_loader = make_loader(cfg.dataset, eval_split, max(cfg.batch_size, 256), cfg.device,
                                       cfg.seed, data_dir=cfg.data_dir, loader=self.paths["loader"], shard=shard)
        self.val_loader = make_loader(cfg.dataset, "val", max(cfg.batch_size, 256), cfg.device, cfg.seed,
                                      data_dir=cfg.data_dir, loader=self.paths["loader"], shard=shard,
                                      val_fraction=cfg.val_fraction) if cfg.val_fraction is not None else None
        # {"epoch", "acc"}: the epoch of checkpoint-best.pt and its target val accuracy (first best on ties).
        self.best_val: dict | None = None
        self.models = build_models(graph, cfg, info.num_classes, info.image_size, pretrained)
        if placement.sync_bn:
            for name in list(self.models):
                self.models[name] = global_batchnorm(self.models[name])
        placement.assign(self.models)
        # Whether remote losses train this rank's nodes: a non-detached ensemble's loss (place nodes).
        self.exchange_grad = any(not n.detach and n.name in loss_targets(graph) for n in graph.ensemble_nodes)
        self.metric_mask = placement.metric_mask(cfg.device)
        check_logits(graph, self.models, info.num_classes, info.image_size, cfg.device)
        check_attention_sizes(graph, self.models, info.image_size, cfg.device)
        for node in graph.model_nodes:
            if node.frozen:
                self.models[node.name].eval()  # a teacher's BatchNorm statistics never move
        self.want_attention = attention_nodes(graph)
        self.want_branches = branch_nodes(graph)
        self.loss_fn = loss_function(self.paths)
        groups = param_groups(graph, self.models, cfg.lr)
        self.optimizer = make_optimizer(cfg, groups) if groups else None
        self.scheduler = (torch.optim.lr_scheduler.MultiStepLR(self.optimizer, cfg.milestones(), cfg.lr_decay)
                          if self.optimizer else None)
        self.scaler = torch.amp.GradScaler(enabled=cfg.amp and amp_dtype(cfg) == torch.float16)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.epoch = 0  # epochs completed
        self.epoch_lrs: dict[str, float] = {}  # each trained node's learning rate in the current epoch
        # Per-node sums the steps add into on the device; read once per epoch.
        self.loss_sums = torch.zeros(len(graph.nodes), device=cfg.device)
        self.correct = torch.zeros(len(graph.nodes), device=cfg.device)
        self.skipped = torch.zeros((), device=cfg.device)  # steps the fp16 grad scaler skipped
        compile = None
        if cfg.compile:
            this = weakref.proxy(self)  # what the models hold must not keep their trainer alive

            def compile(module):
                return Compiled(module, this.paths, lambda e: this.fall_back("compile", "off", e))

            for name in list(self.models):
                self.models[name] = compile(self.models[name])
        fast = torch.device(cfg.device).type == "cuda" and not cfg.reference
        if fast:  # before fusion: the fused stacks keep the layout of the nodes' tensors
            for model in self.models.values():
                model.to(memory_format=torch.channels_last)
        self.units = make_units(graph, self.models, self.want_attention, self.want_branches,
                                fuse=cfg.fused(), compile=compile, runs=placement.owns,
                                on_fault=lambda nodes, reason: self.fall_back(
                                    "fuse", "off", RuntimeError(f"{', '.join(n.name for n in nodes)}: {reason}")))
        self.check_fusion(info.image_size)
        placement.data_parallel(self.units)
        self.fast = FastStep(self) if fast else None

    def check_fusion(self, image_size: int) -> None:
        """Each fused group runs as its nodes would, or falls back to its nodes run one by one."""
        # A generator of its own: the global one belongs to the seeded initialisation, which trials
        # packed as threads take in turn while this runs.
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(self.cfg.device)
        if self.cfg.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        units = []
        for unit in self.units:
            fault = fusion_fault(unit, x, unit.name in self.want_attention) if len(unit.nodes) > 1 else None
            if fault is not None:
                self.fall_back("fuse", "off", RuntimeError(f"{', '.join(n.name for n in unit.nodes)}: {fault}"))
            units += unfuse(unit, self.models) if fault is not None else [unit]
        self.units = units

    # ---- one step ---------------------------------------------------------------------------
    def autocast_context(self):
        return autocast(self.cfg)

    def forward_unit(self, unit: Unit, x):
        return forward_unit(unit, x, unit.name in self.want_attention)

    def train_step(self, x, y, step) -> None:
        """Forward all nodes, Σ L_t backward once, one optimizer step, metrics added on the device.
        `step` is the 1-based optimizer step (an int, or a device tensor holding step / total)."""
        if self.fast is not None:
            self.fast(x, y, step)
            return
        with self.autocast_context():
            logits, attention = self.exchange(*forward(self.units, x, self.want_attention))
        losses = self.losses(logits, y, step, attention or None)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step(self.placement.total(losses))
        self.accumulate(losses, logits, y)

    def losses(self, logits: dict, y, step, attention) -> dict:
        """{target: L_t} by the run's loss function; kernels that fail here fall back to the reference."""
        try:
            return self.loss_fn(self.graph, logits, y, step=step, total_steps=self.total_steps, attention=attention)
        except Exception as e:
            if self.loss_fn is reference_graph_losses:
                raise
            self.fall_back("kernels", "reference", e)
            self.loss_fn = reference_graph_losses
            return self.losses(logits, y, step, attention)

    def fall_back(self, switch: str, path: str, error: BaseException) -> None:
        """A fast component that cannot run here: the run goes on with `path`, one line says so
        (also with --quiet), config.json records it (KTFAST_STRICT=1: an error instead)."""
        fall_back(self.paths, switch, path, f"{type(error).__name__}: {error}")
        self.record_paths()

    def exchange(self, logits: dict, attention: dict):
        """Every node's outputs, those of other ranks' nodes included (place nodes)."""
        return self.placement.exchange(logits, attention, grad=self.exchange_grad, phase="train")

    def optimizer_step(self, total) -> None:
        """`total` = Σ L_t backward once, one step of every trainable node. The fp16 grad scaler skips a step
        whose gradients overflowed and then lowers its scale: that is counted on the device, with
        no read-back (the scaler's device tensor; `get_scale()` would synchronise)."""
        if self.optimizer is None or not torch.is_tensor(total) or not total.requires_grad:
            return  # place nodes: a rank of frozen nodes only has nothing to step
        scaler = self.scaler
        scaler.scale(total).backward()
        self.placement.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        scale = scaler_tensors(scaler)[0].clone() if scaler.is_enabled() else None
        scaler.step(self.optimizer)
        scaler.update()
        if scale is not None:
            self.skipped += scaler_tensors(scaler)[0] < scale

    @torch.no_grad()
    def accumulate(self, losses: dict, logits: dict, y) -> None:
        """Add a step's per-node loss (L_t; the cross-entropy for nodes nothing trains) and
        correct count to the epoch sums, without reading anything back to the host."""
        z = node_logits(self.graph, {k: v.detach() for k, v in logits.items()})
        dtype = self.loss_sums.dtype  # fp32 (AMP's half-precision logits too), float64 for float64 models
        per_node = [losses[name].detach().to(dtype) if name in losses else F.cross_entropy(z[name].to(dtype), y)
                    for name in self.graph.nodes]
        self.loss_sums += torch.stack(per_node) * self.metric_mask
        self.correct += torch.stack([(z[name].argmax(1) == y).sum() for name in self.graph.nodes]).float() \
            * self.metric_mask

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
        self.loss_sums.zero_()
        self.correct.zero_()
        self.skipped.zero_()
        self.epoch_lrs = self.node_lrs()

    def bar(self, batches):
        cfg = self.cfg
        return tqdm(batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="img", unit_scale=cfg.batch_size,
                    leave=False, disable=not self.progress, dynamic_ncols=True, total=self.steps_per_epoch)

    def close_epoch(self, seen: int, steps: int, start: float) -> tuple[dict, float, int]:
        """The epoch's metrics (`train_epoch`) from the device sums, `seen` images in `steps` steps
        begun at `start`; the lr schedule steps."""
        graph = self.graph
        n = len(graph.nodes)
        loss_sums, correct, skipped, seen = self.placement.reduce_epoch(self.loss_sums, self.correct, self.skipped, seen)
        sums = torch.cat([loss_sums, correct, skipped.view(1)]).tolist()  # the epoch's one sync
        elapsed = time.perf_counter() - start
        train = {name: {"loss": sums[i] / steps, "acc": sums[n + i] / seen} for i, name in enumerate(graph.nodes)}
        if self.scheduler is not None:
            self.scheduler.step()
        return train, seen / elapsed, int(sums[-1])

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs. `on_epoch(epoch, row)` may stop the run by raising."""
        rows = []
        self.recording = True  # from here on: a resume that failed before left its directory as it was
        self.record_paths()
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            rows.append(self.end_epoch(start, *self.train_epoch(), on_epoch))
        return rows

    def end_epoch(self, start: float, train: dict, images_per_s: float, skipped: int, on_epoch=None) -> dict:
        """An epoch trained since `start`: checked, evaluated, written, logged; its metrics row."""
        bad = [name for name, v in train.items() if not math.isfinite(v["loss"])]
        if bad:  # nothing of this epoch is written: the last checkpoint is the last finite one
            raise NonFiniteLoss(f"non-finite training loss of node {', '.join(bad)} in epoch {self.epoch + 1}"
                                + (f"; {self.out} keeps the checkpoint of epoch {self.epoch}"
                                   if self.out is not None and self.epoch else ""))
        self.placement.share_buffers(self.models)
        test = evaluate(self.graph, self.models, self.units, self.eval_loader, self.cfg, self.placement)
        val = (evaluate(self.graph, self.models, self.units, self.val_loader, self.cfg, self.placement)
               if self.val_loader is not None else None)
        self.epoch += 1
        row = {"epoch": self.epoch, "time_s": time.perf_counter() - start, "images_per_s": images_per_s,
               "train": train, "test": test, **({"val": val} if val else {})}
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
        return {"epoch": self.epoch, "graph": self.graph.to_dict(), "config": self.cfg.to_dict(),
                # Copies: a fused node's tensors are views of its group's stacks, which torch.save would write whole.
                "models": {k: {n: v.clone() for n, v in uncompiled(m).state_dict().items()}
                           for k, m in self.models.items()},
                "optimizer": plain_lrs(self.optimizer.state_dict()) if self.optimizer else None,
                "scheduler": plain_schedule(self.scheduler.state_dict()) if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "best_val": self.best_val}

    def save_checkpoint(self) -> None:
        save_atomic(self.state_dict(), self.out / CHECKPOINT)

    def record_paths(self) -> None:
        """config.json's `"paths"`: the path each switch took, rewritten atomically when it changes
        (a fallback, a resume elsewhere). The rest of config.json is the command's (the config the run
        was started with)."""
        if self.out is None or not self.recording:
            return
        path = self.out / "config.json"
        config = json.loads(path.read_text()) if path.exists() else self.cfg.to_dict()
        if config.get("paths") != self.paths:
            write_text_atomic(path, json.dumps({**config, "paths": dict(self.paths)}, indent=2) + "\n")

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
    return (f"epoch {row['epoch']}/{epochs}  test acc: " + ", ".join(parts)
            + f"  ({row['images_per_s']:.0f} img/s, {row['time_s']:.1f}s)")
