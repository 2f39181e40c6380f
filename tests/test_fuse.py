"""Horizontal fusion (`--fuse`) computes what the unfused nodes compute: the same logits and losses,
gradients, BatchNorm statistics and optimizer steps, for every model family of the registry; frozen
and trainable nodes never share a group; checkpoints move between fused and unfused runs.

Tolerance: fused, a convolution is one grouped convolution and a BatchNorm one over N·C channels,
so each sum is the same sum taken in another order. The runs compare in float64 (an autouse
fixture below), where that rounding parts them by 1e-15 to 1e-12 of a tensor's scale in three steps
(measured: 2e-15 for ResNet-8, 1e-12 for ABN-18), while one optimizer step moves a weight by
lr·grad, about 1e-3 of its size, so a lost or doubled gradient, a momentum buffer shared between
nodes or a BatchNorm statistic of the wrong node shows up as 1e-3 or more (measured: gradients
handed to the other node, 0.8; running statistics, 1.6). 1e-9 lies three orders above the one and
six below the other. Not float32: there a pre-activation within rounding of 0 takes the ReLU's
other branch on one side only, which parts the gradients by O(|g|) at once (2e-4 of the weights
in three steps, on an AVX2 CPU), and ResNet-18 at 16 px is unstable outright (an input scaled by
1 + 1e-7 moves its fp32 gradients by up to 17 %, in float64 by 2e-7).
"""

import argparse
from contextlib import contextmanager

import pytest
import torch

from ktfast import Graph
from ktfast.args import add_recipe_args, config_from_args
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.fuse import FusedGroup, fusion_groups
from ktfast.engine.trainer import Trainer
from ktfast.internals import uncompiled
from ktfast.models import build_model

TINY = "synthetic:classes=4,size=16,train=96,test=40"
RTOL = 1e-9


pytestmark = pytest.mark.usefixtures("private_cache")


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Models, optimizer state and metric sums built in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def float64():
    with default_dtype(torch.float64):
        yield


class Float64Batches:
    """A trainer's loader whose images come in float64 (a loader yields float32), for `fit()`."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return ((x.double(), y) for x, y in self.loader)


def fitting_trainer(g: Graph, out=None, **kw) -> Trainer:
    """A Trainer for `fit()` in float64."""
    trainer = build_trainer(g, cfg(**kw), out=out, progress=False)
    trainer.train_loader, trainer.eval_loader = (
        Float64Batches(trainer.train_loader),
        Float64Batches(trainer.eval_loader),
    )
    return trainer


def cfg(**kw):
    base = dict(dataset=TINY, epochs=2, batch_size=16, device="cpu", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def graph(model: str, n: int = 2, extra_nodes=(), extra_edges=()) -> Graph:
    """n nodes of one model learning from the labels and each other, an attention edge between the
    first two (and branch edges for multi-branch models). Every loss is a continuous function of
    the logits and maps: the crop is the whole map and no gate reads an arg-max, so float rounding
    cannot flip a choice (a near-tie in an arg-max, taken one way fused and the other unfused,
    changes a loss by O(1): in float64 such graphs match to 1e-13, in float32 they need not)."""
    names = [f"n{i}" for i in range(n)]
    side = build_model(model, 4, 16)(torch.zeros(2, 3, 16, 16), return_attention=True)[1].shape[-1]
    edges = [{"from": "label", "to": a, "loss": "ce", "gate": "through"} for a in names]
    edges += [
        {"from": names[1], "to": names[0], "loss": "kl+att_mse", "gate": "linear", "crops": [side]},
        {"from": names[0], "to": names[1], "loss": "kl", "gate": "through", "temperature": 2.0},
    ]
    if model.startswith("branch"):
        edges += [
            {"from": names[1], "to": f"{names[0]}.b1", "loss": "kl+mse", "gate": "through"},
            {"from": f"{names[1]}.b0", "to": names[0], "loss": "kl", "gate": "through"},
        ]
    return Graph.from_dict(
        {
            "version": 1,
            "name": "g",
            "target": names[0],
            "nodes": [{"name": a, "model": model} for a in names] + list(extra_nodes),
            "edges": edges + list(extra_edges),
        }
    )


def record(trainer: Trainer) -> list:
    """What the losses of `trainer`'s step (or a replica group's, one seed at a time) see each step:
    every endpoint's logits and attention map, every L_t (the kernels' or the reference's)."""
    seen, losses_of = [], trainer.step.seed_losses

    def recording(logits, labels, step, total_steps, attention, scratch):
        losses, total = losses_of(logits, labels, step, total_steps, attention, scratch)
        seen.append(
            {
                k: v.detach().clone()
                for k, v in (
                    *logits.items(),
                    *(("L_" + t, L) for t, L in losses.items()),
                    *(("att_" + a, m) for a, m in (attention or {}).items()),
                )
            }
        )
        return losses, total

    trainer.step.seed_losses = recording
    return seen


def run(g: Graph, steps: int = 3, dtype=torch.float64, **kw) -> tuple[Trainer, list]:
    with default_dtype(dtype):  # the models are built in it
        trainer = build_trainer(g, cfg(**kw), out=None, progress=False)
        seen = record(trainer)
        trainer.train_loader.set_epoch(0)
        for k, (x, y) in zip(range(steps), trainer.train_loader):
            trainer.train_step(x.to(dtype), y, k + 1)
    return trainer, seen


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """|a - b| ≤ rtol · max|b|, elementwise (relative to the tensor's scale: a weight near zero
    carries the rounding of its neighbours), the scale at least 1e-3: a tensor smaller than that
    is rounding residue (ABN's BatchNorm before a BatchNorm has a bias whose exact gradient is 0:
    its values, 1e-19, and the next BatchNorm's running mean, 1e-15, are rounding alone), while
    weights and statistics are of order 0.01 to 1; integers exactly."""
    if not b.is_floating_point():
        assert torch.equal(a, b), what
        return
    scale = max(b.abs().max().item(), 1e-3)
    assert (a - b).abs().max().item() <= rtol * scale, f"{what}: {(a - b).abs().max().item() / scale:.2e}"


def assert_same_run(
    plain: Trainer, fused: Trainer, seen_plain: list, seen_fused: list, rtol: float = RTOL
) -> None:
    assert len(seen_plain) == len(seen_fused) > 0
    for step, (p, f) in enumerate(zip(seen_plain, seen_fused)):
        assert p.keys() == f.keys()
        for k in p:
            assert_close(f[k], p[k], f"step {step + 1} {k}", rtol)
    for name, model in plain.models.items():
        other = uncompiled(fused.models[name]).state_dict()  # compiled or not
        for k, v in model.state_dict().items():
            assert_close(other[k], v, f"{name}.{k}", rtol)
    if plain.optimizer is not None:
        assert len(plain.optimizer.state) == len(fused.optimizer.state)
        for (p, sp), (q, sq) in zip(plain.optimizer.state.items(), fused.optimizer.state.items()):
            assert p.shape == q.shape and sp.keys() == sq.keys()
            for k in sp:
                assert_close(sq[k], sp[k], f"optimizer {k}", rtol)


FAMILIES = ["resnet8", "wrn10_2", "resnet18", "abn18", "branch2_resnet8"]


@pytest.mark.parametrize("model", FAMILIES)
def test_fused_nodes_compute_what_unfused_nodes_compute(model):
    g = graph(model, 3)
    plain, seen_plain = run(g, fuse=False)
    fused, seen_fused = run(g, fuse=True)
    # n0, n1 need attention maps, n2 does not: one fused pair and one single node.
    assert [(len(u.nodes), isinstance(u.module, FusedGroup)) for u in fused.units] == [(2, True), (1, False)]
    assert_same_run(plain, fused, seen_plain, seen_fused)


def test_fused_adam_steps_as_unfused():
    """In float64. Adam scales each element's step to about lr whatever the gradient's size, so an
    element whose gradient is at fp32 rounding level (a BatchNorm bias of a saturated channel) takes
    a step of ±lr either way: fp32 runs differ there by up to 2·lr (measured: 4e-2 of that bias).
    In float64 a gradient perturbation δ moves a step by at most lr·δ/ε (ε = 1e-8, at g → 0); with
    δ ≤ 1e-13 (a thousand float64 ulps) that is 1e-7 · lr, so 1e-8 bounds it (measured: 1e-14)."""
    g = graph(
        "resnet8",
        3,
        extra_edges=[{"from": "n0", "to": "n2", "loss": "att_mse", "gate": "through", "crops": [1]}],
    )
    plain, seen_plain = run(g, optimizer="adam", lr=0.01, fuse=False)
    fused, seen_fused = run(g, optimizer="adam", lr=0.01, fuse=True)
    assert [len(u.nodes) for u in fused.units] == [3]
    assert_same_run(plain, fused, seen_plain, seen_fused, rtol=1e-8)


def test_fused_evaluation_matches_unfused():
    # Epochs of steps and an evaluation: more rounding, still far below 1e-9 in float64 (measured:
    # 2e-16), while a real fault moves an epoch's loss by 1e-1 (a checkpoint loaded beside the
    # stacks: accuracy 0.45 against 0.60). Equal accuracies: an arg-max flips only at a near-tie
    # within float64 rounding.
    g = graph("resnet8", 3)
    rows = {fuse: fitting_trainer(g, epochs=1, fuse=fuse).fit()[0] for fuse in (False, True)}
    for split in ("train", "test"):
        for node, v in rows[False][split].items():
            assert rows[True][split][node]["acc"] == v["acc"]
            assert rows[True][split][node]["loss"] == pytest.approx(v["loss"], rel=RTOL)


def teacher_checkpoint(path, seed: int) -> dict:
    torch.manual_seed(seed)
    t = build_model("resnet8", 4, 16)
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save(t.state_dict(), path)
    return t.state_dict()


def test_frozen_and_trainable_nodes_never_share_a_group(tmp_path):
    teachers = {f"t{i}": teacher_checkpoint(tmp_path / f"t{i}.pt", i) for i in range(2)}
    g = graph(
        "resnet8",
        2,
        extra_nodes=[
            {"name": t, "model": "resnet8", "init": {"checkpoint": str(tmp_path / f"{t}.pt")}}
            for t in teachers
        ],
        extra_edges=[{"from": t, "to": "n0", "loss": "kl", "gate": "through"} for t in teachers],
    )
    assert [n.name for n in g.model_nodes if n.frozen] == ["t0", "t1"]
    groups = [[n.name for n in group] for group in fusion_groups(g, set(), set())]
    assert groups == [["n0", "n1"], ["t0", "t1"]]
    plain, seen_plain = run(g, fuse=False)
    fused, seen_fused = run(g, fuse=True)
    assert [[n.name for n in u.nodes] for u in fused.units] == [["n0", "n1"], ["t0", "t1"]]
    assert_same_run(plain, fused, seen_plain, seen_fused)
    for name, state in teachers.items():  # the frozen group: eval mode, no gradient, nothing moves
        model = fused.models[name]
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        for k, v in state.items():
            assert torch.equal(model.state_dict()[k], v), k


def test_groups_part_on_attention_and_branch_needs():
    g = graph("branch2_resnet8", 4)  # n0, n1: attention; n0: branches addressed
    groups = fusion_groups(g, {"n0", "n1"}, {"n0"})
    assert [[n.name for n in group] for group in groups] == [["n0"], ["n1"], ["n2", "n3"]]


def test_one_node_of_each_architecture_runs_as_before():
    nodes = [{"name": f"m{i}", "model": m} for i, m in enumerate(FAMILIES)]
    g = Graph.from_dict(
        {
            "version": 1,
            "name": "mixed",
            "target": "m0",
            "nodes": nodes,
            "edges": [{"from": "label", "to": n["name"], "loss": "ce", "gate": "through"} for n in nodes]
            + [
                {"from": "m3", "to": "m0", "loss": "kl+att_mse", "gate": "through", "crops": [1]},
                {"from": "m0", "to": "m4.b0", "loss": "kl", "gate": "through"},
            ],
        }
    )
    plain, seen_plain = run(g, steps=2, fuse=False, dtype=torch.float32)  # as users train: bit for bit
    fused, seen_fused = run(g, steps=2, fuse=True, dtype=torch.float32)
    assert not any(isinstance(u.module, FusedGroup) for u in fused.units)
    for p, f in zip(seen_plain, seen_fused):
        assert all(torch.equal(p[k], f[k]) for k in p)  # the very same computation, bit for bit
    torch.testing.assert_close(fused.loss_sums, plain.loss_sums, rtol=0, atol=0)


@pytest.mark.parametrize("first", [True, False], ids=["fused-then-unfused", "unfused-then-fused"])
def test_a_checkpoint_moves_between_fused_and_unfused_runs(tmp_path, first):
    g = graph("resnet8", 2)
    whole = fitting_trainer(g, fuse=first).fit()

    class Stop(Exception):
        pass

    def stop(epoch, row):
        raise Stop

    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(Stop):
        fitting_trainer(g, out=out, fuse=first).fit(on_epoch=stop)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    plain_keys = build_model("resnet8", 4, 16).state_dict().keys()
    assert all(sd.keys() == plain_keys for sd in state["models"].values())  # one plain state dict per node
    resumed = fitting_trainer(g, out=out, fuse=not first)
    resumed.load_checkpoint(out / "checkpoint.pt")
    (row,) = resumed.fit()
    for split in ("train", "test"):
        for node, v in whole[1][split].items():
            assert row[split][node]["acc"] == v["acc"]
            assert row[split][node]["loss"] == pytest.approx(v["loss"], rel=RTOL)


def test_fusion_keeps_the_nodes_layout_and_later_conversions_keep_the_views():
    """The fast path makes the nodes channels_last before fusing; a later `.to(channels_last)` of a
    node (a no-op then) must leave its tensors views of the stacks."""
    models = [build_model("resnet8", 4, 16).to(memory_format=torch.channels_last) for _ in range(2)]
    group = FusedGroup(models)
    for m in models:
        m.to(memory_format=torch.channels_last)
    for k, name in enumerate(group.param_names):
        for i, m in enumerate(models):
            p = m.get_parameter(name)
            assert p.data_ptr() == group.params[k][i].data_ptr()
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    fused = group(x)
    for i, m in enumerate(models):
        assert_close(fused[i].detach(), m(x).detach(), f"logits of node {i}")


def test_fuse_flag_resolves_and_is_recorded():
    p = argparse.ArgumentParser()
    add_recipe_args(p)
    for argv, expected in (([], False), (["--fuse"], True), (["--no-fuse"], False)):
        c = config_from_args(p.parse_args(["--device", "cpu", *argv]))
        assert c.fuse is expected and c.to_dict()["fuse"] is expected
    assert TrainConfig(device="cuda").fused() and not TrainConfig(device="cuda", reference=True).fused()
    assert not TrainConfig(device="cpu").fused() and TrainConfig(device="cpu", fuse=True).fused()


def test_compiled_fused_step_matches_eager_unfused():
    g = graph("resnet8", 2)
    plain, seen_plain = run(g, steps=2, fuse=False)
    fused, seen_fused = run(g, steps=2, fuse=True, compile=True)
    assert_same_run(plain, fused, seen_plain, seen_fused)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize(
    "flags", [dict(), dict(compile=True), dict(amp=True)], ids=["streams", "compile", "amp"]
)
def test_cuda_fused_fast_step_matches_unfused(flags):
    """The CUDA fast step (streams, kernels, CUDA graph), fused and unfused: the per-step losses it
    adds to the epoch sums and the weights after 4 steps. The losses are read from what the step
    itself accumulates (a captured step calls no Python loss function to record)."""
    g = graph("resnet8", 3)
    runs = {}
    with default_dtype(torch.float32):  # the GPU path as users run it
        for fuse in (False, True):
            trainer = build_trainer(g, cfg(device="cuda", fuse=fuse, **flags), out=None, progress=False)
            trainer.train_loader.set_epoch(0)
            losses, before = [], torch.zeros_like(trainer.loss_sums)
            for k, (x, y) in zip(range(4), trainer.train_loader):
                trainer.train_step(x, y, k + 1)
                losses.append((trainer.loss_sums - before).cpu())
                before = trainer.loss_sums.clone()
            runs[fuse] = trainer, losses
    (plain, plain_losses), (fused, fused_losses) = runs[False], runs[True]
    assert any(isinstance(uncompiled(u.module), FusedGroup) for u in fused.units)
    assert not any(isinstance(uncompiled(u.module), FusedGroup) for u in plain.units)
    assert len(plain_losses) == len(fused_losses) == 4  # what is compared was produced, every step
    assert all(bool((loss[:3] > 0).all()) for loss in plain_losses + fused_losses)
    # cuDNN picks other algorithms for grouped convolutions (and bf16 under AMP): the bound of
    # tests/test_fast.py's CUDA comparison, and bf16's for AMP.
    tol = 5e-2 if flags.get("amp") else 2e-3
    for step, (p, f) in enumerate(zip(plain_losses, fused_losses)):
        torch.testing.assert_close(f, p, rtol=tol, atol=tol, msg=f"step {step + 1}")
    for name, model in plain.models.items():
        other = uncompiled(fused.models[name]).state_dict()
        for k, v in model.state_dict().items():
            assert_close(other[k].float(), v.float(), f"{name}.{k}", rtol=tol)
