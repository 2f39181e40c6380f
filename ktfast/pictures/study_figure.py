"""A search drawn (`ktfast report --storage URL --study NAME -o study.png`): every finished trial's
objective by epoch, pruned trials ending at their rung; the objective of each trial in the order they
were started, with the best so far; the parameters that mattered most, by Optuna's importance
evaluator (fANOVA, seeded: the same study gives the same picture); when the search chose the loss
design of its edges (`--losses`, `--standardize`, `--temperatures`), how each loss, standardization, DKD β
and temperature fared; and when it drew edge weights (`--weights`), each weight against the objective.
matplotlib is imported inside the function that draws."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

MIN_IMPORTANCE_TRIALS = 8  # complete trials: below that, fANOVA's forest ranks noise
TOP_PARAMS = 12
COMPLETE, PRUNED = "C0", "0.55"  # colours
# The trial parameters of an edge's loss design (ktfast.graph_search.search.Space): prefix -> row label of a value.
CHOICE_PARAMS = {
    "loss ": lambda v: f"loss {v}",
    "standardize ": lambda v: f"standardize {'on' if v else 'off'}",
    "beta ": lambda v: f"dkd β {v:g}",
    "temperature ": lambda v: f"T {v:g}",
}
WEIGHT = "weight "  # the parameter of an edge's weight, drawn log-uniformly


def importances(study: optuna.Study) -> dict[str, float] | None:
    """{parameter: importance}, the largest first; None with too few complete trials to tell."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def loss_choices(study: optuna.Study) -> dict[str, list[float]]:
    """{row: the objective of every complete trial, once per edge that chose it}: losses in the order
    the search listed them, then standardize off/on, then β ascending, then T ascending. An edge is
    one draw of a choice: a trial whose three edges chose dkd counts three times for dkd."""
    listed = study.user_attrs.get("ktfast", {}).get("losses") or ()
    rows: dict[str, list[float]] = {}
    keys = {}  # row -> (kind of parameter, place in --losses, value): the order of the rows
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for name, value in t.params.items():
            kind = next((i for i, p in enumerate(CHOICE_PARAMS) if name.startswith(p)), None)
            if kind is not None:
                label = list(CHOICE_PARAMS.values())[kind](value)
                rows.setdefault(label, []).append(t.value)
                keys[label] = (kind, listed.index(value) if value in listed else len(listed), value)
    return {label: rows[label] for label in sorted(rows, key=keys.get)}


def _draw_choices(ax, study: optuna.Study) -> None:
    rows = loss_choices(study)
    if not rows:
        ax.text(
            0.5, 0.5, "no complete trial chose a loss yet", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_axis_off()
        return
    labels = list(rows)[::-1]  # the first row on top
    for y, label in enumerate(labels):
        values = [100 * v for v in rows[label]]
        ax.scatter(values, [y] * len(values), color=COMPLETE, alpha=0.25, s=12)
        ax.plot([sum(values) / len(values)], [y], "D", color="C3", gid=f"choice {label}")
    ax.set_yticks(range(len(labels)), [f"{label} ({len(rows[label])})" for label in labels], fontsize=8)
    ax.set(xlabel="objective (%) of complete trials", title="loss choices, each edge that drew one: ◆ mean")


def _draw_weights(ax, study: optuna.Study) -> None:
    """Each edge weight a complete trial drew against the trial's objective, on a log axis."""
    points = [
        (value, 100 * t.value)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for name, value in t.params.items()
        if name.startswith(WEIGHT)
    ]
    if points:
        ax.scatter(*zip(*points), color=COMPLETE, alpha=0.5, s=14, gid="weights")
    ax.set_xscale("log")
    ax.set(
        xlabel="edge weight (log)",
        ylabel="objective (%) of complete trials",
        title=f"edge weights, each edge that drew one ({len(points)})",
    )


def study_figure(study: optuna.Study, title: str = ""):
    """Three panels: objective (%) by epoch, objective (%) by trial with the best so far, parameter
    importances; one more, the loss choices, when the search chose them, and one more, the edge weights,
    when it drew them. Lines carry `gid`s ("trial N", "best so far", "choice ROW", "weights") so that
    what is drawn can be checked."""
    from matplotlib.figure import Figure

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    space = study.user_attrs.get("ktfast", {})
    chose = (
        bool(space.get("losses"))
        or space.get("standardize") == "search"
        or bool(space.get("temperatures"))
        or any(name.startswith(tuple(CHOICE_PARAMS)) for t in trials for name in t.params)
    )
    weighed = bool(space.get("weights")) or any(name.startswith(WEIGHT) for t in trials for name in t.params)
    panels = 3 + chose + weighed
    fig = Figure(figsize=(16 + 5 * (panels - 3), 5), layout="constrained")
    axes = fig.subplots(1, panels, width_ratios=(1, 1, 1.1, 1.1, 1.1)[:panels])
    if chose:
        _draw_choices(axes[3], study)
    if weighed:
        _draw_weights(axes[-1], study)
    _draw_by_epoch(axes[0], trials)
    done = _draw_by_trial(axes[1], trials)
    _draw_importances(axes[2], study, len(done))
    if space.get("standardize") == "on":  # fixed, so no panel shows it
        title = f"{title} (standardize on: every kl, dkd or dist edge)".lstrip()
    fig.suptitle(title, fontsize=11)
    return fig


def _draw_by_epoch(ax, trials: list) -> None:
    for t in trials:
        epochs = sorted(t.intermediate_values)
        values = [100 * t.intermediate_values[e] for e in epochs]
        pruned = t.state == TrialState.PRUNED
        ax.plot(
            epochs,
            values,
            color=PRUNED if pruned else COMPLETE,
            linewidth=0.8 if pruned else 1.3,
            alpha=0.7 if pruned else 0.9,
            marker="x" if pruned else None,
            markevery=[len(epochs) - 1],
            gid=f"trial {t.number}",
        )
    ax.set(xlabel="epoch", ylabel="objective (%)", title="each trial by epoch (grey: pruned at its rung)")
    ax.xaxis.get_major_locator().set_params(integer=True)


def _draw_by_trial(ax, trials: list) -> list:
    """Each trial's objective (a pruned one's at its rung) and the best so far; the complete trials."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    stopped = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if stopped:
        ax.scatter(
            [t.number for t in stopped],
            [100 * t.intermediate_values[max(t.intermediate_values)] for t in stopped],
            color=PRUNED,
            marker="x",
            s=18,
            label="pruned (at its rung)",
        )
    ax.scatter(
        [t.number for t in done], [100 * t.value for t in done], color=COMPLETE, s=18, label="complete"
    )
    best, running = [], float("-inf")
    for t in done:
        running = max(running, 100 * t.value)
        best.append(running)
    ax.step([t.number for t in done], best, where="post", color="C3", gid="best so far", label="best so far")
    ax.set(xlabel="trial", ylabel="objective (%)", title="objective by trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="lower right")
    return done


def _draw_importances(ax, study: optuna.Study, complete: int) -> None:
    found = importances(study)
    if found:
        names = list(found)[:TOP_PARAMS][::-1]
        ax.barh(names, [found[n] for n in names], color="C2")
        ax.set(xlabel="importance (fANOVA)", title="parameters that matter most")
        ax.tick_params(axis="y", labelsize=8)
    else:
        why = (
            f"parameter importance needs {MIN_IMPORTANCE_TRIALS} complete trials,\nthe study has {complete}"
            if found is None
            else "no parameter is shared by every complete trial"
        )
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
