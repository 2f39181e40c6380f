"""Triton kernels of ktfast (imported as ``ktfast.kernels``): `graph_losses` in one launch forward
and one backward for the logit losses of all edges, plus one each for the attention crops.

`fused_graph_losses` has the contract of `ktfast.losses.reference_graph_losses`, which defines
what it must compute; tests hold the one to the other.
"""
from __future__ import annotations

import torch

from ktfast.graph import Graph, GraphError
from ktfast.losses import node_logits

from .attention import AttentionLossFn
from .edge_loss_fn import EdgeLossFn, Scratch
from .edge_table import WEIGHT, edge_table

__all__ = ["fused_graph_losses", "fused_loss_vector", "Scratch", "EdgeLossFn", "AttentionLossFn"]


def _linear_factor(step, total_steps):
    """step / total_steps, which every time gate (linear, negative_linear, gamma, negative_gamma) is
    computed from in the kernel: a float, or a 0-d fp32 device tensor when step is one (the fast
    path keeps it on the device so that a captured CUDA graph reads the current value)."""
    if not torch.is_tensor(step):
        return step / total_steps
    factor = step if total_steps == 1 and step.dtype == torch.float32 else step / total_steps
    return factor.float().reshape(())


def fused_graph_losses(graph: Graph, logits: dict, labels, step, total_steps, attention=None, *,
                       scratch: Scratch | None = None) -> dict:
    """{target: L_t}, as `ktfast.losses.reference_graph_losses`: keys loss_targets(graph), in order.
    scratch: as `fused_loss_vector`'s."""
    table = edge_table(graph, labels.device)
    if not table.targets:
        return {}
    losses, _ = fused_loss_vector(graph, logits, labels, step, total_steps, attention, scratch)
    return dict(zip(table.targets, losses.unbind(0)))


def fused_loss_vector(graph: Graph, logits: dict, labels, step, total_steps, attention=None,
                      scratch: Scratch | None = None):
    """(L [targets], Σ_t L_t []): what `fused_graph_losses` computes, without a tensor per target.
    A step back-propagates the sum: the kernels hand it out directly, saving the launches (and the
    host time) that unbinding and summing per-target scalars cost. Targets: loss_targets(graph);
    the graph must have at least one.

    scratch: the caller's `Scratch` (a step keeps one and passes it to every call, so that a
    captured CUDA graph replays with memory made before the capture), or None: the call makes its
    own, so no two callers (e.g. trials in threads) ever share one."""
    table = edge_table(graph, labels.device)
    z = node_logits(graph, logits)
    rows = [z[n] for n in table.endpoints]
    if len({r.dtype for r in rows}) > 1 or rows[0].dtype == torch.float64:  # the kernels read one dtype
        rows = [r.float() for r in rows]
    losses, total, gates = EdgeLossFn.apply(table, labels.contiguous(), _linear_factor(step, total_steps), scratch,
                                            *(r.contiguous() for r in rows))
    att = table.attention
    if att is not None:
        if attention is None:
            raise GraphError("attention maps are needed by the graph's attention edges")
        maps = [attention[n] for n in att.nodes]
        h, w = maps[0].shape[-2:]
        if att.max_crop > min(h, w):
            raise GraphError(f"crops: crop size {att.max_crop} is larger than the {h}x{w} attention map")
        terms = AttentionLossFn.apply(att, table.floats[WEIGHT], gates, len(table.targets), *maps)
        losses, total = losses + terms, total + terms.sum()
    return losses, total
