"""Pictures: `ktfast show`, `ktfast attention`, `ktfast report` write PNGs that depend on their input;
`show --model` counts parameters and FLOPs; bad input exits 2 with one line and writes nothing."""

import json
import re
import shutil

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from ktfast.cli import main
from ktfast.graph import Graph
from ktfast.models import build_model
from ktfast.pictures.graph_figure import TARGET, graph_figure
from ktfast.pictures.plots import attention_samples, curves_figure, read_metrics

TINY = "synthetic:classes=4,size=16,train=32,test=12"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAIR = {
    "version": 1,
    "name": "pair",
    "target": "a",
    "nodes": [
        {"name": "a", "model": "resnet8"},
        {"name": "b", "model": "resnet8"},
        {"name": "ens", "ensemble": ["a", "b"], "reduce": "mean"},
    ],
    "edges": [
        {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
        {"from": "label", "to": "b", "loss": "ce", "gate": "correct"},
        {"from": "b", "to": "a", "loss": "kl", "gate": "linear", "temperature": 2.0},
        {"from": "a", "to": "b", "loss": "kl", "gate": "cutoff"},
    ],
}
KD = {
    "version": 1,
    "name": "kd",
    "target": "student",
    "nodes": [{"name": "student", "model": "resnet8"}, {"name": "teacher", "model": "resnet14"}],
    "edges": [
        {"from": "label", "to": "student", "loss": "ce", "gate": "through"},
        {"from": "teacher", "to": "student", "loss": "kl", "gate": "through", "weight": 0.5},
    ],
}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def read_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def differ(a, b) -> bool:
    return a.shape != b.shape or not np.array_equal(a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs of PAIR that differ only in their seed."""
    root = tmp_path_factory.mktemp("runs")
    graph = write_json(root / "pair.json", PAIR)
    out = []
    for seed in (0, 1):
        run = root / f"seed{seed}"
        assert (
            main(
                [
                    "train",
                    "--graph",
                    str(graph),
                    "--dataset",
                    TINY,
                    "--epochs",
                    "2",
                    "--batch-size",
                    "8",
                    "--lr",
                    "0.05",
                    "--seeds",
                    str(seed),
                    "--out",
                    str(run),
                    "--quiet",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        out.append(run)
    return out


def test_show_draws_each_graph_differently(tmp_path, capsys):
    pictures = []
    for data in (PAIR, KD):
        png = tmp_path / f"{data['name']}.png"
        assert main(["show", str(write_json(tmp_path / f"{data['name']}.json", data)), "-o", str(png)]) == 0
        assert capsys.readouterr().out.strip() == str(png)
        pictures.append(read_png(png))
    assert differ(*pictures)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kd.json",
        "kd.png",
        "pair.json",
        "pair.png",
    ]  # no temporaries


def test_graph_figure_shows_what_the_graph_says():
    graph = Graph.from_dict(PAIR)
    fig = graph_figure(graph)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 3  # the cut-off edge a -> b is omitted
    assert "kl · linear\nT=2" in texts and "ce · correct" in texts and not any("cutoff" in t for t in texts)
    assert "Label" in texts and "ens\nmean of 2" in texts
    target = next(
        p
        for p in ax.patches
        if not isinstance(p, FancyArrowPatch)
        and p.get_facecolor()[:3] == pytest.approx(matplotlib.colors.to_rgb(TARGET))
    )
    assert target.get_linewidth() > 2
    kd = [t.get_text() for t in graph_figure(Graph.from_dict(KD)).axes[0].texts]
    assert "teacher\nresnet14*" in kd and "kl · through\nw=0.5" in kd  # frozen teacher, non-default weight


def test_edge_labels_name_the_time_gates_gamma_and_soften():
    d = {
        "version": 1,
        "target": "a",
        "nodes": [{"name": n, "model": "resnet8"} for n in "abc"],
        "edges": [
            {
                "from": "b",
                "to": "a",
                "loss": "kl",
                "gate": "gamma",
                "gamma": 2.5,
                "temperature": 10.0,
                "soften": "source",
            },
            {"from": "c", "to": "a", "loss": "kl", "gate": "negative_gamma", "soften": "source"},
            {"from": "a", "to": "b", "loss": "mse", "gate": "negative_linear"},
            {"from": "label", "to": "c", "loss": "ce", "gate": "gamma"},
        ],
    }
    texts = [t.get_text() for t in graph_figure(Graph.from_dict(d)).axes[0].texts]
    for label in (
        "kl · gamma γ=2.5\nT=10 (source)",
        "kl · negative_gamma γ=1\nT=1 (source)",
        "mse · negative_linear",
        "ce · gamma γ=1",
    ):
        assert label in texts


def test_show_with_run_adds_final_test_accuracies(runs, tmp_path):
    graph = write_json(tmp_path / "pair.json", PAIR)
    plain, with_run = tmp_path / "plain.png", tmp_path / "run.png"
    assert main(["show", str(graph), "-o", str(plain)]) == 0
    assert main(["show", str(graph), "-o", str(with_run), "--run", str(runs[0])]) == 0
    assert differ(read_png(plain), read_png(with_run))
    final = read_metrics(runs[0])[-1]["test"]
    texts = [
        t.get_text()
        for t in graph_figure(Graph.from_dict(PAIR), {n: v["acc"] for n, v in final.items()}).axes[0].texts
    ]
    assert f"a\nresnet8\n({100 * final['a']['acc']:.2f})" in texts
    assert f"ens\nmean of 2\n({100 * final['ens']['acc']:.2f})" in texts


def test_attention_depends_on_the_checkpoint(runs, tmp_path, capsys):
    pictures = []
    for run in runs:
        png = tmp_path / f"{run.name}.png"
        assert main(["attention", str(run), "-o", str(png), "--images", "3"]) == 0
        assert capsys.readouterr().out.strip() == str(png)
        pictures.append(read_png(png))
    assert differ(*pictures)
    # The maps come from the checkpoint and from nothing else: run 0's directory with run 1's
    # checkpoint gives run 1's maps (the test images do not depend on the seed).
    swapped = tmp_path / "swapped"
    shutil.copytree(runs[0], swapped)
    shutil.copy(runs[1] / "checkpoint.pt", swapped / "checkpoint.pt")
    a, b = attention_samples(swapped, 3), attention_samples(runs[1], 3)
    assert all(torch.equal(a.maps[n], b.maps[n]) for n in ("a", "b")) and a.entropies == b.entropies
    samples = attention_samples(runs[0], 3)
    assert not torch.equal(samples.maps["a"], a.maps["a"])
    assert list(samples.maps) == ["a", "b"] and samples.images.shape == (3, 16, 16, 3)
    # A node's "attention" layer is the map drawn: the same weights, the first stage's map instead of the last's.
    layered = tmp_path / "layered"
    shutil.copytree(runs[0], layered)
    graph = json.loads((layered / "graph.json").read_text())
    graph["nodes"][0]["attention"] = "stages.0"
    write_json(layered / "graph.json", graph)
    other = attention_samples(layered, 3)
    assert not torch.equal(other.maps["a"], samples.maps["a"]) and torch.equal(
        other.maps["b"], samples.maps["b"]
    )
    for name in ("a", "b"):
        assert samples.maps[name].shape == (3, 16, 16)
        assert float(samples.maps[name].min()) == 0.0 and float(samples.maps[name].max()) == pytest.approx(
            1.0
        )
        assert all(0 <= h <= np.log(4) + 1e-6 for h in samples.entropies[name])


def test_report_plots_one_curve_per_node_and_panel(runs, capsys):
    run = runs[0]
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    read_png(run / "curves.png")
    graph, rows = Graph.load(run / "graph.json"), read_metrics(run)
    fig = curves_figure(graph, rows)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["a (target)", "b", "ens"]
        assert all(list(line.get_xdata()) == [1, 2] for line in lines)
        assert lines[2].get_linestyle() == "--"  # the ensemble node
    test_acc = fig.axes[1].get_lines()[1].get_ydata()
    assert list(test_acc) == pytest.approx([100 * r["test"]["b"]["acc"] for r in rows])


def test_report_of_several_seeds_draws_each_seed_and_the_band_of_mean_and_std(runs, capsys):
    """The fixture's folder holds seed0/ and seed1/, as `--seeds 0,1` writes them: every panel has each
    seed's line, the mean labelled by the node, and the band mean ± sample std (statistics.stdev, the
    reference; the band's vertices are those numbers as matplotlib stores them, float64)."""
    root = runs[0].parent
    assert main(["report", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "curves.png")
    read_png(root / "curves.png")
    graph = Graph.load(runs[0] / "graph.json")
    rows = {s: read_metrics(run) for s, run in enumerate(runs)}
    fig = curves_figure(graph, rows)
    assert len(fig.axes) == 4
    test_acc = fig.axes[1]
    lines = {line.get_gid() or line.get_label(): line for line in test_acc.get_lines()}
    for node in ("a", "b", "ens"):
        per_seed = [[100 * r["test"][node]["acc"] for r in rows[s]] for s in (0, 1)]
        for s in (0, 1):
            assert list(lines[f"{node} seed {s}"].get_ydata()) == pytest.approx(per_seed[s], rel=1e-12)
        mean = [(x + y) / 2 for x, y in zip(*per_seed)]
        label = node + (" (target)" if node == "a" else "")
        assert list(lines[label].get_ydata()) == pytest.approx(mean, rel=1e-12)
        [band] = [c for c in test_acc.collections if c.get_gid() == f"{node} band"]
        ys = band.get_paths()[0].vertices[:, 1]
        std = [abs(x - y) / 2**0.5 for x, y in zip(*per_seed)]  # the sample std of two values
        assert min(ys) == pytest.approx(min(m - d for m, d in zip(mean, std)), abs=1e-9)
        assert max(ys) == pytest.approx(max(m + d for m, d in zip(mean, std)), abs=1e-9)


def test_show_model_counts_parameters_and_flops(capsys):
    assert main(["show", "--model", "resnet8", "--dataset", TINY]) == 0
    out = capsys.readouterr().out
    params = int(re.search(r"^parameters\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    flops = int(re.search(r"^FLOPs\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    macs = int(re.search(r"^MACs\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    model = build_model("resnet8", 4, 16)  # the tiny dataset's classes and image size
    assert params == sum(p.numel() for p in model.parameters())
    assert flops > 0 and flops == 2 * macs
    assert main(["show", "--model", "resnet8"]) == 0  # digits: 32 px, four times the pixels
    bigger = int(re.search(r"^FLOPs\s+([\d,]+)", capsys.readouterr().out, re.M).group(1).replace(",", ""))
    assert bigger > 3 * flops


BAD = {
    "missing graph file": (["show", "nope.json", "-o", "out.png"], "not found"),
    "neither graph nor model": (["show", "-o", "out.png"], "exactly one"),
    "both graph and model": (["show", "pair.json", "--model", "resnet8", "-o", "out.png"], "exactly one"),
    "graph without -o": (["show", "pair.json"], "-o"),
    "unknown picture format": (["show", "pair.json", "-o", "out.txt"], ".png"),
    "unknown model": (["show", "--model", "resnet9"], "resnet9"),
    "run without metrics": (["show", "pair.json", "-o", "out.png", "--run", "empty"], "metrics.jsonl"),
    "run of another graph": (["show", "kd.json", "-o", "out.png", "--run", "RUN"], "another graph"),
    "report without metrics": (["report", "empty", "-o", "out.png"], "metrics.jsonl"),
    "report of no directory": (["report", "nowhere", "-o", "out.png"], "nowhere"),
    "attention without checkpoint": (["attention", "empty", "-o", "out.png"], "graph.json"),
    "attention with bad --images": (["attention", "RUN", "-o", "out.png", "--images", "0"], "--images"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "pair.json", PAIR)
    write_json(tmp_path / "kd.json", KD)
    (tmp_path / "empty").mkdir()
    argv, needle = BAD[case]
    before = set(tmp_path.rglob("*"))
    assert main([str(runs[0]) if a == "RUN" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ktfast: error:") and needle in err
    assert set(tmp_path.rglob("*")) == before


def test_failed_write_keeps_the_old_picture(tmp_path, monkeypatch, capsys):
    """The picture is renamed into place only once fully written: a full disk leaves the old one."""
    png = tmp_path / "g.png"
    png.write_bytes(b"old picture")

    def full_disk(self, path, **kwargs):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert main(["show", str(write_json(tmp_path / "g.json", PAIR)), "-o", str(png)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert png.read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.png"]
