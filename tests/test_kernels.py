"""The fused Triton kernels against the reference losses: values and gradients, every loss kind and
gate, on random graphs and shapes. Without CUDA they run through Triton's interpreter (conftest)."""
import itertools
import random

import pytest
import torch

from ktfast import Graph, GraphError
from ktfast.kernels import fused_graph_losses
from ktfast.losses import reference_graph_losses

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
KINDS = ["kl", "cos", "mse", "kl+mse", "cos+mse", "att_mse", "att_cos", "kl+att_mse", "cos+att_cos"]
GATES = ["through", "linear", "correct"]


def inputs(names, batch, classes, size=5, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = {n: (3 * torch.randn(batch, classes, generator=gen)).to(device, dtype) for n in names}
    a = {n: torch.randn(batch, size, size, generator=gen).to(device, dtype) for n in names}
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return z, a, y


def compare(d, z, a, y, step=2, total=7, rtol=1e-5, atol=1e-6):
    """Both implementations on copies of the same leaves: losses and every gradient agree."""
    g = Graph.from_dict(d)
    results = []
    for fn in (reference_graph_losses, fused_graph_losses):
        zz = {k: v.detach().clone().requires_grad_() for k, v in z.items()}
        aa = {k: v.detach().clone().requires_grad_() for k, v in a.items()}
        losses = fn(g, zz, y, step, total, aa)
        grads = torch.autograd.grad(sum(losses.values()), list(zz.values()) + list(aa.values()), allow_unused=True)
        results.append((losses, grads))
    (ref, ref_grads), (fused, fused_grads) = results
    assert list(ref) == list(fused)
    for t in ref:
        torch.testing.assert_close(fused[t].float(), ref[t].float(), rtol=rtol, atol=atol)
    for gr, gf in zip(ref_grads, fused_grads):
        if gr is None and gf is None:
            continue
        gr = torch.zeros_like(gf) if gr is None else gr  # "no gradient" equals a zero gradient
        gf = torch.zeros_like(gr) if gf is None else gf
        torch.testing.assert_close(gf.float(), gr.float(), rtol=rtol, atol=atol)


def models(*names):
    return [{"name": n, "model": "resnet8"} for n in names]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,gate", list(itertools.product(KINDS, GATES)))
def test_every_kind_and_gate(kind, gate, device):
    d = {"version": 1, "target": "a", "nodes": models("a", "b"),
         "edges": [{"from": "label", "to": "a", "loss": "ce", "gate": gate},
                   {"from": "b", "to": "a", "loss": kind, "gate": gate, "temperature": 2.5, "weight": 0.8,
                    "crops": [2, 3]},
                   {"from": "label", "to": "b", "loss": "ce", "gate": "through"}]}
    z, a, y = inputs("ab", 6, 9, seed=len(kind) + 7 * len(gate), device=device)
    with torch.no_grad():  # the correct gate passes some samples and blocks others
        z["b"][:3] = 0
        z["b"][torch.arange(3), y[:3]] = 5
    compare(d, z, a, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_random_graphs(seed, device):
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(rng.randint(2, 5))]
    nodes = models(*names)
    if rng.random() < 0.7:
        nodes.append({"name": "ens", "ensemble": rng.sample(names, 2), "reduce": rng.choice(["mean", "sum"]),
                      "detach": rng.random() < 0.5})
    endpoints = [n["name"] for n in nodes]
    edges = [{"from": "label", "to": n, "loss": "ce", "gate": rng.choice(GATES + ["cutoff"])} for n in endpoints]
    for s, t in itertools.permutations(endpoints, 2):
        kinds = KINDS if s in names and t in names else ["kl", "cos", "mse", "kl+mse"]
        edges.append({"from": s, "to": t, "loss": rng.choice(kinds), "gate": rng.choice(GATES + ["cutoff"]),
                      "temperature": rng.choice([1.0, 2.0, 10.0]), "weight": rng.uniform(-1, 2),
                      "crops": rng.sample([1, 2, 3, 4], rng.randint(1, 3))})
    batch, classes = rng.choice([(1, 10), (7, 13), (16, 100)])
    z, a, y = inputs(names, batch, classes, size=4, seed=seed, device=device)
    compare({"version": 1, "target": names[0], "nodes": nodes, "edges": edges}, z, a, y,
            step=rng.randint(1, 9), total=9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,classes", [(1, 10), (3, 1000), (5, 200)])
def test_sizes(batch, classes, device):
    d = {"version": 1, "target": "a", "nodes": models("a", "b", "c"),
         "edges": [{"from": "label", "to": "a", "loss": "ce", "gate": "correct"},
                   {"from": "b", "to": "a", "loss": "kl", "gate": "through", "temperature": 10.0},
                   {"from": "c", "to": "a", "loss": "cos+mse", "gate": "correct"},
                   {"from": "a", "to": "b", "loss": "kl", "gate": "linear"}]}
    compare(d, *inputs("abc", batch, classes, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_correct_gate_masking_every_sample_and_identical_logits(device):
    d = {"version": 1, "target": "a", "nodes": models("a", "b", "c"),
         "edges": [{"from": "b", "to": "a", "loss": "kl+att_mse", "gate": "correct", "crops": [3]},
                   {"from": "c", "to": "a", "loss": "kl+mse", "gate": "through", "temperature": 4.0}]}
    z, a, y = inputs("abc", 6, 10, device=device)
    with torch.no_grad():
        z["b"][:] = 0
        z["b"][torch.arange(6), (y + 1) % 10] = 3  # b is wrong everywhere
        z["c"].copy_(z["a"])  # identical source and target: zero loss, zero gradient
    compare(d, z, a, y)
    g = Graph.from_dict(d)
    zz = {k: v.clone().requires_grad_() for k, v in z.items()}
    loss = fused_graph_losses(g, zz, y, 1, 1, a)["a"]
    assert abs(loss.item()) < 1e-6
    (grad,) = torch.autograd.grad(loss, zz["a"])
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_attention_crops_at_borders_and_full_size(device):
    d = {"version": 1, "target": "a", "nodes": models("a", "b"),
         "edges": [{"from": "b", "to": "a", "loss": "att_mse+att_cos", "gate": "through", "crops": [1, 3, 6]}]}
    z, a, y = inputs("ab", 6, 5, size=6, device=device)
    with torch.no_grad():
        for i, (r, c) in enumerate([(0, 0), (5, 5), (0, 5), (5, 0), (2, 0), (0, 3)]):
            a["b"][i, r, c] = 40.0
    compare(d, z, a, y)
    d["edges"][0]["crops"] = [7]
    with pytest.raises(GraphError, match="crop size 7"):
        fused_graph_losses(Graph.from_dict(d), z, y, 1, 1, a)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs_within_bound(device):
    d = {"version": 1, "target": "a", "nodes": models("a", "b", "c") + [{"name": "e", "ensemble": ["b", "c"]}],
         "edges": [{"from": "label", "to": "a", "loss": "ce", "gate": "through"},
                   {"from": "e", "to": "a", "loss": "kl", "gate": "correct", "temperature": 2.0},
                   {"from": "a", "to": "b", "loss": "cos+mse", "gate": "linear"}]}
    z, a, y = inputs("abc", 8, 100, device=device)
    z16 = {k: v.to(torch.bfloat16) for k, v in z.items()}
    # Both read the same bf16 logits and accumulate in fp32: they differ by fp32 rounding, and the
    # gradients come back in bf16 (8 bits of mantissa), hence the bound.
    compare(d, z16, a, y, rtol=1e-2, atol=1e-2)


def test_linear_gate_factor_from_a_device_tensor():
    d = {"version": 1, "target": "a", "nodes": models("a", "b"),
         "edges": [{"from": "b", "to": "a", "loss": "kl", "gate": "linear"}]}
    g = Graph.from_dict(d)
    z, a, y = inputs("ab", 4, 10, device=DEVICES[0])
    as_int = fused_graph_losses(g, z, y, 3, 12)["a"]
    as_tensor = fused_graph_losses(g, z, y, torch.tensor(0.25, device=DEVICES[0]), 1)["a"]
    torch.testing.assert_close(as_int, as_tensor)
