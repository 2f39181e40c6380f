"""Models from the user's code (docs/ARCHITECTURE.md §3): `py:MODULE:FACTORY` nodes (a file of tests/, and
torchvision's resnet18 as code no one here wrote), `"attention": "LAYER"` taken by torch.fx, the
entry-point group `ktfast.models`, fusion of two py: nodes, and every bad input as one line."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
import user_nets
from test_fuse import assert_same_run, default_dtype, record

from ktfast import Graph, usercode
from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.fuse import FusedGroup
from ktfast.engine.trainer import Trainer
from ktfast.models import build_model, is_model_name

NETS = Path(user_nets.__file__).resolve()
TINY = f"py:{NETS}:tiny_net"
pytestmark = pytest.mark.usefixtures("private_cache")


def mixed(a=None, b=None, crops=(8,)) -> dict:
    """A py: node and a resnet8 teaching each other, attention edges both ways. The crop is the whole
    8x8 map and no gate reads an arg-max, so rounding cannot flip a choice between two paths."""
    a = a or {"model": TINY, "attention": "features.5"}
    return {
        "version": 1,
        "name": "mixed",
        "target": "a",
        "nodes": [dict(a, name="a"), dict(b or {"model": "resnet8"}, name="b")],
        "edges": [
            {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
            {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
            {"from": "b", "to": "a", "loss": "kl+att_mse", "gate": "linear", "crops": list(crops)},
            {"from": "a", "to": "b", "loss": "kl+att_cos", "gate": "through", "crops": list(crops)},
        ],
    }


def steps(g: Graph, n: int, **kw) -> tuple[Trainer, list]:
    cfg = TrainConfig(
        **{
            **dict(dataset="digits", train_fraction=0.05, epochs=1, batch_size=16, device="cpu", lr=0.05),
            **kw,
        }
    )
    trainer = build_trainer(g, cfg, out=None, progress=False)
    seen = record(trainer)
    for k, (x, y) in zip(range(n), trainer.train_loader):
        trainer.train_step(x.to(torch.get_default_dtype()), y, k + 1)
    return trainer, seen


def test_py_and_registry_nodes_train_through_the_kernels_as_the_reference_step_by_step(monkeypatch):
    """Two steps, float32 (the interpreted kernels' dtype). Each step's logits, maps and L_t, then
    the weights, agree to 1e-4 of their scale: the two paths differ by the order of float32 sums
    (relative 6e-8 per addition, over at most ~1e3 terms: 1e-4 at worst), while a wrong term, sign
    or gate moves L_t by its own size (1e-2 and more)."""
    g = Graph.from_dict(mixed())
    runs = {}
    for kernels in ("0", "1"):
        monkeypatch.setenv("KTFAST_KERNELS", kernels)
        runs[kernels] = steps(g, 2)
    assert runs["1"][0].paths["kernels"] == "triton" and runs["0"][0].paths["kernels"] == "reference"
    assert {"L_a", "L_b", "att_a", "att_b"} <= runs["0"][1][0].keys()
    assert_same_run(runs["0"][0], runs["1"][0], runs["0"][1], runs["1"][1], rtol=1e-4)


def test_attention_is_the_channel_mean_of_the_named_layer_and_the_state_dict_stays_plain():
    x = torch.randn(2, 3, 32, 32)
    for name, layer, features in (
        (TINY, "features.5", lambda m: m.net.features(x)),
        ("resnet8", "stages.1", lambda m: m.stages[1](m.stages[0](m.stem(x)))),
        (
            "torchvision:resnet18",
            "layer3",
            lambda m: torch.nn.Sequential(*list(raw_resnet18(m).children())[:-3])(x),
        ),
    ):
        torch.manual_seed(0)
        plain = build_model(name, 10, 32).eval()
        torch.manual_seed(1)
        model = build_model(name, 10, 32, attention=layer).eval()
        assert model.state_dict().keys() == plain.state_dict().keys(), name
        model.load_state_dict(plain.state_dict())  # a plain checkpoint loads as it is
        with torch.no_grad():
            logits, att = model(x, return_attention=True)
            torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)
            torch.testing.assert_close(att, features(plain).mean(1), rtol=0, atol=0)
        if name == TINY:  # traced code, no hook: torch.compile takes the whole forward as one graph
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x, return_attention=True)[1], att)


def raw_resnet18(model) -> torch.nn.Module:
    """torchvision's own resnet18 holding a node's weights."""
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict({k.removeprefix("net."): v for k, v in model.state_dict().items()})
    return net


def test_the_factory_gets_image_size_only_where_it_names_it():
    built = usercode.factory(TINY).__globals__["BUILT"]  # the file as ktfast imported it
    built.clear()
    build_model(TINY, 7, 24)
    assert built == [{"num_classes": 7, "image_size": 24}]
    assert build_model(f"py:{NETS}:no_image_size", 7, 24)(torch.zeros(2, 3, 24, 24)).shape == (2, 7)


def test_a_relative_file_is_relative_to_the_graph_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.py").write_text(NETS.read_text())
    (tmp_path / "sub" / "g.json").write_text(json.dumps(mixed({"model": "py:net.py:tiny_net"})))
    monkeypatch.chdir(tmp_path)
    g = Graph.load("sub/g.json")
    assert g.nodes["a"].model == f"py:{tmp_path / 'sub' / 'net.py'}:tiny_net" and g.user_code == [
        g.nodes["a"].model
    ]
    assert Graph.from_dict(g.to_dict()).to_dict() == g.to_dict()  # the run's graph.json means the same


def test_torchvision_resnet18_by_py_with_layer4_trains_a_step():
    """Code no one here wrote. At 32 px layer4's map is 1x1: crops of side 1."""
    node = {"model": "py:torchvision.models:resnet18", "attention": "layer4"}
    g = Graph.from_dict(mixed(node, node, crops=(1,)))
    trainer, seen = steps(g, 1, batch_size=8)
    assert seen[0]["att_a"].shape == (8, 1, 1) and seen[0]["L_a"].isfinite()
    model = trainer.models["a"]
    assert all(p.grad is not None for p in model.parameters())  # every layer reached by the step
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        net = raw_resnet18(model)
        logits, att = model(x, return_attention=True)
        torch.testing.assert_close(logits, net(x))
        torch.testing.assert_close(att, torch.nn.Sequential(*list(net.children())[:-2])(x).mean(1))


def test_two_py_nodes_of_one_factory_fuse_and_compute_as_unfused():
    """float64, the bound of tests/test_fuse.py (1e-9: rounding is 1e-13, a fault 1e-3)."""
    g = Graph.from_dict(mixed(b={"model": TINY, "attention": "features.5"}))
    with default_dtype(torch.float64):
        plain, seen_plain = steps(g, 2, fuse=False)
        fused, seen_fused = steps(g, 2, fuse=True)
    assert [isinstance(u.module, FusedGroup) for u in fused.units] == [True]
    assert_same_run(plain, fused, seen_plain, seen_fused, rtol=1e-9)


def test_py_nodes_that_cannot_be_stacked_run_unfused_saying_so(capsys):
    grown = {"model": f"py:{NETS}:growing", "attention": "features.5"}
    trainer, _ = steps(Graph.from_dict(mixed(grown, grown)), 1, fuse=True)
    assert [len(u.nodes) for u in trainer.units] == [1, 1] and trainer.paths["fuse"] == "off"
    [line] = [s for s in capsys.readouterr().out.splitlines() if "fuse" in s]
    assert "a, b" in line and "architecture" in line


def test_an_installed_package_registers_names(tmp_path, monkeypatch):
    dist = tmp_path / "userpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ktfast.models]\ntinyreg = user_nets:tiny_net\n")
    assert not is_model_name("tinyreg")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert is_model_name("tinyreg")
    g = Graph.from_dict(mixed({"model": "tinyreg", "attention": "features.5"}))
    assert g.user_code == []  # an installed package, not a file the graph names
    assert build_model("tinyreg", 5, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize(
    "node,field,needle",
    [
        ({"model": "py:missing_file.py:f"}, "model", "file not found"),
        ({"model": "py:no_such_module_xyz:f"}, "model", "cannot import no_such_module_xyz"),
        ({"model": "py:user_nets"}, "model", "expected py:MODULE:FACTORY"),
        ({"model": f"py:{NETS}:nothing"}, "model", "has no callable 'nothing'"),
        ({"model": f"py:{NETS}:raises"}, "model", "the factory raised RuntimeError: no weights here"),
        ({"model": f"py:{NETS}:not_a_module"}, "model", "returned str, not a torch.nn.Module"),
        ({"model": f"py:{NETS}:wrong_logits"}, "model", "to (2, 11), not logits [2, 10]"),
        (
            {"model": TINY, "attention": "features.55"},
            "attention",
            "unknown attention layer 'features.55' (did you mean 'features.5'",
        ),
        ({"model": TINY}, "model", "name the layer"),  # an attention edge, and no layer named
        ({"model": TINY, "attention": "features.0"}, "loss", "differ in size"),  # 16x16 against 8x8
    ],
)
def test_bad_user_models_exit_2_naming_the_node(node, field, needle, tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps(mixed(node)))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--graph",
            str(tmp_path / "g.json"),
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--train-fraction",
            "0.05",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    where = "edges[b->a]" if field == "loss" else "nodes[a]"
    assert f"{where}.{field}: " in err and needle in err, err
    assert not out.exists()


def test_show_and_the_run_say_the_graph_runs_user_code(tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps(mixed()))
    assert main(["show", str(tmp_path / "g.json"), "-o", str(tmp_path / "g.png")]) == 0
    assert f"runs: {TINY}" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
    assert (
        main(
            [
                "train",
                "--graph",
                str(tmp_path / "g.json"),
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--train-fraction",
                "0.05",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"graph mixed runs user code: {TINY}"
    [row] = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(row["test"]) == {"a", "b"}
    saved = json.loads((tmp_path / "run" / "graph.json").read_text())
    assert saved["nodes"][0] == {"name": "a", "model": TINY, "init": "scratch", "attention": "features.5"}


def test_the_custom_example_names_a_layer_of_resnet8s_map_size():
    g = Graph.load(Path(__file__).parents[1] / "examples" / "custom" / "graph.json")
    assert g.user_code == [
        f"py:{Path(__file__).parents[1].resolve() / 'examples' / 'custom' / 'tiny_net.py'}:tiny_net"
    ]
    x = torch.zeros(2, 3, 32, 32)
    maps = [
        build_model(n.model, 10, 32, attention=n.attention)(x, return_attention=True)[1].shape
        for n in g.model_nodes
    ]
    assert maps == [(2, 8, 8), (2, 8, 8)]
