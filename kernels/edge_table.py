"""A graph's edge tables on one device: what the fused kernels read instead of the `Graph`.

Built once per (graph, device) and cached, so a training step uploads nothing (and stays
capturable in a CUDA graph). Edges are sorted by target, stably, so the edges into one node are a
contiguous range: the backward accumulates each target's gradient in registers and stores it once.
"""
from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass

import torch

from ktfast.graph import LABEL, EnsembleNode, Graph, owner
from ktfast.graph.gates import GATES as GATE_ROWS
from ktfast.graph.loss_kinds import LOSS_KINDS
from ktfast.losses import loss_targets

# Loss-term bits, the loss kinds' codes (`ktfast.graph.loss_kinds`): over logits, and over attention maps.
LOGIT_TERMS = {k.name: k.code for k in LOSS_KINDS.values() if not k.attention}
ATTENTION_TERMS = {k.name: k.code for k in LOSS_KINDS.values() if k.attention}
CE, KL, COS, MSE, DKD, DIST = (LOGIT_TERMS[n] for n in ("ce", "kl", "cos", "mse", "dkd", "dist"))
ATT_MSE, ATT_COS = ATTENTION_TERMS["att_mse"], ATTENTION_TERMS["att_cos"]
STD = 64  # the edge's kl, dkd and dist terms see standardized logits: a bit above every kind's
# the terms that read softmax slots at the edge's temperature
TEMPERED = functools.reduce(operator.or_, (k.code for k in LOSS_KINDS.values() if k.tempered and not k.attention))
GATES = {g.name: g.code for g in GATE_ROWS.values() if g.code is not None}  # the gates' codes in the kernel

# Rows of `EdgeTable.ints` [8, E]: source endpoint (-1: the label), target endpoint, loss bits, gate
# code, softmax slots: the source's at the edge's temperature, the target's of the KL term (at it
# too, or at 1 where the edge softens only its source) and the target's at the edge's temperature
# (dkd, dist), index in `targets`.
SRC, DST, KIND, GATE, SSLOT, DSLOT, TSLOT, TGT = range(8)
# Rows of `EdgeTable.floats` [8, E]: 1/T of the source's and of the KL target's softmax, the KL's
# factor (T², or 1 where only the source is softened), weight, the gate's parameter (1/γ of the
# gamma gates, 1/w of the warmup gate), dkd's α and β, T.
INV_T, DINV_T, KL_SCALE, WEIGHT, GATE_ARG, ALPHA, BETA, TEMP = range(8)


@dataclass(frozen=True)
class AttentionTable:
    nodes: tuple[str, ...]  # the maps the kernel reads, in this order
    ints: torch.Tensor  # [5, A]: source map, target map, term bits, edge row (its gate), index in targets
    crops: torch.Tensor  # [A, K] crop sizes, 0-padded; K = the most crop sizes of one edge
    n_crops: torch.Tensor  # [A]
    grads: torch.Tensor  # [3, N']: target map, its first edge, one past its last
    grad_nodes: tuple[int, ...]  # the target maps
    max_crop: int


@dataclass(frozen=True)
class EdgeTable:
    endpoints: tuple[str, ...]  # the logits the kernels read: graph nodes, then branch addresses
    targets: tuple[str, ...]  # loss_targets(graph): the rows of the output (a branch's edges add to its node's)
    ints: torch.Tensor  # [8, E] int32, rows as above
    floats: torch.Tensor  # [8, E] float32
    # Softmax slots: slot n < M is endpoint n's raw logits at T = 1; the rest are (endpoint, T,
    # standardized) triples other than those.
    slot_node: torch.Tensor  # [S] int32
    slot_inv_t: torch.Tensor  # [S] float32
    slot_std: torch.Tensor  # [S] int32: 1 where the slot is of standardized logits
    node_std: torch.Tensor  # [M] int32: 1 where some slot standardizes the endpoint (its mean and std are needed)
    # Endpoints whose gradient the backward writes (targets of logit losses, detached ensembles
    # excepted): endpoint index, first edge into it, one past the last: [3, G] int32.
    grads: torch.Tensor
    grad_nodes: tuple[int, ...]
    attention: AttentionTable | None
    # Every edge's term bits OR-ed: the kernels take it as a constant, so the code of terms no edge
    # has is compiled out (a graph of KL edges keeps the registers it had before dkd, dist and STD).
    kinds: int

    @property
    def n_edges(self) -> int:
        return self.ints.shape[1]

    @property
    def n_slots(self) -> int:
        return self.slot_node.numel()


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {device: EdgeTable}


def edge_table(graph: Graph, device: torch.device) -> EdgeTable:
    per_device = _cache.setdefault(graph, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = _build(graph, device)
    return per_device[key]


def _endpoints(graph: Graph) -> list[str]:
    used = {n for e in graph.active_edges for n in (e.source, e.target) if n != LABEL}
    ordered = [n for n in graph.nodes if n in used]
    branches = [n for e in graph.active_edges for n in (e.source, e.target) if n in used and n not in graph.nodes]
    return ordered + list(dict.fromkeys(branches))


def _ranges(keys: list[int], wanted: list[int]) -> list[list[int]]:
    """For each wanted key, its first position in the sorted `keys` and one past its last."""
    return [[w for w in wanted], [keys.index(w) for w in wanted],
            [len(keys) - keys[::-1].index(w) for w in wanted]]


def _build(graph: Graph, device) -> EdgeTable:
    endpoints = _endpoints(graph)
    index = {n: i for i, n in enumerate(endpoints)}
    targets = loss_targets(graph)
    edges = sorted(graph.active_edges, key=lambda e: index[e.target])

    slots = {(i, 1.0, False): i for i in range(len(endpoints))}
    rows = []
    for e in edges:
        src = -1 if e.source == LABEL else index[e.source]
        dst = index[e.target]
        kind = sum(LOGIT_TERMS[t] for t in e.terms if t in LOGIT_TERMS) | (STD if e.standardize else 0)
        trio = []
        for node, temperature, used in ((max(src, 0), e.temperature, TEMPERED), (dst, _target_temperature(e), KL),
                                        (dst, e.temperature, DKD | DIST)):
            if kind & used:
                trio.append(slots.setdefault((node, temperature, e.standardize), len(slots)))
            else:
                trio.append(node)
        rows.append([src, dst, kind, GATES[e.gate], *trio, targets.index(owner(e.target))])
    ints = torch.tensor(rows, dtype=torch.int32).T
    floats = torch.tensor([[1 / e.temperature, 1 / _target_temperature(e),
                            e.temperature ** 2 if e.soften == "both" else 1.0, e.weight, _gate_arg(e),
                            e.alpha, e.beta, e.temperature] for e in edges], dtype=torch.float32).T
    slot_list = sorted(slots, key=slots.get)
    standardized = {n for n, _, std in slot_list if std}

    dsts = [r[DST] for r in rows]
    trained = [index[n] for n in dict.fromkeys(e.target for e in edges if _trains(graph, e))]
    grads = _ranges(dsts, trained)

    def put(x, dtype=torch.int32):
        return torch.as_tensor(x, dtype=dtype).contiguous().to(device)

    return EdgeTable(tuple(endpoints), tuple(targets), put(ints), put(floats, torch.float32),
                     put([n for n, _, _ in slot_list]), put([1 / t for _, t, _ in slot_list], torch.float32),
                     put([int(std) for _, _, std in slot_list]),
                     put([int(n in standardized) for n in range(len(endpoints))]),
                     put(grads).reshape(3, -1), tuple(trained), _attention_table(graph, edges, targets, put),
                     functools.reduce(operator.or_, (r[KIND] for r in rows), 0))


def _gate_arg(edge) -> float:
    """The gate's parameter as the kernel reads it: 1/w of the warmup gate, 1/γ of the others."""
    return 1 / getattr(edge, GATE_ROWS[edge.gate].param or "gamma")


def _target_temperature(edge) -> float:
    return edge.temperature if edge.soften == "both" else 1.0


def _trains(graph: Graph, edge) -> bool:
    """Whether the edge's logit terms send a gradient into its target."""
    if not any(t in LOGIT_TERMS for t in edge.terms):
        return False
    node = graph.nodes.get(edge.target)
    return not (isinstance(node, EnsembleNode) and node.detach)


def _attention_table(graph: Graph, edges: list, targets: list, put) -> AttentionTable | None:
    att = [(row, e) for row, e in enumerate(edges) if e.uses_attention]
    if not att:
        return None
    nodes = [n for n in graph.nodes if any(n in (e.source, e.target) for _, e in att)]
    index = {n: i for i, n in enumerate(nodes)}
    att.sort(key=lambda item: index[item[1].target])  # stable: edge order within a target
    width = max(len(e.crops) for _, e in att)
    ints = [[index[e.source], index[e.target], sum(ATTENTION_TERMS[t] for t in e.terms if t in ATTENTION_TERMS),
             row, targets.index(e.target)] for row, e in att]
    dsts = [index[e.target] for _, e in att]
    trained = list(dict.fromkeys(dsts))
    return AttentionTable(tuple(nodes), put(torch.tensor(ints, dtype=torch.int32).T),
                          put([list(e.crops) + [0] * (width - len(e.crops)) for _, e in att]),
                          put([len(e.crops) for _, e in att]), put(_ranges(dsts, trained)).reshape(3, -1),
                          tuple(trained), max(max(e.crops) for _, e in att))
