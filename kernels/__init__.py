"""Triton kernels of ktfast (imported as ``ktfast.kernels``): `graph_losses` in two launches forward
(edge losses, attention crops) and two backward, whatever the number of edges.

`fused_graph_losses` has the contract of `ktfast.losses.reference_graph_losses`, which defines
what it must compute; tests hold the one to the other.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ktfast.graph import LABEL, Graph, GraphError
from ktfast.kernels.attention import ATT_COS, ATT_MSE, AttentionLossFn
from ktfast.kernels.edge_losses import CE, CORRECT, COS, KL, LINEAR, MSE, THROUGH, EdgeLossFn
from ktfast.losses import node_logits

__all__ = ["fused_graph_losses", "EdgeLossFn", "AttentionLossFn"]

_KIND = {"ce": CE, "kl": KL, "cos": COS, "mse": MSE}
_ATT_KIND = {"att_mse": ATT_MSE, "att_cos": ATT_COS}
_GATE = {"through": THROUGH, "linear": LINEAR, "correct": CORRECT}


@dataclass
class Plan:
    """A graph's edge tables on one device, built once and reused every step."""
    endpoints: list  # rows of the stacked logits: model nodes then ensemble nodes
    table: dict
    to_targets: torch.Tensor  # [T, E]: weight of edge e in target t's loss
    att_nodes: list
    att_table: dict | None
    att_rows: torch.Tensor | None  # which edge-table rows the attention edges are
    max_crop: int


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {device: Plan}


def _first(dst: list, n: int, device) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(dst, dtype=torch.long), minlength=n) if dst else torch.zeros(n, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32).to(device)


def _plan(graph: Graph, device) -> Plan:
    cached = _plans.setdefault(graph, {})
    if str(device) in cached:
        return cached[str(device)]
    endpoints = list(graph.nodes)
    index = {n: i for i, n in enumerate(endpoints)}
    edges = sorted(graph.active_edges, key=lambda e: index[e.target])  # stable: file order within a target

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    table = {"src": ints([-1 if e.source == LABEL else index[e.source] for e in edges]),
             "dst": ints([index[e.target] for e in edges]),
             "kind": ints([sum(_KIND[t] for t in e.terms if t in _KIND) for e in edges]),
             "gate": ints([_GATE[e.gate] for e in edges]),
             "temp": torch.tensor([e.temperature for e in edges], dtype=torch.float32, device=device),
             "first": _first([index[e.target] for e in edges], len(endpoints), device)}
    targets = graph.targets
    to_targets = torch.zeros(len(targets), len(edges), device=device)
    for j, e in enumerate(edges):
        to_targets[targets.index(e.target), j] = e.weight

    att = [(j, e) for j, e in enumerate(edges) if e.uses_attention]
    att_nodes = sorted({n for _, e in att for n in (e.source, e.target)}, key=index.get)
    att_table = att_rows = None
    max_crop = 0
    if att:
        a_index = {n: i for i, n in enumerate(att_nodes)}
        width = max(len(e.crops) for _, e in att)
        max_crop = max(max(e.crops) for _, e in att)
        att_table = {"src": ints([a_index[e.source] for _, e in att]),
                     "dst": ints([a_index[e.target] for _, e in att]),
                     "kind": ints([sum(_ATT_KIND[t] for t in e.terms if t in _ATT_KIND) for _, e in att]),
                     "ncrops": ints([len(e.crops) for _, e in att]),
                     "crops": ints([list(e.crops) + [0] * (width - len(e.crops)) for _, e in att]),
                     "first": _first([a_index[e.target] for _, e in att], len(att_nodes), device)}
        att_rows = torch.tensor([j for j, _ in att], device=device)
    plan = Plan(endpoints, table, to_targets, att_nodes, att_table, att_rows, max_crop)
    cached[str(device)] = plan
    return plan


def fused_graph_losses(graph: Graph, logits: dict, labels, step, total_steps, attention=None) -> dict:
    """{target: L_t}, as `ktfast.losses.reference_graph_losses`. `step` may be a device tensor
    (the fast path passes step / total_steps that way, so CUDA-graph replays see it change)."""
    plan = _plan(graph, labels.device)
    z = node_logits(graph, logits)
    rows = [z[n] for n in plan.endpoints]
    if len({r.dtype for r in rows}) > 1:  # e.g. an fp32 ensemble beside bf16 nodes
        rows = [r.float() for r in rows]
    stacked = torch.stack(rows)
    if torch.is_tensor(step):
        factor = (step / total_steps).float().reshape(())
    else:
        factor = torch.full((), step / total_steps, device=labels.device, dtype=torch.float32)
    sums, gates = EdgeLossFn.apply(stacked, labels, factor, plan.table)
    if plan.att_table is not None:
        if attention is None:
            raise GraphError("attention maps are needed by the graph's attention edges")
        maps = torch.stack([attention[n] for n in plan.att_nodes])
        if plan.max_crop > min(maps.shape[-2:]):
            h, w = maps.shape[-2:]
            raise GraphError(f"crops: crop size {plan.max_crop} is larger than the {h}x{w} attention map")
        att_sums = AttentionLossFn.apply(maps, gates[plan.att_rows], plan.att_table)
        sums = sums.index_add(0, plan.att_rows, att_sums)  # distinct rows: no colliding adds
    per_target = plan.to_targets @ sums / labels.shape[0]
    return {t: per_target[i] for i, t in enumerate(graph.targets)}
