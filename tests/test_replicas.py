"""Seeds as replicas (`ktfast.engine.replicas`): each replica computes what its seed's run alone computes —
step by step (what the losses see, weights, BatchNorm statistics, optimizer state), whole epochs
with evaluation, checkpoints that resume one by one — for a graph with a frozen teacher, an
ensemble node and attention edges; and the command's replicas, groups and fallbacks.

Tolerance (as tests/test_fuse.py derives it): stacked, a convolution is one grouped convolution
and a BatchNorm one over S·N·C channels, the same sums in another order; in float64 that parts
the runs by 1e-15 to 1e-12 of a tensor's scale in three steps, while a fault (another replica's
batch, labels or gradient, a momentum buffer of the wrong seed) moves them by 1e-3 or more, so
1e-9 lies between. Not float32: a pre-activation within rounding of 0 can take the ReLU's other
branch on one side only and part the runs by O(|g|). The graph's losses are continuous in the
logits and maps (no arg-max gate), so rounding cannot flip a choice.
"""

import json

import pytest
import torch
from graphs import pair
from test_fast_step import Streams, pool
from test_fuse import Float64Batches, assert_close, record, teacher_checkpoint

from ktfast import Graph
from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine import replicas as replicas_module
from ktfast.engine import session
from ktfast.engine.build import build_trainer
from ktfast.engine.fast import StreamBank
from ktfast.engine.replicas import ReplicaGroup, Replicas, seed_groups
from ktfast.engine.trainer import Trainer
from ktfast.models import build_model

TINY = "synthetic:classes=4,size=16,train=48,test=16"
SEEDS = [0, 1]

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def solos(tmp_path_factory):
    """The graph, and each seed's run alone (unfused: a stacked replica must match it either way):
    3 steps, and what its losses saw at each."""
    folder = tmp_path_factory.mktemp("solos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KTFAST_CACHE", str(folder / "cache"))
        mp.setenv("KTFAST_KERNELS", "0")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            g = graph(folder)
            runs = [trainer(g, s, fuse=False) for s in SEEDS]
            seen = [record(t) for t in runs]
            for t in runs:
                steps(t.train_step, [t.train_loader])
        finally:
            torch.set_default_dtype(previous)
    return g, runs, seen


def graph(tmp_path) -> Graph:
    """Two resnet8 students with attention edges both ways, a frozen resnet8 teacher, an ensemble of
    the students teaching a third resnet8 (without attention: a group of its own when fused)."""
    teacher_checkpoint(tmp_path / "t.pt", 5)
    return Graph.from_dict(
        {
            "version": 1,
            "name": "g",
            "target": "a",
            "nodes": [
                {"name": "a", "model": "resnet8"},
                {"name": "b", "model": "resnet8"},
                {"name": "c", "model": "resnet8"},
                {"name": "t", "model": "resnet8", "init": {"checkpoint": str(tmp_path / "t.pt")}},
                {"name": "ens", "ensemble": ["a", "b"], "reduce": "mean", "detach": True},
            ],
            "edges": [{"from": "label", "to": n, "loss": "ce", "gate": "through"} for n in "abc"]
            + [
                {"from": "b", "to": "a", "loss": "kl+att_mse", "gate": "linear", "crops": [4]},
                {"from": "a", "to": "b", "loss": "att_mse", "gate": "through", "crops": [2, 4]},
                {"from": "t", "to": "a", "loss": "kl", "gate": "through", "temperature": 2.0},
                {"from": "ens", "to": "c", "loss": "kl", "gate": "through"},
                {"from": "c", "to": "b", "loss": "kl", "gate": "linear"},
            ],
        }
    )


def cfg(seed: int, **kw) -> TrainConfig:
    return TrainConfig(
        **{**dict(dataset=TINY, epochs=2, batch_size=16, device="cpu", lr=0.05, seed=seed), **kw}
    )


def trainer(g, seed, out=None, **kw) -> Trainer:
    t = build_trainer(g, cfg(seed, **kw), out=out, progress=False)
    t.train_loader, t.eval_loader = Float64Batches(t.train_loader), Float64Batches(t.eval_loader)
    return t


def steps(step, loaders, n: int = 3) -> None:
    """n steps of `step(x, y, k)` on the loaders' batches, concatenated (one loader: a solo run)."""
    for loader in loaders:
        loader.set_epoch(0)
    for k, batches in zip(range(n), zip(*loaders)):
        step(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), k + 1)


def assert_same_replica(solo: Trainer, replica: Trainer, seen_solo: list, seen_replica: list) -> None:
    assert len(seen_solo) == len(seen_replica) == 3
    for step, (p, f) in enumerate(zip(seen_solo, seen_replica)):
        assert p.keys() == f.keys()
        for k in p:
            assert_close(f[k], p[k], f"seed {solo.cfg.seed} step {step + 1} {k}")
    for name, model in solo.models.items():
        theirs = replica.models[name].state_dict()
        for k, v in model.state_dict().items():
            assert_close(theirs[k], v, f"seed {solo.cfg.seed} {name}.{k}")
    for (p, sp), (q, sq) in zip(solo.optimizer.state.items(), replica.optimizer.state.items(), strict=True):
        assert p.shape == q.shape and sp.keys() == sq.keys()
        for k in sp:
            assert_close(sq[k], sp[k], f"seed {solo.cfg.seed} optimizer {k}")
    torch.testing.assert_close(replica.loss_sums, solo.loss_sums, rtol=1e-9, atol=0)
    torch.testing.assert_close(replica.correct, solo.correct, rtol=0, atol=0)


def by_seed(calls: list, seeds: int) -> list[list]:
    """What each replica's losses saw, from `record`'s calls on a replica group: its step computes
    the seeds' losses in turn, each from its own logits and labels, so the calls alternate by seed."""
    return [calls[s::seeds] for s in range(seeds)]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_each_replica_steps_as_its_seed_alone(solos, fuse):
    g, runs, seen_solo = solos
    group = [trainer(g, s, fuse=fuse) for s in SEEDS]
    rep = Replicas(group)
    # Fused: the students a, b of every replica in one group, c's, the teachers'; unfused: one per node.
    assert [[n.name for n in u.nodes] for u in rep.units] == (
        [["0/a", "0/b", "1/a", "1/b"], ["0/c", "1/c"], ["0/t", "1/t"]]
        if fuse
        else [[f"{s}/{n}" for s in SEEDS] for n in "abct"]
    )
    assert all(isinstance(u.module, ReplicaGroup) for u in rep.units)
    calls = record(rep)
    steps(rep.train_step, [t.train_loader for t in group])
    seen = by_seed(calls, len(SEEDS))
    for solo, replica, a, b in zip(runs, group, seen_solo, seen):
        assert_same_replica(solo, replica, a, b)
        assert not replica.models["t"].training and not any(
            p.requires_grad for p in replica.models["t"].parameters()
        )


@pytest.mark.usefixtures("float64")
def test_the_fast_step_over_replicas_steps_each_as_alone(solos):
    """The replicas' step on its fast path (streams stood in for on a CPU, as tests/test_fast_step.py
    does): each replica's losses paired with its own labels and targets, one backward, every
    optimizer stepped."""
    g, runs, seen_solo = solos
    group = [trainer(g, s, fuse=True) for s in SEEDS]
    rep = Replicas(group)
    rep.step.use_streams(Streams([]), StreamBank(pool()))
    calls = record(rep)
    steps(rep.train_step, [t.train_loader for t in group])
    seen = by_seed(calls, len(SEEDS))
    assert rep.step.factor is not None and [len(s) for s in seen] == [3] * len(SEEDS)
    for solo, replica, a, b in zip(runs, group, seen_solo, seen):
        assert_same_replica(solo, replica, a, b)


@pytest.mark.usefixtures("float64")
def test_replica_epochs_and_checkpoints_are_the_seeds_own(tmp_path):
    """Two epochs with evaluation: each replica's rows are its seed's alone; a replica's checkpoint
    holds a plain state dict per node and resumes as a run of its own (epoch 2 as the whole run)."""
    g = graph(tmp_path)
    data = dict(dataset="synthetic:classes=4,size=16,train=32,test=16", fuse=True)
    whole = trainer(g, 1, **data).fit()  # the second replica's run alone (the first's steps: tests above)

    class Stop(Exception):
        pass

    def stop(epoch, row):
        raise Stop

    outs = [tmp_path / f"seed{s}" for s in SEEDS]
    for out in outs:
        out.mkdir()
    with pytest.raises(Stop):  # after every replica wrote epoch 1
        Replicas([trainer(g, s, out=out, **data) for s, out in zip(SEEDS, outs)]).fit(on_epoch=[None, stop])
    plain = {k: v.shape for k, v in build_model("resnet8", 4, 16).state_dict().items()}
    rows = {}
    for s, out in zip(SEEDS, outs):
        (rows[s],) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all({k: v.shape for k, v in sd.items()} == plain for sd in state["models"].values())
        assert state["config"]["seed"] == s
    resumed = trainer(g, 1, out=outs[1], **{**data, "fuse": False})  # the second replica, resumed alone
    resumed.load_checkpoint(outs[1] / "checkpoint.pt")
    for got, want in ((rows[1], whole[0]), (resumed.fit()[0], whole[1])):
        assert got["epoch"] == want["epoch"]
        for split in ("train", "test"):
            for node, v in want[split].items():
                assert got[split][node]["acc"] == v["acc"]
                assert got[split][node]["loss"] == pytest.approx(v["loss"], rel=1e-9)


def test_seed_groups_are_as_few_and_even_as_fit():
    assert seed_groups([0, 1, 2, 3, 4], 5) == [[0, 1, 2, 3, 4]]
    assert seed_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert seed_groups([0, 1, 2, 3, 4], 4) == [[0, 1, 2], [3, 4]]
    assert seed_groups([7, 8], 1) == [[7], [8]]


GOOD = pair(("label", "a", "ce", "through"), ("b", "a", "kl", "linear"), ("label", "b", "ce", "through"))


def train(tmp_path, *flags) -> int:
    path = tmp_path / "g.json"
    path.write_text(json.dumps(GOOD))
    return main(
        [
            "train",
            "--graph",
            str(path),
            "--dataset",
            TINY,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--quiet",
            "--device",
            "cpu",
            "--train-fraction",
            "0.5",
            *flags,
        ]
    )


@pytest.mark.usefixtures("in_tmp")
def test_replicas_that_do_not_fit_train_in_groups_said_in_one_line(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(replicas_module, "replicas_per_group", lambda trainer, count: 1)
    monkeypatch.setattr(
        session, "Replicas", lambda ts: built.append([t.cfg.seed for t in ts]) or Replicas(ts)
    )
    assert train(tmp_path, "--seeds", "4,5", "--out", "run") == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "groups" in line] == [
        "--seeds: 2 replicas do not fit in GPU memory together: they train in 2 groups, seeds 4 then 5"
    ]
    assert built == [[4], [5]]
    for s in (4, 5):
        assert len((tmp_path / "run" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()) == 1
        assert json.loads((tmp_path / "run" / f"seed{s}" / "config.json").read_text())["seed"] == s


@pytest.mark.usefixtures("in_tmp")
@pytest.mark.parametrize("flags, line", [(["--reference"], "--reference"), (["--seeds-one-by-one"], None)])
def test_seeds_train_one_by_one_where_asked_or_needed(tmp_path, capsys, monkeypatch, flags, line):
    monkeypatch.setattr(replicas_module.Replicas, "__init__", lambda *a: pytest.fail("replicas were built"))
    assert train(tmp_path, "--seeds", "0,1", "--out", "run", *flags) == 0
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--seeds")]
    assert said == (
        [f"--seeds: the 2 seeds train one by one: {line} (the reference path stacks nothing)"] if line else []
    )
    assert all((tmp_path / "run" / f"seed{s}" / "checkpoint.pt").is_file() for s in (0, 1))
