"""Horizontal fusion (docs/ARCHITECTURE.md §2, `--fuse`): model nodes of the same architecture and role run as one
module, so that N nodes cost about the kernel launches of one.

A group's parameters and BatchNorm buffers are stacked along a new leading dimension, and the
model's own forward runs once under `torch.func.vmap` over that dimension (`functional_call` on
the first member as the template). vmap turns each convolution into one grouped convolution and
each BatchNorm into one over N·C channels (HFTA's layout, derived from the unchanged model code,
so attention maps, branch logits and ABN's products need no fused copy of each architecture);
BatchNorm's running statistics are updated in place in the stacked buffers, per node.

The nodes keep owning their tensors: after fusion every node's parameters and buffers are views
of its row of the stacks. The optimizer steps the nodes' own parameters (its state stays per
node), a node's state dict is a plain state dict, and loading one writes into the stacks. The
stacked parameters are the leaves autograd accumulates into; a hook hands each row of their
gradient to the node's parameter as a view, before the optimizer runs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from ktfast.graph import Graph, ModelNode
from ktfast.internals import uncompiled


@dataclass
class Unit:
    """What runs as one forward: a single node's model, or a FusedGroup of several nodes."""

    nodes: list[ModelNode]
    module: nn.Module
    branches: bool  # the nodes hand over their branch logits (`node.b{i}`)

    @property
    def name(self) -> str:
        return self.nodes[0].name


def fusion_groups(graph: Graph, want_attention: set[str], want_branches: set[str]) -> list[list[ModelNode]]:
    """The model nodes grouped by what must be equal to run as one module: the model, frozen or
    trainable (eval mode under no-grad, or training), the attention layer, and whether the attention
    map and the branch logits are needed. Groups in the order of their first node, nodes in graph order."""
    groups: dict[tuple, list[ModelNode]] = {}
    for node in graph.model_nodes:
        key = (
            node.model,
            node.frozen,
            node.attention,
            node.name in want_attention,
            node.name in want_branches,
        )
        groups.setdefault(key, []).append(node)
    return list(groups.values())


def make_units(
    graph: Graph,
    models,
    want_attention: set[str],
    want_branches: set[str],
    fuse: bool,
    compile=None,
    runs=lambda name: True,
    on_fault=None,
) -> list[Unit]:
    """The units of one step, of the nodes this process `runs` (all but with place nodes). With
    `fuse`, each group of two or more nodes becomes a FusedGroup, wrapped by `compile` (module ->
    compiled module) when given; single nodes are run by the module `models` holds, compiled or not.
    A group whose models cannot be stacked (a user's factory that builds another network each call)
    runs unfused where `on_fault(nodes, reason)` is given, and raises where not."""
    units = []
    for group in fusion_groups(graph, want_attention, want_branches):
        nodes = [n for n in group if runs(n.name)]
        if fuse and len(nodes) > 1:
            try:
                group = FusedGroup([uncompiled(models[n.name]) for n in nodes])
            except ValueError as e:
                if on_fault is None:
                    raise
                on_fault(nodes, str(e))
                units += [Unit([n], models[n.name], n.name in want_branches) for n in nodes]
                continue
            units.append(Unit(nodes, compile(group) if compile else group, nodes[0].name in want_branches))
        else:
            units += [Unit([n], models[n.name], n.name in want_branches) for n in nodes]
    return units


def forward_unit(unit: Unit, x, want_attention: bool):
    """({endpoint: logits}, {node: attention map}) of a unit's nodes: the endpoints are the nodes
    and, where wanted, their branches `node.b{i}`. Frozen nodes run without autograd."""
    options = {"return_branches": True} if unit.branches else {}  # single-branch models lack the option
    with torch.no_grad() if unit.nodes[0].frozen else nullcontext():
        out = unit.module(x, return_attention=want_attention, **options)
    out = out if isinstance(out, tuple) else (out,)

    def rows(t):  # one tensor per node: a fused group's are stacked [N, ...]
        return [t] if len(unit.nodes) == 1 else t.unbind(0)

    names = [n.name for n in unit.nodes]
    logits = dict(zip(names, rows(out[0])))
    if unit.branches:
        for j, z in enumerate(out[-1]):
            logits.update((f"{name}.b{j}", row) for name, row in zip(names, rows(z)))
    attention = dict(zip(names, rows(out[1]))) if want_attention else {}
    return logits, attention


def fusion_fault(unit: Unit, x: torch.Tensor, want_attention: bool) -> str | None:
    """Why a fused unit cannot stand in for its nodes on this machine (an error, or outputs that
    differ), or None. One forward of a small batch through the group and through each member
    alone, in the nodes' own mode (training mode runs BatchNorm on the batch: under vmap on a GPU
    that is cuDNN's path), the BatchNorm statistics put back afterwards. The bound, 1e-3 of the
    outputs' scale, is far above fp32 rounding of these few layers and far below a wrong path."""
    group = uncompiled(unit.module)
    saved = [b.clone() for b in group.buffers()]
    try:
        with torch.no_grad():
            fused, _ = forward_unit(Unit(unit.nodes, group, unit.branches), x, want_attention)  # not compiled
            alone = {}
            for i, (node, member) in enumerate(zip(unit.nodes, group.members)):
                alone.update(
                    forward_unit(
                        Unit([node], member, unit.branches), group.member_input(i, x), want_attention
                    )[0]
                )
        for name, want in alone.items():
            scale = want.abs().max().item() or 1.0
            if not (fused[name] - want).abs().max().item() <= 1e-3 * scale:
                return f"node {name}'s fused output differs from its own"
        return None
    except Exception as e:  # a backend without this path under vmap
        return f"{type(e).__name__}: {e}"
    finally:
        with torch.no_grad():
            for b, old in zip(group.buffers(), saved):
                b.copy_(old)


def unfuse(unit: Unit, models) -> list[Unit]:
    """A fused unit's nodes as units of their own (their modules as `models` holds them)."""
    return [Unit([n], models[n.name], unit.branches) for n in unit.nodes]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked on a new leading dimension, each row laid out as the first tensor is
    (channels_last stays channels_last), so that the rows can stand in for the tensors."""
    proto = torch.empty_like(tensors[0])  # dense, in the first tensor's order of strides
    out = torch.empty_strided(
        (len(tensors), *proto.shape), (proto.numel(), *proto.stride()), dtype=proto.dtype, device=proto.device
    )
    for row, t in zip(out, tensors):
        row.copy_(t)
    return out


class FusedGroup(nn.Module):
    """N models of one architecture run as one: `forward(x, **options)` returns what a member's
    forward returns, each tensor stacked `[N, ...]` in member order."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = list(members)  # a plain list: the nodes' modules stay registered elsewhere only
        shapes = [
            [(n, t.shape) for n, t in (*m.named_parameters(), *m.named_buffers())] for m in self.members
        ]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(
                "only models of one architecture can be fused, and theirs differ in the names or "
                "shapes of their tensors"
            )
        self.param_names = [n for n, _ in self.members[0].named_parameters()]
        self.buffer_names = [n for n, _ in self.members[0].named_buffers()]
        self.params = nn.ParameterList()
        for name in self.param_names:
            own = [m.get_parameter(name) for m in self.members]
            stacked = nn.Parameter(_stack([p.detach() for p in own]), requires_grad=own[0].requires_grad)
            with torch.no_grad():
                for p, row in zip(own, stacked.detach()):
                    p.set_(row)  # p becomes a view of its row: what the group learns, the member has
            if stacked.requires_grad:
                stacked.register_post_accumulate_grad_hook(_hand_out(own))
            self.params.append(stacked)
        for k, name in enumerate(self.buffer_names):
            stacked = _stack([m.get_buffer(name) for m in self.members])
            module, _, leaf = name.rpartition(".")
            for m, row in zip(self.members, stacked):
                setattr(m.get_submodule(module), leaf, row)
            self.register_buffer(f"buffer{k}", stacked)

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The input member i sees when the group is given `x`: all of it (`ReplicaGroup`'s differ)."""
        return x

    def forward(self, x, **options):
        """The first member is the template: its training flag (the nodes' mode, which evaluation
        switches) decides how BatchNorm runs. `randomness="error"`: a model that draws random
        numbers cannot be fused exactly (each node would draw its own)."""

        def one(params, buffers):
            return functional_call(self.members[0], (params, buffers), (x,), options)

        params = dict(zip(self.param_names, self.params))
        buffers = {name: getattr(self, f"buffer{k}") for k, name in enumerate(self.buffer_names)}
        return vmap(one, randomness="error")(params, buffers)


def _hand_out(own: list[nn.Parameter]):
    """The hook that gives each node's parameter its row of the stacked gradient, as the node's
    own backward would have accumulated it, and leaves the stack without a gradient, so that the
    next backward starts from none (the optimizer's zero_grad only sees the nodes' parameters)."""

    def hook(stacked: torch.Tensor) -> None:
        grad, stacked.grad = stacked.grad, None
        for p, g in zip(own, grad):
            p.grad = g if p.grad is None else p.grad + g

    return hook
