"""`ktfast train --tensorboard` (docs/ARCHITECTURE.md §11): per node, event files whose values, read back with
TensorBoard's own reader, are those of metrics.jsonl."""

import json

import pytest

from ktfast.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util.tensor_util import make_ndarray  # noqa: E402

TINY = "synthetic:classes=4,size=16,train=96,test=40"
GRAPH = {
    "version": 1,
    "name": "tb",
    "target": "a",
    "nodes": [
        {"name": "a", "model": "resnet8"},
        {"name": "b", "model": "resnet8"},
        {"name": "ens", "ensemble": ["a", "b"]},
    ],
    "edges": [
        {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
        {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
        {"from": "a", "to": "b", "loss": "kl", "gate": "linear"},
    ],
}


pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def read_events(folder) -> dict:
    """{tag: {step: value}} of one node's event files."""
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: {e.step: make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}
        for tag in events.Tags()["tensors"]
    }


def test_event_files_per_node_hold_the_values_of_metrics_jsonl(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    args = [
        "train",
        "--graph",
        "g.json",
        "--dataset",
        TINY,
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--lr-decay-at",
        "0.5",
        "--device",
        "cpu",
        "--quiet",
        "--tensorboard",
        "--out",
        "run",
    ]
    assert main([*args, "--epochs", "3"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["a", "b", "ens"]
    lrs = {1: 0.05, 2: 0.05, 3: 0.05 * 0.1}  # decayed at half of the 3 epochs, rounded: after epoch 2
    for node in ("a", "b", "ens"):
        events = read_events(run / "tensorboard" / node)
        expected = {
            f"{what}/{split}": {r["epoch"]: r[split][node][what] for r in rows}
            for what in ("loss", "acc")
            for split in ("train", "test")
        }
        expected["images_per_s"] = {r["epoch"]: r["images_per_s"] for r in rows}
        if node != "ens":  # an ensemble node has no weights and no learning rate
            expected["lr"] = lrs
        assert events == expected, node


def test_tensorboard_goes_on_after_resume(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    args = [
        "train",
        "--graph",
        "g.json",
        "--dataset",
        TINY,
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--tensorboard",
        "--out",
        "run",
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, epochs=2)))  # one epoch more to go
    assert main(["train", "--resume", "run", "--quiet", "--tensorboard"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert read_events(run / "tensorboard" / "a")["acc/test"] == {
        r["epoch"]: r["test"]["a"]["acc"] for r in rows
    }
