"""T and weights in the search (issue 25, item 3): `--temperatures 1,2,4 --weights 0.1:10` draw the
temperature of every model-to-model edge whose loss reads one from the list and its weight
log-uniformly from the range; the export writes them and `ktfast train` accepts it; the study picture
shows them; bad lists and ranges exit 2 with one line; a study is joined only with the same choices."""

import json
import math
import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from test_search import SEARCH, load, study_of

from ktfast.args import UsageError
from ktfast.cli import main
from ktfast.graph import LABEL, TEMPERED_TERMS, Graph
from ktfast.graph_search.search import Space
from ktfast.graph_search.study import open_storage
from ktfast.pictures.study_figure import study_figure

pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")
TINY = "synthetic:classes=4,size=16,train=96,test=40"


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_sampling_draws_t_where_the_loss_reads_it_and_weights_log_uniformly_on_transfer_edges():
    """300 graphs of 3 nodes (6 transfer edges each, half of them on). Log-uniform on [0.1, 10] puts half
    the weights below 1 (a uniform draw would put 0.9/9.9 = 9 % there); over n ≥ 600 transfer edges the
    binomial sd of that fraction is ≤ 0.5/√600 = 0.02, so the bound 0.5 ± 0.1 is 5 sd wide and fails
    only for another distribution."""
    losses = ("kl", "cos", "dkd+att_mse", "dist")
    space = Space(
        3,
        "resnet8",
        ("resnet8",),
        ("through", "cutoff"),
        losses,
        "target",
        temperatures=(1.0, 2.0, 4.0),
        weights=(0.1, 10.0),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    weights, temperatures = [], set()
    for i in range(300):
        trial = study.ask()
        spec = space.sample(trial, f"t{i}")
        graph = {(e.source, e.target): e for e in Graph.from_dict(spec).edges}  # every sampled graph is valid
        for e in spec["edges"]:
            s, t, on = e["from"], e["to"], e["gate"] != "cutoff"
            transfer = on and s != LABEL
            tempered = transfer and any(term in TEMPERED_TERMS for term in e["loss"].split("+"))
            assert ("weight" in e) == (f"weight {s}->{t}" in trial.params) == transfer
            assert ("temperature" in e) == (f"temperature {s}->{t}" in trial.params) == tempered
            if transfer:
                assert e["weight"] == trial.params[f"weight {s}->{t}"] == graph[s, t].weight
                assert 0.1 <= e["weight"] <= 10
                weights.append(e["weight"])
            if tempered:
                assert e["temperature"] == trial.params[f"temperature {s}->{t}"] == graph[s, t].temperature
                temperatures.add(e["temperature"])
        study.tell(trial, 0.0)
    assert temperatures == {1.0, 2.0, 4.0}
    assert len(weights) >= 600
    assert abs(sum(w < 1 for w in weights) / len(weights) - 0.5) < 0.1


def test_searched_t_and_weights_are_exported_and_the_export_trains(tmp_path, capsys):
    """The acceptance: a trial with T 4 and weight 0.25 on n2->n1, T 2 and weight 3 on n1->n2, run in this
    process as a worker runs it (the space as the worker reads it from its spec); the exported graph
    holds them and `ktfast train` trains exactly that graph."""
    from ktfast.args import config_from_args
    from ktfast.cli import build_parser
    from ktfast.commands.search import space_from_args
    from ktfast.graph_search.search import objective

    url, name = f"sqlite:///{tmp_path}/s.db", "tw"
    recipe = ["--dataset", TINY, "--batch-size", "16", "--device", "cpu", "--quiet"]
    cli = [
        *SEARCH[:2],
        "2",
        *SEARCH[3:7],
        "--gates",
        "through",
        "--temperatures",
        "1,2,4",
        "--weights",
        "0.1:10",
        "--epochs",
        "1",
        "--trials",
        "1",
        "--storage",
        url,
        "--study",
        name,
        *recipe,
    ]
    first = {
        "model n2": "resnet8",
        "gate label->n1": "through",
        "gate n2->n1": "through",
        "weight n2->n1": 0.25,
        "temperature n2->n1": 4.0,
        "gate label->n2": "through",
        "gate n1->n2": "through",
        "weight n1->n2": 3.0,
        "temperature n1->n2": 2.0,
    }
    study = study_of(cli)
    study.enqueue_trial(first)
    args = build_parser().parse_args(cli)
    space = Space.from_dict(json.loads(json.dumps(space_from_args(args).to_dict())))  # the worker's spec
    assert space == space_from_args(args)
    cfg = config_from_args(args).replace(split="search")
    study.optimize(lambda t: objective(t, space, cfg, 1), n_trials=1)
    [trial] = load(url, name).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params == first
    assert main(["export", "--storage", url, "--study", name, "-o", "g.json"]) == 0
    edges = {(e["from"], e["to"]): e for e in json.loads((tmp_path / "g.json").read_text())["edges"]}
    assert edges["n2", "n1"] == {
        "from": "n2",
        "to": "n1",
        "loss": "kl",
        "gate": "through",
        "weight": 0.25,
        "temperature": 4.0,
        "standardize": False,
    }
    assert edges["n1", "n2"]["weight"] == 3.0 and edges["n1", "n2"]["temperature"] == 2.0
    assert "weight" not in edges["label", "n1"] and "temperature" not in edges["label", "n1"]
    assert main(["train", "--graph", "g.json", "--epochs", "1", "--out", "run", *recipe]) == 0
    trained = {(e.source, e.target): e for e in Graph.load(tmp_path / "run" / "graph.json").edges}
    assert (trained["n2", "n1"].weight, trained["n2", "n1"].temperature) == (0.25, 4.0)
    assert (trained["n1", "n2"].weight, trained["n1", "n2"].temperature) == (3.0, 2.0)


BAD = {
    "temperature zero": (["--temperatures", "1,0"], "every temperature must be > 0, got 0.0"),
    "temperature negative": (["--temperatures", "-2"], "must be > 0, got -2.0"),
    "temperature not a number": (["--temperatures", "1,hot"], "--temperatures"),
    "weights reversed": (["--weights", "10:0.1"], "--weights"),
    "weights from zero": (["--weights", "0:1"], "--weights"),
    "weights without a colon": (["--weights", "1"], "--weights"),
    "weights not numbers": (["--weights", "a:b"], "--weights"),
    "weights with one node": (["--nodes", "1", "--weights", "0.1:10"], "1-node"),
    "temperatures without a tempered loss": (
        ["--losses", "cos,mse", "--temperatures", "1,2"],
        "--temperatures",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_temperatures_and_weights_exit_2_with_one_line(case, tmp_path, capsys):
    extra, needle = BAD[case]
    assert main([*SEARCH, "--trials", "2", "--storage", f"sqlite:///{tmp_path}/s.db", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "s.db").exists()


def test_a_study_is_joined_only_with_the_same_temperatures_and_weights(tmp_path):
    cli = [*SEARCH, "--trials", "2", "--storage", f"sqlite:///{tmp_path}/s.db", "--study", "s"]
    study_of(cli)  # made without them: they are recorded as nothing, a search without them joins
    study_of(cli)
    for extra, needle in (
        (["--weights", "0.1:10"], "weights=None, not [0.1, 10.0]"),
        (["--temperatures", "1,2"], "temperatures=None, not [1.0, 2.0]"),
    ):
        with pytest.raises(UsageError, match=re.escape(needle)):
            study_of([*cli, *extra])


def test_the_study_picture_shows_each_t_and_each_weight_against_the_objective(tmp_path):
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path}/s.db"), study_name="s", direction="maximize"
    )
    study.set_user_attr("ktfast", {"losses": None, "temperatures": [1.0, 4.0], "weights": [0.1, 10.0]})
    dists = {
        "temperature n2->n1": CategoricalDistribution([1.0, 4.0]),
        "weight n2->n1": FloatDistribution(0.1, 10.0, log=True),
    }
    drawn = [
        (1.0, 0.2, 0.6),
        (4.0, 5.0, 0.8),
        (4.0, 1.5, 0.7),
        (1.0, 0.5, None),
    ]  # T, weight, value (None: pruned)
    for t, w, value in drawn:
        study.add_trial(
            optuna.trial.create_trial(
                params={"temperature n2->n1": t, "weight n2->n1": w},
                distributions=dists,
                intermediate_values={1: 0.5},
                state=TrialState.COMPLETE if value is not None else TrialState.PRUNED,
                value=value,
            )
        )
    fig = study_figure(study)
    assert len(fig.axes) == 5
    marks = {line.get_gid(): line.get_xdata()[0] for line in fig.axes[3].get_lines()}
    assert marks == pytest.approx({"choice T 1": 60.0, "choice T 4": 75.0}, rel=1e-12)
    [points] = [c for c in fig.axes[4].collections if c.get_gid() == "weights"]
    offsets = sorted(map(tuple, points.get_offsets().tolist()))  # complete trials only
    assert [w for w, _ in offsets] == [0.2, 1.5, 5.0]
    assert [v for _, v in offsets] == pytest.approx([60.0, 70.0, 80.0], rel=1e-12)
    assert fig.axes[4].get_xscale() == "log" and not math.isnan(fig.axes[4].get_xlim()[0])
