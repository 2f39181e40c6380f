"""Selection without test leakage (issue 25, item 2): `--val-fraction` holds out a seeded, class-balanced
part of the training set, `checkpoint-best.pt` is the epoch of the target's best val accuracy (the first
on ties), `summary.json` follows docs/ARCHITECTURE.md §2, bad values exit 2 with one line, and the search's objective
never reads the test set."""

import json
import statistics

import optuna
import pytest
import torch
from graphs import LABELS, pair

import ktfast.engine.build
import ktfast.engine.trainer
from ktfast.cli import main
from ktfast.data import load_arrays, make_loader, split_indices

TINY = "synthetic:classes=4,size=16,train=96,test=40"
PAIR = pair(*LABELS, ("b", "a", "kl", "correct"))
RUN = ["--dataset", TINY, "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--quiet", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def graph_file(tmp_path):
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(PAIR))
    return str(path)


def test_the_val_split_is_a_class_balanced_part_of_train_the_same_for_every_seed():
    arrays = load_arrays(TINY)
    val, train = split_indices(arrays, "val", 0.25), split_indices(arrays, "train", 0.25)
    assert sorted(torch.cat([val, train]).tolist()) == list(range(96))  # a partition of the training set
    assert torch.bincount(arrays.train_y[val]).tolist() == [6] * 4  # 24 images per class, a quarter held out
    loaders = [make_loader(TINY, "val", 8, "cpu", seed, val_fraction=0.25) for seed in (0, 1)]
    assert loaders[0].indices.tolist() == loaders[1].indices.tolist() == val.tolist()
    subset = make_loader(TINY, "train", 8, "cpu", 3, train_fraction=0.5, val_fraction=0.25)
    assert not set(subset.indices.tolist()) & set(val.tolist())  # a train fraction is drawn from the rest
    assert len(make_loader(TINY, "train", 8, "cpu", 0).indices) == 96  # no val fraction: all of train


def test_a_run_trains_on_the_rest_and_evaluates_val_and_test(tmp_path):
    from ktfast.args import config_from_args
    from ktfast.cli import build_parser
    from ktfast.engine.run import make_trainer
    from ktfast.graph import Graph

    args = build_parser().parse_args(
        ["train", "--graph", graph_file(tmp_path), *RUN, "--val-fraction", "0.25"]
    )
    trainer = make_trainer(Graph.from_dict(PAIR), config_from_args(args, seed=1), out=None, progress=False)
    train, val = set(trainer.train_loader.indices.tolist()), set(trainer.val_loader.indices.tolist())
    assert len(train) == 72 and len(val) == 24 and not train & val  # 96 training images, a quarter held out
    assert trainer.eval_loader.split == "test" and trainer.eval_loader.num_samples == 40


def scripted_val(monkeypatch, accs: list[float]):
    """The target's val accuracy of epoch e is accs[e - 1] (the val split is evaluated for real, then
    overwritten), so that the best epoch is known; the weights of every epoch are kept."""
    real = ktfast.engine.trainer.evaluate

    def evaluate(graph, models, units, loader, cfg, placement=None):
        out = real(graph, models, units, loader, cfg, placement)
        if loader.split == "val":
            out[graph.target]["acc"] = accs[len(kept[cfg.seed])]
            kept[cfg.seed].append({k: v.clone() for k, v in models[graph.target].state_dict().items()})
        return out

    kept = {0: [], 1: []}
    monkeypatch.setattr(ktfast.engine.trainer, "evaluate", evaluate)
    return kept


def test_checkpoint_best_is_the_first_best_val_epoch_and_summary_follows_the_design(
    tmp_path, monkeypatch, capsys
):
    """Val accuracies 0.5, 0.75, 0.75 of the target: the best is epoch 2 (a tie with 3 keeps the first),
    not the last; checkpoint-best.pt holds epoch 2's weights, summary.json the test accuracies of
    epoch 2 and of epoch 3, with the sample std over the two seeds (statistics.stdev, the reference)."""
    kept = scripted_val(monkeypatch, [0.5, 0.75, 0.75])
    assert (
        main(
            [
                "train",
                "--graph",
                graph_file(tmp_path),
                *RUN,
                "--seeds",
                "0,1",
                "--val-fraction",
                "0.25",
                "--out",
                "r",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert (
        "last epoch" in table
        and "at best val" in table
        and "best val epoch of a: 2 (seed 0), 2 (seed 1)" in table
    )
    rows = {
        s: [
            json.loads(line)
            for line in (tmp_path / "r" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()
        ]
        for s in (0, 1)
    }
    for s in (0, 1):
        assert [r["val"]["a"]["acc"] for r in rows[s]] == [0.5, 0.75, 0.75]
        assert all(set(r["val"]) == {"a", "b"} and 0 <= r["val"]["b"]["acc"] <= 1 for r in rows[s])
        best = torch.load(tmp_path / "r" / f"seed{s}" / "checkpoint-best.pt", weights_only=True)
        assert best["epoch"] == 2 and best["best_val"] == {"epoch": 2, "acc": 0.75}
        for k, v in best["models"]["a"].items():
            assert torch.equal(v, kept[s][1][k])  # epoch 2's weights, exactly
        assert any(
            not torch.equal(v, kept[s][2][k]) for k, v in best["models"]["a"].items()
        )  # not the last's
        last = torch.load(tmp_path / "r" / f"seed{s}" / "checkpoint.pt", weights_only=True)
        assert last["epoch"] == 3 and last["best_val"] == {
            "epoch": 2,
            "acc": 0.75,
        }  # what a resume goes on from
    from ktfast.config import TrainConfig
    from ktfast.engine.run import make_trainer
    from ktfast.graph import Graph

    run = tmp_path / "r" / "seed1"
    resumed = make_trainer(
        Graph.load(run / "graph.json"), TrainConfig.load(run / "config.json"), out=None, progress=False
    )
    resumed.load_checkpoint(run / "checkpoint.pt")
    assert resumed.best_val == {"epoch": 2, "acc": 0.75}  # a later epoch must beat 0.75 to replace it
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["target"] == "a" and summary["seeds"] == [0, 1] and set(summary["nodes"]) == {"a", "b"}
    for node in ("a", "b"):
        for key, epoch in (("last", 3), ("best_val", 2)):
            accs = [rows[s][epoch - 1]["test"][node]["acc"] for s in (0, 1)]
            want = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs), "per_seed": accs}
            if key == "best_val":
                want["epochs"] = [2, 2]
            assert summary["nodes"][node][key] == want
    from ktfast.pictures.plots import curves_figure

    val_acc = curves_figure(Graph.from_dict(PAIR), rows).axes[2]  # `ktfast report r`: a val column too
    assert val_acc.get_title() == "val accuracy (%)"
    [mean] = [line for line in val_acc.get_lines() if line.get_label() == "a (target)"]
    assert list(mean.get_ydata()) == pytest.approx([50, 75, 75], rel=1e-12)


def test_one_seed_without_val_writes_summary_with_std_0_and_no_best_val(tmp_path):
    assert main(["train", "--graph", graph_file(tmp_path), *RUN[:3], "1", *RUN[4:], "--out", "one"]) == 0
    [row] = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert "val" not in row and not (tmp_path / "one" / "checkpoint-best.pt").exists()
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["seeds"] == [0]
    for node in ("a", "b"):
        acc = row["test"][node]["acc"]
        assert summary["nodes"][node] == {"last": {"mean": acc, "std": 0.0, "per_seed": [acc]}}


BAD = {
    "zero": (["--val-fraction", "0"], "--val-fraction: must be in (0, 1)"),
    "one": (["--val-fraction", "1"], "--val-fraction: must be in (0, 1)"),
    "not a number": (["--val-fraction", "half"], "--val-fraction"),
    # 2 images per class: round(0.75 * 2) = 2 held out, none left to train on
    "a class emptied": (
        ["--val-fraction", "0.75", "--dataset", "synthetic:classes=4,size=16,train=8,test=8"],
        "holds out every training sample of class 0",
    ),
    "with the search split": (["--val-fraction", "0.2", "--split", "search"], "--split search"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_val_fraction_exits_2_with_one_line_and_no_run_directory(case, tmp_path, capsys):
    extra, needle = BAD[case]
    assert main(["train", "--graph", graph_file(tmp_path), *RUN, *extra, "--out", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_the_search_objective_is_scored_on_search_val_and_never_reads_the_test_set(monkeypatch):
    """A trial run in this process, every loader it makes recorded: the trainer trains on search_train,
    is scored on search_val, and no loader of the test split (or of a val fraction) is ever made; the
    objective is the search_val accuracy of its last epoch."""
    from ktfast.args import config_from_args
    from ktfast.cli import build_parser
    from ktfast.commands.search import space_from_args
    from ktfast.graph_search.search import objective

    made = []
    real = ktfast.engine.build.make_loader

    def make_loader(dataset, split, *args, **kwargs):
        assert split != "test", "the search made a loader of the test set"
        made.append((split, kwargs.get("val_fraction")))
        return real(dataset, split, *args, **kwargs)

    monkeypatch.setattr(ktfast.engine.build, "make_loader", make_loader)
    args = build_parser().parse_args(
        [
            "search",
            "--nodes",
            "1",
            "--target-model",
            "resnet8",
            "--gates",
            "through",
            "--trials",
            "1",
            "--dataset",
            TINY,
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ]
    )
    cfg = config_from_args(args).replace(split="search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: objective(t, space_from_args(args), cfg, 1), n_trials=1)
    assert made == [("search_train", None), ("search_val", None)]
    [trial] = study.trials
    assert (
        trial.user_attrs["data"]["scored_on"] == "search_val" and trial.value == trial.intermediate_values[2]
    )
    for acc in trial.intermediate_values.values():  # a count of the 20 search_val images (5 of each class)
        assert acc * 20 == pytest.approx(round(acc * 20), abs=1e-9)
