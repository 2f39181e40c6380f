"""The trainer: one forward per node per step, joint update, frozen teachers, the run directory."""

import json

import pytest
import torch

from ktfast import Graph
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.pretrain import cache_path
from ktfast.engine.run import make_trainer

TINY = "synthetic:classes=4,size=16,train=96,test=40"


pytestmark = pytest.mark.usefixtures("private_cache")


def cfg(**kw):
    base = dict(dataset=TINY, epochs=2, batch_size=32, device="cpu", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def dml(model="resnet8", extra_nodes=(), extra_edges=()):
    return Graph.from_dict(
        {
            "version": 1,
            "name": "dml",
            "target": "a",
            "nodes": [{"name": "a", "model": model}, {"name": "b", "model": model}, *extra_nodes],
            "edges": [
                {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
                {"from": "label", "to": "b", "loss": "ce", "gate": "correct"},
                {"from": "b", "to": "a", "loss": "kl", "gate": "linear"},
                {"from": "a", "to": "b", "loss": "kl+att_mse", "gate": "through", "crops": [1, 2]},
                *extra_edges,
            ],
        }
    )


def test_run_directory_rows_and_checkpoint(tmp_path):
    g = dml(extra_nodes=[{"name": "ens", "ensemble": ["a", "b"]}])
    out = tmp_path / "run"
    out.mkdir()
    rows = build_trainer(g, cfg(), out=out, progress=False).fit()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows)) and [r["epoch"] for r in lines] == [1, 2]
    for row in lines:
        assert set(row) == {"epoch", "time_s", "images_per_s", "train", "test"}
        assert row["time_s"] > 0 and row["images_per_s"] > 0
        for split in ("train", "test"):
            assert set(row[split]) == {"a", "b", "ens"}
            for v in row[split].values():
                assert 0 <= v["acc"] <= 1 and v["loss"] >= 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["models"]) == {"a", "b"}
    assert not (out / "checkpoint.pt.tmp").exists()


def test_one_forward_per_node_per_step_and_joint_update():
    g = dml()
    trainer = build_trainer(g, cfg(epochs=1), out=None, progress=False)
    calls = {"a": 0, "b": 0}
    for name in calls:
        # Training forwards only: evaluation runs in eval mode.
        trainer.models[name].register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + m.training)
        )
    before = {n: [p.detach().clone() for p in trainer.models[n].parameters()] for n in calls}
    trainer.fit()
    steps = trainer.steps_per_epoch
    assert calls == {"a": steps, "b": steps}  # DCL: one forward, not DML's re-forward per node
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for n in calls:
        assert all(id(p) in optimized for p in trainer.models[n].parameters())
        assert any(not torch.equal(p0, p) for p0, p in zip(before[n], trainer.models[n].parameters()))


def test_frozen_teacher_never_changes_weights_or_batchnorm_statistics(tmp_path):
    teacher = tmp_path / "teacher.pt"
    from ktfast.models import build_model

    torch.manual_seed(1)
    t = build_model("resnet8", 4, 16)
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    torch.save(t.state_dict(), teacher)
    g = dml(
        extra_nodes=[{"name": "t", "model": "resnet8", "init": {"checkpoint": str(teacher)}}],
        extra_edges=[
            {"from": "t", "to": "a", "loss": "kl", "gate": "through", "temperature": 2.0},
            {"from": "a", "to": "t", "loss": "kl", "gate": "cutoff"},
        ],
    )
    assert g.nodes["t"].frozen
    trainer = build_trainer(g, cfg(), out=None, progress=False)
    trainer.fit()
    after = trainer.models["t"].state_dict()
    for k, v in t.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert not trainer.models["t"].training
    assert all(not p.requires_grad for p in trainer.models["t"].parameters())


def test_pretrained_init_fills_the_cache_once(capsys):
    g = Graph.from_dict(
        {
            "version": 1,
            "target": "s",
            "nodes": [{"name": "s", "model": "resnet8"}, {"name": "t", "model": "resnet8"}],
            "edges": [
                {"from": "label", "to": "s", "loss": "ce", "gate": "through"},
                {"from": "t", "to": "s", "loss": "kl", "gate": "through"},
            ],
        }
    )
    assert g.nodes["t"].init == "pretrained"
    c = cfg(epochs=1)
    first = make_trainer(g, c, out=None, progress=False)
    assert "training it first" in capsys.readouterr().out
    path = cache_path("resnet8", c)
    assert path.exists()
    stored = torch.load(path, weights_only=True)
    assert stored["model"] == "resnet8"
    for k, v in stored["state_dict"].items():
        assert torch.equal(first.models["t"].state_dict()[k], v)
    make_trainer(g, c.replace(seed=3), out=None, progress=False)
    assert "training it first" not in capsys.readouterr().out


def test_a_node_after_a_pretrained_one_starts_the_same_with_or_without_the_cache():
    g = Graph.from_dict(
        {
            "version": 1,
            "target": "s",
            "nodes": [{"name": "t", "model": "resnet8"}, {"name": "s", "model": "resnet8"}],
            "edges": [
                {"from": "label", "to": "s", "loss": "ce", "gate": "through"},
                {"from": "t", "to": "s", "loss": "kl", "gate": "through"},
            ],
        }
    )
    # Seed 1: the pretraining (seed 0) leaves the global generator elsewhere than it found it.
    fresh = (
        make_trainer(g, cfg(epochs=1, seed=1), out=None, progress=False).models["s"].state_dict()
    )  # pretrains t
    cached = make_trainer(g, cfg(epochs=1, seed=1), out=None, progress=False).models["s"].state_dict()
    for k, v in fresh.items():
        assert torch.equal(cached[k], v), k


def test_with_a_train_fraction_each_seed_has_a_teacher_of_its_own_subset():
    c = cfg(epochs=1, train_fraction=0.5)
    assert cache_path("resnet8", c) != cache_path("resnet8", c.replace(seed=1))
    assert cache_path("resnet8", cfg()) == cache_path("resnet8", cfg(seed=1))  # full data: one teacher
    from ktfast.engine.pretrain import pretrain

    for seed in (0, 1):
        stored = torch.load(
            pretrain("resnet8", c.replace(seed=seed), log=lambda *a: None, progress=False), weights_only=True
        )
        assert stored["config"]["seed"] == seed and stored["config"]["train_fraction"] == 0.5


def test_same_seed_same_run_different_seed_different_run():
    g = dml()
    a = build_trainer(g, cfg(epochs=1), out=None, progress=False).fit()
    b = build_trainer(g, cfg(epochs=1), out=None, progress=False).fit()
    c = build_trainer(g, cfg(epochs=1, seed=1), out=None, progress=False).fit()
    assert a[0]["test"] == b[0]["test"] and a[0]["train"] == b[0]["train"]
    assert a[0]["train"] != c[0]["train"]


# Only the schedule is stepped here, no optimizer step: torch warns about that order.
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_lr_schedule_follows_the_recipe_fractions():
    trainer = build_trainer(dml(), cfg(epochs=10, lr_decay_at=(0.3, 0.6, 0.9)), out=None, progress=False)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.05] * 3 + [0.005] * 3 + [0.0005] * 3 + [0.00005])
    group = trainer.optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4


def test_training_learns_real_digits():
    """Training descends: within 40 steps on the bundled digits the loss falls well below its start
    and the target beats chance (10 %) by far on the test split. Gradient ascent does neither."""
    from ktfast.engine.trainer import evaluate

    g = Graph.from_dict(
        {
            "version": 1,
            "target": "a",
            "nodes": [{"name": "a", "model": "resnet8"}],
            "edges": [{"from": "label", "to": "a", "loss": "ce", "gate": "through"}],
        }
    )
    trainer = build_trainer(
        g, cfg(dataset="digits", epochs=10, optimizer="adam", lr=3e-3), out=None, progress=False
    )
    trainer.train_loader.set_epoch(0)
    losses, previous = [], 0.0
    for k, (x, y) in zip(range(40), trainer.train_loader):
        trainer.train_step(x, y, k + 1)
        losses.append(trainer.loss_sums[0].item() - previous)
        previous = trainer.loss_sums[0].item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 2.0 and last < 0.75 * first, (first, last)  # ln 10 = 2.30 at the start
    assert evaluate(g, trainer.models, trainer.units, trainer.eval_loader, trainer.cfg)["a"]["acc"] > 0.4


def test_the_loop_hands_every_step_its_1_based_index_and_the_run_its_total():
    """Linear gates weigh a step by k / k_end with k = 1 … k_end (docs/ARCHITECTURE.md §1): the last step at 1."""
    trainer = build_trainer(dml(), cfg(epochs=2), out=None, progress=False)
    seen = []
    original = trainer.train_step
    trainer.train_step = lambda x, y, step: (seen.append(step), original(x, y, step))
    trainer.fit()
    per_epoch = trainer.steps_per_epoch
    assert per_epoch == 96 // 32 and trainer.total_steps == 2 * per_epoch
    assert seen == list(range(1, trainer.total_steps + 1))


def scaled(scales: dict) -> Graph:
    """Three trained nodes with the given lr_scale (1 where not given)."""
    d = dml(
        extra_nodes=[{"name": "c", "model": "resnet8"}],
        extra_edges=[{"from": "label", "to": "c", "loss": "ce", "gate": "through"}],
    ).to_dict()
    for node in d["nodes"]:
        if node["name"] in scales:
            node["lr_scale"] = scales[node["name"]]
    return Graph.from_dict(d)


# Only the schedule is stepped here, no optimizer step: torch warns about that order.
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_scale_gives_each_node_its_lr_through_the_schedule(optimizer):
    trainer = build_trainer(
        scaled({"b": 0.1, "c": 0.25}), cfg(epochs=10, optimizer=optimizer), out=None, progress=False
    )
    group_of = {id(p): i for i, g in enumerate(trainer.optimizer.param_groups) for p in g["params"]}
    for _ in range(10):
        decay = 0.1 ** sum(trainer.scheduler.last_epoch >= m for m in cfg(epochs=10).milestones())
        for name, scale in {"a": 1.0, "b": 0.1, "c": 0.25}.items():
            groups = {group_of[id(p)] for p in trainer.models[name].parameters()}
            assert len(groups) == 1, name
            assert trainer.optimizer.param_groups[groups.pop()]["lr"] == pytest.approx(
                0.05 * scale * decay
            ), name
        trainer.scheduler.step()
    assert trainer.scheduler.last_epoch == 10


def test_lr_scale_scales_each_nodes_step_and_survives_resume(tmp_path):
    # Plain SGD (no momentum, no weight decay): a node's first step is -lr · scale · gradient, and
    # the first gradient does not depend on the scales (same seed, same weights, same batch).
    recipe = dict(epochs=3, momentum=0.0, weight_decay=0.0)
    steps = {}
    for scales in ({}, {"b": 0.1}):
        trainer = build_trainer(scaled(scales), cfg(**recipe), out=None, progress=False)
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in trainer.models.items()}
        x, y = next(iter(trainer.train_loader))
        trainer.train_step(x, y, 1)
        steps[bool(scales)] = {
            n: [(p.detach() - p0, p0) for p, p0 in zip(m.parameters(), before[n])]
            for n, m in trainer.models.items()
        }
    eps = torch.finfo(torch.float32).eps
    for name, ratio in {"a": 1.0, "b": 0.1, "c": 1.0}.items():
        for (full, p0), (scaled_step, _) in zip(steps[False][name], steps[True][name]):
            # A step read as new - old weight carries the rounding of the new weight: ≤ eps · |w| / 2.
            bound = 2 * eps * max(p0.abs().max().item(), full.abs().max().item())
            torch.testing.assert_close(scaled_step, ratio * full, rtol=0, atol=bound)
            assert (
                ratio == 1.0 or full.abs().max() > 100 * eps * p0.abs().max()
            )  # the step is more than rounding

    out = tmp_path / "run"
    out.mkdir()
    first = build_trainer(scaled({"b": 0.1}), cfg(**recipe, lr_decay_at=(0.5,)), out=out, progress=False)
    first.fit()
    again = build_trainer(scaled({"b": 0.1}), cfg(**recipe, lr_decay_at=(0.5,)), out=None, progress=False)
    again.load_checkpoint(out / "checkpoint.pt")
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in first.optimizer.param_groups]
    assert [g["lr"] for g in first.optimizer.param_groups] == pytest.approx([0.005, 0.0005])


def test_a_train_fraction_of_one_is_the_whole_set_and_shares_the_teachers():
    # Each seed draws its own subset, so its teachers learn that subset; the whole set has one.
    whole = [cfg(train_fraction=1.0, seed=s) for s in (0, 1)]
    assert all(c.train_fraction is None for c in whole)
    assert cache_path("resnet8", whole[0]) == cache_path("resnet8", whole[1]) == cache_path("resnet8", cfg())
    part = [cfg(train_fraction=0.5, seed=s) for s in (0, 1)]
    assert cache_path("resnet8", part[0]) != cache_path("resnet8", part[1])
