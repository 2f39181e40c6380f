"""One table per concept (`ktfast.graph.gates`, `ktfast.graph.loss_kinds`): for every row, its torch formula, the
reference's graph losses (`ktfast.losses`) and the fused kernels (`ktfast.kernels`) agree, and the
codes the kernels know the rows by are one per row."""

import functools
import operator

import pytest
import torch
from test_kernels import DEVICES, compare, graph, inputs, models, some_correct

from ktfast import Graph
from ktfast import graph as graph_module
from ktfast.graph.gates import GATES
from ktfast.graph.loss_kinds import LOSS_KINDS, standardize
from ktfast.kernels.edge_table import ATTENTION_TERMS, LOGIT_TERMS, STD
from ktfast.kernels.edge_table import GATES as KERNEL_GATES
from ktfast.losses import reference_graph_losses

PARAMS = {"gamma": 2.5, "warmup": 0.4}  # a value of each field a gate may read
STEP, TOTAL = 2, 7


def table_loss(g: Graph, z: dict, a: dict, y, step: int, total: int) -> torch.Tensor:
    """L_t of the graph's one edge straight from its rows: weight · Σ_b gate_b · loss_b / B."""
    (e,) = g.active_edges
    gate, kind = GATES[e.gate], LOSS_KINDS[e.loss]
    z_s = None if e.source == "label" else z[e.source]
    weight = gate.weight(step, total, getattr(e, gate.param) if gate.param else None, z_s, y)
    s, t = (a[e.source], a[e.target]) if kind.attention else (z_s, z[e.target])
    if kind.tempered and e.standardize:
        s, t = standardize(s), standardize(t)
    return e.weight * (weight * kind.loss(e, s, t, y)).sum() / y.shape[0]


def check_row(edge: dict, device: str, seed: int):
    """The table's formula against the reference in float64 (the same operations in the same order:
    equal to the last bit, so any difference is the reference reading another row or field), then the
    kernels against the float64 reference within `test_kernels.bounds`' derived bounds, gradients
    included (`test_kernels.compare`)."""
    nodes = models("a", "b")
    d = graph(nodes, [edge])
    z, a, y = inputs("ab", 6, 9, seed=seed, device=device)
    some_correct(z["b"], y)  # the correct gate passes some samples and not others
    g = Graph.from_dict(d)
    z64 = {k: v.double() for k, v in z.items()}
    a64 = {k: v.double() for k, v in a.items()}
    reference = reference_graph_losses(g, z64, y, STEP, TOTAL, a64)["a"]
    assert table_loss(g, z64, a64, y, STEP, TOTAL).item() == reference.item()
    compare(d, z, a, y, STEP, TOTAL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [g.name for g in GATES.values() if g.code is not None])
def test_every_gate(name, device):
    gate = GATES[name]
    extra = {gate.param: PARAMS[gate.param]} if gate.param else {}
    check_row(
        {"from": "b", "to": "a", "loss": "mse", "gate": name, "weight": 0.8, **extra}, device, seed=gate.code
    )


def kind_cases():
    for kind in LOSS_KINDS.values():
        yield kind.name, False
        if kind.tempered:
            yield kind.name, True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,standardize", list(kind_cases()))
def test_every_loss_kind(name, standardize, device):
    kind = LOSS_KINDS[name]
    edge = {"from": "label" if kind.label else "b", "to": "a", "loss": name, "gate": "linear", "weight": 0.8}
    if kind.attention:
        edge["crops"] = [2, 3]
    if kind.tempered:
        edge.update(temperature=2.5, standardize=standardize)
    check_row(edge, device, seed=kind.code + 10 * kind.attention)


def test_codes_are_one_per_row():
    """The kernels tell the rows apart by their codes alone: a gate's is its own, a loss kind's is a
    bit of its own among the kinds over the same inputs, apart from the standardize bit; the graph
    file's names and the kernels' tables are the table's."""
    computed = [g for g in GATES.values() if g.code is not None]
    assert len({g.code for g in computed}) == len(computed)
    assert all((g.code is None) == (g.weight is None) for g in GATES.values())
    assert KERNEL_GATES == {g.name: g.code for g in computed}
    for attention, table in ((False, LOGIT_TERMS), (True, ATTENTION_TERMS)):
        codes = [k.code for k in LOSS_KINDS.values() if k.attention == attention]
        assert all(c > 0 and c & (c - 1) == 0 for c in codes)  # one bit each
        assert functools.reduce(operator.or_, codes) == sum(codes)  # no two the same
        assert table == {k.name: k.code for k in LOSS_KINDS.values() if k.attention == attention}
    assert not sum(LOGIT_TERMS.values()) & STD
    assert graph_module.GATES == tuple(GATES) and graph_module.LOSS_TERMS == tuple(LOSS_KINDS)
