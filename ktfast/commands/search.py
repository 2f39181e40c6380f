"""`ktfast search` and `ktfast export` (DESIGN §6, §7): the search space from the flags, the workers
launched and watched until the study has its trials, and the best graph written as a graph file."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from optuna.trial import TrialState

from ktfast.args import UsageError, add_recipe_args, config_from_args, positive_int
from ktfast.data import dataset_info
from ktfast.config import TrainConfig
from ktfast.graph import ATTENTION_TERMS, DEFAULT_CROPS, GATES, LOSS_TERMS, Graph
from ktfast.packing import PACKS
from ktfast.search import (BETAS, COUNTED, DEFAULT_GATES, DEFAULT_MODELS, GAMMAS, OBJECTIVES, PRUNERS, SAMPLERS,
                           STANDARDIZE, Space, run_workers, summary)
from ktfast.study import DEFAULT_STORAGE, find_study, open_storage, open_study


def register(sub) -> None:
    p = sub.add_parser("search", help="search the graph that maximises the target's (or the ensemble's) "
                       "validation accuracy")
    p.add_argument("--nodes", type=positive_int, required=True, help="number of model nodes, the target included")
    p.add_argument("--target-model", required=True, help="model of node 1, the target (the papers: resnet32)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="choices for the other nodes")
    p.add_argument("--gates", default=",".join(DEFAULT_GATES),
                   help=f"choices for every edge, label edges included, of "
                        f"{', '.join(g for g in GATES if g != 'warmup')} (default: %(default)s); an edge given gamma or "
                        f"negative_gamma also draws γ from {GAMMAS}")
    p.add_argument("--losses", default=None, help="choices for every model-to-model edge, any loss "
                   "expressions, e.g. kl,cos,att_mse,att_cos,kl+att_mse,cos+att_cos or kl,dkd,dist,dkd+att_mse "
                   f"(default: kl only); an edge given a dkd term also draws β from {BETAS} (α = 1)")
    p.add_argument("--standardize", choices=STANDARDIZE, default="off",
                   help="logit standardization of the edges whose loss has a kl, dkd or dist term: never, always, "
                        "or one more choice per such edge (default: %(default)s)")
    p.add_argument("--temperatures", type=temperature_list, default=None, metavar="T1,T2,...",
                   help="choices of the temperature of every model-to-model edge whose loss has a kl, dkd or dist "
                        "term, e.g. 1,2,4 (default: T = 1)")
    p.add_argument("--weights", type=weight_range, default=None, metavar="LOW:HIGH",
                   help="the weight of every model-to-model edge, drawn log-uniformly from LOW to HIGH, e.g. "
                        "0.1:10 (default: weight 1; label edges always 1)")
    p.add_argument("--objective", choices=OBJECTIVES, default="target",
                   help="the accuracy of node 1, or of an ensemble node (mean of all nodes' logits)")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="finished (complete or pruned) trials the study must have; re-running resumes")
    p.add_argument("--gpus", help="GPU ids as CUDA_VISIBLE_DEVICES takes them (default: all visible)")
    p.add_argument("--trials-per-gpu", type=positive_int, help="trials at once on each GPU (default 1; see --pack)")
    p.add_argument("--workers", type=positive_int, help="CPU workers (--device cpu; default 1)")
    p.add_argument("--pack", choices=PACKS, help="how the K trials of a GPU (or the CPU workers) run: as processes "
                   "(time-sliced), as threads of one process on their own CUDA streams, or as processes through "
                   "a CUDA MPS daemon started for the search (default: mps for K > 1 on GPUs, falling back to "
                   "processes where MPS cannot run; else processes)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="sqlite:///FILE (default %(default)s), journal:FILE or FILE.log, postgresql://…")
    p.add_argument("--study", help="study name (default: DATASET-Nn-TARGET_MODEL-OBJECTIVE)")
    p.add_argument("--pruner", choices=PRUNERS, default="asha")
    p.add_argument("--min-resource", type=positive_int, default=1, metavar="N",
                   help="epoch of the pruner's first decision: ASHA's rungs at N, 2N, 4N, … (default 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default="random")
    p.add_argument("--heartbeat-interval", type=positive_int, default=60, metavar="S",
                   help="seconds between a worker's heartbeats (SQLite, PostgreSQL)")
    p.add_argument("--grace-period", type=positive_int, default=None, metavar="S",
                   help="seconds without a heartbeat before a trial is failed and retried (default: twice the "
                        "interval)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_recipe_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a searched graph (the best complete trial) as a graph file")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study", help="default: the storage's only study")
    p.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    p.add_argument("-o", "--output", required=True, help="graph file to write")
    p.set_defaults(func=cmd_export)


def _listed(flag: str, text: str, valid, noun: str, expected: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    for item in items:
        if not valid(item):
            raise UsageError(f"{flag}: unknown {noun} {item!r} (expected {expected})")
    return items


def temperature_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(dict.fromkeys(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"every temperature must be > 0, got {bad[0] if bad else text!r}")
    return values


def weight_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        bounds = (float(low), float(high)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None or not all(map(math.isfinite, bounds)) or not 0 < bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError(f"expected a range LOW:HIGH with 0 < LOW < HIGH, e.g. 0.1:10, got {text!r}")
    return bounds


def _pair_loss(loss: str) -> bool:
    terms = loss.split("+")
    return len(set(terms)) == len(terms) and all(t in LOSS_TERMS and t != "ce" for t in terms)


def space_from_args(args) -> Space:
    from ktfast.models import MODEL_NAMES, is_model_name

    models = ", ".join(MODEL_NAMES)
    if not is_model_name(args.target_model):
        raise UsageError(f"--target-model: unknown model {args.target_model!r} (expected one of {models})")
    space = Space(
        nodes=args.nodes, target_model=args.target_model,
        models=_listed("--models", args.models, is_model_name, "model", f"one of {models}"),
        gates=_listed("--gates", args.gates, GATES.__contains__, "gate", ", ".join(GATES)),
        losses=_listed("--losses", args.losses, _pair_loss, "loss", "kl, cos, mse, att_mse, att_cos, dkd, dist or "
                       "a sum such as kl+att_mse") if args.losses is not None else None,
        objective=args.objective, standardize=args.standardize, temperatures=args.temperatures,
        weights=args.weights)
    if "warmup" in space.gates:  # every trial's graph would be refused, and its worker stopped
        raise UsageError("--gates: the warmup gate needs its fraction of the run, which the search does not draw; "
                         "use linear or gamma")
    if space.objective == "target" and space.gates == ("cutoff",):
        raise UsageError("--gates: with cutoff alone every edge into the target is cut off, and the target frozen")
    if space.nodes == 1 and (space.temperatures or space.weights):
        raise UsageError(f"--{'temperatures' if space.temperatures else 'weights'}: a 1-node search has label edges "
                         "only, and they keep T = 1 and weight 1")
    if space.temperatures and not space.allows_standardize():
        raise UsageError(f"--temperatures: only edges with a kl, dkd or dist term read a temperature, and "
                         f"--losses {args.losses} has none")
    if space.standardize != "off" and not space.allows_standardize():
        where = f"--losses {args.losses}" if space.nodes > 1 else "a 1-node search (label edges only)"
        raise UsageError(f"--standardize {space.standardize}: only edges with a kl, dkd or dist term are "
                         f"standardized, and {where} has none")
    return space


def check_attention_sizes(space: Space, dataset: str, data_dir) -> None:
    """An attention loss needs maps at least as large as its crops: say so now, not in every trial."""
    import torch

    from ktfast.models import build_model

    uses_attention = space.nodes > 1 and any(t in ATTENTION_TERMS for loss in space.losses or ()
                                             for t in loss.split("+"))
    if not uses_attention:
        return
    info = dataset_info(dataset, data_dir)
    x = torch.zeros(2, 3, info.image_size, info.image_size)
    for name in dict.fromkeys((space.target_model, *space.models)):
        with torch.no_grad():
            h, w = build_model(name, info.num_classes, info.image_size).eval()(x, return_attention=True)[1].shape[1:]
        if max(DEFAULT_CROPS) > min(h, w):
            raise UsageError(f"--losses: {name} has a {h}x{w} attention map on {dataset}, smaller than the "
                             f"{max(DEFAULT_CROPS)}x{max(DEFAULT_CROPS)} crop of the attention losses")


def worker_devices(args, cfg: TrainConfig) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker to start (None: a CPU worker)."""
    if cfg.device == "cpu":
        if args.gpus or args.trials_per_gpu:
            raise UsageError("--gpus/--trials-per-gpu: GPU workers need --device cuda; on the CPU use --workers")
        return [None] * (args.workers or 1)
    if args.workers:
        raise UsageError("--workers: counts CPU workers; on GPUs use --gpus and --trials-per-gpu")
    if args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        raise UsageError(f"--gpus: expected GPU ids such as 0,1, got {args.gpus!r}")
    return [g for g in gpus for _ in range(args.trials_per_gpu or 1)]


def pack_mode(args, cfg: TrainConfig) -> str:
    if cfg.device == "cpu":
        if args.pack == "mps":
            raise UsageError("--pack mps: MPS shares a GPU; with --device cpu pack processes or threads")
        return args.pack or "processes"
    return args.pack or ("mps" if (args.trials_per_gpu or 1) > 1 else "processes")


def cmd_search(args) -> int:
    space = space_from_args(args)
    cfg = config_from_args(args).replace(split="search")
    dataset_info(cfg.dataset, cfg.data_dir)
    check_attention_sizes(space, cfg.dataset, cfg.data_dir)
    devices = worker_devices(args, cfg)
    pack = pack_mode(args, cfg)
    if args.min_resource > cfg.epochs:
        raise UsageError(f"--min-resource: the first rung, epoch {args.min_resource}, is past --epochs {cfg.epochs}")
    if args.grace_period is not None and args.grace_period <= args.heartbeat_interval:
        raise UsageError("--grace-period: must be longer than --heartbeat-interval")
    name = args.study or f"{cfg.dataset}-{space.nodes}n-{space.target_model}-{space.objective}"
    study = open_study(open_storage(args.storage), name, space, cfg, args.pruner, args.min_resource)
    done = sum(1 for _ in study.get_trials(deepcopy=False, states=COUNTED))
    if done < args.trials:
        spec = {"storage": args.storage, "study": name, "trials": args.trials, "space": space.to_dict(),
                "config": cfg.to_dict(), "sampler": args.sampler, "pruner": args.pruner,
                "min_resource": args.min_resource,
                "heartbeat_interval": args.heartbeat_interval, "grace_period": args.grace_period}
        run_workers(study, spec, devices, pack, args.trials, args.quiet)
    print(summary(study, args.storage, args.trials), flush=True)
    done = sum(1 for _ in study.get_trials(deepcopy=False, states=COUNTED))
    if done < args.trials:
        print(f"ktfast: the workers stopped with {done} of {args.trials} trials finished; run the same command "
              f"again to resume", file=sys.stderr)
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
    graph = dict(trial.user_attrs["graph"], description=f"ktfast search, study {name}, trial {trial.number}: {value}")
    Graph.from_dict(graph)  # what `ktfast train` will check
    try:
        Path(args.output).write_text(json.dumps(graph, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"-o: cannot write {args.output}: {e.strerror}") from None
    print(f"wrote {args.output}: trial {trial.number} of {name}, {value}")
    return 0
