"""`ktfast train` and `ktfast pretrain` (DESIGN §7): a graph trained with one or several seeds into a
run directory, resumed from its last checkpoint, and the pretrain cache filled by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ktfast import tensorboard
from ktfast import distributed
from ktfast.args import RECIPE, UsageError, add_recipe_args, config_from_args, logger, seeds
from ktfast.config import TrainConfig
from ktfast.data import dataset_info
from ktfast.distributed import PLACES, Placement, PeerLost
from ktfast.graph import Graph
from ktfast.models import is_model_name
from ktfast.pretrain import pretrain
from ktfast.replicas import Replicas, replica_reason, train_replicas
from ktfast.run import make_trainer
from ktfast.summary import result_table, seed_dirs, write_summary
from ktfast.train import CHECKPOINT, METRICS


def register(sub) -> None:
    p = sub.add_parser("train", help="train a graph file")
    p.add_argument("--graph", help="graph file (JSON)")
    add_recipe_args(p)
    p.add_argument("--split", choices=["train", "search"],
                   help="search: train and evaluate on the search's held-out split of the training set "
                        "(CIFAR 40k/10k, image folders class-balanced halves), never the test set")
    p.add_argument("--seeds", type=seeds, help="e.g. 0,1,2,3,4: report mean ± std (default 0); the seeds' runs "
                                               "train as replicas, stacked into one step")
    p.add_argument("--seeds-one-by-one", action="store_true", help="train the seeds' runs one after another")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="hold out a class-balanced fraction F of the training set (the same for every seed): "
                        "metrics gain val rows, checkpoint-best.pt keeps the target's best-val epoch")
    p.add_argument("--out", help="run directory (default runs/<graph name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files under RUN/tensorboard/NODE")
    p.add_argument("--place", choices=PLACES, default=None,
                   help="under torchrun: data (default) = every process holds every node and takes a share "
                        "of each batch; nodes = each process runs a share of the nodes on every batch")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --place data: BatchNorm normalises over the global batch of all processes")
    p.add_argument("--gpus", type=gpu_list, default=None,
                   help="e.g. 0,1,2,3: train on these GPUs of this machine (one torchrun process each)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="fill the pretrain cache with a label-only model")
    p.add_argument("--model", required=True)
    add_recipe_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)


# ---- train -----------------------------------------------------------------------------------
def _free_run_dir(base: Path) -> Path:
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_new_run_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out: {path} exists and is not empty (use --resume {path} to continue it)")


def gpu_list(text: str) -> list[int]:
    gpus = seeds(text)  # distinct integers
    if min(gpus) < 0:
        raise ValueError(text)
    return gpus


def cmd_train(args) -> int:
    if args.tensorboard and not tensorboard.available():
        raise UsageError("--tensorboard: needs the tensorboard package (pip install 'ktfast[tensorboard]')")
    if args.gpus is not None:
        return _launch(args)
    with distributed.process_group(_device(args)) as (rank, world):
        try:
            if args.resume:
                return _resume(Path(args.resume), args, rank, world)
            return _train(args, rank, world)
        except Exception as e:
            if distributed.is_peer_failure(e):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise PeerLost(f"rank {rank} of {world}: another process of the run stopped ({first[:160]}); "
                               "the run directory keeps its last whole epoch: continue it with --resume") from None
            raise


def _device(args) -> str:
    """Where the run trains: a resumed run where it started (its config.json), else as the flags say."""
    if args.resume:
        try:
            return TrainConfig.load(Path(args.resume) / "config.json").device
        except (OSError, ValueError, TypeError):  # _resume says what is wrong with the directory
            pass
    return config_from_args(args).device


def _check_launch(graph: Graph, cfg: TrainConfig) -> None:
    """What a run of `cfg.world_size` processes cannot do (exit 2 on every rank, DESIGN §10)."""
    world = cfg.world_size
    if cfg.place == "nodes" and world > len(graph.model_nodes):
        raise UsageError(f"--place nodes: {world} processes for the {len(graph.model_nodes)} model nodes of "
                         f"{graph.name} (at most one process per node)")
    if cfg.sync_bn and cfg.place != "data":
        raise UsageError("--sync-bn: only with --place data (with --place nodes each node sees the whole batch)")
    if cfg.place == "data" and cfg.batch_size % world:
        raise UsageError(f"--batch-size: {cfg.batch_size} does not split into {world} equal shares")


def _train(args, rank: int, world: int) -> int:
    if not args.graph:
        raise UsageError("--graph: required (or --resume DIR)")
    graph = Graph.load(args.graph)
    configs = [config_from_args(args, seed).replace(world_size=world) for seed in args.seeds or [0]]
    distributed.check_same([graph.to_dict(), [c.to_dict() for c in configs]], "graph or recipe")
    _check_launch(graph, configs[0])
    if rank == 0 and user_code(graph, configs[0]):  # the first line, before any of that code runs
        print(f"graph {graph.name} runs user code: {', '.join(user_code(graph, configs[0]))}", flush=True)
    distributed.rank_zero_first(lambda: dataset_info(configs[0].dataset, configs[0].data_dir))

    def run_dir() -> Path:
        if args.out:
            _check_new_run_dir(Path(args.out))
            return Path(args.out)
        return _free_run_dir(Path("runs") / graph.name)

    root = distributed.from_rank_zero(run_dir)
    runs = seed_dirs(root, [cfg.seed for cfg in configs])
    quiet = args.quiet or rank != 0
    multi = len(configs) > 1
    reason = "" if args.seeds_one_by_one or not multi else replica_reason(configs[0], world)
    if reason and rank == 0:
        print(f"--seeds: the {len(configs)} seeds train one by one: {reason}", flush=True)

    def start(cfg: TrainConfig):
        out = runs[cfg.seed]
        # Everything that can fail on bad input happens here, before the directory exists.
        trainer = make_trainer(graph, cfg, out=out, log=logger(quiet), progress=not quiet,
                               placement=Placement(graph, cfg.place, rank, world, cfg.sync_bn))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            graph.save(out / "graph.json")
            cfg.save(out / "config.json")
            print(f"run {out}: graph {graph.name}, {cfg.dataset}, seed {cfg.seed}, {cfg.epochs} epochs, "
                  f"{cfg.device}{', amp' if cfg.amp else ''}{', compile' if cfg.compile else ''}"
                  f"{', fuse' if cfg.fuse else ''}{f', {world} processes, place {cfg.place}' if world > 1 else ''}",
                  flush=True)
        return trainer

    with_tensorboard = args.tensorboard and rank == 0
    if not multi or args.seeds_one_by_one or reason:
        for cfg in configs:
            _fit(start(cfg), with_tensorboard)
    else:
        train_replicas(configs, start, lambda trainers: _fit_replicas(trainers, with_tensorboard))
    if rank == 0:  # every seed has finished: summary.json from their metrics.jsonl
        print(result_table(graph, write_summary(root, graph, runs), configs[0].split))
    return 0


def user_code(graph: Graph, cfg: TrainConfig) -> list[str]:
    """The user's code a run imports and runs (DESIGN §3, §5): its `py:` models and data set."""
    return graph.user_code + ([cfg.dataset] if cfg.dataset.startswith("py:") else [])


def _launch(args) -> int:
    """`ktfast train --gpus 0,1,…`: the same command under torchrun, one process per GPU."""
    import torch

    if distributed.world_size() > 1:
        raise UsageError("--gpus: already one of several processes (torchrun starts them; drop --gpus)")
    if args.device == "cpu" or not torch.cuda.is_available():
        raise UsageError("--gpus: needs CUDA (on a CPU: torchrun --nproc-per-node N -m ktfast train ... --device cpu)")
    if max(args.gpus) >= torch.cuda.device_count():
        raise UsageError(f"--gpus: this machine has {torch.cuda.device_count()} GPUs, numbered from 0")
    if not args.resume:  # a bad launch ends here, in one line, before any process starts
        graph = Graph.load(args.graph) if args.graph else None
        if graph is None:
            raise UsageError("--graph: required (or --resume DIR)")
        _check_launch(graph, config_from_args(args).replace(world_size=len(args.gpus)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, args.gpus))}
    return subprocess.run(launch_command(args.argv, len(args.gpus)), env=env).returncode


def launch_command(argv: list[str], processes: int) -> list[str]:
    """torchrun's command line for `ktfast ARGV` without its --gpus flag."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "ktfast", *rest]


# Recipe flags that --resume checks against the run's config.json: a run continues as it started.
RESUME_CHECKED = (*RECIPE, "split", "train_fraction", "val_fraction")


def _check_resume_flags(run: Path, args, cfg: TrainConfig) -> None:
    """A flag given with --resume must agree with the run, also when it is given at its default value."""
    for key in RESUME_CHECKED:
        given = getattr(args, key, None)
        if given is not None and given != getattr(cfg, key):
            raise UsageError(f"--{key.replace('_', '-')}: the run in {run} has {getattr(cfg, key)!r}, not "
                             f"{given!r} (--resume continues a run as it was started)")
    if args.seeds is not None and args.seeds != [cfg.seed]:
        raise UsageError(f"--seeds: the run in {run} has seed {cfg.seed}")


def _resume(run: Path, args, rank: int = 0, world: int = 1) -> int:
    if not (run / "graph.json").is_file() or not (run / "config.json").is_file():
        raise UsageError(f"--resume: {run} is not a run directory (no graph.json / config.json)")
    graph = Graph.load(run / "graph.json")
    if args.graph and Graph.load(args.graph).to_dict() != graph.to_dict():
        raise UsageError(f"--graph: {args.graph} is not the graph of the run in {run} (its graph.json)")
    try:
        cfg = TrainConfig.load(run / "config.json")
    except (ValueError, TypeError) as e:  # malformed JSON, or fields of the wrong kind
        raise UsageError(f"--resume: {run / 'config.json'} is not a run's config: {e}") from None
    _check_resume_flags(run, args, cfg)
    if args.place not in (None, cfg.place):
        raise UsageError(f"--place: the run in {run} has place {cfg.place}")
    if cfg.place == "data" and cfg.world_size != world:
        raise UsageError(f"--resume: the run in {run} was trained by {cfg.world_size} processes with place data: "
                         f"resume it with as many (place nodes resumes with any number)")
    started = cfg
    if args.fuse is not None:  # fused or not, the run computes the same: either may resume the other
        cfg = cfg.replace(fuse=args.fuse)
    cfg = cfg.replace(world_size=world)
    _check_launch(graph, cfg)
    if rank == 0 and user_code(graph, cfg):
        print(f"graph {graph.name} runs user code: {', '.join(user_code(graph, cfg))}", flush=True)
    quiet = args.quiet or rank != 0
    trainer = make_trainer(graph, cfg, out=run, log=logger(quiet), progress=not quiet,
                           placement=Placement(graph, cfg.place, rank, world, cfg.sync_bn))
    done = 0
    if (run / CHECKPOINT).exists():
        trainer.load_checkpoint(run / CHECKPOINT)
        done = trainer.epoch
    distributed.barrier()  # every rank has read the run directory before rank 0 changes it
    kept = []
    if rank == 0:
        if started.world_size != world:  # place nodes, continued by another number of processes
            started.replace(world_size=world).save(run / "config.json")
        # Rows past the checkpoint belong to an epoch that will be trained again.
        metrics = run / METRICS
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        kept = [r for r in rows if r["epoch"] <= done]
        if len(kept) < len(rows):
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"resuming {run} after epoch {done} of {cfg.epochs}", flush=True)
    _fit(trainer, args.tensorboard and rank == 0)
    if rank == 0:
        root, runs = _summary_runs(run, cfg.seed)
        summary = write_summary(root, graph, runs)
        print(result_table(graph, summary, cfg.split))
    return 0


def _summary_runs(run: Path, seed: int) -> tuple[Path, dict[int, Path]]:
    """(top of the run, each seed's directory) for summary.json after a resume: a seed{s} directory
    beside others is one seed of a run of several, summarised over the seeds that have finished epochs."""
    siblings = {int(d.name[4:]): d for d in run.parent.glob("seed*")
                if d.name[4:].isdigit() and (d / METRICS).is_file() and (d / "config.json").is_file()}
    if run.name == f"seed{seed}" and len(siblings) > 1:
        return run.parent, dict(sorted(siblings.items()))
    return run, {seed: run}


def _fit(trainer, with_tensorboard: bool) -> list[dict]:
    if not with_tensorboard:
        return trainer.fit()
    log = tensorboard.TensorBoardLog(trainer.out, trainer)
    try:
        return trainer.fit(on_epoch=log)
    finally:
        log.close()


def _fit_replicas(trainers: list, with_tensorboard: bool) -> dict[int, list[dict]]:
    """The seeds' runs as replicas (`ktfast.replicas`), each with its TensorBoard log where asked."""
    logs = [tensorboard.TensorBoardLog(t.out, t) for t in trainers] if with_tensorboard else None
    try:
        return Replicas(trainers).fit(on_epoch=logs)
    finally:
        for log in logs or ():
            log.close()


# ---- pretrain ------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    if not is_model_name(args.model):
        raise UsageError(f"--model: unknown model {args.model!r}")
    cfg = config_from_args(args)
    dataset_info(cfg.dataset, cfg.data_dir)
    path = pretrain(args.model, cfg, log=logger(args.quiet), progress=not args.quiet)
    print(path)
    return 0
