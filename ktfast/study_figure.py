"""A search drawn (`ktfast report --storage URL --study NAME -o study.png`): every finished trial's
objective by epoch, pruned trials ending at their rung; the objective of each trial in the order they
were started, with the best so far; and the parameters that mattered most, by Optuna's importance
evaluator (fANOVA, seeded: the same study gives the same picture). matplotlib is imported inside the
function that draws."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

MIN_IMPORTANCE_TRIALS = 8  # complete trials: below that, fANOVA's forest ranks noise
TOP_PARAMS = 12
COMPLETE, PRUNED = "C0", "0.55"  # colours


def importances(study: optuna.Study) -> dict[str, float] | None:
    """{parameter: importance}, the largest first; None with too few complete trials to tell."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def study_figure(study: optuna.Study, title: str = ""):
    """Three panels: objective (%) by epoch, objective (%) by trial with the best so far, parameter
    importances. Lines carry `gid`s ("trial N", "best so far") so that what is drawn can be checked."""
    from matplotlib.figure import Figure

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    fig = Figure(figsize=(16, 5), layout="constrained")
    by_epoch, by_trial, params = fig.subplots(1, 3, width_ratios=(1, 1, 1.1))

    for t in trials:
        epochs = sorted(t.intermediate_values)
        values = [100 * t.intermediate_values[e] for e in epochs]
        pruned = t.state == TrialState.PRUNED
        by_epoch.plot(epochs, values, color=PRUNED if pruned else COMPLETE, linewidth=0.8 if pruned else 1.3,
                      alpha=0.7 if pruned else 0.9, marker="x" if pruned else None, markevery=[len(epochs) - 1],
                      gid=f"trial {t.number}")
    by_epoch.set(xlabel="epoch", ylabel="objective (%)", title="each trial by epoch (grey: pruned at its rung)")
    by_epoch.xaxis.get_major_locator().set_params(integer=True)

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    stopped = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if stopped:
        by_trial.scatter([t.number for t in stopped], [100 * t.intermediate_values[max(t.intermediate_values)]
                                                       for t in stopped], color=PRUNED, marker="x", s=18,
                         label="pruned (at its rung)")
    by_trial.scatter([t.number for t in done], [100 * t.value for t in done], color=COMPLETE, s=18, label="complete")
    best, running = [], float("-inf")
    for t in done:
        running = max(running, 100 * t.value)
        best.append(running)
    by_trial.step([t.number for t in done], best, where="post", color="C3", gid="best so far", label="best so far")
    by_trial.set(xlabel="trial", ylabel="objective (%)", title="objective by trial")
    by_trial.xaxis.get_major_locator().set_params(integer=True)
    by_trial.legend(fontsize=8, loc="lower right")

    found = importances(study)
    if found:
        names = list(found)[:TOP_PARAMS][::-1]
        params.barh(names, [found[n] for n in names], color="C2")
        params.set(xlabel="importance (fANOVA)", title="parameters that matter most")
        params.tick_params(axis="y", labelsize=8)
    else:
        why = (f"parameter importance needs {MIN_IMPORTANCE_TRIALS} complete trials,\nthe study has {len(done)}"
               if found is None else "no parameter is shared by every complete trial")
        params.text(0.5, 0.5, why, ha="center", va="center", transform=params.transAxes)
        params.set_axis_off()
    fig.suptitle(title, fontsize=11)
    return fig
