"""Faults of a training run (docs/ARCHITECTURE.md §2, §7): a corrupt or foreign checkpoint, a run directory that
names other data, a diverging loss, a write that fails. Each ends with its exit code and one line,
and nothing of the run directory is lost or overwritten."""

import hashlib
import json
import math
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from graphs import LABELS, pair

from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.trainer import Trainer
from ktfast.graph import Graph

TINY = "synthetic:classes=4,size=16,train=96,test=40"
PAIR = pair(*LABELS)


pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def train(tmp_path, out: str, graph: dict = PAIR, epochs: int = 1, extra=()) -> int:
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(graph))
    return main(
        [
            "train",
            "--graph",
            str(path),
            "--dataset",
            TINY,
            "--epochs",
            str(epochs),
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out,
            *extra,
        ]
    )


def files(run: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())}


def one_line(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 2 epochs stopped after the first (its checkpoint and one row), made once."""
    root = tmp_path_factory.mktemp("base")
    path = root / "g.json"
    path.write_text(json.dumps(PAIR))
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
                "--batch-size",
                "32",
                "--lr",
                "0.05",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(root / "run"),
            ]
        )
        == 0
    )
    cfg = json.loads((root / "run" / "config.json").read_text())
    (root / "run" / "config.json").write_text(json.dumps(dict(cfg, epochs=2), indent=2) + "\n")
    return root / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def resume(run: Path, *extra: str) -> int:
    return main(["train", "--resume", str(run), "--quiet", *extra])


# ---- --resume from what is not this run's ------------------------------------------------------
def truncate_checkpoint(run, tmp_path):
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])


def garble_checkpoint(run, tmp_path):
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[100:4000] = bytes(range(256)) * 15 + bytes(20)
    (run / "checkpoint.pt").write_bytes(bytes(data))


def foreign_checkpoint(run, tmp_path):
    """A checkpoint of another graph whose nodes and weights fit this one's: only the edges differ."""
    other = dict(PAIR, edges=[*PAIR["edges"], {"from": "b", "to": "a", "loss": "kl", "gate": "through"}])
    assert train(tmp_path, "other", other) == 0
    shutil.copy(tmp_path / "other" / "checkpoint.pt", run / "checkpoint.pt")


def foreign_models(run, tmp_path):
    """A checkpoint of a graph with other models (and an old checkpoint without its graph in it)."""
    other = json.loads(json.dumps(PAIR))
    other["nodes"][1]["model"] = "resnet14"
    assert train(tmp_path, "other", other) == 0
    state = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=True)
    del state["graph"], state["config"]
    torch.save(state, run / "checkpoint.pt")


CORRUPT = {
    "truncated checkpoint": (truncate_checkpoint, "truncated or corrupt"),
    "garbled checkpoint": (garble_checkpoint, "truncated or corrupt"),
    "checkpoint of another graph": (foreign_checkpoint, "another graph (its edges differ"),
    "checkpoint of other models": (foreign_models, "node b do not fit"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_resume_from_what_is_not_this_run_exits_2_and_touches_nothing(case, run, tmp_path, capsys):
    spoil, needle = CORRUPT[case]
    spoil(run, tmp_path)
    capsys.readouterr()
    before = files(run)
    assert resume(run) == 2
    one_line(capsys.readouterr().err, needle, str(run / "checkpoint.pt"))
    assert files(run) == before


# What the run's data are, and another value of each: other data of the same shape, on which the
# weights would load and the run would go on silently.
OTHER_DATA = {
    "dataset": TINY.replace("test=40", "test=48"),
    "split": "search",
    "train_fraction": 0.5,
    "val_fraction": 0.25,
    "seed": 1,
}


@pytest.mark.parametrize("field", sorted(OTHER_DATA))
def test_resume_refuses_a_checkpoint_trained_on_other_data_than_config_json_names(field, run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, **{field: OTHER_DATA[field]})))
    before = files(run)
    assert resume(run) == 2
    one_line(capsys.readouterr().err, f"trained with {field} {cfg[field]!r}", str(run / "checkpoint.pt"))
    assert files(run) == before


@pytest.mark.parametrize("field", sorted(OTHER_DATA))
def test_resume_with_a_data_flag_that_disagrees_with_the_run_exits_2_naming_it(field, run, capsys):
    flag = "--seeds" if field == "seed" else f"--{field.replace('_', '-')}"
    before = files(run)
    assert resume(run, flag, str(OTHER_DATA[field])) == 2
    one_line(capsys.readouterr().err, f"{flag}: the run in {run} has")
    assert files(run) == before


def test_resume_with_a_flag_that_disagrees_with_the_run_exits_2(run, tmp_path, capsys):
    before = files(run)
    assert resume(run, "--lr", "0.3") == 2
    one_line(capsys.readouterr().err, "--lr")
    d = TrainConfig()  # given at its default value, a flag is still given: the run has lr 0.05, batch 32
    assert resume(run, "--lr", str(d.lr)) == 2
    one_line(capsys.readouterr().err, "--lr", "0.05")
    assert resume(run, "--batch-size", str(d.batch_size)) == 2
    one_line(capsys.readouterr().err, "--batch-size", "32")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(PAIR, edges=PAIR["edges"][:1])))
    assert resume(run, "--graph", str(other)) == 2
    one_line(capsys.readouterr().err, "--graph", "not the graph of the run")
    (run / "config.json").write_text('{"dataset": ')
    assert resume(run) == 2
    one_line(capsys.readouterr().err, "config.json")
    assert {k: v for k, v in files(run).items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"
    }


def test_resume_with_agreeing_flags_continues(run, finished_run):
    cfg = json.loads((run / "config.json").read_text())  # as an older ktfast wrote it: a field since retired
    (run / "config.json").write_text(json.dumps(dict(cfg, extra={}), indent=2) + "\n")
    assert resume(run, "--dataset", TINY, "--lr", "0.05", "--graph", str(finished_run / "graph.json")) == 0
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- a diverging loss --------------------------------------------------------------------------
def test_a_non_finite_loss_exits_3_naming_node_and_epoch_and_keeps_the_last_finite_checkpoint(
    tmp_path, capsys, monkeypatch
):
    kept = {}
    train_epoch = Trainer.train_epoch

    def poisoned(self):
        if self.epoch == 1:  # epoch 2: node b's weights blow up (as a too-large step would)
            kept.update(files(self.out))
            with torch.no_grad():
                next(self.models["b"].parameters()).fill_(float("inf"))
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", poisoned)
    assert train(tmp_path, "run", epochs=3) == 3
    one_line(capsys.readouterr().err, "node b ", "epoch 2", "checkpoint of epoch 1")
    assert kept and files(tmp_path / "run") == kept  # the checkpoint and rows of epoch 1, untouched
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert resume(tmp_path / "run") == 0  # and the run goes on from there


def test_fp16_skipped_steps_are_counted_in_the_metrics_row(tmp_path):
    cfg = TrainConfig(dataset=TINY, epochs=1, batch_size=32, device="cpu", lr=0.05)
    heavy = dict(PAIR, edges=[dict(e, weight=8.0) for e in PAIR["edges"]])
    trainer = build_trainer(Graph.from_dict(heavy), cfg, out=tmp_path, progress=False)
    # A CPU run has no fp16 scaler. This one starts at a scale that overflows Σ L_t × scale, and halves
    # it at every skipped step (never growing it back): the row must count exactly those halvings.
    trainer.scaler = trainer.step.scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**127, growth_interval=10**6
    )
    [row] = trainer.fit()
    halvings = math.log2(2.0**127 / trainer.scaler.get_scale())
    assert row["skipped_steps"] == halvings > 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["skipped_steps"] == row["skipped_steps"]


# ---- a write that fails ------------------------------------------------------------------------
def limited_resume(run: Path, max_file_bytes: int) -> subprocess.CompletedProcess:
    """`ktfast train --resume` in a process whose writes fail past `max_file_bytes` per file (EFBIG
    from the write itself, as a full disk fails it with ENOSPC)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "ktfast", "train", "--resume", str(run), "--quiet"],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("what", ["checkpoint", "metrics row"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_rows(what, run):
    before = files(run)
    size = (
        (run / "checkpoint.pt").stat().st_size // 2
        if what == "checkpoint"
        else (run / "metrics.jsonl").stat().st_size + 40
    )  # the row fails part-way through
    proc = limited_resume(run, size)
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, "cannot write", "checkpoint.pt" if what == "checkpoint" else "metrics.jsonl")
    assert files(run) == before
