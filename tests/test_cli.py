"""The command line: bad input ends with exit 2 and one line; runs, seeds, resume after a real kill."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from graphs import LABELS, pair

from ktfast.cli import main

TINY = "synthetic:classes=4,size=16,train=96,test=40"
GOOD = pair(*LABELS, ("b", "a", "kl", "correct"), ("a", "b", "kl", "linear"))


# Bounds a hang of a command run here, never its speed: the 4-epoch run of the resume test takes 34 s
# on one CPU core shared with a busy process.
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def write(tmp_path, graph, name="g.json"):
    path = tmp_path / name
    path.write_text(graph if isinstance(graph, str) else json.dumps(graph))
    return path


def bad(graph_change):
    g = json.loads(json.dumps(GOOD))
    graph_change(g)
    return g


BAD_RUNS = {
    "malformed json": ('{"nodes": [', [], "malformed JSON"),
    "unknown model": (bad(lambda g: g["nodes"][1].update(model="resnet9")), [], "resnet9"),
    "unknown gate": (bad(lambda g: g["edges"][2].update(gate="sometimes")), [], "sometimes"),
    "ce not from label": (bad(lambda g: g["edges"][2].update(loss="ce")), [], "ce"),
    "missing node": (bad(lambda g: g["edges"][2].update({"from": "c"})), [], "'c'"),
    "unknown dataset": (GOOD, ["--dataset", "mnist"], "mnist"),
    "missing cifar": (GOOD, ["--dataset", "cifar10", "--data-dir", "nowhere"], "cifar10"),
    "bad seeds": (GOOD, ["--seeds", "0,x"], "--seeds"),
    "duplicate seeds": (GOOD, ["--seeds", "0,1,0"], "--seeds"),
    "bad epochs": (GOOD, ["--epochs", "0"], "--epochs"),
    "bad crop": (bad(lambda g: g["edges"][3].update(loss="kl+att_mse", crops=[9])), [], "crop"),
    "soften on a ce edge": (bad(lambda g: g["edges"][0].update(soften="source")), [], "soften"),
    "lr_scale zero": (bad(lambda g: g["nodes"][0].update(lr_scale=0)), [], "lr_scale"),
    "gamma on a correct gate": (bad(lambda g: g["edges"][2].update(gamma=2.0)), [], "gamma"),
    "gamma zero": (bad(lambda g: g["edges"][3].update(gate="gamma", gamma=0.0)), [], "gamma"),
    "beta negative": (bad(lambda g: g["edges"][2].update(loss="dkd", beta=-1)), [], "edges[b->a].beta"),
    "standardize on an mse edge": (
        bad(lambda g: g["edges"][3].update(loss="mse", standardize=True)),
        [],
        "edges[a->b].standardize",
    ),
    "dkd from label": (bad(lambda g: g["edges"][0].update(loss="dkd")), [], "edges[label->a].loss: 'dkd'"),
    "warmup above one": (
        bad(lambda g: g["edges"][3].update(gate="warmup", warmup=2)),
        [],
        "edges[a->b].warmup",
    ),
    "warmup on a correct gate": (bad(lambda g: g["edges"][2].update(warmup=0.5)), [], "edges[b->a].warmup"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_input_exits_2_with_one_line_and_no_run_directory(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KTFAST_OFFLINE", "1")
    graph, extra, needle = BAD_RUNS[case]
    path = write(tmp_path, graph)
    code = main(
        [
            "train",
            "--graph",
            str(path),
            "--dataset",
            TINY,
            "--epochs",
            "1",
            "--out",
            "run",
            "--quiet",
            "--device",
            "cpu",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_missing_graph_file_and_non_empty_out(tmp_path, capsys):
    assert main(["train", "--graph", "nope.json"]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("keep me")
    assert main(["train", "--graph", str(write(tmp_path, GOOD)), "--out", "old", "--dataset", TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "old" / "x").read_text() == "keep me"


def test_subprocess_error_has_no_traceback(tmp_path):
    path = write(tmp_path, bad(lambda g: g["edges"][2].update(temperature=0)))
    proc = subprocess.run(
        [sys.executable, "-m", "ktfast", "train", "--graph", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "temperature" in proc.stderr


def test_seeds_report_mean_and_std(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code = main(
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
            "--seeds",
            "0,1",
            "--out",
            "multi",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mean ± std of 2 seeds" in out
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    for seed in (0, 1):
        rows = (tmp_path / "multi" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["test"]["a"]["acc"] == summary["nodes"]["a"]["last"]["per_seed"][seed]
    assert json.loads((tmp_path / "multi" / "seed1" / "config.json").read_text())["seed"] == 1


def _strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in rows]


def _rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, hold):
    path = write(tmp_path, GOOD)
    args = [
        sys.executable,
        "-m",
        "ktfast",
        "train",
        "--graph",
        str(path),
        "--dataset",
        "synthetic:classes=4,size=16,train=512,test=64",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        args + ["--out", "whole"],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )

    proc = subprocess.Popen(
        args + ["--out", "killed"],
        cwd=tmp_path,
        env={**env, **hold.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        hold.wait(
            1, RUN_TIMEOUT_S, [proc]
        )  # epoch 1 written, a step of epoch 2 taken: the kill lands mid-epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    killed = tmp_path / "killed"
    assert [r["epoch"] for r in _rows(killed)] == [1]
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 1

    subprocess.run(
        [sys.executable, "-m", "ktfast", "train", "--resume", "killed", "--quiet"],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert _strip_times(_rows(killed)) == _strip_times(_rows(tmp_path / "whole"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU's way to run the kernels")
def test_kernels_forced_on_a_cpu_run_in_the_triton_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["KTFAST_KERNELS"] = "1"
    graph = write(tmp_path, GOOD)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ktfast",
            "train",
            "--graph",
            str(graph),
            "--dataset",
            TINY,
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_split_search_trains_and_evaluates_on_the_held_out_split(tmp_path, capsys):
    from ktfast.config import TrainConfig
    from ktfast.engine.trainer import splits

    path = write(tmp_path, GOOD)
    assert (
        main(
            [
                "train",
                "--graph",
                str(path),
                "--dataset",
                TINY,
                "--epochs",
                "1",
                "--split",
                "search",
                "--out",
                "val",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "validation accuracy on the search split" in capsys.readouterr().out
    saved = TrainConfig.load(tmp_path / "val" / "config.json")
    assert saved.split == "search" and splits(saved) == ("search_train", "search_val")


def test_cuda_graph_flag_on_every_training_command(tmp_path):
    """--cuda-graph/--no-cuda-graph is a recipe flag: train, search and pretrain take it (default on)."""
    from ktfast.args import config_from_args
    from ktfast.cli import build_parser

    commands = {
        "train": ["train", "--graph", "g.json"],
        "pretrain": ["pretrain", "--model", "resnet8"],
        "search": ["search", "--nodes", "3", "--target-model", "resnet8", "--trials", "1"],
    }
    for name, argv in commands.items():
        for flag, expected in ((None, True), ("--cuda-graph", True), ("--no-cuda-graph", False)):
            args = build_parser().parse_args(argv + ["--device", "cpu"] + ([flag] if flag else []))
            assert config_from_args(args).cuda_graph is expected, (name, flag)


@pytest.mark.parametrize("flag", ["--cuda-graph", "--no-cuda-graph"])
def test_cuda_graph_flag_runs_on_a_cpu(flag, tmp_path):
    from ktfast.config import TrainConfig

    path = write(tmp_path, GOOD)
    assert (
        main(
            [
                "train",
                "--graph",
                str(path),
                "--dataset",
                TINY,
                "--epochs",
                "1",
                "--out",
                "run",
                "--quiet",
                "--device",
                "cpu",
                flag,
            ]
        )
        == 0
    )
    assert TrainConfig.load(tmp_path / "run" / "config.json").cuda_graph is (flag == "--cuda-graph")
    assert len(_rows(tmp_path / "run")) == 1
