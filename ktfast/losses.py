"""Per-edge losses and gates in plain PyTorch: the reference that defines correctness (docs/ARCHITECTURE.md §1, §8).

Each gate's weight and each loss kind's per-sample formula are rows of `ktfast.graph.gates` and
`ktfast.graph.loss_kinds`; this module applies them to a graph's edges. The fused Triton kernels in
`ktfast.kernels` compute the same functions and are tested against these; this module imports none
of them.
"""

from __future__ import annotations

import torch

from ktfast.graph import LABEL, Edge, Graph, GraphError, owner
from ktfast.graph.gates import GATES

# The formulas keep their names here too, where tests and the kernels' comments look for the reference's.
from ktfast.graph.loss_kinds import (  # noqa: F401
    DIST_EPS,
    LOSS_KINDS,
    NORMALIZE_EPS,
    STANDARDIZE_EPS,
    att_cos,
    att_mse,
    attention_crops,
    ce,
    cos,
    dist,
    dkd,
    kl,
    mse,
    standardize,
)


# ---- gates -------------------------------------------------------------------------------
def gate(edge: Edge, z_s: torch.Tensor | None, labels: torch.Tensor, step: int, total_steps: int):
    """The per-sample weight of an edge: a scalar or a [B] tensor (docs/ARCHITECTURE.md §1, Gates)."""
    g = GATES[edge.gate]
    if g.weight is None:
        raise ValueError(f"gate {edge.gate!r} is not computed")
    return g.weight(step, total_steps, getattr(edge, g.param) if g.param else None, z_s, labels)


def edge_loss(edge: Edge, z_s, z_t, labels, att_s=None, att_t=None) -> torch.Tensor:
    """The ungated per-sample loss of one edge: the sum of its terms ([B]), each kind's formula
    (`ktfast.graph.loss_kinds`) fed the maps, the standardized logits or the raw logits it reads."""
    total = 0.0
    std_s, std_t = (standardize(z_s), standardize(z_t)) if edge.standardize else (z_s, z_t)
    for term in edge.terms:
        kind = LOSS_KINDS[term]
        s, t = (att_s, att_t) if kind.attention else (std_s, std_t) if kind.tempered else (z_s, z_t)
        total = total + kind.loss(edge, s, t, labels)
    return total


# ---- the graph ---------------------------------------------------------------------------
def loss_targets(graph: Graph) -> list[str]:
    """The keys of graph_losses, in file order: nodes with a non-cut-off edge into them or into one
    of their branches. A loss into a branch adds to its node's L_t, since that node is what it
    trains (`Graph.targets` leaves out a node whose edges all go to its branches)."""
    into = {owner(e.target) for e in graph.active_edges}
    return [name for name in graph.nodes if name in into]


def node_logits(graph: Graph, logits: dict) -> dict:
    """Logits of every endpoint: the model nodes and branches given, plus each ensemble node reduced
    from its members (detached when the node says so, so that its losses then train nothing)."""
    out = dict(logits)
    for node in graph.ensemble_nodes:
        members = torch.stack([logits[m] for m in node.members])
        if node.detach:
            members = members.detach()
        out[node.name] = members.mean(0) if node.reduce == "mean" else members.sum(0)
    return out


def graph_losses(
    graph: Graph, logits: dict, labels, step: int, total_steps: int, attention: dict | None = None
) -> dict:
    """{target name: L_t} for every node with a non-cut-off incoming edge (docs/ARCHITECTURE.md §8).

    L_t = Σ_edges→t weight · mean_over_batch(gate · loss_per_sample), the edges into t's branches
    `t.b{i}` included; `logits` holds those branches' logits under their addresses. The fused
    Triton kernels (`ktfast.kernels.fused_graph_losses`) compute the same; the training step
    chooses between the two (`ktfast.engine.step.Step`).
    """
    z = node_logits(graph, logits)
    batch = labels.shape[0]
    losses = {}
    for edge in graph.active_edges:
        z_s = None if edge.source == LABEL else z[edge.source]
        att_s = att_t = None
        if edge.uses_attention:
            if attention is None:
                raise GraphError(f"edges[{edge.source}->{edge.target}]: attention maps are needed")
            att_s, att_t = attention[edge.source], attention[edge.target]
        per_sample = gate(edge, z_s, labels, step, total_steps) * edge_loss(
            edge, z_s, z[edge.target], labels, att_s, att_t
        )
        # The mean divides by the full batch, also where the correct gate zeroes samples.
        term = edge.weight * per_sample.sum() / batch
        target = owner(edge.target)
        losses[target] = losses[target] + term if target in losses else term
    return {t: losses[t] for t in loss_targets(graph)}


reference_graph_losses = graph_losses  # the name the fused kernels are held to, in tests and benchmarks
