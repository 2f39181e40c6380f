"""ABN and EKD: the `abn18` and `branch{N}_resnet8` models, branch addresses `node.b{i}` in graphs,
losses and training, the EKD objective against the paper's formula, and the example graphs."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ktfast import Graph, GraphError
from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.pretrain import cache_path
from ktfast.graph import EnsembleNode
from ktfast.kernels import fused_graph_losses
from ktfast.losses import graph_losses
from ktfast.models import build_model, is_model_name

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = "synthetic:classes=10,size=32,train=16,test=16"  # 32 px: the 8x8 ABN map the examples' crops need


pytestmark = pytest.mark.usefixtures("private_cache")


# ---- abn18 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size,side", [(32, 8), (64, 8), (224, 14)])
def test_abn18_logits_and_attention_map(size, side):
    model = build_model("abn18", 7, size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits, att = model(x, return_attention=True)
        assert torch.equal(model(x), logits)
    assert logits.shape == (1, 7) and att.shape == (1, side, side)
    assert 0 <= att.min() and att.max() <= 1  # a sigmoid: the map weights the features


def forced_map(model, x, value):
    """The logits with the attention map replaced by a constant."""
    hook = model.attention_map.register_forward_hook(lambda m, i, out: torch.full_like(out, value))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        hook.remove()


def test_abn18_map_weights_the_features_without_a_residual():
    torch.manual_seed(0)
    model = build_model("abn18", 5, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    model.attention_map.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        logits, att = model(x, return_attention=True)
        features = model.features(model.stem(x))
        unweighted = model.fc(F.adaptive_avg_pool2d(model.perception_branch(features), 1).flatten(1))
    torch.testing.assert_close(att, seen[0].squeeze(1))  # the map returned is the one applied
    assert not torch.allclose(forced_map(model, x, 0.0), logits)  # the map acts on the logits
    # A map of ones leaves the features as they are: features · map, not features · (1 + map).
    torch.testing.assert_close(forced_map(model, x, 1.0), unweighted)


def test_abn18_attention_branch_learns_from_the_perception_logits():
    model = build_model("abn18", 5, 32)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.attention_branch[0][0].conv1.weight.grad.abs().sum() > 0
    assert model.attention_map[0].weight.grad.abs().sum() > 0


# ---- branch{N}_resnet8 ----------------------------------------------------------------------
def test_registry_names():
    for ok in ("abn18", "branch1_resnet8", "branch3_resnet8", "branch12_resnet8"):
        assert is_model_name(ok), ok
    for bad in ("branch0_resnet8", "branch03_resnet8", "branch3_resnet20", "branch_resnet8", "abn"):
        assert not is_model_name(bad), bad


def test_branch_model_sums_independent_resnet8_branches():
    torch.manual_seed(0)
    model = build_model("branch3_resnet8", 10, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, att, branches = model(x, return_attention=True, return_branches=True)
        assert torch.equal(model(x), logits)
        only_branches = model(x, return_branches=True)
        single = build_model("resnet8", 10, 32).eval()
        maps = []
        for i, z in enumerate(branches):
            # Each branch is a whole ResNet-8 of its own (own stem, nothing shared), as in the paper.
            single.load_state_dict(model.branches[i].state_dict())
            zi, ai = single(x, return_attention=True)
            torch.testing.assert_close(z, zi)
            maps.append(ai)
    assert len(branches) == 3 and logits.shape == (4, 10) and att.shape == (4, 8, 8)
    torch.testing.assert_close(logits, sum(branches))
    torch.testing.assert_close(att, torch.stack(maps).mean(0))
    assert torch.equal(only_branches[0], logits) and len(only_branches) == 2
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 3 * sum(p.numel() for p in single.parameters())


# ---- branch addresses in graph files --------------------------------------------------------
def student_graph(*edges, members=("s.b0", "s.b2")):
    return {
        "version": 1,
        "target": "s",
        "nodes": [
            {"name": "s", "model": "branch3_resnet8"},
            {"name": "t", "model": "resnet8"},
            {"name": "bs", "ensemble": list(members), "reduce": "sum", "detach": False},
        ],
        "edges": [{"from": "label", "to": "t", "loss": "ce", "gate": "through"}, *edges],
    }


def edge(source, target, loss="kl"):
    return {"from": source, "to": target, "loss": loss, "gate": "through"}


def test_branch_addresses_load():
    g = Graph.from_dict(
        student_graph(edge("t", "s.b0"), edge("s.b2", "t"), edge("s.b0", "s.b2"), edge("label", "bs", "ce"))
    )
    assert [(e.source, e.target) for e in g.edges[1:]] == [
        ("t", "s.b0"),
        ("s.b2", "t"),
        ("s.b0", "s.b2"),
        ("label", "bs"),
    ]
    assert not g.nodes["s"].frozen


@pytest.mark.parametrize(
    "edges,members,field",
    [
        ([edge("t", "s.b3")], ("s.b0",), r"edges\[t->s\.b3\]\.to"),
        ([edge("s.b3", "t")], ("s.b0",), r"edges\[s\.b3->t\]\.from"),
        ([], ("s.b0", "s.b3"), r"nodes\[bs\]\.ensemble"),
        ([edge("t.b0", "s")], ("s.b0",), r"edges\[t\.b0->s\]\.from"),  # a single-branch model has no b0
    ],
)
def test_a_branch_the_model_does_not_have_is_rejected(edges, members, field):
    with pytest.raises(GraphError, match=field):
        Graph.from_dict(student_graph(*edges, members=members))


def test_losses_into_branches_count_for_their_node():
    # Every edge into s goes to a branch: s is still trained, and its L_t sums those edges.
    g = Graph.from_dict(
        student_graph(edge("t", "s.b0", "kl+mse"), edge("t", "s.b2", "mse"), members=("s.b1",))
    )
    gen = torch.Generator().manual_seed(0)
    z = {n: torch.randn(6, 10, generator=gen) for n in ("t", "s.b0", "s.b1", "s.b2")}
    z["s"] = z["s.b0"] + z["s.b1"] + z["s.b2"]
    y = torch.randint(0, 10, (6,), generator=gen)
    losses = graph_losses(g, z, y, step=1, total_steps=1)
    assert list(losses) == ["s", "t"] and not g.nodes["s"].frozen
    kl = F.kl_div(
        F.log_softmax(z["s.b0"], 1), F.log_softmax(z["t"], 1), reduction="batchmean", log_target=True
    )
    expected = kl + F.mse_loss(z["s.b0"], z["t"]) + F.mse_loss(z["s.b2"], z["t"])
    torch.testing.assert_close(losses["s"], expected)
    fused = fused_graph_losses(g, z, y, 1, 1)
    assert list(fused) == list(losses)
    for k in losses:
        torch.testing.assert_close(fused[k], losses[k])


def test_a_graph_with_branch_endpoints_trains_and_evaluates_its_branch_ensemble():
    g = Graph.from_dict(
        student_graph(edge("t", "s.b0", "kl+mse"), edge("s.b2", "t"), edge("label", "bs", "ce"))
    )
    cfg = TrainConfig(dataset=TINY, epochs=1, batch_size=16, device="cpu")
    row = build_trainer(g, cfg, out=None, progress=False).fit()[0]
    assert set(row["train"]) == set(row["test"]) == {"s", "t", "bs"}
    assert all(0 <= v["acc"] <= 1 and v["loss"] >= 0 for v in row["test"].values())


# ---- EKD ------------------------------------------------------------------------------------
def ekd_inputs(batch=8, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = {
        n: (3 * torch.randn(batch, classes, generator=gen)).requires_grad_()
        for n in ("t0", "t1", "t2", "s.b0", "s.b1", "s.b2")
    }
    return z, torch.randint(0, classes, (batch,), generator=gen)


def with_student_sum(z):
    return {**z, "s": z["s.b0"] + z["s.b1"] + z["s.b2"]}  # what branch3_resnet8 returns as s


def ekd_paper_loss(z, y, alpha=0.5, beta=0.5, gamma=0.6, T=10.0):
    """Asif et al., Eq. 5 and 8, written out: (teachers' part, student's part) of L_train."""

    def kl(student, teacher):  # Eq. 8's L_KL(student, teacher / T): only the teacher is softened, no T²
        p = F.softmax(teacher / T, 1)
        return (p * (F.log_softmax(teacher / T, 1) - F.log_softmax(student, 1))).sum(1).mean()

    def mse(student, teacher):
        return ((student - teacher) ** 2).mean()

    teachers = [z[f"t{i}"] for i in range(3)]
    branches = [z[f"s.b{i}"] for i in range(3)]
    p_t, p_s = sum(teachers), sum(branches)
    fixed_t = [t.detach() for t in teachers]  # a graph edge trains its target only
    l_kd = (
        kl(p_s, sum(fixed_t))
        + mse(p_s, sum(fixed_t))
        + sum(kl(q_s, q_t) + mse(q_s, q_t) for q_s, q_t in zip(branches, fixed_t))
    )
    return alpha * F.cross_entropy(p_t, y), beta * F.cross_entropy(p_s, y) + gamma * l_kd


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_ekd_graph_is_the_papers_objective(path):
    g = Graph.load(EXAMPLES / "ekd.json")
    z, y = ekd_inputs()
    fn = graph_losses if path == "reference" else fused_graph_losses
    losses = fn(g, with_student_sum(z), y, 1, 1)
    teachers, student = ekd_paper_loss(z, y)
    assert set(losses) == {"teachers", "s"}
    torch.testing.assert_close(losses["teachers"], teachers)
    torch.testing.assert_close(losses["s"], student)
    got = torch.autograd.grad(sum(losses.values()), list(z.values()))
    want = torch.autograd.grad(teachers + student, list(z.values()))
    for name, a, b in zip(z, got, want):
        torch.testing.assert_close(a, b, msg=name)


def test_ekd_trains_the_same_through_the_fused_kernels(monkeypatch):
    d = json.loads((EXAMPLES / "ekd.json").read_text())
    for node in d["nodes"]:
        node.pop("init", None)  # scratch teachers: no pretraining needed to compare the two paths
    g = Graph.from_dict(d)
    # One step (16 images): later steps would amplify rounding differences (BatchNorm on small
    # batches). SGD without weight decay: a parameter moves only where a gradient reaches it.
    cfg = TrainConfig(dataset=TINY, epochs=1, batch_size=16, device="cpu", lr=0.05, weight_decay=0.0)
    weights = {}
    for kernels in ("0", "1"):
        monkeypatch.setenv("KTFAST_KERNELS", kernels)
        trainer = build_trainer(g, cfg, out=None, progress=False)
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in trainer.models.items()}
        trainer.train_epoch()
        weights[kernels] = {n: list(m.parameters()) for n, m in trainer.models.items()}
        for n, m in trainer.models.items():  # teachers fine-tuned, every branch trained
            assert all(not torch.equal(p0, p) for p0, p in zip(before[n], m.parameters()) if p.dim() > 1), n
    for n in weights["0"]:
        for a, b in zip(weights["0"][n], weights["1"][n]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the example graphs ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_abn_examples_target_the_ensemble_of_all_nodes(n):
    g = Graph.load(EXAMPLES / f"abn{n}.json")
    models = [m.name for m in g.model_nodes]
    assert len(models) == n and {m.model for m in g.model_nodes} == {"abn18"}
    ens = g.nodes[g.target]
    assert isinstance(ens, EnsembleNode) and list(ens.members) == models and ens.reduce == "mean"
    assert all(any(e.source == "label" and e.target == m for e in g.active_edges) for m in models)  # L_hard
    terms = {t for e in g.active_edges for t in e.terms}
    assert terms & {"kl", "att_mse"}
    if n >= 3:  # the larger graphs also push outputs apart (Fig. 3b, 4)
        assert terms & {"cos", "att_cos"}


@pytest.mark.parametrize("name", ["abn2", "abn3", "abn4", "abn5", "ekd"])
def test_example_trains_one_epoch_through_the_cli(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            "--graph",
            str(EXAMPLES / f"{name}.json"),
            "--dataset",
            TINY,
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--out",
            "run",
            "--quiet",
            "--device",
            "cpu",
        ]
        + (["--optimizer", "adam", "--lr", "0.01"] if name == "ekd" else [])
    )
    assert code == 0
    g = Graph.load(EXAMPLES / f"{name}.json")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["epoch"] == 1 and set(row["test"]) == set(g.nodes)
    assert all(0 <= v["acc"] <= 1 for v in row["test"].values())
    if name == "ekd":  # the teachers start from the pretrain cache and are fine-tuned, not frozen
        cfg = TrainConfig.load(tmp_path / "run" / "config.json")
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["models"]
        for node in g.model_nodes:
            if node.name != "s":
                assert node.init == "pretrained" and not node.frozen
                start = torch.load(cache_path(node.model, cfg), weights_only=True)["state_dict"]
                assert not torch.equal(start["fc.weight"], state[node.name]["fc.weight"])
