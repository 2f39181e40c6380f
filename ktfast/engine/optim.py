"""The optimizer of a run: one over every trainable node, a parameter group per `lr_scale`, and its
state dict with plain-float learning rates (on the captured CUDA step each lr is a device tensor)."""

from __future__ import annotations

import torch

from ktfast.config import TrainConfig
from ktfast.graph import Graph


def param_groups(graph: Graph, models, lr: float) -> list[dict]:
    """One optimizer parameter group per distinct `lr_scale` of the trainable nodes, in node order,
    at lr × scale: the schedule multiplies every group's lr alike, so the ratios hold throughout."""
    groups: dict[float, list] = {}
    for node in graph.trainable:
        groups.setdefault(node.lr_scale, []).extend(models[node.name].parameters())
    return [{"params": params, "lr": lr * scale} for scale, params in groups.items()]


def make_optimizer(cfg: TrainConfig, params):
    """One optimizer over every trainable node (`params`: parameter groups). On CUDA the fused
    implementations update all nodes' tensors in a few multi-tensor launches (what apex's FusedSGD
    did); when the step is captured as a CUDA graph, each group's lr is a device tensor that the
    scheduler fills in place, and Adam keeps its step count on the device, so that replays see both."""
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda and cfg.cuda_graph:  # on the device: a captured step reads the schedule's current lr
        params = [{**g, "lr": torch.tensor(float(g["lr"]), device=cfg.device)} for g in params]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            fused=cuda or None,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            fused=cuda or None,
            capturable=cuda and cfg.cuda_graph,
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def plain_lrs(state: dict) -> dict:
    """An optimizer state dict with plain-float learning rates, whatever device they live on."""
    for group in state["param_groups"]:
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = float(group[key])
    return state


def plain_schedule(state: dict) -> dict:
    for key in ("base_lrs", "_last_lr"):
        if key in state:
            state[key] = [float(v) for v in state[key]]
    return state


def load_keeping_lr_tensors(optimizer, state: dict) -> None:
    """load_state_dict replaces each group's lr: a device tensor (the one a captured step reads)
    is kept and given the loaded value."""
    tensors = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, lr in zip(optimizer.param_groups, tensors):
        if torch.is_tensor(lr):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
