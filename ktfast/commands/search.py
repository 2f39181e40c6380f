"""`ktfast search` and `ktfast export` (ARCHITECTURE §6, §7): the search's flags, run by `ktfast.graph_search.session`
as `ktfast.search` runs them, and the best graph written as a graph file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from optuna.trial import TrialState

from ktfast.args import UsageError, add_recipe_args, positive_int
from ktfast.graph import Graph
from ktfast.graph.gates import DEFAULT_GATES, DRAWABLE_GATES, GAMMA_GATES
from ktfast.graph.loss_kinds import TEMPERED_TEXT
from ktfast.graph_search.packing import PACKS
from ktfast.graph_search.search import (
    BETAS,
    DEFAULT_MODELS,
    GAMMAS,
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    STANDARDIZE,
)
from ktfast.graph_search.session import SEARCH_OPTIONS, counted, run_search, space_from_args  # noqa: F401 (tests)
from ktfast.graph_search.study import DEFAULT_STORAGE, find_study
from ktfast.graph_search.workers import summary


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="search the graph that maximises the target's (or the ensemble's) validation accuracy"
    )
    _add_space_args(p)
    _add_run_args(p)
    add_recipe_args(p)
    p.set_defaults(func=cmd_search, **{k: v for k, v in SEARCH_OPTIONS.items() if v is not None})

    p = sub.add_parser("export", help="write a searched graph (the best complete trial) as a graph file")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study", help="default: the storage's only study")
    p.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    p.add_argument("-o", "--output", required=True, help="graph file to write")
    p.set_defaults(func=cmd_export)


def _add_space_args(p) -> None:
    """What is searched: the nodes, and the choices of every edge."""
    p.add_argument(
        "--nodes", type=positive_int, required=True, help="number of model nodes, the target included"
    )
    p.add_argument("--target-model", required=True, help="model of node 1, the target (the papers: resnet32)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="choices for the other nodes")
    p.add_argument(
        "--gates",
        default=",".join(DEFAULT_GATES),
        help=f"choices for every edge, label edges included, of "
        f"{', '.join(DRAWABLE_GATES)} (default: %(default)s); an edge given "
        f"{' or '.join(GAMMA_GATES)} also draws γ from {GAMMAS}",
    )
    p.add_argument(
        "--losses",
        default=None,
        help="choices for every model-to-model edge, any loss "
        "expressions, e.g. kl,cos,att_mse,att_cos,kl+att_mse,cos+att_cos or kl,dkd,dist,dkd+att_mse "
        f"(default: kl only); an edge given a dkd term also draws β from {BETAS} (α = 1)",
    )
    p.add_argument(
        "--standardize",
        choices=STANDARDIZE,
        default="off",
        help=f"logit standardization of the edges whose loss has a {TEMPERED_TEXT} term: never, always, "
        "or one more choice per such edge (default: %(default)s)",
    )
    p.add_argument(
        "--temperatures",
        metavar="T1,T2,...",
        help=f"choices of the temperature of every model-to-model edge whose loss has a {TEMPERED_TEXT} "
        "term, e.g. 1,2,4 (default: T = 1)",
    )
    p.add_argument(
        "--weights",
        metavar="LOW:HIGH",
        help="the weight of every model-to-model edge, drawn log-uniformly from LOW to HIGH, e.g. "
        "0.1:10 (default: weight 1; label edges always 1)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="target",
        help="the accuracy of node 1, or of an ensemble node (mean of all nodes' logits)",
    )


def _add_run_args(p) -> None:
    """How the search runs: its trials, their workers and packing, the study, pruner and sampler."""
    p.add_argument(
        "--trials",
        type=positive_int,
        required=True,
        help="finished (complete or pruned) trials the study must have; re-running resumes",
    )
    p.add_argument("--gpus", help="GPU ids as CUDA_VISIBLE_DEVICES takes them (default: all visible)")
    p.add_argument(
        "--trials-per-gpu", type=positive_int, help="trials at once on each GPU (default 1; see --pack)"
    )
    p.add_argument("--workers", type=positive_int, help="CPU workers (--device cpu; default 1)")
    p.add_argument(
        "--pack",
        choices=PACKS,
        help="how the K trials of a GPU (or the CPU workers) run: as processes "
        "(time-sliced), as threads of one process on their own CUDA streams, or as processes through "
        "a CUDA MPS daemon started for the search (default: mps for K > 1 on GPUs, falling back to "
        "processes where MPS cannot run; else processes)",
    )
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="sqlite:///FILE (default %(default)s), journal:FILE or FILE.log, postgresql://…",
    )
    p.add_argument("--study", help="study name (default: DATASET-Nn-TARGET_MODEL-OBJECTIVE)")
    p.add_argument("--pruner", choices=PRUNERS, default="asha")
    p.add_argument(
        "--min-resource",
        type=positive_int,
        default=1,
        metavar="N",
        help="epoch of the pruner's first decision: ASHA's rungs at N, 2N, 4N, … (default 1)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="random")
    p.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        default=60,
        metavar="S",
        help="seconds between a worker's heartbeats (SQLite, PostgreSQL)",
    )
    p.add_argument(
        "--grace-period",
        type=positive_int,
        default=None,
        metavar="S",
        help="seconds without a heartbeat before a trial is failed and retried (default: twice the interval)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_search(args) -> int:
    study = run_search(args, args.quiet)
    print(summary(study, args.storage, args.trials), flush=True)
    done = counted(study)
    if done < args.trials:
        print(
            f"ktfast: the workers stopped with {done} of {args.trials} trials finished; run the same command "
            f"again to resume",
            file=sys.stderr,
        )
        return 1
    return 0


# ---- export ----------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    study = find_study(args.storage, args.study)
    name = study.study_name
    if args.trial is None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise UsageError(f"--study {name}: no complete trial yet")
        trial = max(complete, key=lambda t: t.value)
    else:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == args.trial), None)
        if trial is None:
            raise UsageError(f"--trial: study {name} has no trial {args.trial}")
    if "graph" not in trial.user_attrs:
        raise UsageError(f"--trial: trial {trial.number} of {name} holds no graph")
    value = f"{trial.value:.2%} on search_val" if trial.value is not None else trial.state.name.lower()
    graph = dict(
        trial.user_attrs["graph"], description=f"ktfast search, study {name}, trial {trial.number}: {value}"
    )
    Graph.from_dict(graph)  # what `ktfast train` will check
    try:
        Path(args.output).write_text(json.dumps(graph, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"-o: cannot write {args.output}: {e.strerror}") from None
    print(f"wrote {args.output}: trial {trial.number} of {name}, {value}")
    return 0
