"""How often does ASHA prune the best graph in its first rung? (issue 18)

    python examples/pruning_study.py run    [--root runs/pruning_study] [--nodes 2] [--models resnet8]
                                            [--epochs 6] [--trials 12] [--train-fraction 0.25]
    python examples/pruning_study.py replay [--root runs/pruning_study] [--orders 1000]

`run` is one 12-trial `ktfast search` on digits (a quarter of the search's training split, the
whole of its validation split) over all seven gates without pruning (`--pruner none`), so every
graph trains all its epochs and reports its search_val accuracy at each. `replay` then puts those
learning curves through Optuna's own ASHA pruner
(`SuccessiveHalvingPruner(min_resource=m, reduction_factor=2)`, as `ktfast search --min-resource m`
builds it), trial after trial as one worker would, for m = 1 and m = a third of the epochs: in the
search's order and in random orders of the same 12 trials (ASHA's decisions depend on the order in
which trials arrive). It prints, for each m, how often the best final graph is pruned, at which
epoch, the final accuracy of the best graph the pruned search keeps, and the epochs trained.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

GATES = "through,cutoff,linear,correct,negative_linear,gamma,negative_gamma"
STUDY = "gates-unpruned"


def run(root: Path, nodes: int, models: str, epochs: int, trials: int, fraction: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "ktfast",
        "search",
        "--nodes",
        str(nodes),
        "--target-model",
        "resnet8",
        "--models",
        models,
        "--gates",
        GATES,
        "--pruner",
        "none",
        "--trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--dataset",
        "digits",
        "--train-fraction",
        str(fraction),
        "--device",
        "cpu",
        "--quiet",
        "--storage",
        f"sqlite:///{root}/search.db",
        "--study",
        STUDY,
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def curves(root: Path) -> tuple[list[dict], list[dict]]:
    """({epoch: accuracy}, graph) of every complete trial, in trial order."""
    import optuna

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root}/search.db")
    done = sorted(
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number
    )
    return [dict(t.intermediate_values) for t in done], [t.user_attrs["graph"] for t in done]


def gates(graph: dict) -> str:
    return ", ".join(
        f"{e['from']}→{e['to']} {e['gate']}" + (f" γ={e['gamma']:g}" if "gamma" in e else "")
        for e in graph["edges"]
    )


def replay(trial_curves: list[dict], order: list[int], min_resource: int) -> dict:
    """{trial index: epoch it was pruned after} under ASHA with this first rung, one trial at a time."""
    import optuna

    epochs = max(trial_curves[0])
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=2),
    )
    pruned = {}
    for i in order:
        trial = study.ask()
        for epoch in range(1, epochs + 1):
            trial.report(trial_curves[i][epoch], epoch)
            # as ktfast search's objective: the last epoch is no decision
            if epoch < epochs and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned[i] = epoch
                break
        else:
            study.tell(trial, trial_curves[i][epochs])
    return pruned


def report(root: Path, n_orders: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_curves, graphs = curves(root)
    n, epochs = len(trial_curves), max(trial_curves[0])
    finals = [c[epochs] for c in trial_curves]
    best = max(range(n), key=lambda i: finals[i])
    print(
        f"{n} unpruned trials, {epochs} epochs; final search_val accuracy (%): "
        + ", ".join(f"{100 * f:.1f}" for f in finals)
    )
    print(
        f"best final graph: trial index {best}, {100 * finals[best]:.2f} %; its accuracy at epochs 1..{epochs}: "
        + ", ".join(f"{100 * trial_curves[best][e]:.1f}" for e in range(1, epochs + 1))
    )
    ranks_at_1 = sorted(range(n), key=lambda i: -trial_curves[i][1]).index(best) + 1
    print(f"its rank among the {n} at epoch 1: {ranks_at_1}; its gates: {gates(graphs[best])}")
    rng = random.Random(0)
    orders = [list(range(n))] + [rng.sample(range(n), n) for _ in range(n_orders)]
    print(
        "| first rung | best pruned, search's order | best pruned, random orders | pruned at epoch | "
        "best kept (mean final %) | epochs trained (mean, of " + str(n * epochs) + ") |"
    )
    print("|---|---|---|---|---|---|")
    for m in sorted({1, max(1, epochs // 3)}):
        results = [replay(trial_curves, order, m) for order in orders]
        lost = [r for r in results[1:] if best in r]
        at = Counter(r[best] for r in lost)
        kept = [max(finals[i] for i in range(n) if i not in r) for r in results[1:]]
        spent = [sum(r.get(i, epochs) for i in range(n)) for r in results[1:]]
        print(
            f"| epoch {m} | {'yes, at epoch ' + str(results[0][best]) if best in results[0] else 'no'} "
            f"| {len(lost)} / {len(orders) - 1} ({100 * len(lost) / (len(orders) - 1):.1f} %) "
            f"| {', '.join(f'{e}: {c}' for e, c in sorted(at.items())) or '–'} "
            f"| {100 * sum(kept) / len(kept):.2f} | {sum(spent) / len(spent):.1f} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "replay"])
    p.add_argument("--root", type=Path, default=Path("runs/pruning_study"))
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--models", default="resnet8", help="the other nodes' choices")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--train-fraction", type=float, default=0.25, help="of the search's training split")
    p.add_argument("--orders", type=int, default=1000, help="random trial orders replayed")
    args = p.parse_args(argv)
    if args.command == "run":
        run(args.root, args.nodes, args.models, args.epochs, args.trials, args.train_fraction)
    else:
        report(args.root, args.orders)


if __name__ == "__main__":
    main()
