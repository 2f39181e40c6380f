"""The fused Triton kernels against the reference losses (`ktfast.losses`): values and gradients,
every loss kind and gate, on random graphs and shapes. Without CUDA the kernels run through
Triton's interpreter; with CUDA the same comparisons run natively (the "cuda" cases)."""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks the interpreter when a kernel is defined, so before ktfast.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

from ktfast import Graph, GraphError  # noqa: E402
from ktfast.graph import TEMPERED_TERMS, EnsembleNode  # noqa: E402
from ktfast.kernels import edge_loss_fn, edge_losses, fused_graph_losses, fused_loss_vector  # noqa: E402
from ktfast.losses import (  # noqa: E402
    NORMALIZE_EPS,
    STANDARDIZE_EPS,
    loss_targets,
    node_logits,
    owner,
    reference_graph_losses,
    standardize,
)
from ktfast.models import is_model_name  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="the interpreter runs where CUDA does not")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
]
KINDS = ["kl", "cos", "mse", "kl+mse", "cos+mse", "kl+cos", "att_mse", "att_cos", "kl+att_mse", "cos+att_cos"]
GATES = ["through", "linear", "correct"]


def inputs(names, batch, classes, size=5, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = {n: (3 * torch.randn(batch, classes, generator=gen)).to(device, dtype) for n in names}
    a = {n: torch.randn(batch, size, size, generator=gen).to(device, dtype) for n in names}
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return z, a, y


def run(fn, g, z, a, y, step, total):
    """Losses and the gradients of their sum w.r.t. every logit and map (None: no gradient)."""
    zz = {k: v.detach().clone().requires_grad_() for k, v in z.items()}
    aa = {k: v.detach().clone().requires_grad_() for k, v in a.items()}
    losses = fn(g, zz, y, step, total, aa)
    if not losses:
        return losses, []
    grads = torch.autograd.grad(
        sum(losses.values()), list(zz.values()) + list(aa.values()), allow_unused=True
    )
    return losses, grads


EPS32 = torch.finfo(torch.float32).eps


def crop_norms(att_s, att_t, k):
    """‖target crop‖ per sample: the window of side k around the source's arg-max (docs/ARCHITECTURE.md §1)."""
    b, h, w = att_s.shape
    flat = att_s.reshape(b, -1).argmax(1)
    top = (flat // w - k // 2).clamp(0, h - k)
    left = (flat % w - k // 2).clamp(0, w - k)
    return torch.stack([att_t[i, top[i] : top[i] + k, left[i] : left[i] + k].norm() for i in range(b)])


def bounds(g, z, a, y):
    """How far an fp32 computation of the losses and gradients may be from the exact values:
    ({target: bound on L_t}, {input name: bound on each element of its gradient}), from the inputs.

    κ = 8 + log2(B·C) roundings of relative size eps32: a chain of at most 8 fp32 operations (exp
    and log within 2 ulp each), plus one rounding per level of the tree sums over classes and batch.
    Each rounding is relative to the size of what it combines, which gives each term's bound:
    * log-softmax at temperature T: at most r = 2Z/T + log C in size (Z = the largest |logit|), so
      ce's loss and gradient p - onehot are off by κ·eps·(2Z + log C); T²·KL's loss by κ·eps·2T²r
      and its gradient T·(p_t - p_s) by κ·eps·2Tr: T is KL's condition factor;
    * dkd: TCKD and NCKD are KLs of distributions made of the same log-sum-exps (1 - p_y from the
      non-label one), so each obeys KL's bound: loss (α + β)·2T²r; its gradient
      T·(α(b_t - b_s)q_t + β(q_t - q_s)) sums three and two products of such probabilities: T(3α + 2β)r;
    * dist: the centred vectors a = p_s - 1/C, b = p_t - 1/C carry the probabilities' error r times
      the conditioning c = |p_s|/|a| + |p_t|/|b| (largest over the rows, in float64); the correlation
      moves by at most twice their relative errors: loss 2T²rc; its gradient
      -T p_t (a/D - φb - Σp_t g) is at most T(2/|b| + 2) in size, and each of its factors carries
      error rc: 4T(2/|b| + 2)rc;
    * standardize: the tempered terms see z' = (z - mean)/s, so Z becomes max|z'|; the gradient
      (h - ρz')/s is at most (1 + √C)|h|/s (Cauchy-Schwarz on ρ), so h's bound and its size times
      the two roundings of z' and s are magnified by (1 + √C)/s (smallest s of the target);
    * cos: the loss and each of the gradient's two terms are at most 1 and carry the probabilities'
      relative error (2Z + log C)·κ·eps, four times (two norms, a product, a division);
    * mse: (z_t - z_s)² ≤ 4Z², gradient 2(z_t - z_s)/C ≤ 4Z/C;
    * attention: normalised crops are at most 1 (loss terms at most 4), but the gradient divides by
      the target crop's norm: κ·eps·4 / min ‖crop‖, the conditioning a tiny 1×1 crop exposes.
    An edge adds |weight|·(loss bound) to its target's L_t and |weight|/B·(gradient bound) to each
    element of its target's gradient (gates are at most 1); an ensemble that is not detached passes
    its gradient bound on to its members (/ n for a mean).
    """
    z64 = node_logits(g, {k: v.double() for k, v in z.items()})
    batch, classes = y.shape[0], next(iter(z.values())).shape[1]
    big = max(v.abs().max().item() for v in z64.values())
    big_std = max(standardize(v).abs().max().item() for v in z64.values())
    log_c = math.log(classes)
    ulp = EPS32 * (8 + math.log2(batch * classes))
    loss_bound = {t: 0.0 for t in loss_targets(g)}
    grad_bound = {k: 0.0 for k in list(z) + [f"att:{k}" for k in a]}

    def give(end, amount):
        node = g.nodes.get(end)
        if isinstance(node, EnsembleNode):
            if not node.detach:
                for m in node.members:
                    give(m, amount / (len(node.members) if node.reduce == "mean" else 1))
        else:
            grad_bound[end] += amount

    def tempered(e):
        """(loss bound, gradient bound) of the edge's kl, dkd and dist terms, in units of κ·eps."""
        t = e.temperature
        z_s, z_t = z64[e.source], z64[e.target]
        if e.standardize:
            z_s, z_t = standardize(z_s), standardize(z_t)
        r = 2 * (big_std if e.standardize else big) / t + log_c
        loss = grad = size = 0.0
        if "kl" in e.terms:
            loss, grad, size = loss + 2 * t * t * r, grad + 2 * t * r, size + max(t, 1.0)
        if "dkd" in e.terms:
            loss += (e.alpha + e.beta) * 2 * t * t * r
            grad += t * (3 * e.alpha + 2 * e.beta) * r
            size += t * (e.alpha + e.beta)
        if "dist" in e.terms:
            p_s, p_t = torch.softmax(z_s / t, 1), torch.softmax(z_t / t, 1)
            a_, b_ = p_s - p_s.mean(1, keepdim=True), p_t - p_t.mean(1, keepdim=True)
            cond = (p_s.norm(dim=1) / a_.norm(dim=1) + p_t.norm(dim=1) / b_.norm(dim=1)).max().item()
            grad_size = t * (2 / b_.norm(dim=1).min().item() + 2)
            loss, grad, size = loss + 2 * t * t * r * cond, grad + 4 * grad_size * r * cond, size + grad_size
        if e.standardize:
            s = STANDARDIZE_EPS + z64[e.target].std(1).min().item()
            grad = (1 + math.sqrt(classes)) / s * (grad + 2 * size)
        return loss, grad

    for e in g.active_edges:
        w = abs(e.weight) * ulp
        terms = {
            "ce": (2 * big + log_c, 2 * big + log_c),
            "cos": (4 * (2 * big + log_c), 8 * (2 * big + log_c)),
            "mse": (4 * big * big, 4 * big / classes),
        }
        if any(term in TEMPERED_TERMS for term in e.terms):
            terms["tempered"] = tempered(e)
        for term in e.terms:
            if term in TEMPERED_TERMS:
                continue
            if term in terms:
                loss_bound[owner(e.target)] += w * terms[term][0]
                give(e.target, w * terms[term][1] / batch)
            else:
                smallest = min(
                    crop_norms(a[e.source].double(), a[e.target].double(), k).min().item() for k in e.crops
                )
                loss_bound[owner(e.target)] += w * 4
                grad_bound[f"att:{e.target}"] += w * 4 / max(smallest, NORMALIZE_EPS) / batch
        if "tempered" in terms:
            loss_bound[owner(e.target)] += w * terms["tempered"][0]
            give(e.target, w * terms["tempered"][1] / batch)
    return loss_bound, [grad_bound[k] for k in z] + [grad_bound[f"att:{k}"] for k in a]


def within(got, exact, bound, what):
    err = (got.double() - exact).abs().max().item()
    assert err <= bound, f"{what}: off by {err:.3g}, bound {bound:.3g}"


def compare(d, z, a, y, step=2, total=7):
    """The fused kernels and the fp32 reference, on copies of the same leaves, each held to the
    reference computed in float64 within the rounding bound of `bounds`: same keys in the same order,
    every loss and every gradient ("no gradient" is a zero gradient). Gradients come back in the
    inputs' dtype: half inputs add that one rounding, eps(dtype)·|exact|."""
    g = Graph.from_dict(d)
    exact, exact_grads = run(
        reference_graph_losses,
        g,
        {k: v.double() for k, v in z.items()},
        {k: v.double() for k, v in a.items()},
        y,
        step,
        total,
    )
    loss_bound, grad_bound = bounds(g, z, a, y)
    results = {
        "fused": run(fused_graph_losses, g, z, a, y, step, total),
        "reference": run(reference_graph_losses, g, z, a, y, step, total),
    }
    inputs = list(z.values()) + list(a.values())
    for name, (losses, grads) in results.items():
        assert list(losses) == list(exact) == loss_targets(g)
        for t in exact:
            within(losses[t], exact[t], loss_bound[t], f"{name} L[{t}]")
        for i, (ge, gg) in enumerate(zip(exact_grads, grads)):
            if ge is None and gg is None:
                continue
            ge = torch.zeros_like(inputs[i], dtype=torch.float64) if ge is None else ge
            gg = torch.zeros_like(inputs[i]) if gg is None else gg
            assert gg.dtype == inputs[i].dtype
            rounding = torch.finfo(gg.dtype).eps * ge.abs().max().item() if gg.dtype != torch.float32 else 0.0
            within(gg, ge, grad_bound[i] + rounding, f"{name} gradient {i}")
    return results["fused"]


def models(*names):
    return [{"name": n, "model": "resnet8"} for n in names]


def graph(nodes, edges, target="a"):
    return {"version": 1, "target": target, "nodes": nodes, "edges": edges}


def some_correct(z, y, n=3):
    """Make the first n samples of z right (its top-1 is the label): the correct gate passes those."""
    with torch.no_grad():
        z[:n] = 0
        z[torch.arange(n), y[:n]] = 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,gate", list(itertools.product(KINDS, GATES)))
def test_every_kind_and_gate(kind, gate, device):
    d = graph(
        models("a", "b"),
        [
            {"from": "label", "to": "a", "loss": "ce", "gate": gate},
            {
                "from": "b",
                "to": "a",
                "loss": kind,
                "gate": gate,
                "temperature": 2.5,
                "weight": 0.8,
                "crops": [2, 3],
            },
            {"from": "label", "to": "b", "loss": "ce", "gate": "through", "weight": -1.5},
        ],
    )
    z, a, y = inputs("ab", 6, 9, seed=len(kind) + 7 * len(gate), device=device)
    some_correct(z["b"], y)
    compare(d, z, a, y)


def random_nodes(rng, most, p_ensemble):
    """2 to `most` model nodes, and with probability `p_ensemble` an ensemble of two of them: (model
    names, node dicts, every endpoint's name)."""
    names = [f"n{i}" for i in range(rng.randint(2, most))]
    nodes = models(*names)
    if rng.random() < p_ensemble:
        nodes.append(
            {
                "name": "ens",
                "ensemble": rng.sample(names, 2),
                "reduce": rng.choice(["mean", "sum"]),
                "detach": rng.random() < 0.5,
            }
        )
    return names, nodes, [n["name"] for n in nodes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_random_graphs(seed, device):
    rng = random.Random(seed)
    names, nodes, endpoints = random_nodes(rng, 5, 0.7)
    edges = [
        {"from": "label", "to": n, "loss": "ce", "gate": rng.choice(GATES + ["cutoff"])} for n in endpoints
    ]
    for s, t in itertools.permutations(endpoints, 2):
        kinds = KINDS if s in names and t in names else ["kl", "cos", "mse", "kl+mse"]
        edges.append(
            {
                "from": s,
                "to": t,
                "loss": rng.choice(kinds),
                "gate": rng.choice(GATES + ["cutoff"]),
                "temperature": rng.choice([1.0, 2.0, 10.0]),
                "weight": rng.uniform(0.2, 2),  # > 0: no cancellation in L_t
                "crops": rng.sample([1, 2, 3, 4], rng.randint(1, 3)),
            }
        )
    batch, classes = rng.choice([(1, 10), (7, 13), (16, 100)])
    z, a, y = inputs(names, batch, classes, size=4, seed=seed, device=device)
    some_correct(z[names[1]], y, n=batch // 2)
    compare(graph(nodes, edges, names[0]), z, a, y, step=rng.randint(1, 9), total=9)


NEW_KINDS = ["dkd", "dist", "kl+dkd", "dkd+dist+mse", "dist+cos+att_mse"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind,gate,std", list(itertools.product(NEW_KINDS, ["through", "correct", "warmup"], [False, True]))
)
def test_new_kinds_gates_and_standardize(kind, gate, std, device):
    d = graph(
        models("a", "b"),
        [
            {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
            {
                "from": "b",
                "to": "a",
                "loss": kind,
                "gate": gate,
                "temperature": 2.5,
                "weight": 0.8,
                "crops": [2, 3],
                "standardize": std,
                **({"alpha": 0.5, "beta": 4.0} if "dkd" in kind else {}),
                **({"warmup": 0.6} if gate == "warmup" else {}),
            },
        ],
    )
    z, a, y = inputs("ab", 6, 9, seed=len(kind) + 7 * len(gate) + std, device=device)
    some_correct(z["b"], y)
    compare(d, z, a, y, step=2, total=7)


def random_edge(rng, s, t, attention: bool) -> dict:
    """An edge of any logit kind, old or new, and sometimes standardized, with random T (0.5 to 10),
    α (0 included), β, weight and gate (the warmup gate included)."""
    kinds = [
        "kl",
        "cos",
        "mse",
        "kl+mse",
        "dkd",
        "dist",
        "kl+dkd",
        "dkd+mse",
        "dist+cos",
        "kl+dist",
        "dkd+dist",
    ]
    kind = rng.choice(kinds + (["att_mse", "dkd+att_mse", "dist+att_cos"] if attention else []))
    edge = {
        "from": s,
        "to": t,
        "loss": kind,
        "gate": rng.choice(GATES + ["cutoff", "warmup"]),
        "temperature": rng.choice([0.5, 1.0, 2.0, 4.0, 10.0]),
        "weight": rng.uniform(0.2, 2),
        "crops": rng.sample([1, 2, 3], rng.randint(1, 2)),
    }
    if edge["gate"] == "warmup":
        edge["warmup"] = rng.choice([0.1, 0.5, 1.0])
    if "dkd" in kind:
        edge["alpha"], edge["beta"] = rng.choice([0.0, 1.0, 2.5]), rng.choice([0.0, 1.0, 8.0])
    if any(term in TEMPERED_TERMS for term in kind.split("+")):
        edge["standardize"] = rng.random() < 0.5
    if "kl" in kind.split("+") and rng.random() < 0.3:
        edge["soften"] = "source"
    return edge


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_mixing_old_and_new_kinds(seed, device):
    """Random graphs of every logit kind, old and new, standardize, α (0 too), β, T from 0.5 to 10 and
    the warmup gate: values and gradients against float64 within `bounds`."""
    rng = random.Random(100 + seed)
    names, nodes, endpoints = random_nodes(rng, 4, 0.5)
    edges = [{"from": "label", "to": n, "loss": "ce", "gate": rng.choice(GATES)} for n in endpoints]
    edges += [
        random_edge(rng, s, t, s in names and t in names) for s, t in itertools.permutations(endpoints, 2)
    ]
    batch, classes = rng.choice([(1, 10), (7, 13), (16, 100)])
    z, a, y = inputs(names, batch, classes, size=4, seed=seed, device=device)
    some_correct(z[names[1]], y, n=batch // 2)
    compare(graph(nodes, edges, names[0]), z, a, y, step=rng.randint(1, 9), total=9)


@pytest.mark.parametrize("device", DEVICES)
def test_standardize_at_constant_logits_is_finite(device, monkeypatch):
    """Rows of constant logits (var = 0, mean exact for 1.5 and 0): z' = 0, and the reference takes the
    std's own gradient as 0 there; the kernels' gradient is finite and within the bound, whose 1/s =
    1e7 is the true conditioning of (h - mean h) / ε. Also across class blocks (Chan's merge).
    dist at a constant target has |b| ≈ 0 (its gradient a/ε ~ 1e8, rounding-dominated in fp32): only
    its finiteness is asserted."""
    monkeypatch.setattr(edge_losses, "MAX_BLOCK_C", 8)
    d = graph(
        models("a", "b"),
        [
            {
                "from": "b",
                "to": "a",
                "loss": "kl+dkd",
                "gate": "through",
                "standardize": True,
                "temperature": 2.0,
            },
            {"from": "a", "to": "b", "loss": "dkd+mse", "gate": "through", "standardize": True},
        ],
    )
    z, a, y = inputs("ab", 6, 20, device=device)
    with torch.no_grad():
        z["a"][:2] = 1.5
        z["b"][1:3] = 0.0
    losses, grads = compare(d, z, a, y)
    d["edges"][0]["loss"] = "dist"
    losses, grads = run(fused_graph_losses, Graph.from_dict(d), z, a, y, 1, 1)
    assert all(torch.isfinite(v).all() for v in losses.values()) and all(
        torch.isfinite(g_).all() for g_ in grads[:2]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_dkd_where_p_y_rounds_to_one(device):
    """Label logits 20 and 40 above the rest: p_y is 1 in fp32 for both, and 1 - p_y, from the
    non-label log-sum-exp, keeps full precision. With β = 0 the gradient off the label is
    T·α·(b_t - b_s)·q_t, b = 1 - p_y, no cancellation (b_t ≪ b_s): each element within 3 rounding
    bounds of the probabilities, relative, 3·κ·eps·(2Z/T + log C). 1 - exp(log p_y) would give 0."""
    d = graph(
        models("a", "b"),
        [{"from": "b", "to": "a", "loss": "dkd", "gate": "through", "alpha": 2.0, "beta": 0.0}],
    )
    z, a, y = inputs("ab", 5, 10, device=device)
    with torch.no_grad():
        z["a"].clamp_(-3, 3)
        z["b"].clamp_(-3, 3)
        rows = torch.arange(5)
        z["b"][rows, y] = 23.0
        z["a"][rows, y] = 43.0
    g = Graph.from_dict(d)
    _, grads = run(fused_graph_losses, g, z, a, y, 1, 1)
    _, exact = run(reference_graph_losses, g, {k: v.double() for k, v in z.items()}, {}, y, 1, 1)
    off = torch.ones_like(z["a"], dtype=torch.bool)
    off[rows, y] = False
    assert (exact[0][off].abs() > 0).all()
    ulp = EPS32 * (8 + math.log2(5 * 10))
    rel = ((grads[0].double() - exact[0]) / exact[0])[off].abs().max().item()
    assert rel <= 3 * ulp * (2 * 43 + math.log(10)), rel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,classes", [(1, 10), (3, 1000), (5, 200), (33, 10)])
def test_sizes(batch, classes, device):
    d = graph(
        models("a", "b", "c"),
        [
            {"from": "label", "to": "a", "loss": "ce", "gate": "correct"},
            {"from": "b", "to": "a", "loss": "kl", "gate": "through", "temperature": 10.0},
            {"from": "c", "to": "a", "loss": "cos+mse", "gate": "correct"},
            {"from": "a", "to": "b", "loss": "kl", "gate": "linear"},
        ],
    )
    z, a, y = inputs("abc", batch, classes, device=device)
    some_correct(z["c"], y, n=(batch + 1) // 2)
    compare(d, z, a, y)


@pytest.mark.parametrize("device", DEVICES)
def test_class_blocks_and_row_blocks(device, monkeypatch):
    """Rows wider than a block (online max, arg-max and sum across blocks, ties across blocks) and
    batches spread over several programs, at sizes the interpreter runs quickly."""
    monkeypatch.setattr(edge_losses, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(edge_losses, "GPU_TILE", 32)
    d = graph(
        models("a", "b", "c"),
        [
            {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
            {"from": "b", "to": "a", "loss": "kl+cos", "gate": "correct", "temperature": 3.0},
            {"from": "c", "to": "a", "loss": "kl+mse", "gate": "through"},
            {"from": "a", "to": "c", "loss": "kl", "gate": "correct", "temperature": 3.0},
        ],
    )
    z, a, y = inputs("abc", 20, 37, device=device)
    with torch.no_grad():  # b's max is tied at classes 3 and 20 (two blocks): the first one counts
        z["b"][:, 20] = z["b"].max(1).values + 1
        z["b"][:, 3] = z["b"][:, 20]
        y[:10] = 3
        y[10:] = 20
        z["a"][:, 33] = z["a"].max(1).values + 2  # a's top-1 in the last, partial block
    compare(d, z, a, y)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_vector_and_its_total(device, monkeypatch):
    """The step's entry: L and Σ L from one launch, reduced inside the kernel over several programs
    (and its counter left ready: the second call computes the same), with gradients through either."""
    monkeypatch.setattr(edge_losses, "GPU_TILE", 32)
    monkeypatch.setattr(edge_losses, "MAX_BLOCK_C", 16)
    g = Graph.from_dict(
        graph(
            models("a", "b", "c"),
            [
                {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
                {"from": "a", "to": "b", "loss": "kl+att_mse", "gate": "linear", "crops": [2]},
                {"from": "b", "to": "c", "loss": "cos+mse", "gate": "through", "weight": 0.5},
            ],
        )
    )
    z, a, y = inputs("abc", 40, 20, size=4, device=device)
    z64 = {k: v.double().requires_grad_() for k, v in z.items()}
    exact = reference_graph_losses(g, z64, y, 3, 8, {k: v.double() for k, v in a.items()})
    weights = torch.tensor([1.0, -2.0, 3.0], device=device)  # dL/dL_t = weight + 2 below: at most 5
    exact_grads = torch.autograd.grad(
        (torch.stack(list(exact.values())) * weights.double()).sum() + 2 * sum(exact.values()),
        list(z64.values()),
    )
    loss_bound, grad_bound = bounds(g, z, a, y)
    zz = {k: v.clone().requires_grad_() for k, v in z.items()}
    for _ in range(2):
        losses, total = fused_loss_vector(g, zz, y, 3, 8, a)
        assert torch.equal(losses, torch.stack(list(fused_graph_losses(g, zz, y, 3, 8, a).values())))
        within(total, sum(exact.values()), sum(loss_bound.values()), "total")
        grads = torch.autograd.grad((losses * weights).sum() + 2 * total, list(zz.values()))
        for i, (gf, ge) in enumerate(zip(grads, exact_grads)):
            within(gf, ge, 5 * grad_bound[i], f"gradient {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_more_endpoints_than_linked(device, monkeypatch):
    """Past MAX_LINKED endpoints the logits are stacked into one buffer first."""
    monkeypatch.setattr(edge_losses, "MAX_LINKED", 2)
    d = graph(
        models("a", "b", "c"),
        [
            {"from": "label", "to": "c", "loss": "ce", "gate": "through"},
            {"from": "b", "to": "a", "loss": "kl", "gate": "through", "temperature": 2.0},
            {"from": "a", "to": "c", "loss": "mse+cos", "gate": "linear"},
        ],
    )
    compare(d, *inputs("abc", 4, 10, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduce,detach", list(itertools.product(["mean", "sum"], [True, False])))
def test_ensemble_sources_and_targets(reduce, detach, device):
    d = graph(
        models("a", "b", "c") + [{"name": "e", "ensemble": ["b", "c"], "reduce": reduce, "detach": detach}],
        [
            {"from": "e", "to": "a", "loss": "kl", "gate": "correct", "temperature": 2.0},
            {"from": "label", "to": "e", "loss": "ce", "gate": "through"},
            {"from": "a", "to": "e", "loss": "kl+mse", "gate": "linear"},
            {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
        ],
    )
    z, a, y = inputs("abc", 6, 10, device=device)
    some_correct(z["b"], y)
    some_correct(z["c"], y)
    _, grads = compare(d, z, a, y)
    assert (grads[2] is None) == detach  # c learns only through a non-detached ensemble


@pytest.mark.parametrize("device", DEVICES)
def test_correct_gate_masking_every_sample(device):
    d = graph(
        models("a", "b"),
        [
            {"from": "b", "to": "a", "loss": "kl+att_mse", "gate": "correct", "crops": [3]},
            {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
        ],
    )
    z, a, y = inputs("ab", 6, 10, device=device)
    with torch.no_grad():
        z["b"][:] = 0
        z["b"][torch.arange(6), (y + 1) % 10] = 3  # b is wrong everywhere
    losses, grads = compare(d, z, a, y)
    assert losses["a"].item() == 0
    assert not grads[0].any() and not grads[2].any()


@pytest.mark.parametrize("device", DEVICES)
def test_identical_source_and_target(device):
    d = graph(
        models("a", "b"), [{"from": "b", "to": "a", "loss": "kl+mse", "gate": "through", "temperature": 4.0}]
    )
    z, a, y = inputs("ab", 6, 10, device=device)
    z["b"] = z["a"].clone()
    losses, grads = compare(d, z, a, y)
    assert abs(losses["a"].item()) < 1e-6
    assert grads[0].abs().max().item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_attention_crops_at_borders_and_full_size(device):
    d = graph(
        models("a", "b"),
        [
            {"from": "b", "to": "a", "loss": "att_mse+att_cos", "gate": "through", "crops": [1, 3, 6]},
            {"from": "a", "to": "b", "loss": "kl+att_cos", "gate": "linear", "crops": [2, 5], "weight": 3.0},
        ],
    )
    z, a, y = inputs("ab", 7, 5, size=6, device=device)
    with torch.no_grad():
        for i, (r, c) in enumerate([(0, 0), (5, 5), (0, 5), (5, 0), (2, 0), (0, 3), (3, 3)]):
            a["b"][i, r, c] = 40.0
        a["a"][0] = 1.0  # a flat source map: the first pixel is its arg-max
    compare(d, z, a, y)
    d["edges"][0]["crops"] = [7]
    with pytest.raises(GraphError, match="crop size 7"):
        fused_graph_losses(Graph.from_dict(d), z, y, 1, 1, a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["att_cos", "att_mse"])
def test_one_pixel_crop_has_exactly_zero_gradient(loss, device):
    """A 1×1 crop normalises to ±1 whatever the pixel, so its gradient is exactly 0; the H100 run
    failed here (seed 0, n3->n2, att_cos, |t| ≈ 0.002) when an ulp of the division was magnified
    by 1 / |t|. Correctly rounded sqrt and division give ±1 exactly, hence 0 exactly."""
    d = graph(models("a", "b"), [{"from": "b", "to": "a", "loss": loss, "gate": "through", "crops": [1]}])
    z, a, y = inputs("ab", 8, 10, size=4, device=device)
    with torch.no_grad():
        a["a"].mul_(0.002)  # small target pixels: the backward divides by them
    _, grads = run(fused_graph_losses, Graph.from_dict(d), z, a, y, 1, 1)
    assert grads[2] is not None and torch.equal(grads[2], torch.zeros_like(grads[2]))
    compare(d, z, a, y)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_maps_up_to_32(device):
    d = graph(
        models("a", "b"),
        [
            {"from": "b", "to": "a", "loss": "att_mse", "gate": "correct", "crops": [3, 32]},
            {"from": "a", "to": "b", "loss": "att_cos", "gate": "through", "crops": [5]},
        ],
    )
    z, a, y = inputs("ab", 3, 10, size=32, device=device)
    some_correct(z["b"], y, n=2)
    compare(d, z, a, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_bound(dtype, device):
    d = graph(
        models("a", "b", "c"),
        [
            {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
            {"from": "c", "to": "a", "loss": "kl", "gate": "correct", "temperature": 2.0},
            {"from": "a", "to": "b", "loss": "cos+mse", "gate": "linear"},
        ],
    )
    z, a, y = inputs("abc", 8, 100, device=device)
    some_correct(z["c"], y)
    # Both read the same half-precision logits and accumulate in fp32: the float64 computation from
    # those logits bounds them as in fp32, plus the gradients' rounding to the half dtype. (No
    # ensemble: its mean is rounded to half before either implementation sees it.)
    compare(d, {k: v.to(dtype) for k, v in z.items()}, a, y)


@pytest.mark.parametrize("device", DEVICES)
def test_soften_source_against_a_direct_computation(device):
    # Into a: edges softened at the source only (EKD's Eq. 8) before and after a Hinton edge at the
    # same T, so the backward switches the target's softmax from T = 1 to T and back; into b: source
    # softened at T = 3.
    T, w = 10.0, 0.6
    d = graph(
        models("a", "b", "c", "d"),
        [
            {
                "from": "b",
                "to": "a",
                "loss": "kl+mse",
                "gate": "through",
                "temperature": T,
                "soften": "source",
                "weight": w,
            },
            {"from": "c", "to": "a", "loss": "kl", "gate": "through", "temperature": T},
            {
                "from": "d",
                "to": "a",
                "loss": "kl",
                "gate": "through",
                "temperature": 5.0,
                "soften": "source",
                "weight": 0.3,
            },
            {"from": "a", "to": "b", "loss": "kl", "gate": "linear", "temperature": 3.0, "soften": "source"},
            {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
        ],
    )
    z, a, y = inputs("abcd", 9, 13, device=device)
    fused, grads = compare(d, z, a, y, step=2, total=7)

    def kl(source, target):  # Σ_k softmax(source)_k (log softmax(source)_k - log softmax(target)_k), per row
        return (torch.softmax(source, 1) * (torch.log_softmax(source, 1) - torch.log_softmax(target, 1))).sum(
            1
        )

    zz = {k: v.double().detach().requires_grad_() for k, v in z.items()}
    za, zb, zc, zd = zz["a"], zz["b"], zz["c"], zz["d"]
    want_a = (
        w * (kl(zb.detach() / T, za) + ((za - zb.detach()) ** 2).mean(1))
        + T * T * kl(zc.detach() / T, za / T)
        + 0.3 * kl(zd.detach() / 5.0, za)
    ).mean()
    want_b = (
        2 / 7 * kl(za.detach() / 3.0, zb) + torch.nn.functional.cross_entropy(zb, y, reduction="none")
    ).mean()
    torch.testing.assert_close(fused["a"].double(), want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused["b"].double(), want_b, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want_a + want_b, [za, zb, zc, zd], allow_unused=True)
    assert grads[2] is None and grads[3] is None  # c and d are only sources
    for got, want in zip(grads[:2], want_grads[:2]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# k / k_end = 0.1, 0.5, 1 at steps 1, k_end / 2, k_end of k_end = 10, and γ = 2.5: 1/γ = 0.4.
# warmup, w = 0.25: k / (w k_end) = 0.4, then capped at 1.
TIME_GATE_WEIGHTS = {
    "negative_linear": [0.9, 0.5, 0.0],
    "gamma": [0.1**0.4, 0.5**0.4, 1.0],
    "negative_gamma": [0.9**0.4, 0.5**0.4, 0.0],
    "warmup": [0.4, 1.0, 1.0],
}
GATE_FIELDS = {"gamma": {"gamma": 2.5}, "negative_gamma": {"gamma": 2.5}, "warmup": {"warmup": 0.25}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", sorted(TIME_GATE_WEIGHTS))
def test_time_gates_at_the_first_middle_and_last_step(gate, device):
    fields = GATE_FIELDS.get(gate, {})
    edges = [
        {
            "from": "b",
            "to": "a",
            "loss": "kl+cos+att_mse",
            "gate": gate,
            "temperature": 2.0,
            "crops": [2],
            **fields,
        },
        {
            "from": "c",
            "to": "a",
            "loss": "dkd+dist",
            "gate": gate,
            "standardize": True,
            "temperature": 3.0,
            **fields,
        },
        {"from": "label", "to": "a", "loss": "ce", "gate": gate, "weight": 0.5, **fields},
    ]
    plain = [{k: v for k, v in e.items() if k not in fields} | {"gate": "through"} for e in edges]
    z, a, y = inputs("abc", 6, 9, device=device)
    plain_graph = Graph.from_dict(graph(models("a", "b", "c"), plain))
    through, through_grads = run(fused_graph_losses, plain_graph, z, a, y, 1, 10)
    for step, weight in zip((1, 5, 10), TIME_GATE_WEIGHTS[gate]):
        fused, grads = compare(graph(models("a", "b", "c"), edges), z, a, y, step=step, total=10)
        assert fused["a"].item() == pytest.approx(weight * through["a"].item(), rel=1e-5, abs=1e-6)
        for got, want in zip(grads, through_grads):
            if want is not None:
                torch.testing.assert_close(got, weight * want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["linear", "negative_linear", "gamma", "negative_gamma", "warmup"])
def test_time_gate_factor_from_a_device_tensor(gate, device):
    edge = {"from": "b", "to": "a", "loss": "kl", "gate": gate} | {
        "gamma": {"gamma": 0.7},
        "negative_gamma": {"gamma": 0.7},
        "warmup": {"warmup": 0.5},
    }.get(gate, {})
    g = Graph.from_dict(graph(models("a", "b"), [edge]))
    z, a, y = inputs("ab", 4, 10, device=device)
    as_int = fused_graph_losses(g, z, y, 3, 12)["a"]
    as_tensor = fused_graph_losses(g, z, y, torch.tensor(0.25, device=device), 1)["a"]
    as_step = fused_graph_losses(g, z, y, torch.tensor(3, device=device), 12)["a"]
    torch.testing.assert_close(as_tensor, as_int)
    torch.testing.assert_close(as_step, as_int)


@pytest.mark.skipif(not is_model_name("branch2_resnet8"), reason="no multi-branch models registered")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_edge", [True, False])  # without it, s is trained through its branches only
def test_branch_endpoints(device, label_edge):
    d = {
        "version": 1,
        "target": "s",
        "nodes": [{"name": "s", "model": "branch2_resnet8"}, *models("t")],
        "edges": [
            {"from": "t", "to": "s.b0", "loss": "kl+mse", "gate": "through", "temperature": 3.0},
            {"from": "s.b0", "to": "s.b1", "loss": "kl", "gate": "correct"},
            {"from": "label", "to": "s", "loss": "ce", "gate": "through"},
        ][: 3 if label_edge else 2],
    }
    z, a, y = inputs(["s", "t", "s.b0", "s.b1"], 5, 10, device=device)
    compare(d, z, {}, y)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_steps_do_not_recompile():
    g = Graph.from_dict(
        graph(
            models("a", "b"),
            [
                {"from": "b", "to": "a", "loss": "kl", "gate": "linear"},
                {"from": "label", "to": "b", "loss": "ce", "gate": "correct"},
            ],
        )
    )
    z, a, y = inputs("ab", 64, 100, device="cuda")
    z = {k: v.requires_grad_() for k, v in z.items()}

    def compiled():
        return sum(len(c[0]) for c in edge_losses._edge_loss_fwd.device_caches.values())

    sum(fused_graph_losses(g, z, y, 1, 100).values()).backward()
    before = compiled()
    for step in range(2, 12):
        z = {k: v.detach().clone().requires_grad_() for k, v in z.items()}  # new addresses too
        sum(fused_graph_losses(g, z, y, step, 100).values()).backward()
    assert compiled() == before


class LaunchSpy:
    """Stands in for a kernel: records each launch's arguments (the tensors kept alive, so that no
    two launches' memory can have the same address), then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def scratch_graph():
    return Graph.from_dict(
        graph(
            models("a", "b", "c"),
            [
                {"from": "label", "to": "a", "loss": "ce", "gate": "correct"},
                {"from": "a", "to": "b", "loss": "kl+cos", "gate": "linear"},
                {"from": "b", "to": "c", "loss": "mse", "gate": "through", "weight": 0.5},
            ],
        )
    )


def scratch_args(spy) -> list[tuple[int, int]]:
    """(partial rows, counter) addresses of each recorded forward launch."""
    part = spy.kernel.arg_names.index("part_ptr")
    return [(args[part].data_ptr(), args[part + 1].data_ptr()) for args, _ in spy.launches]


@pytest.mark.parametrize("device", DEVICES)
def test_each_caller_owns_its_scratch(device, monkeypatch):
    """Two owners never share scratch memory, and a call without one makes its own: trials in threads
    that share a stream (or not) can't add into each other's partial sums. One owner's scratch is
    reused by every call, and computes what a fresh one does (the counter is left at 0)."""
    monkeypatch.setattr(edge_losses, "GPU_TILE", 32)  # several programs: the scratch is used
    monkeypatch.setattr(edge_losses, "MAX_BLOCK_C", 16)
    spy = LaunchSpy(edge_losses._edge_loss_fwd)
    monkeypatch.setattr(edge_losses, "_edge_loss_fwd", spy)
    g = scratch_graph()
    z, _, y = inputs("abc", 40, 20, device=device)
    mine, theirs = edge_loss_fn.Scratch(), edge_loss_fn.Scratch()
    results = []
    for scratch in (mine, theirs, None, None, mine, mine):
        zz = {k: v.clone().requires_grad_() for k, v in z.items()}
        losses, total = fused_loss_vector(g, zz, y, 3, 8, scratch=scratch)
        results.append((losses, total, torch.autograd.grad(total, list(zz.values()))))
    assert edge_loss_fn._blocks(40, 20, torch.device(device))[3] > 1
    mine_1, theirs_1, own_1, own_2, mine_2, mine_3 = scratch_args(spy)
    assert mine_1 == mine_2 == mine_3  # reused by its owner
    addresses = [a for pair in (mine_1, theirs_1, own_1, own_2) for a in pair]
    assert len(set(addresses)) == len(addresses)  # never shared with another owner, nor between calls of none
    for losses, total, grads in results[1:]:
        assert torch.equal(losses, results[0][0]) and torch.equal(total, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][2]))
    assert torch.equal(
        torch.stack(list(fused_graph_losses(g, z, y, 3, 8, scratch=mine).values())), results[0][0]
    )


def test_scratch_is_not_made_inside_a_capture(monkeypatch):
    """Memory allocated while a CUDA graph is captured belongs to the graph's pool: a Scratch made
    then would be a different one at every capture. It must exist before (the step's warm-up)."""
    scratch = edge_loss_fn.Scratch()
    part, count = scratch.buffers(torch.device("cpu"), 4, 8)
    assert part.shape == (4, 8) and count.item() == 0
    monkeypatch.setattr(edge_loss_fn, "_capturing", lambda device: True)
    assert scratch.buffers(torch.device("cpu"), 4, 8)[0] is part  # made before: fine
    with pytest.raises(RuntimeError, match="run the step once before capturing it"):
        scratch.buffers(torch.device("cpu"), 2, 8)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_scratch_under_a_real_capture():
    g = scratch_graph()
    z, _, y = inputs("abc", 512, 100, device="cuda")
    scratch, side = edge_loss_fn.Scratch(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        want, _ = fused_loss_vector(g, z, y, 3, 8, scratch=scratch)  # warm-up: makes the scratch
    torch.cuda.current_stream().wait_stream(side)
    graph_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_, stream=side):
        got, _ = fused_loss_vector(g, z, y, 3, 8, scratch=scratch)
    graph_.replay()
    graph_.replay()
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="run the step once before capturing it"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            fused_loss_vector(g, {k: v[:64] for k, v in z.items()}, y[:64], 3, 8, scratch=scratch)


@pytest.mark.parametrize("kernel", ["_edge_loss_fwd", "_edge_loss_bwd"])
def test_endpoint_offsets_do_not_select_the_compiled_kernel(kernel, monkeypatch):
    """The endpoints' offsets change whenever the logits' buffers move (every eager step). Which
    compiled variant a launch runs (compiling it first if new) is the specialisation Triton's launcher
    binds from the arguments: it must not depend on the offsets, or a new pattern mid-run compiles a
    variant, inside a CUDA-graph capture too. Bound here for sm_90, as on a GPU, from a real launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    spy = LaunchSpy(getattr(edge_losses, kernel))
    monkeypatch.setattr(edge_losses, kernel, spy)
    z, _, y = inputs("abc", 8, 10)
    _, total = fused_loss_vector(scratch_graph(), {k: v.requires_grad_() for k, v in z.items()}, y, 3, 8)
    total.backward()
    ((args, kwargs),) = spy.launches
    fn = (
        spy.kernel if isinstance(spy.kernel, JITFunction) else JITFunction(spy.kernel.fn, **spy.kernel.kwargs)
    )
    bind = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    first, n = fn.arg_names.index("node_stride") + 1, edge_losses.OFFSET_ARGS
    patterns = [
        [0] * n,
        [16 * k for k in range(n)],
        [1, 17, -3, 2**31 + 5, -(2**40)] + [4096 * k + 7 for k in range(n - 5)],
    ]
    keys = []
    for offsets in patterns:
        _, specialization, _ = bind(*args[:first], *offsets, *args[first + n :], **kwargs)
        keys.append(specialization)
    assert keys[0] == keys[1] == keys[2]


@pytest.mark.parametrize("sms", [108, 132])  # A100, H100: the plans a GPU gets, computed without one
def test_launch_plans_keep_few_elements_per_thread_and_fill_the_gpu(sms):
    """At most THREAD_ELEMENTS elements of a block per thread: registers grow with them (16 took the
    edge-loss backward to 214-228 registers at B=1024, C=1000, the attention backward at 56×56 to 255
    and a spill; benchmarks/compile_kernels.py measures them, tests/test_compile_kernels.py holds them).
    And a program per SM at least, wherever the batch has that many rows."""
    from ktfast.kernels import plans

    per_thread = plans.THREAD_ELEMENTS
    for batch in (1, 7, 64, 100, 256, 1000, 1024, 4097, 8192, 65536):
        for classes in (2, 10, 100, 1000, 4000):
            rows, block_c, warps, programs = plans.edge_plan(
                batch, classes, sms, edge_losses.MAX_BLOCK_C, edge_losses.GPU_TILE
            )
            assert (
                block_c >= min(classes, edge_losses.MAX_BLOCK_C)
                and (programs - 1) * rows < batch <= programs * rows
            )
            assert rows * block_c <= 32 * warps * per_thread
            assert programs >= min(batch, sms)
    for side in range(1, 65):
        block, warps = plans.attention_plan(side, side)
        assert side * side <= block <= 32 * warps * 2 * per_thread and warps <= 16
