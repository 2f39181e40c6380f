"""Training on several processes (docs/ARCHITECTURE.md §10), as CI can: 2 gloo processes on 127.0.0.1.

place nodes computes what one process computes (dcl3, and EKD whose ensemble trains teachers on
other ranks); place data with --sync-bn computes it up to reduction order, and without it does
not (in float64, to a derived bound); torchrun trains both places to the accuracy of one process;
a killed rank ends the other with one line and the run resumes to the uninterrupted run's metrics;
launch mistakes end every rank with exit 2 and one line."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dist_steps
import pytest
import torch

from ktfast.cli import main
from ktfast.commands.train import launch_command
from ktfast.config import TrainConfig
from ktfast.data import make_loader
from ktfast.engine.distributed import Placement
from ktfast.engine.run import make_trainer
from ktfast.engine.trainer import evaluate
from ktfast.graph import Graph

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DML2 = [
    "train",
    "--graph",
    str(EXAMPLES / "dml2_resnet8.json"),
    "--dataset",
    "digits",
    "--device",
    "cpu",
    "--epochs",
    "4",
    "--lr-decay-at",
    "0.8",
    "--fuse",
    "--quiet",
]  # place data fuses n1 and n2


@pytest.fixture
def env(tmp_path, monkeypatch):
    """The children's environment: the test's own caches, the reference losses, one thread each."""
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return dict(os.environ)


# Bounds on hangs, never on speed: a torchrun of DML2 (4 epochs, 2 processes) takes 70 s on one CPU
# core shared with a busy process, its processes reach the test hold in epoch 2 within a third of that,
# and a rank ends within seconds of its peer's death.
RUN_TIMEOUT_S, HOLD_TIMEOUT_S, EXIT_TIMEOUT_S = 480, 180, 60


def torchrun(args, env):
    return subprocess.run(
        [*TORCHRUN, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=RUN_TIMEOUT_S
    )


def dist_steps_run(args, env, out):
    done = torchrun([str(ROOT / "tests" / "dist_steps.py"), *args, str(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def single_process_steps(graph_file, place):
    return dist_steps.steps(Graph.load(graph_file), place, sync_bn=False)


# Both sides run in float64 (tests/dist_steps.py), where three steps' rounding parts them by ~1e-16
# (measured: losses 4e-16 and weights 1.5e-16 with sync-bn; place nodes are bit-identical), while a
# fault (a gradient lost, doubled or paired with another node's; a statistic off by a term) moves
# the weights by some lr·|g|/|w| within three steps: 1e-4 or more (measured: a variance over n - 1
# for n, 2e-4; one node's gradients not averaged, 1e-2). 1e-9 lies five orders from either.
# Not float32: there a pre-activation within rounding of 0 takes the ReLU's other branch on one
# side only, and that node's gradients part by O(|g|) at once (dml2 with sync-bn on an AVX2
# oneDNN: weights 2.4e-4 apart, all in the node that holds that pre-activation).
BOUND = 1e-9


def relative_differences(ours: dict, reference: dict) -> tuple[float, float]:
    """(largest relative difference of a step's loss, largest of a node's weights and buffers as one vector)."""
    losses = max(
        abs(a - b) / max(abs(b), 1e-12)
        for ra, rb in zip(ours["losses"], reference["losses"])
        for a, b in zip(ra, rb)
    )
    assert len(ours["losses"]) == len(reference["losses"]) == dist_steps.STEPS
    weights = 0.0
    for node, state in reference["models"].items():
        assert set(ours["models"][node]) == set(state)
        ref = torch.cat([v.flatten().double() for v in state.values()])
        got = torch.cat([ours["models"][node][k].flatten().double() for k in state])
        weights = max(weights, ((got - ref).norm() / ref.norm()).item())
    return losses, weights


# ---- place nodes and place data: the same computation as one process ----------------------------
@pytest.mark.parametrize("graph", ["dcl3.json", "ekd.json"])
def test_place_nodes_computes_what_one_process_computes(graph, env, tmp_path):
    # Rank 0 trains EKD's pretrained teachers into the cache first; the single process then finds them.
    ours = dist_steps_run(["steps", str(EXAMPLES / graph), "nodes", "false"], env, tmp_path / "nodes.pt")
    reference = single_process_steps(EXAMPLES / graph, "nodes")
    losses, weights = relative_differences(ours, reference)
    assert losses <= BOUND and weights <= BOUND, (losses, weights)
    for node in Graph.load(EXAMPLES / graph).trainable:  # EKD's teachers too, trained through the ensemble
        start, end = ours["start"][node.name], ours["models"][node.name]
        assert any(not torch.equal(start[k], end[k]) for k in start), node.name


def test_place_data_with_sync_bn_computes_what_one_process_computes(env, tmp_path):
    graph = EXAMPLES / "dml2_resnet8.json"
    reference = single_process_steps(graph, "data")
    synced = dist_steps_run(["steps", str(graph), "data", "true"], env, tmp_path / "sync.pt")
    losses, weights = relative_differences(synced, reference)
    assert losses <= BOUND and weights <= BOUND, (losses, weights)
    # Without it each rank normalises by its own half batch: another computation, visibly.
    alone = dist_steps_run(["steps", str(graph), "data", "false"], env, tmp_path / "local.pt")
    losses, _ = relative_differences(alone, reference)
    assert losses > 1e-3


def test_global_batchnorm_matches_batchnorm_over_the_whole_batch(env, tmp_path):
    got = dist_steps_run(["batchnorm"], env, tmp_path / "bn.pt")
    x, weight, bias, target = dist_steps.batchnorm_case()
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    want = dist_steps.batchnorm_grads(bn, x, target)
    for key, value in want.items():  # float64: the two-pass variance against torch's, to 1e-12
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)


# ---- torchrun end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """dml2 of two ResNet-8 on digits, 4 epochs, 2 processes with place data: the run the killed one must match."""
    tmp = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "KTFAST_CACHE": str(tmp / "cache"), "KTFAST_KERNELS": "0", "OMP_NUM_THREADS": "1"}
    out = tmp / "run"
    done = torchrun(["-m", "ktfast", *DML2, "--out", str(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, env


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("place", ["data", "nodes"])
def test_torchrun_trains_both_places_to_the_accuracy_of_one_process(
    place, uninterrupted, tmp_path, monkeypatch
):
    run, env = uninterrupted
    if place == "nodes":
        done = torchrun(["-m", "ktfast", *DML2, "--place", "nodes", "--out", str(tmp_path / "run")], env)
        assert done.returncode == 0, done.stderr[-3000:]
        run = tmp_path / "run"
    metrics = rows(run)
    assert [r["epoch"] for r in metrics] == [1, 2, 3, 4]
    assert all(metrics[-1]["test"][n]["acc"] >= 0.90 for n in ("n1", "n2")), metrics[-1]["test"]
    config = json.loads((run / "config.json").read_text())
    assert (config["world_size"], config["place"]) == (2, place)
    # The whole training set each epoch, each image counted once: accuracies are multiples of 1/N.
    seen = metrics[-1]["train"]["n1"]["acc"] * 1408
    assert abs(seen - round(seen)) < 1e-6
    # The checkpoint holds every node as trained, rank 1's too: one process evaluates what the run did.
    monkeypatch.setenv("KTFAST_CACHE", env["KTFAST_CACHE"])
    cfg = TrainConfig.load(run / "config.json").replace(world_size=1)
    trainer = make_trainer(Graph.load(run / "graph.json"), cfg, out=None, progress=False)
    trainer.load_checkpoint(run / "checkpoint.pt")
    test = evaluate(trainer.graph, trainer.models, trainer.units, trainer.eval_loader, cfg)
    for node, want in metrics[-1]["test"].items():
        assert test[node]["acc"] == want["acc"] and test[node]["loss"] == pytest.approx(
            want["loss"], rel=1e-5
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argvs: list[list[str]], env: dict) -> list[subprocess.Popen]:
    """One process per rank, started as torchrun would start them (its environment variables)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "ktfast", *argv],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **env,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
            },
        )
        for rank, argv in enumerate(argvs)
    ]


def test_a_killed_rank_ends_the_other_in_one_line_and_the_run_resumes_to_the_same_metrics(
    uninterrupted, tmp_path, hold
):
    reference, env = uninterrupted
    run = tmp_path / "run"
    ranks = start_ranks([[*DML2, "--out", str(run)]] * 2, {**env, **hold.env})
    try:
        hold.wait(2, HOLD_TIMEOUT_S, ranks)  # both ranks past epoch 1 (written) and a step into epoch 2
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].wait()
        hold.release()  # rank 0's next collective meets the dead rank
        _, err = ranks[0].communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        for p in ranks:
            p.kill()
    assert ranks[0].returncode not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "another process of the run stopped" in lines[0], err
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == len(rows(run)) == 1

    done = torchrun(["-m", "ktfast", "train", "--resume", str(run), "--quiet"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]
    assert rows(run)[-1]["test"] == rows(reference)[-1]["test"]
    assert rows(run)[-1]["train"] == rows(reference)[-1]["train"]


# ---- launch mistakes ------------------------------------------------------------------------------
@pytest.mark.parametrize("mistake", ["more ranks than nodes", "different graphs", "resumed at another size"])
def test_a_bad_launch_ends_every_rank_with_exit_2_and_one_line(mistake, uninterrupted, tmp_path):
    reference, env = uninterrupted
    if mistake == "more ranks than nodes":
        argvs = [
            [
                *DML2,
                "--graph",
                str(EXAMPLES / "vanilla.json"),
                "--place",
                "nodes",
                "--out",
                str(tmp_path / "r"),
            ]
        ] * 2
        expected = "--place nodes: 2 processes for the 1 model nodes"
    elif mistake == "different graphs":
        argvs = [
            [*DML2, "--out", str(tmp_path / "r")],
            [*DML2, "--graph", str(EXAMPLES / "ind3_resnet8.json"), "--out", str(tmp_path / "r")],
        ]
        expected = "rank 1 was started with another graph or recipe than rank 0"
    else:  # place data continues only with the world size it started with
        code = main(["train", "--resume", str(reference), "--quiet"])
        assert code == 2
        return
    ranks = start_ranks(argvs, env)
    for p in ranks:
        _, err = p.communicate(timeout=120)  # a hang's bound: the ranks stop while starting
        assert p.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "r").exists()


def test_gpus_needs_cuda_and_hands_the_command_to_torchrun(capsys):
    if not torch.cuda.is_available():
        assert main([*DML2, "--gpus", "0,1"]) == 2
        assert "--gpus: needs CUDA" in capsys.readouterr().err
    cmd = launch_command(["train", "--gpus", "0,1", "--graph", "g.json", "--gpus=2", "--amp"], 2)
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "ktfast",
        "train",
        "--graph",
        "g.json",
        "--amp",
    ]


# ---- the parts, in one process -------------------------------------------------------------------
def test_shards_of_a_loader_make_up_its_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    whole = make_loader("digits", "train", 64, "cpu", seed=3, loader="gpu")
    shards = [make_loader("digits", "train", 64, "cpu", seed=3, loader="gpu", shard=(r, 2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    test = make_loader("digits", "test", 256, "cpu", seed=3, loader="gpu")
    parts = [
        torch.cat([y for _, y in make_loader("digits", "test", 256, "cpu", 3, loader="gpu", shard=(r, 3))])
        for r in range(3)
    ]
    assert torch.equal(torch.cat(parts), torch.cat([y for _, y in test]))  # each test image once
    with pytest.raises(Exception, match="does not split into 3"):
        make_loader("digits", "train", 64, "cpu", seed=3, loader="gpu", shard=(0, 3))


def test_nodes_are_placed_largest_first_on_the_least_loaded_rank():
    graph = Graph.from_dict(
        {
            "version": 1,
            "name": "five",
            "target": "a",
            "nodes": [
                {"name": "a", "model": "resnet8"},
                {"name": "b", "model": "resnet110"},
                {"name": "c", "model": "resnet32"},
                {"name": "d", "model": "resnet110", "init": "pretrained"},  # frozen: nothing trains it
                {"name": "e", "model": "resnet32"},
            ],
            "edges": [{"from": "label", "to": n, "loss": "ce", "gate": "through"} for n in "abce"]
            + [{"from": "d", "to": "a", "loss": "kl", "gate": "through"}],
        }
    )
    sizes = {"resnet8": 78, "resnet32": 464, "resnet110": 1730}  # thousands of parameters

    class Model(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(k))

    models = {n.name: Model(sizes[n.model]) for n in graph.model_nodes}
    placement = Placement(graph, "nodes", 0, 2)
    placement.assign(models)
    # Costs (×3 when trained): b 5190, d 1730 (frozen), c 1392, e 1392, a 234.
    assert placement.owner == {"b": 0, "d": 1, "c": 1, "e": 1, "a": 1}
    placement = Placement(graph, "nodes", 0, 3)
    placement.assign(models)
    assert placement.owner == {"b": 0, "d": 1, "c": 2, "e": 2, "a": 1}
