"""`ktfast report --storage URL --study NAME -o study.png`: each trial by epoch (pruned ones ending at
their rung), the best so far, the parameters that matter most; a PNG that depends on the study; bad
storage or study exits 2 with one line and writes nothing."""

import random

import matplotlib.image
import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from test_search import postgres_url

from ktfast.cli import main
from ktfast.graph_search.study import open_storage
from ktfast.pictures.study_figure import MIN_IMPORTANCE_TRIALS, study_figure

EPOCHS = 4
SPACE = {
    "model n2": CategoricalDistribution(["resnet8", "resnet14"]),
    "gate label->n1": CategoricalDistribution(["through", "linear", "correct"]),
    "gate n2->n1": CategoricalDistribution(["through", "cutoff"]),
}


@pytest.fixture(autouse=True)
def quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(url: str, name: str, seed: int, trials: int = 12) -> optuna.Study:
    """A finished search without training: the gate n2->n1 decides the accuracy, every third trial
    is pruned at rung 1 or 2."""
    rng = random.Random(seed)
    study = optuna.create_study(storage=open_storage(url), study_name=name, direction="maximize")
    for i in range(trials):
        params = {k: rng.choice(d.choices) for k, d in SPACE.items()}
        final = 0.5 + 0.4 * (params["gate n2->n1"] == "through") + rng.uniform(0, 0.02)
        last = rng.choice([1, 2]) if i % 3 == 2 else EPOCHS
        values = {e: final * (0.6 + 0.4 * e / EPOCHS) for e in range(1, last + 1)}
        done = last == EPOCHS
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=SPACE,
                intermediate_values=values,
                state=TrialState.COMPLETE if done else TrialState.PRUNED,
                value=values[EPOCHS] if done else None,
            )
        )
    return study


def test_the_figure_draws_each_trial_by_epoch_the_best_so_far_and_what_matters(tmp_path):
    study = make_study(f"sqlite:///{tmp_path}/s.db", "s", seed=0)
    by_epoch, by_trial, params = study_figure(study).axes
    trials = study.get_trials()
    lines = {line.get_gid(): line for line in by_epoch.get_lines()}
    assert sorted(lines) == sorted(f"trial {t.number}" for t in trials)
    for t in trials:
        epochs = sorted(t.intermediate_values)
        assert list(lines[f"trial {t.number}"].get_xdata()) == epochs  # a pruned trial ends at its rung
        assert np.allclose(
            lines[f"trial {t.number}"].get_ydata(), [100 * t.intermediate_values[e] for e in epochs]
        )
    assert any(t.state == TrialState.PRUNED for t in trials)
    [best] = [line for line in by_trial.get_lines() if line.get_gid() == "best so far"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert list(best.get_xdata()) == [t.number for t in complete]
    assert np.allclose(best.get_ydata(), np.maximum.accumulate([100 * t.value for t in complete]))
    names = [label.get_text() for label in params.get_yticklabels()]
    assert sorted(names) == sorted(SPACE) and names[-1] == "gate n2->n1"  # the largest bar on top


def test_too_few_complete_trials_for_importance_are_said_not_drawn(tmp_path):
    study = make_study(f"sqlite:///{tmp_path}/s.db", "s", seed=0, trials=MIN_IMPORTANCE_TRIALS)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) < MIN_IMPORTANCE_TRIALS
    params = study_figure(study).axes[2]
    assert (
        not params.patches and f"needs {MIN_IMPORTANCE_TRIALS} complete trials" in params.texts[0].get_text()
    )


def storage(kind: str, tmp_path, tag: str) -> str:
    if kind == "postgres":
        return postgres_url()
    return f"sqlite:///{tmp_path}/{tag}.db" if kind == "sqlite" else f"journal:{tmp_path}/{tag}.log"


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgres"])
def test_report_draws_each_study_differently(kind, tmp_path, capsys):
    pictures = []
    for seed in (0, 1):
        url, name = storage(kind, tmp_path, f"seed{seed}"), f"study-{kind}-{seed}-{random.getrandbits(32):x}"
        make_study(url, name, seed)
        png = tmp_path / f"seed{seed}.png"
        assert main(["report", "--storage", url, "--study", name, "-o", str(png)]) == 0
        assert capsys.readouterr().out.strip() == str(png)
        pictures.append(matplotlib.image.imread(png))
    assert pictures[0].shape == pictures[1].shape and not np.array_equal(*pictures)
    assert not list(tmp_path.glob(".*.tmp"))


BAD = {
    "missing sqlite file": (["--storage", "sqlite:///missing.db", "--study", "s"], "no such file"),
    "missing journal file": (["--storage", "journal:missing.log", "--study", "s"], "no such file"),
    "unreachable server": (
        ["--storage", "postgresql://nobody@127.0.0.1:1/none", "--study", "s"],
        "--storage",
    ),
    "unknown study": (["--storage", "sqlite:///s.db", "--study", "other"], "'other'"),
    "no -o": (["--storage", "sqlite:///s.db", "--study", "s"], "-o"),
    "a run and a storage": (["somerun", "--storage", "sqlite:///s.db"], "exactly one"),
    "unknown picture format": (
        ["--storage", "sqlite:///s.db", "--study", "s", "-o", "study.xyz"],
        "study.xyz",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_report_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    make_study(f"sqlite:///{tmp_path}/s.db", "s", seed=0)
    extra, needle = BAD[case]
    output = [] if "-o" in extra or case == "no -o" else ["-o", "study.png"]
    assert main(["report", *extra, *output]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"]  # no picture, no new storage file


CHOICES = {
    "gate n2->n1": CategoricalDistribution(["through", "cutoff"]),
    "loss n2->n1": CategoricalDistribution(["dkd", "kl", "cos"]),
    "loss n1->n2": CategoricalDistribution(["dkd", "kl", "cos"]),
    "beta n2->n1": CategoricalDistribution([1.0, 2.0, 4.0, 8.0]),
    "beta n1->n2": CategoricalDistribution([1.0, 2.0, 4.0, 8.0]),
    "standardize n2->n1": CategoricalDistribution([False, True]),
    "standardize n1->n2": CategoricalDistribution([False, True]),
}


def test_the_loss_choices_are_drawn_with_the_mean_objective_of_the_edges_that_drew_each(tmp_path):
    """A search of `--losses dkd,kl,cos --standardize search` (parameters as ktfast.search draws them:
    β only with dkd, standardize only with dkd or kl): a fourth panel, one row per value, its ◆ at the
    mean objective over the edges that drew it, counted once per edge."""
    rng = random.Random(0)
    study = optuna.create_study(
        storage=open_storage(f"sqlite:///{tmp_path}/s.db"), study_name="s", direction="maximize"
    )
    study.set_user_attr("ktfast", {"losses": ["dkd", "kl", "cos"], "standardize": "search"})
    for i in range(10):
        params = {"gate n2->n1": rng.choice(["through", "cutoff"])}
        for edge in ("n2->n1", "n1->n2"):
            loss = params[f"loss {edge}"] = rng.choice(["dkd", "kl", "cos"])
            if loss == "dkd":
                params[f"beta {edge}"] = rng.choice([1.0, 2.0, 4.0, 8.0])
            if loss != "cos":
                params[f"standardize {edge}"] = rng.choice([False, True])
        value = rng.uniform(0.5, 0.9)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: CHOICES[k] for k in params},
                intermediate_values={1: value},
                state=TrialState.COMPLETE if i % 4 else TrialState.PRUNED,
                value=value if i % 4 else None,
            )
        )
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    expected = {}
    for t in complete:  # the rows, from the parameters as written
        for name, v in t.params.items():
            kind = name.split()[0]
            row = (
                f"loss {v}"
                if kind == "loss"
                else f"dkd β {v:g}"
                if kind == "beta"
                else f"standardize {'on' if v else 'off'}"
                if kind == "standardize"
                else None
            )
            if row:
                expected.setdefault(row, []).append(100 * t.value)
    assert {"loss dkd", "loss kl", "standardize off", "standardize on"} <= set(expected)
    assert any(r.startswith("dkd β") for r in expected)
    choices = study_figure(study).axes[3]
    marks = {line.get_gid(): line for line in choices.get_lines()}
    assert sorted(marks) == sorted(f"choice {row}" for row in expected)
    for row, values in expected.items():
        assert marks[f"choice {row}"].get_xdata()[0] == pytest.approx(sum(values) / len(values), rel=1e-12)
    labels = [label.get_text() for label in choices.get_yticklabels()][::-1]  # top row first
    listed = [r for r in ("loss dkd", "loss kl", "loss cos") if r in expected]  # in the order of --losses
    steps = sorted(r for r in expected if r.startswith("dkd β"))
    order = [
        *listed,
        *[r for r in ("standardize off", "standardize on") if r in expected],
        *sorted(steps, key=lambda r: float(r.split()[-1])),
    ]
    assert labels == [f"{row} ({len(expected[row])})" for row in order]


def test_a_search_without_loss_choices_keeps_three_panels_and_says_a_fixed_standardize(tmp_path):
    study = make_study(f"sqlite:///{tmp_path}/s.db", "s", seed=0)
    assert len(study_figure(study).axes) == 3
    study.set_user_attr("ktfast", {"losses": None, "standardize": "on"})
    fig = study_figure(study, "study s")
    assert len(fig.axes) == 3 and "standardize on" in fig.get_suptitle()
