"""graph_losses held to an independent per-sample computation (float64 NumPy loops, written from the
formulas of docs/ARCHITECTURE.md §1), and its gradients to where they may and may not go."""

import math

import logit_reference as paper
import numpy as np
import pytest
import torch

from ktfast import Graph, GraphError
from ktfast.losses import graph_losses, reference_graph_losses

LOSSES = [
    "kl",
    "cos",
    "mse",
    "att_mse",
    "att_cos",
    "kl+att_mse",
    "cos+att_cos",
    "kl+mse",
    "dkd",
    "dist",
    "dkd+att_mse",
    "dist+mse",
    "dkd+dist",
]
GATES = ["through", "linear", "correct", "negative_linear", "gamma", "negative_gamma", "warmup"]
TEMPERED = ("kl", "dkd", "dist")  # the terms that see standardized logits under `standardize`


@pytest.fixture(autouse=True)
def reference_only(monkeypatch):
    monkeypatch.setenv("KTFAST_KERNELS", "0")


# ---- the independent computation -------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def crop(a, i, j, k):
    h, w = a.shape
    top = min(max(i - k // 2, 0), h - k)
    left = min(max(j - k // 2, 0), w - k)
    c = a[top : top + k, left : left + k].reshape(-1)
    return c / max(np.sqrt((c * c).sum()), 1e-12)


def term_loss(term, edge, zs, zt, y, att_s, att_t):
    if term in TEMPERED and edge.get("standardize"):
        zs, zt = paper.standardize(zs), paper.standardize(zt)
    if term == "dkd":
        return paper.dkd(
            zs, zt, y, edge.get("temperature", 1.0), edge.get("alpha", 1.0), edge.get("beta", 8.0)
        )
    if term == "dist":
        return paper.dist(zs, zt, edge.get("temperature", 1.0))
    if term == "ce":
        return -math.log(softmax(zt)[y])
    if term == "kl":
        t = edge.get("temperature", 1.0)
        if edge.get("soften", "both") == "source":  # EKD's Eq. 8: KL(softmax(z_s / T) ‖ softmax(z_t))
            ps, pt = softmax(zs / t), softmax(zt)
            return float((ps * (np.log(ps) - np.log(pt))).sum())
        ps, pt = softmax(zs / t), softmax(zt / t)
        return float((ps * (np.log(ps) - np.log(pt))).sum()) * t * t
    if term == "cos":
        ps, pt = softmax(zs), softmax(zt)
        return float(ps @ pt / (np.linalg.norm(ps) * np.linalg.norm(pt)))
    if term == "mse":
        return float(((zs - zt) ** 2).mean())
    i, j = np.unravel_index(np.argmax(att_s), att_s.shape)
    values = []
    for k in edge.get("crops", [3, 5]):
        a, b = crop(att_s, i, j, k), crop(att_t, i, j, k)
        values.append(float(((a - b) ** 2).mean()) if term == "att_mse" else float(a @ b))
    return sum(values) / len(values)


def time_gate(gate, x, gamma=1.0, warmup=None):
    """The gates of docs/ARCHITECTURE.md §1 that depend only on x = k / k_end."""
    return {
        "through": 1.0,
        "linear": x,
        "negative_linear": 1 - x,
        "gamma": x ** (1 / gamma),
        "negative_gamma": (1 - x) ** (1 / gamma),
        "warmup": warmup and min(1.0, x / warmup),
    }[gate]


def expected_losses(d, logits, labels, step, total, attention):
    z = {k: v.detach().double().numpy() for k, v in logits.items()}
    att = {k: v.detach().double().numpy() for k, v in (attention or {}).items()}
    for n in d["nodes"]:
        if "ensemble" in n:
            stacked = np.stack([z[m] for m in n["ensemble"]])
            z[n["name"]] = stacked.mean(0) if n.get("reduce", "mean") == "mean" else stacked.sum(0)
    y = labels.numpy()
    batch = len(y)
    out = {}
    for e in d["edges"]:
        if e["gate"] == "cutoff":
            continue
        total_b = 0.0
        for b in range(batch):
            zs = None if e["from"] == "label" else z[e["from"]][b]
            if e["gate"] != "correct":
                g = time_gate(e["gate"], step / total, e.get("gamma", 1.0), e.get("warmup"))
            else:
                g = 1.0 if zs is None or int(np.argmax(zs)) == y[b] else 0.0
            loss = sum(
                term_loss(
                    t,
                    e,
                    zs,
                    z[e["to"]][b],
                    y[b],
                    att.get(e["from"], [None] * batch)[b],
                    att.get(e["to"], [None] * batch)[b],
                )
                for t in e["loss"].split("+")
            )
            total_b += g * loss
        out[e["to"]] = out.get(e["to"], 0.0) + e.get("weight", 1.0) * total_b / batch
    return out


# ---- helpers ------------------------------------------------------------------------------------
def make_inputs(names, batch=6, classes=7, size=6, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = {n: (scale * torch.randn(batch, classes, generator=gen)).requires_grad_() for n in names}
    attention = {n: torch.randn(batch, size, size, generator=gen).requires_grad_() for n in names}
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return logits, labels, attention


def check(d, logits, labels, attention=None, step=3, total=10):
    got = graph_losses(Graph.from_dict(d), logits, labels, step=step, total_steps=total, attention=attention)
    want = expected_losses(d, logits, labels, step, total, attention)
    assert list(got) == [n["name"] for n in d["nodes"] if n["name"] in want]
    for t in want:
        assert got[t].item() == pytest.approx(want[t], rel=1e-5, abs=1e-6), t
    return got


def graph(nodes, edges, target="n1"):
    return {"version": 1, "target": target, "nodes": nodes, "edges": edges}


def models(*names):
    return [{"name": n, "model": "resnet8"} for n in names]


# ---- values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_and_gate_against_independent_computation(loss, gate):
    gamma = (
        {"gamma": 2.5} if gate in ("gamma", "negative_gamma") else {"warmup": 0.4} if gate == "warmup" else {}
    )
    edges = [
        {"from": "label", "to": "n1", "loss": "ce", "gate": gate, **gamma},
        {"from": "n2", "to": "n1", "loss": loss, "gate": gate, "crops": [3, 5], **gamma},
        {"from": "label", "to": "n2", "loss": "ce", "gate": "through"},
    ]
    logits, labels, attention = make_inputs(["n1", "n2"], seed=10 * LOSSES.index(loss) + GATES.index(gate))
    # Make the correct gate select some samples and not others.
    with torch.no_grad():
        logits["n2"][:3].zero_()
        logits["n2"][torch.arange(3), labels[:3]] = 5.0
    check(graph(models("n1", "n2"), edges), logits, labels, attention)


def test_temperature_weights_and_several_edges_into_one_target():
    edges = [
        {"from": "label", "to": "n1", "loss": "ce", "gate": "through", "weight": 0.5},
        {"from": "n2", "to": "n1", "loss": "kl", "gate": "through", "temperature": 10.0, "weight": 0.6},
        {"from": "n3", "to": "n1", "loss": "kl+mse", "gate": "linear", "temperature": 2.0, "weight": -0.3},
        {"from": "n1", "to": "n3", "loss": "cos", "gate": "correct", "weight": 2.0},
    ]
    logits, labels, _ = make_inputs(["n1", "n2", "n3"], seed=5)
    check(graph(models("n1", "n2", "n3"), edges), logits, labels, step=7, total=7)


def test_soften_source_against_independent_computation():
    # EKD's Eq. 8 (soften source) next to Hinton's (both) on the same target, at two temperatures.
    edges = [
        {
            "from": "n2",
            "to": "n1",
            "loss": "kl+mse",
            "gate": "through",
            "temperature": 10.0,
            "soften": "source",
            "weight": 0.6,
        },
        {"from": "n3", "to": "n1", "loss": "kl", "gate": "linear", "temperature": 10.0, "weight": 0.4},
        {"from": "n1", "to": "n2", "loss": "kl", "gate": "correct", "temperature": 3.0, "soften": "source"},
    ]
    logits, labels, _ = make_inputs(["n1", "n2", "n3"], seed=11, scale=4.0)
    check(graph(models("n1", "n2", "n3"), edges), logits, labels, step=4, total=9)


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("loss", ["kl", "dkd", "dist", "dkd+mse", "dist+cos", "kl+att_cos"])
def test_modern_terms_temperature_alpha_beta_and_standardize(loss, standardize):
    # standardize changes the kl, dkd and dist terms and leaves mse, cos and att_* as they were.
    extra = {"alpha": 0.0, "beta": 2.0} if "dkd" in loss else {}
    edges = [
        {
            "from": "n2",
            "to": "n1",
            "loss": loss,
            "gate": "warmup",
            "warmup": 0.5,
            "temperature": 4.0,
            "standardize": standardize,
            "weight": 0.7,
            **extra,
        },
        {
            "from": "n1",
            "to": "n2",
            "loss": loss.split("+")[0],
            "gate": "correct",
            "temperature": 0.5,
            "standardize": standardize,
        },
        {"from": "label", "to": "n1", "loss": "ce", "gate": "through"},
    ]
    logits, labels, attention = make_inputs(["n1", "n2"], seed=13, scale=5.0)
    check(graph(models("n1", "n2"), edges), logits, labels, attention, step=2, total=10)


# k / k_end = 0.1, 0.5 at w = 0.4: 0.25 and 1 (the gate holds at 1 after the warm-up); the first step of
# DKD's 1/12 over 240 steps is 1/20.
@pytest.mark.parametrize(
    "warmup,steps,weights",
    [
        (0.4, (1, 2, 4, 5, 10), (0.25, 0.5, 1.0, 1.0, 1.0)),
        (1 / 12, (1, 10, 20, 21, 240), (0.05, 0.5, 1.0, 1.0, 1.0)),
        (1.0, (1, 5, 10), (0.1, 0.5, 1.0)),
    ],
)
def test_warmup_gate_rises_linearly_to_one_and_stays(warmup, steps, weights):
    total = 240 if warmup == 1 / 12 else 10
    edges = [
        {"from": "n2", "to": "n1", "loss": "dkd", "gate": "warmup", "warmup": warmup, "temperature": 4.0}
    ]
    plain = [{"from": "n2", "to": "n1", "loss": "dkd", "gate": "through", "temperature": 4.0}]
    gated, through = (Graph.from_dict(graph(models("n1", "n2"), e)) for e in (edges, plain))
    logits, labels, _ = make_inputs(["n1", "n2"], seed=8)
    for step, weight in zip(steps, weights):
        got = graph_losses(gated, logits, labels, step, total)["n1"]
        want = graph_losses(through, logits, labels, step, total)["n1"]
        assert got.item() == pytest.approx(weight * want.item(), rel=1e-6), step


def test_soften_source_gradient_is_the_difference_of_the_two_softmaxes():
    # d/dz_t Σ p_s log(p_s / softmax(z_t)) = softmax(z_t) - softmax(z_s / T): no factor T, unlike
    # T² · KL at T on both sides, whose gradient is T · (softmax(z_t / T) - softmax(z_s / T)).
    T, weight = 10.0, 0.6
    d = graph(
        models("n1", "n2"),
        [
            {
                "from": "n2",
                "to": "n1",
                "loss": "kl",
                "gate": "through",
                "temperature": T,
                "soften": "source",
                "weight": weight,
            }
        ],
    )
    logits, labels, _ = make_inputs(["n1", "n2"], batch=5, classes=7, seed=3, scale=4.0)
    z1 = logits["n1"].detach().double().requires_grad_()
    z2 = logits["n2"].detach().double()
    loss = graph_losses(Graph.from_dict(d), {"n1": z1, "n2": z2}, labels, 1, 1)["n1"]
    (grad,) = torch.autograd.grad(loss, z1)
    want = weight / 5 * (torch.softmax(z1.detach(), 1) - torch.softmax(z2 / T, 1))
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda z: graph_losses(Graph.from_dict(d), {"n1": z, "n2": z2}, labels, 1, 1)["n1"], (z1,)
    )


# k / k_end = 0.1, 0.5, 1 at steps 1, k_end / 2, k_end of k_end = 10, and γ = 2.5: 1/γ = 0.4.
TIME_GATE_WEIGHTS = {
    "negative_linear": [0.9, 0.5, 0.0],
    "gamma": [0.1**0.4, 0.5**0.4, 1.0],
    "negative_gamma": [0.9**0.4, 0.5**0.4, 0.0],
}


@pytest.mark.parametrize("gate", sorted(TIME_GATE_WEIGHTS))
def test_time_gates_at_the_first_middle_and_last_step(gate):
    gamma = {"gamma": 2.5} if "gamma" in gate else {}
    edges = [
        {"from": "n2", "to": "n1", "loss": "kl+mse", "gate": gate, "temperature": 2.0, **gamma},
        {"from": "label", "to": "n1", "loss": "ce", "gate": gate, "weight": 0.5, **gamma},
    ]
    plain = [dict(e, gate="through") for e in edges]
    for e in plain:
        e.pop("gamma", None)
    gated, through = (
        Graph.from_dict(graph(models("n1", "n2"), edges)),
        Graph.from_dict(graph(models("n1", "n2"), plain)),
    )
    logits, labels, _ = make_inputs(["n1", "n2"], seed=8)
    for step, weight in zip((1, 5, 10), TIME_GATE_WEIGHTS[gate]):
        got = graph_losses(gated, logits, labels, step, 10)["n1"]
        want = graph_losses(through, logits, labels, step, 10)["n1"]
        assert got.item() == pytest.approx(weight * want.item(), rel=1e-6, abs=1e-7), step
        g_got = torch.autograd.grad(got, logits["n1"])[0]
        g_want = torch.autograd.grad(want, logits["n1"])[0]
        torch.testing.assert_close(g_got, weight * g_want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("detach", [True, False])
def test_ensemble_nodes_as_source_and_target(reduce, detach):
    nodes = models("n1", "n2", "n3") + [
        {"name": "ens", "ensemble": ["n1", "n2"], "reduce": reduce, "detach": detach}
    ]
    edges = [
        {"from": "label", "to": "ens", "loss": "ce", "gate": "through"},
        {"from": "ens", "to": "n3", "loss": "kl", "gate": "correct", "temperature": 3.0},
        {"from": "n3", "to": "ens", "loss": "kl+mse", "gate": "linear"},
        {"from": "label", "to": "n3", "loss": "ce", "gate": "through"},
    ]
    logits, labels, _ = make_inputs(["n1", "n2", "n3"], seed=11)
    got = check(graph(nodes, edges, target="ens"), logits, labels)
    grads = torch.autograd.grad(sum(got.values()), [logits[n] for n in ("n1", "n2", "n3")], allow_unused=True)
    member_grads_nonzero = [g is not None and g.abs().sum().item() > 0 for g in grads[:2]]
    # Losses into the ensemble reach its members only when it is not detached.
    assert member_grads_nonzero == [not detach, not detach]
    assert grads[2] is not None and grads[2].abs().sum() > 0


def test_correct_gate_that_masks_every_sample_still_divides_by_batch():
    edges = [
        {"from": "label", "to": "n1", "loss": "ce", "gate": "through"},
        {"from": "n2", "to": "n1", "loss": "kl", "gate": "correct"},
    ]
    logits, labels, _ = make_inputs(["n1", "n2"], seed=3)
    with torch.no_grad():
        logits["n2"].zero_()
        logits["n2"][torch.arange(6), (labels + 1) % 7] = 4.0  # every sample wrong
    d = graph(models("n1", "n2"), edges)
    got = check(d, logits, labels)
    ce_only = check(graph(models("n1", "n2"), edges[:1]), logits, labels)
    assert got["n1"].item() == pytest.approx(ce_only["n1"].item())
    # One correct sample of six: its loss enters divided by the whole batch.
    with torch.no_grad():
        logits["n2"][0] = 0.0
        logits["n2"][0, labels[0]] = 4.0
    got = check(d, logits, labels)
    g = Graph.from_dict(d)
    one = reference_graph_losses(g, {k: v[:1] for k, v in logits.items()}, labels[:1], 1, 1)["n1"]
    assert got["n1"].item() == pytest.approx(
        ce_only["n1"].item() + (one.item() - ce_only_first(logits, labels)) / 6
    )


def ce_only_first(logits, labels):
    return torch.nn.functional.cross_entropy(logits["n1"][:1], labels[:1]).item()


def test_identical_logits_give_zero_kl_and_mse():
    edges = [{"from": "n2", "to": "n1", "loss": "kl+mse", "gate": "through", "temperature": 4.0}]
    logits, labels, _ = make_inputs(["n1", "n2"], seed=9)
    with torch.no_grad():
        logits["n2"].copy_(logits["n1"])
    got = check(graph(models("n1", "n2"), edges), logits, labels)
    assert got["n1"].item() == pytest.approx(0.0, abs=1e-6)
    (grad,) = torch.autograd.grad(got["n1"], logits["n1"])
    assert grad.abs().max().item() < 1e-6


def test_crop_windows_move_inside_the_map_and_k_equal_to_map_is_allowed():
    edges = [{"from": "n2", "to": "n1", "loss": "att_mse", "gate": "through", "crops": [1, 3, 6]}]
    logits, labels, attention = make_inputs(["n1", "n2"], seed=4)
    with torch.no_grad():  # arg-max in corners and on edges
        for b, (i, j) in enumerate([(0, 0), (5, 5), (0, 5), (5, 0), (2, 0), (0, 3)]):
            attention["n2"][b, i, j] = 50.0
    check(graph(models("n1", "n2"), edges), logits, labels, attention)
    edges[0]["crops"] = [7]
    with pytest.raises(GraphError, match="crop size 7"):
        graph_losses(Graph.from_dict(graph(models("n1", "n2"), edges)), logits, labels, 1, 1, attention)


@pytest.mark.parametrize("loss", ["att_mse", "att_cos"])
def test_even_crops_away_from_the_border(loss):
    """An even window has no centre pixel: its top-left corner is (i - k/2, j - k/2), so the arg-max
    sits just below and right of its middle. Away from the border nothing clamps it: a window one
    pixel off shows here."""
    edges = [{"from": "n2", "to": "n1", "loss": loss, "gate": "through", "crops": [2, 4]}]
    logits, labels, attention = make_inputs(["n1", "n2"], size=8, seed=5)
    with torch.no_grad():
        for b, (i, j) in enumerate([(3, 4), (4, 3), (2, 2), (5, 5), (3, 3), (4, 5)]):
            attention["n2"][b, i, j] = 50.0
    check(graph(models("n1", "n2"), edges), logits, labels, attention)


def test_cutoff_edges_are_not_computed_and_their_targets_absent():
    edges = [
        {"from": "label", "to": "n1", "loss": "ce", "gate": "through"},
        {"from": "n1", "to": "n2", "loss": "kl", "gate": "cutoff"},
    ]
    logits, labels, _ = make_inputs(["n1", "n2"])
    got = check(graph(models("n1", "n2"), edges), logits, labels)
    assert list(got) == ["n1"]


# ---- gradients ------------------------------------------------------------------------------
def test_gradients_reach_only_targets():
    edges = [
        {"from": "label", "to": "n1", "loss": "ce", "gate": "through"},
        {"from": "n2", "to": "n1", "loss": "kl+att_mse", "gate": "through"},
        {"from": "n3", "to": "n1", "loss": "cos+att_cos", "gate": "correct"},
        {"from": "n1", "to": "n2", "loss": "mse", "gate": "linear"},
    ]
    logits, labels, attention = make_inputs(["n1", "n2", "n3"], size=8)
    got = graph_losses(
        Graph.from_dict(graph(models("n1", "n2", "n3"), edges)), logits, labels, 2, 4, attention
    )
    # Each target's loss reaches that target alone: n2's loss reaches n2, not its source n1.
    g_n1 = torch.autograd.grad(
        got["n1"],
        [logits["n1"], logits["n2"], logits["n3"], attention["n1"], attention["n2"], attention["n3"]],
        retain_graph=True,
        allow_unused=True,
    )
    assert g_n1[0] is not None and g_n1[3] is not None
    assert all(g is None for g in (g_n1[1], g_n1[2], g_n1[4], g_n1[5]))
    g_n2 = torch.autograd.grad(got["n2"], [logits["n1"], logits["n2"]], allow_unused=True)
    assert g_n2[0] is None and g_n2[1] is not None


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_match_finite_differences(loss):
    d = graph(
        models("n1", "n2"),
        [
            {"from": "n2", "to": "n1", "loss": loss, "gate": "correct", "temperature": 2.0, "crops": [2, 3]},
            {"from": "label", "to": "n1", "loss": "ce", "gate": "linear"},
        ],
    )
    g = Graph.from_dict(d)
    logits, labels, attention = make_inputs(["n1", "n2"], batch=4, classes=5, size=5, seed=2)
    z2, a2 = logits["n2"].detach().double(), attention["n2"].detach().double()
    z1 = logits["n1"].detach().double().requires_grad_()
    a1 = attention["n1"].detach().double().requires_grad_()

    def f(z, a):
        return graph_losses(g, {"n1": z, "n2": z2}, labels, 1, 3, {"n1": a, "n2": a2})["n1"]

    assert torch.autograd.gradcheck(f, (z1, a1))
