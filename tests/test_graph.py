import json
from pathlib import Path

import pytest

from ktfast import Graph, GraphError
from ktfast.graph import EnsembleNode, ModelNode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def base():
    return {
        "version": 1,
        "name": "t",
        "target": "n1",
        "nodes": [
            {"name": "n1", "model": "resnet8"},
            {"name": "n2", "model": "resnet14"},
            {"name": "n3", "model": "wrn16_1"},
            {"name": "ens", "ensemble": ["n1", "n2"], "reduce": "mean", "detach": True},
        ],
        "edges": [
            {"from": "label", "to": "n1", "loss": "ce", "gate": "through"},
            {"from": "n2", "to": "n1", "loss": "kl", "gate": "linear", "temperature": 2.0},
            {"from": "n3", "to": "n1", "loss": "kl", "gate": "correct"},
            {"from": "label", "to": "n2", "loss": "ce", "gate": "correct"},
            {"from": "n1", "to": "n2", "loss": "kl+att_mse", "gate": "through", "crops": [3, 5]},
        ],
    }


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_examples_load_and_round_trip(path, tmp_path):
    g = Graph.load(path)
    g.save(tmp_path / "g.json")
    again = Graph.load(tmp_path / "g.json")
    assert again.to_dict() == g.to_dict()
    assert g.target in g.nodes


def test_parse_fields_and_frozen_rule():
    g = Graph.from_dict(base())
    assert isinstance(g.nodes["ens"], EnsembleNode) and g.nodes["ens"].members == ("n1", "n2")
    n3 = g.nodes["n3"]
    assert isinstance(n3, ModelNode) and n3.frozen and n3.init == "pretrained"
    assert not g.nodes["n1"].frozen and g.nodes["n1"].init == "scratch"
    assert g.targets == ["n1", "n2"]
    e = g.edges[1]
    assert (e.source, e.target, e.terms, e.gate, e.temperature, e.weight) == (
        "n2",
        "n1",
        ("kl",),
        "linear",
        2.0,
        1.0,
    )
    assert g.edges[4].terms == ("kl", "att_mse") and g.uses_attention


def test_all_cutoff_incoming_edges_freeze_a_node_and_checkpoint_init_is_kept():
    d = base()
    d["nodes"][2]["init"] = {"checkpoint": "teacher.pt"}
    d["edges"].append({"from": "n1", "to": "n3", "loss": "kl", "gate": "cutoff"})
    g = Graph.from_dict(d)
    assert g.nodes["n3"].frozen and g.nodes["n3"].checkpoint == "teacher.pt"
    assert all(e.gate != "cutoff" for e in g.active_edges) and len(g.edges) == 6


def test_non_detached_ensemble_target_trains_its_members():
    d = {
        "version": 1,
        "target": "ens",
        "nodes": [
            {"name": "a", "model": "resnet8"},
            {"name": "b", "model": "resnet8"},
            {"name": "ens", "ensemble": ["a", "b"], "reduce": "sum", "detach": False},
        ],
        "edges": [{"from": "label", "to": "ens", "loss": "ce", "gate": "through"}],
    }
    g = Graph.from_dict(d)
    assert not g.nodes["a"].frozen and not g.nodes["b"].frozen
    d["nodes"][2]["detach"] = True
    g = Graph.from_dict(d)
    assert g.nodes["a"].frozen and g.nodes["b"].frozen


def test_soften_lr_scale_and_gamma_parse_and_round_trip():
    d = base()
    d["nodes"][1]["lr_scale"] = 0.1
    d["edges"][1].update(soften="source", gate="gamma", gamma=2.5)
    d["edges"][2].update(gate="negative_gamma")
    d["edges"].append({"from": "n2", "to": "n3", "loss": "mse", "gate": "negative_linear"})
    g = Graph.from_dict(d)
    assert g.nodes["n2"].lr_scale == 0.1 and g.nodes["n1"].lr_scale == 1.0
    e = g.edges[1]
    assert (e.soften, e.gate, e.gamma) == ("source", "gamma", 2.5)
    assert (g.edges[2].soften, g.edges[2].gamma) == ("both", 1.0)
    again = g.to_dict()
    assert again["nodes"][1]["lr_scale"] == 0.1 and "lr_scale" not in again["nodes"][0]
    assert again["edges"][1]["soften"] == "source" and again["edges"][1]["gamma"] == 2.5
    assert "soften" not in again["edges"][2] and "gamma" not in again["edges"][2]
    assert Graph.from_dict(again).to_dict() == again


def test_dkd_dist_standardize_and_warmup_parse_and_round_trip():
    d = base()
    d["edges"][1].update(
        loss="dkd+att_mse", alpha=0.0, beta=2.5, standardize=True, gate="warmup", warmup=1 / 12
    )
    d["edges"][2].update(loss="dist", temperature=4.0)
    d["edges"].append(
        {"from": "n3", "to": "n2", "loss": "kl", "gate": "warmup", "warmup": 1, "standardize": False}
    )
    d["edges"].append({"from": "n2", "to": "n3", "loss": "dkd", "gate": "through"})
    g = Graph.from_dict(d)
    e1, e2, e3, e4 = g.edges[1], g.edges[2], g.edges[5], g.edges[6]
    assert (e1.terms, e1.alpha, e1.beta, e1.standardize, e1.gate, e1.warmup) == (
        ("dkd", "att_mse"),
        0.0,
        2.5,
        True,
        "warmup",
        1 / 12,
    )
    assert (e2.terms, e2.standardize, e2.warmup) == (("dist",), False, None)
    assert (e3.warmup, e3.standardize) == (1.0, False)
    assert (e4.alpha, e4.beta) == (1.0, 8.0)  # DKD's defaults
    again = g.to_dict()
    assert again["edges"][1]["alpha"] == 0.0 and again["edges"][1]["beta"] == 2.5
    assert again["edges"][1]["standardize"] is True and again["edges"][1]["warmup"] == 1 / 12
    assert again["edges"][6]["alpha"] == 1.0 and again["edges"][6]["beta"] == 8.0
    # Fields at their defaults are left out where they do not apply.
    assert not {"alpha", "beta", "standardize", "warmup"} & set(again["edges"][2])
    assert "standardize" not in again["edges"][5]
    g2 = Graph.from_dict(again)
    assert g2.edges == g.edges and g2.to_dict() == again
    assert Graph.from_dict(json.loads(json.dumps(again))).edges == g.edges  # through the file's JSON too


def mutate(fn):
    d = base()
    fn(d)
    return d


BAD = {
    "missing target": (lambda d: d.pop("target"), "'target'"),
    "unknown target": (lambda d: d.update(target="zz"), "target"),
    "nodes not a list": (lambda d: d.update(nodes={}), "nodes"),
    "unknown model": (lambda d: d["nodes"][0].update(model="resnet9"), "resnet9"),
    "model mistyped": (lambda d: d["nodes"][0].update(model=32), "model"),
    "unknown loss": (lambda d: d["edges"][1].update(loss="kld"), "kld"),
    "unknown loss in a sum": (lambda d: d["edges"][1].update(loss="kl+foo"), "foo"),
    "unknown gate": (lambda d: d["edges"][1].update(gate="open"), "open"),
    "missing gate": (lambda d: d["edges"][1].pop("gate"), "'gate'"),
    "unknown reduce": (lambda d: d["nodes"][3].update(reduce="max"), "max"),
    "edge from missing node": (lambda d: d["edges"][1].update({"from": "n9"}), "n9"),
    "edge to missing node": (lambda d: d["edges"][1].update(to="n9"), "n9"),
    "edge to label": (lambda d: d["edges"][1].update(to="label"), "label"),
    "ce not from label": (lambda d: d["edges"][1].update(loss="ce"), "ce"),
    "kl from label": (lambda d: d["edges"][0].update(loss="kl"), "ce"),
    "duplicate node": (lambda d: d["nodes"].append({"name": "n1", "model": "resnet8"}), "n1"),
    "node named label": (lambda d: d["nodes"].append({"name": "label", "model": "resnet8"}), "label"),
    "ensemble of unknown member": (lambda d: d["nodes"][3].update(ensemble=["n1", "zz"]), "zz"),
    "temperature zero": (lambda d: d["edges"][1].update(temperature=0), "temperature"),
    "temperature negative": (lambda d: d["edges"][1].update(temperature=-1.5), "temperature"),
    "weight not a number": (lambda d: d["edges"][1].update(weight="1"), "weight"),
    "weight a bool": (lambda d: d["edges"][1].update(weight=True), "weight"),
    "unknown edge field": (lambda d: d["edges"][1].update(temprature=2), "temprature"),
    "unknown init": (lambda d: d["nodes"][0].update(init="imagenet"), "init"),
    "detach not bool": (lambda d: d["nodes"][3].update(detach="yes"), "detach"),
    "self loop": (
        lambda d: d["edges"].append({"from": "n1", "to": "n1", "loss": "kl", "gate": "through"}),
        "itself",
    ),
    "attention on ensemble": (
        lambda d: d["edges"].append({"from": "ens", "to": "n2", "loss": "att_cos", "gate": "through"}),
        "ens",
    ),
    "bad crops": (lambda d: d["edges"][4].update(crops=[0]), "crops"),
    "version": (lambda d: d.update(version=2), "version"),
    "duplicate edge": (lambda d: d["edges"].append(dict(d["edges"][1])), "duplicate"),
    "soften on a ce edge": (lambda d: d["edges"][0].update(soften="source"), "soften"),
    "soften on a cos edge": (
        lambda d: d["edges"].append(
            {"from": "n3", "to": "n2", "loss": "cos", "gate": "through", "soften": "both"}
        ),
        "soften",
    ),
    "unknown soften": (lambda d: d["edges"][1].update(soften="target"), "soften"),
    "soften not a string": (lambda d: d["edges"][1].update(soften=1), "soften"),
    "lr_scale zero": (lambda d: d["nodes"][0].update(lr_scale=0), "lr_scale"),
    "lr_scale negative": (lambda d: d["nodes"][0].update(lr_scale=-0.1), "lr_scale"),
    "lr_scale not a number": (lambda d: d["nodes"][0].update(lr_scale="0.1"), "lr_scale"),
    "lr_scale on an ensemble": (lambda d: d["nodes"][3].update(lr_scale=0.1), "lr_scale"),
    "gamma zero": (lambda d: d["edges"][1].update(gate="gamma", gamma=0), "gamma"),
    "gamma negative": (lambda d: d["edges"][1].update(gate="negative_gamma", gamma=-2.0), "gamma"),
    "gamma on a linear gate": (lambda d: d["edges"][1].update(gamma=2.0), "gamma"),
    "gamma on a negative_linear gate": (
        lambda d: d["edges"][1].update(gate="negative_linear", gamma=2.0),
        "gamma",
    ),
    # The fields of the modern logit distillation: each error names the edge and the field.
    "alpha negative": (
        lambda d: d["edges"][1].update(loss="dkd", alpha=-0.5),
        "edges[n2->n1].alpha: must be >= 0",
    ),
    "beta negative": (
        lambda d: d["edges"][1].update(loss="dkd+mse", beta=-8),
        "edges[n2->n1].beta: must be >= 0",
    ),
    "beta infinite": (lambda d: d["edges"][1].update(loss="dkd", beta=float("inf")), "edges[n2->n1].beta"),
    "alpha not a number": (lambda d: d["edges"][1].update(loss="dkd", alpha="1"), "edges[n2->n1].alpha"),
    "alpha on a kl edge": (
        lambda d: d["edges"][1].update(alpha=1.0),
        "edges[n2->n1].alpha: only edges with a 'dkd'",
    ),
    "beta on a dist edge": (lambda d: d["edges"][1].update(loss="dist", beta=8.0), "edges[n2->n1].beta"),
    "standardize on an mse edge": (
        lambda d: d["edges"].append(
            {"from": "n3", "to": "n2", "loss": "mse", "gate": "through", "standardize": True}
        ),
        "edges[n3->n2].standardize",
    ),
    "standardize on cos+att_cos": (
        lambda d: d["edges"][4].update(loss="cos+att_cos", standardize=True),
        "edges[n1->n2].standardize",
    ),
    "standardize on a ce edge": (
        lambda d: d["edges"][0].update(standardize=True),
        "edges[label->n1].standardize",
    ),
    "standardize not a bool": (lambda d: d["edges"][1].update(standardize=1), "edges[n2->n1].standardize"),
    "dkd from label": (lambda d: d["edges"][0].update(loss="dkd"), "edges[label->n1].loss: 'dkd'"),
    "ce+dkd from label": (lambda d: d["edges"][0].update(loss="ce+dkd"), "edges[label->n1].loss"),
    "warmup gate without warmup": (lambda d: d["edges"][1].update(gate="warmup"), "edges[n2->n1].warmup"),
    "warmup zero": (
        lambda d: d["edges"][1].update(gate="warmup", warmup=0),
        "edges[n2->n1].warmup: must be in (0, 1]",
    ),
    "warmup negative": (lambda d: d["edges"][1].update(gate="warmup", warmup=-0.1), "edges[n2->n1].warmup"),
    "warmup above one": (lambda d: d["edges"][1].update(gate="warmup", warmup=1.01), "edges[n2->n1].warmup"),
    "warmup nan": (
        lambda d: d["edges"][1].update(gate="warmup", warmup=float("nan")),
        "edges[n2->n1].warmup",
    ),
    "warmup not a number": (
        lambda d: d["edges"][1].update(gate="warmup", warmup="0.1"),
        "edges[n2->n1].warmup",
    ),
    "warmup on a linear gate": (
        lambda d: d["edges"][1].update(warmup=0.5),
        "edges[n2->n1].warmup: only the warmup",
    ),
    "warmup on a through ce edge": (lambda d: d["edges"][0].update(warmup=0.5), "edges[label->n1].warmup"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_graphs_raise_one_line_naming_the_field(case):
    fn, needle = BAD[case]
    with pytest.raises(GraphError) as info:
        Graph.from_dict(mutate(fn))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [')
    with pytest.raises(GraphError, match="malformed JSON"):
        Graph.load(bad)
    with pytest.raises(GraphError, match="not found"):
        Graph.load(tmp_path / "nope.json")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(GraphError, match="one JSON object"):
        Graph.load(bad)


def test_literature_recipes_are_what_the_readme_says():
    dkd = Graph.load(EXAMPLES / "dkd.json")
    e = dkd.edges[1]
    assert (dkd.nodes["student"].model, dkd.nodes["teacher"].model, dkd.nodes["teacher"].frozen) == (
        "resnet8x4",
        "resnet32x4",
        True,
    )
    assert (e.terms, e.alpha, e.beta, e.temperature, e.gate) == (("dkd",), 1.0, 8.0, 4.0, "warmup")
    assert round(e.warmup * 240) == 20  # mdistiller's 20 of 240 epochs
    ls = Graph.load(EXAMPLES / "kd_ls.json")
    assert [(x.terms, x.weight, x.standardize) for x in ls.edges] == [
        (("ce",), 0.1, False),
        (("kl",), 9.0, True),
    ]
    assert ls.edges[1].temperature == 2.0
    # The README's command line decays the lr at mdistiller's epochs 150, 180 and 210 of 240.
    from ktfast.config import TrainConfig

    readme = (EXAMPLES.parent / "README.md").read_text().split("## Distillation recipes of the literature")[1]
    at = readme.split("--lr-decay-at ", 1)[1].split()[0]
    assert TrainConfig(epochs=240, lr_decay_at=tuple(map(float, at.split(",")))).milestones() == [
        150,
        180,
        210,
    ]
