"""Building a run from its config: `build_trainer` makes the loaders, the models (seeded, checked,
sync-bn, compiled where asked), the optimizer, schedule and grad scaler, the units (fused where
asked, each fused group checked) and the training step with its fast parts, and hands them to the
Trainer; neither the Step nor the Trainer builds anything (docs/ARCHITECTURE.md §2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ktfast.config import TrainConfig
from ktfast.data import dataset_info, load_arrays, make_loader
from ktfast.engine.distributed import Placement
from ktfast.engine.fast import CudaStreams, stream_bank
from ktfast.engine.fuse import Unit, fusion_fault, make_units, unfuse
from ktfast.engine.nodes import (
    attention_nodes,
    branch_nodes,
    build_models,
    check_attention_sizes,
    check_logits,
)
from ktfast.engine.optim import make_optimizer, param_groups
from ktfast.engine.step import Step, Sums
from ktfast.engine.sync_bn import global_batchnorm
from ktfast.engine.trainer import RunPaths, Trainer, splits
from ktfast.graph import Graph
from ktfast.losses import loss_targets
from ktfast.paths import Compiled, amp_dtype, resolve_paths


def build_trainer(
    graph: Graph,
    cfg: TrainConfig,
    out: Path | None,
    log=print,
    progress=True,
    pretrained: dict | None = None,
    placement: Placement | None = None,
) -> Trainer:
    """The Trainer of one run of `graph` with `cfg`, writing `out` (None: nowhere). `pretrained`:
    the pretrain-cache file of each `"pretrained"` node (`ktfast.engine.run` finds or makes them);
    `placement`: this process's part in a run of several (`ktfast.engine.distributed`); there, rank 0
    alone writes `out`."""
    placement = placement or Placement(graph, "data", 0, 1)
    keeps_state = out is not None
    out = out if placement.rank == 0 else None
    info = dataset_info(cfg.dataset, cfg.data_dir)
    # The path each switch takes (config.json's "paths"); a fallback changes it during the run.
    paths = RunPaths(
        {k: v["path"] for k, v in resolve_paths(cfg, load_arrays(cfg.dataset, cfg.data_dir)).items()},
        out,
        cfg,
    )
    loaders = make_loaders(cfg, placement, paths)
    models = _models(graph, cfg, info, pretrained, placement)
    want_attention = attention_nodes(graph)
    optimizer, scheduler, scaler = _optimizer(graph, cfg, models)
    fast = torch.device(cfg.device).type == "cuda" and not cfg.reference
    units = _units(graph, cfg, models, want_attention, info.image_size, paths, placement, fast)
    # Whether remote losses train this rank's nodes: a non-detached ensemble's loss (place nodes).
    exchange_grad = any(not n.detach and n.name in loss_targets(graph) for n in graph.ensemble_nodes)
    step = Step(
        graph,
        units,
        models,
        optimizer,
        scaler,
        [Sums(graph, placement.metric_mask(cfg.device))],
        paths=paths,
        fall_back=paths.fall_back,
        total_steps=cfg.epochs * len(loaders[0]),
        want_attention=want_attention,
        device=cfg.device,
        amp=amp_dtype(cfg) if cfg.amp else None,
        placement=placement,
        exchange_grad=exchange_grad,
        compiled=cfg.compile,
    )
    if fast:
        step.use_streams(CudaStreams(step.device), stream_bank(step.device))
    return Trainer(
        graph,
        cfg,
        out,
        step=step,
        models=models,
        units=units,
        loaders=loaders,
        scheduler=scheduler,
        paths=paths,
        placement=placement,
        keeps_state=keeps_state,
        log=log,
        progress=progress,
    )


def _models(graph: Graph, cfg: TrainConfig, info, pretrained: dict | None, placement: Placement) -> dict:
    """The model nodes, seeded and initialised (sync-bn where asked), placed on this process's
    device, checked against the data, each frozen one in eval mode."""
    models = build_models(graph, cfg, info.num_classes, info.image_size, pretrained)
    if placement.sync_bn:
        for name in list(models):
            models[name] = global_batchnorm(models[name])
    placement.assign(models)
    check_logits(graph, models, info.num_classes, info.image_size, cfg.device)
    check_attention_sizes(graph, models, info.image_size, cfg.device)
    for node in graph.model_nodes:
        if node.frozen:
            models[node.name].eval()  # a teacher's BatchNorm statistics never move
    return models


def _optimizer(graph: Graph, cfg: TrainConfig, models: dict) -> tuple:
    """The optimizer of the trainable nodes (None where there are none), its schedule, and the grad
    scaler (on with fp16 only)."""
    groups = param_groups(graph, models, cfg.lr)
    optimizer = make_optimizer(cfg, groups) if groups else None
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones(), cfg.lr_decay) if optimizer else None
    )
    scaler = torch.amp.GradScaler(enabled=cfg.amp and amp_dtype(cfg) == torch.float16)
    return optimizer, scheduler, scaler


def _units(
    graph: Graph,
    cfg: TrainConfig,
    models: dict,
    want_attention: set[str],
    image_size: int,
    paths: RunPaths,
    placement: Placement,
    fast: bool,
) -> list[Unit]:
    """What the step runs: the models compiled where asked (in `models` too), channels_last on the
    fast path, same-model nodes fused where they may be (each group checked), and the unfused
    trainable nodes under DDP where several processes share the data."""
    compile = None
    if cfg.compile:

        def compile(module):
            return Compiled(module, paths, lambda e: paths.fall_back("compile", "off", e))

        for name in list(models):
            models[name] = compile(models[name])
    if fast:  # before fusion: the fused stacks keep the layout of the nodes' tensors
        for model in models.values():
            model.to(memory_format=torch.channels_last)
    units = make_units(
        graph,
        models,
        want_attention,
        branch_nodes(graph),
        fuse=cfg.fused(),
        compile=compile,
        runs=placement.owns,
        on_fault=lambda nodes, reason: paths.fall_back(
            "fuse", "off", RuntimeError(f"{', '.join(n.name for n in nodes)}: {reason}")
        ),
    )
    units = check_fusion(units, models, want_attention, image_size, cfg.device, paths.fall_back)
    placement.data_parallel(units)
    return units


def make_loaders(cfg: TrainConfig, placement: Placement, paths: dict) -> tuple:
    """(training, evaluation, validation or None) loaders of this rank's share of the data."""
    train_split, eval_split = splits(cfg)
    shard = (placement.rank, placement.world) if not placement.nodes else (0, 1)
    train = make_loader(
        cfg.dataset,
        train_split,
        cfg.batch_size,
        cfg.device,
        cfg.seed,
        data_dir=cfg.data_dir,
        loader=cfg.loader,
        train_fraction=cfg.train_fraction,
        shard=shard,
        paths=paths,
        val_fraction=cfg.val_fraction,
    )
    # The kind the training loader took (after a fallback, if any): the fallback is said once.
    test = make_loader(
        cfg.dataset,
        eval_split,
        max(cfg.batch_size, 256),
        cfg.device,
        cfg.seed,
        data_dir=cfg.data_dir,
        loader=paths["loader"],
        shard=shard,
    )
    val = (
        make_loader(
            cfg.dataset,
            "val",
            max(cfg.batch_size, 256),
            cfg.device,
            cfg.seed,
            data_dir=cfg.data_dir,
            loader=paths["loader"],
            shard=shard,
            val_fraction=cfg.val_fraction,
        )
        if cfg.val_fraction is not None
        else None
    )
    return train, test, val


def check_fusion(
    units: list[Unit], models, want_attention: set[str], image_size: int, device, fall_back
) -> list[Unit]:
    """`units`, each fused group checked to run as its nodes would; one that does not falls back
    (`fall_back`) to its nodes run one by one."""
    # A generator of its own: the global one belongs to the seeded initialisation, which trials
    # packed as threads take in turn while this runs.
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    if str(device).startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    checked = []
    for unit in units:
        fault = fusion_fault(unit, x, unit.name in want_attention) if len(unit.nodes) > 1 else None
        if fault is not None:
            fall_back("fuse", "off", RuntimeError(f"{', '.join(n.name for n in unit.nodes)}: {fault}"))
        checked += unfuse(unit, models) if fault is not None else [unit]
    return checked
