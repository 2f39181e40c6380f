"""`ktfast search` as a session (docs/ARCHITECTURE.md §6, §8): the search space and the workers from the options —
`ktfast search`'s flags or `ktfast.search`'s keywords, as one namespace — and the study run until it
has its trials. The command line and the Python API both call `run_search`."""

from __future__ import annotations

import math
import os

import optuna

from ktfast.args import UsageError, config_from_args
from ktfast.config import TrainConfig
from ktfast.data import dataset_info
from ktfast.graph import ATTENTION_TERMS, DEFAULT_CROPS, GATES
from ktfast.graph.gates import DEFAULT_GATES, DRAWABLE_GATES
from ktfast.graph.loss_kinds import PAIR_TERMS, TEMPERED_TEXT
from ktfast.graph_search.search import COUNTED, DEFAULT_MODELS, Space
from ktfast.graph_search.study import DEFAULT_STORAGE, open_storage, open_study
from ktfast.graph_search.workers import run_workers

# Every option of a search and its default (the flags' defaults; `ktfast.search` takes them as keywords).
SEARCH_OPTIONS = {
    "nodes": None,
    "target_model": None,
    "models": ",".join(DEFAULT_MODELS),
    "gates": ",".join(DEFAULT_GATES),
    "losses": None,
    "standardize": "off",
    "objective": "target",
    "temperatures": None,
    "weights": None,
    "trials": None,
    "gpus": None,
    "trials_per_gpu": None,
    "workers": None,
    "pack": None,
    "storage": DEFAULT_STORAGE,
    "study": None,
    "pruner": "asha",
    "min_resource": 1,
    "sampler": "random",
    "heartbeat_interval": 60,
    "grace_period": None,
}


def _listed(flag: str, text: str, valid, noun: str, expected: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    for item in items:
        if not valid(item):
            raise UsageError(f"{flag}: unknown {noun} {item!r} (expected {expected})")
    return items


def _temperatures(value) -> tuple[float, ...] | None:
    """--temperatures: "1,2,4" (the flag) or a sequence of numbers (the keyword); each > 0."""
    if value is None:
        return None
    try:
        values = tuple(
            dict.fromkeys(
                float(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()
            )
        )
    except (TypeError, ValueError):
        raise UsageError(f"--temperatures: expected comma-separated numbers, got {value!r}") from None
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if not values or bad:
        raise UsageError(f"--temperatures: every temperature must be > 0, got {bad[0] if bad else value!r}")
    return values


def _weights(value) -> tuple[float, float] | None:
    """--weights: "LOW:HIGH" (the flag) or a pair (the keyword), 0 < LOW < HIGH."""
    if value is None:
        return None
    try:
        low, high = value.split(":") if isinstance(value, str) else value
        bounds = (float(low), float(high))
    except (TypeError, ValueError):
        bounds = None
    if bounds is None or not all(map(math.isfinite, bounds)) or not 0 < bounds[0] < bounds[1]:
        raise UsageError(
            f"--weights: expected a range LOW:HIGH with 0 < LOW < HIGH, e.g. 0.1:10, got {value!r}"
        )
    return bounds


def _pair_loss(loss: str) -> bool:
    terms = loss.split("+")
    return len(set(terms)) == len(terms) and all(t in PAIR_TERMS for t in terms)


def space_from_args(args) -> Space:
    from ktfast.models import MODEL_NAMES, is_model_name

    models = ", ".join(MODEL_NAMES)
    if not is_model_name(args.target_model):
        raise UsageError(f"--target-model: unknown model {args.target_model!r} (expected one of {models})")
    space = Space(
        nodes=args.nodes,
        target_model=args.target_model,
        models=_listed("--models", args.models, is_model_name, "model", f"one of {models}"),
        gates=_listed("--gates", args.gates, GATES.__contains__, "gate", ", ".join(GATES)),
        losses=_listed(
            "--losses",
            args.losses,
            _pair_loss,
            "loss",
            f"{', '.join(PAIR_TERMS)} or a sum such as kl+att_mse",
        )
        if args.losses is not None
        else None,
        objective=args.objective,
        standardize=args.standardize,
        temperatures=_temperatures(args.temperatures),
        weights=_weights(args.weights),
    )
    undrawable = [g for g in space.gates if g not in DRAWABLE_GATES]
    if undrawable:  # every trial's graph would be refused, and its worker stopped
        raise UsageError(
            f"--gates: the {undrawable[0]} gate needs its fraction of the run, which the search does "
            "not draw; use linear or gamma"
        )
    if space.objective == "target" and space.gates == ("cutoff",):
        raise UsageError(
            "--gates: with cutoff alone every edge into the target is cut off, and the target frozen"
        )
    if space.nodes == 1 and (space.temperatures or space.weights):
        raise UsageError(
            f"--{'temperatures' if space.temperatures else 'weights'}: a 1-node search has label edges "
            "only, and they keep T = 1 and weight 1"
        )
    if space.temperatures and not space.allows_standardize():
        raise UsageError(
            f"--temperatures: only edges with a {TEMPERED_TEXT} term read a temperature, and "
            f"--losses {args.losses} has none"
        )
    if space.standardize != "off" and not space.allows_standardize():
        where = f"--losses {args.losses}" if space.nodes > 1 else "a 1-node search (label edges only)"
        raise UsageError(
            f"--standardize {space.standardize}: only edges with a {TEMPERED_TEXT} term are "
            f"standardized, and {where} has none"
        )
    return space


def check_attention_sizes(space: Space, dataset: str, data_dir) -> None:
    """An attention loss needs maps at least as large as its crops: say so now, not in every trial."""
    import torch

    from ktfast.models import build_model

    uses_attention = space.nodes > 1 and any(
        t in ATTENTION_TERMS for loss in space.losses or () for t in loss.split("+")
    )
    if not uses_attention:
        return
    info = dataset_info(dataset, data_dir)
    x = torch.zeros(2, 3, info.image_size, info.image_size)
    for name in dict.fromkeys((space.target_model, *space.models)):
        with torch.no_grad():
            h, w = (
                build_model(name, info.num_classes, info.image_size)
                .eval()(x, return_attention=True)[1]
                .shape[1:]
            )
        if max(DEFAULT_CROPS) > min(h, w):
            raise UsageError(
                f"--losses: {name} has a {h}x{w} attention map on {dataset}, smaller than the "
                f"{max(DEFAULT_CROPS)}x{max(DEFAULT_CROPS)} crop of the attention losses"
            )


def worker_devices(args, cfg: TrainConfig) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker to start (None: a CPU worker)."""
    if cfg.device == "cpu":
        if args.gpus or args.trials_per_gpu:
            raise UsageError(
                "--gpus/--trials-per-gpu: GPU workers need --device cuda; on the CPU use --workers"
            )
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


def run_search(opts, quiet: bool = False) -> optuna.Study:
    """The study `opts` asks for (`ktfast search`'s flags, or `ktfast.search`'s keywords), its workers
    run until it has `opts.trials` counted trials or they stop."""
    space = space_from_args(opts)
    cfg = config_from_args(opts).replace(split="search")
    dataset_info(cfg.dataset, cfg.data_dir)
    check_attention_sizes(space, cfg.dataset, cfg.data_dir)
    devices = worker_devices(opts, cfg)
    pack = pack_mode(opts, cfg)
    if opts.min_resource > cfg.epochs:
        raise UsageError(
            f"--min-resource: the first rung, epoch {opts.min_resource}, is past --epochs {cfg.epochs}"
        )
    if opts.grace_period is not None and opts.grace_period <= opts.heartbeat_interval:
        raise UsageError("--grace-period: must be longer than --heartbeat-interval")
    name = opts.study or f"{cfg.dataset}-{space.nodes}n-{space.target_model}-{space.objective}"
    study = open_study(open_storage(opts.storage), name, space, cfg, opts.pruner, opts.min_resource)
    if counted(study) < opts.trials:
        spec = {
            "storage": opts.storage,
            "study": name,
            "trials": opts.trials,
            "space": space.to_dict(),
            "config": cfg.to_dict(),
            "sampler": opts.sampler,
            "pruner": opts.pruner,
            "min_resource": opts.min_resource,
            "heartbeat_interval": opts.heartbeat_interval,
            "grace_period": opts.grace_period,
        }
        run_workers(study, spec, devices, pack, opts.trials, quiet)
    return study


def counted(study: optuna.Study) -> int:
    """The trials that `--trials` counts (complete or pruned)."""
    return sum(1 for _ in study.get_trials(deepcopy=False, states=COUNTED))
