"""One training session (docs/ARCHITECTURE.md §7, §8): the options — `ktfast train`'s flags or `ktfast.train`'s
keywords, as one namespace — made into a graph and a config per seed (new, `--like` another run,
or `--resume`d), each seed trained into the run directory, over one process or the ranks of a
torchrun. The command line and the Python API both call `run_session`; neither trains otherwise.

`say` prints what the command line always shows (the run's first line, the result table): the API
passes a silent one unless `progress=True`. Everything that can fail on bad input fails before a
run directory exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ktfast.args import UsageError, config_from_args, logger
from ktfast.config import TrainConfig, resume_checked
from ktfast.data import dataset_info
from ktfast.engine import distributed, tensorboard
from ktfast.engine.distributed import PeerLost, Placement
from ktfast.engine.replicas import Replicas, replica_reason, train_replicas
from ktfast.engine.run import make_trainer
from ktfast.engine.summary import result_table, seed_dirs, write_summary
from ktfast.engine.trainer import CHECKPOINT, METRICS
from ktfast.graph import Graph
from ktfast.internals import uncompiled

Callback = Callable[[dict], None]


def run_session(
    opts, say=print, progress: bool = True, callbacks: tuple[Callback, ...] = ()
) -> tuple[Path, dict]:
    """(run directory, {node: model} of its first seed) of the session `opts` asks for; the callbacks
    get each epoch's metrics row (rank 0)."""
    with distributed.process_group(_device(opts)) as (rank, world):
        try:
            if opts.resume:
                return resume(Path(opts.resume), opts, rank, world, say, progress, callbacks)
            return train(opts, rank, world, say, progress, callbacks)
        except Exception as e:
            if distributed.is_peer_failure(e):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise PeerLost(
                    f"rank {rank} of {world}: another process of the run stopped ({first[:160]}); "
                    "the run directory keeps its last whole epoch: continue it with --resume"
                ) from None
            raise


def run_dirs(path: Path) -> dict[int, Path]:
    """{seed: directory} of a run: the directory itself, or its `seed{s}/` directories (several seeds);
    empty where `path` holds no run (no graph.json and config.json)."""

    def is_run(d: Path) -> bool:
        return (d / "graph.json").is_file() and (d / "config.json").is_file()

    if is_run(path):
        return {_read_config(path).seed: path}
    seeds = {int(d.name[4:]): d for d in path.glob("seed*") if d.name[4:].isdigit() and is_run(d)}
    return dict(sorted(seeds.items()))


def _read_config(run: Path, flag: str = "--like") -> TrainConfig:
    try:
        return TrainConfig.load(run / "config.json")
    except (OSError, ValueError, TypeError) as e:  # unreadable, malformed JSON, fields of the wrong kind
        raise UsageError(f"{flag}: {run / 'config.json'} is not a run's config: {e}") from None


def _device(opts) -> str:
    """Where the run trains: a resumed run where it started (its config.json), else as the flags say."""
    if opts.resume:
        return _resumed_config(Path(opts.resume)).device
    return _plan(opts)[1][0].device


def _resumed_config(run: Path) -> TrainConfig:
    if not (run / "graph.json").is_file() or not (run / "config.json").is_file():
        raise UsageError(f"--resume: {run} is not a run directory (no graph.json / config.json)")
    return _read_config(run, "--resume")


def _plan(opts) -> tuple[Graph, list[TrainConfig]]:
    """The graph and the config of each seed: from the flags, over the run `--like` names if any
    (its graph.json and config.json; the flags given override them, its seeds are the default)."""
    base, seeds, graph = None, opts.seeds, None
    if opts.like:
        runs = run_dirs(Path(opts.like))
        if not runs:
            raise UsageError(f"--like: {opts.like} is not a run directory (no graph.json / config.json)")
        first = next(iter(runs.values()))
        base, seeds = _read_config(first), seeds or list(runs)
        graph = Graph.load(first / "graph.json")
    if opts.graph:
        graph = _graph(opts.graph)
    if graph is None:
        raise UsageError("--graph: required (or --resume DIR, or --like RUN)")
    return graph, [config_from_args(opts, seed, base) for seed in seeds or [0]]


def _graph(graph) -> Graph:
    return graph if isinstance(graph, Graph) else Graph.load(graph)  # ktfast.train's, or a path


def _free_run_dir(base: Path) -> Path:
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_new_run_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out: {path} exists and is not empty (use --resume {path} to continue it)")


def check_launch(graph: Graph, cfg: TrainConfig) -> None:
    """What a run of `cfg.world_size` processes cannot do (exit 2 on every rank, docs/ARCHITECTURE.md §10)."""
    world = cfg.world_size
    if cfg.place == "nodes" and world > len(graph.model_nodes):
        raise UsageError(
            f"--place nodes: {world} processes for the {len(graph.model_nodes)} model nodes of "
            f"{graph.name} (at most one process per node)"
        )
    if cfg.sync_bn and cfg.place != "data":
        raise UsageError(
            "--sync-bn: only with --place data (with --place nodes each node sees the whole batch)"
        )
    if cfg.place == "data" and cfg.batch_size % world:
        raise UsageError(f"--batch-size: {cfg.batch_size} does not split into {world} equal shares")


def user_code(graph: Graph, cfg: TrainConfig) -> list[str]:
    """The user's code a run imports and runs (docs/ARCHITECTURE.md §3, §5): its `py:` models and data set."""
    return graph.user_code + ([cfg.dataset] if cfg.dataset.startswith("py:") else [])


def check_plan(opts, world: int) -> Graph:
    """The session's graph, its bad input said before anything starts (`ktfast train --gpus`)."""
    graph, configs = _plan(opts)
    check_launch(graph, configs[0].replace(world_size=world))
    return graph


def train(opts, rank: int, world: int, say=print, progress=True, callbacks=()) -> tuple[Path, dict]:
    graph, configs = _plan(opts)
    configs = [cfg.replace(world_size=world) for cfg in configs]
    distributed.check_same([graph.to_dict(), [c.to_dict() for c in configs]], "graph or recipe")
    check_launch(graph, configs[0])
    if rank == 0 and user_code(graph, configs[0]):  # the first line, before any of that code runs
        say(f"graph {graph.name} runs user code: {', '.join(user_code(graph, configs[0]))}")
    distributed.rank_zero_first(lambda: dataset_info(configs[0].dataset, configs[0].data_dir))

    def run_dir() -> Path:
        if opts.out:
            _check_new_run_dir(Path(opts.out))
            return Path(opts.out)
        return _free_run_dir(Path("runs") / graph.name)

    root = distributed.from_rank_zero(run_dir)
    runs = seed_dirs(root, [cfg.seed for cfg in configs])
    multi = len(configs) > 1
    quiet = not progress or rank != 0
    callbacks = callbacks if rank == 0 else ()
    reason = "" if opts.seeds_one_by_one or not multi else replica_reason(configs[0], world)
    if reason and rank == 0:
        say(f"--seeds: the {len(configs)} seeds train one by one: {reason}")
    trainers = {}

    def start(cfg: TrainConfig):
        out = runs[cfg.seed]
        # Everything that can fail on bad input happens here, before the directory exists.
        trainer = make_trainer(
            graph,
            cfg,
            out=out,
            log=logger(quiet),
            progress=not quiet,
            placement=Placement(graph, cfg.place, rank, world, cfg.sync_bn),
        )
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            graph.save(out / "graph.json")
            cfg.save(out / "config.json")
            say(
                f"run {out}: graph {graph.name}, {cfg.dataset}, seed {cfg.seed}, {cfg.epochs} epochs, "
                f"{cfg.device}{', amp' if cfg.amp else ''}{', compile' if cfg.compile else ''}"
                f"{', fuse' if cfg.fuse else ''}{f', {world} processes, place {cfg.place}' if world > 1 else ''}"
            )
        trainers.setdefault("first", trainer)
        return trainer

    with_tensorboard = opts.tensorboard and rank == 0
    if not multi or opts.seeds_one_by_one or reason:
        for cfg in configs:
            fit(start(cfg), with_tensorboard, callbacks)
    else:
        train_replicas(
            configs,
            start,
            lambda group: fit_replicas(group, with_tensorboard, callbacks),
            say=lambda line, **_: say(line),
        )
    if rank == 0:  # every seed has finished: summary.json from their metrics.jsonl
        say(result_table(graph, write_summary(root, graph, runs), configs[0].split))
    return root, trained_models(trainers["first"])


def _check_resume_flags(run: Path, opts, cfg: TrainConfig) -> None:
    """A flag given with --resume must agree with the run, also when it is given at its default value
    (the settings marked resume: a run continues as it started)."""
    for key in resume_checked():
        given = getattr(opts, key, None)
        if given is not None and given != getattr(cfg, key):
            raise UsageError(
                f"--{key.replace('_', '-')}: the run in {run} has {getattr(cfg, key)!r}, not "
                f"{given!r} (--resume continues a run as it was started)"
            )
    if opts.seeds is not None and opts.seeds != [cfg.seed]:
        raise UsageError(f"--seeds: the run in {run} has seed {cfg.seed}")


def resume(
    run: Path, opts, rank: int = 0, world: int = 1, say=print, progress=True, callbacks=()
) -> tuple[Path, dict]:
    if opts.like:
        raise UsageError("--like: starts a new run; --resume continues one (give one of them)")
    cfg = _resumed_config(run)
    graph = Graph.load(run / "graph.json")
    if opts.graph and _graph(opts.graph).to_dict() != graph.to_dict():
        raise UsageError(f"--graph: {opts.graph} is not the graph of the run in {run} (its graph.json)")
    _check_resume_flags(run, opts, cfg)
    if opts.place not in (None, cfg.place):
        raise UsageError(f"--place: the run in {run} has place {cfg.place}")
    if cfg.place == "data" and cfg.world_size != world:
        raise UsageError(
            f"--resume: the run in {run} was trained by {cfg.world_size} processes with place data: "
            f"resume it with as many (place nodes resumes with any number)"
        )
    started = cfg
    if opts.fuse is not None:  # fused or not, the run computes the same: either may resume the other
        cfg = cfg.replace(fuse=opts.fuse)
    cfg = cfg.replace(world_size=world)
    check_launch(graph, cfg)
    if rank == 0 and user_code(graph, cfg):
        say(f"graph {graph.name} runs user code: {', '.join(user_code(graph, cfg))}")
    quiet = not progress or rank != 0
    trainer = make_trainer(
        graph,
        cfg,
        out=run,
        log=logger(quiet),
        progress=not quiet,
        placement=Placement(graph, cfg.place, rank, world, cfg.sync_bn),
    )
    done = 0
    if (run / CHECKPOINT).exists():
        trainer.load_checkpoint(run / CHECKPOINT)
        done = trainer.epoch
    distributed.barrier()  # every rank has read the run directory before rank 0 changes it
    if rank == 0:
        if started.world_size != world:  # place nodes, continued by another number of processes
            started.replace(world_size=world).save(run / "config.json")
        # Rows past the checkpoint belong to an epoch that will be trained again.
        metrics = run / METRICS
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        kept = [r for r in rows if r["epoch"] <= done]
        if len(kept) < len(rows):
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        say(f"resuming {run} after epoch {done} of {cfg.epochs}")
    fit(trainer, opts.tensorboard and rank == 0, callbacks if rank == 0 else ())
    if rank == 0:
        root, runs = _summary_runs(run, cfg.seed)
        say(result_table(graph, write_summary(root, graph, runs), cfg.split))
    return run, trained_models(trainer)


def _summary_runs(run: Path, seed: int) -> tuple[Path, dict[int, Path]]:
    """(top of the run, each seed's directory) for summary.json after a resume: a seed{s} directory
    beside others is one seed of a run of several, summarised over the seeds that have finished epochs."""
    siblings = {
        int(d.name[4:]): d
        for d in run.parent.glob("seed*")
        if d.name[4:].isdigit() and (d / METRICS).is_file() and (d / "config.json").is_file()
    }
    if run.name == f"seed{seed}" and len(siblings) > 1:
        return run.parent, dict(sorted(siblings.items()))
    return run, {seed: run}


def _on_epoch(trainer, with_tensorboard: bool, callbacks) -> tuple:
    """(the trainer's epoch callback, its TensorBoard log or None): each row goes to TensorBoard (if
    asked) and to every callback."""
    log = tensorboard.TensorBoardLog(trainer.out, trainer) if with_tensorboard else None

    def on_epoch(epoch: int, row: dict) -> None:
        if log is not None:
            log(epoch, row)
        for callback in callbacks:
            callback(row)

    return on_epoch, log


def fit(trainer, with_tensorboard: bool, callbacks=()) -> list[dict]:
    """The trainer's remaining epochs."""
    on_epoch, log = _on_epoch(trainer, with_tensorboard, callbacks)
    try:
        return trainer.fit(on_epoch=on_epoch)
    finally:
        if log is not None:
            log.close()


def fit_replicas(trainers: list, with_tensorboard: bool, callbacks=()) -> dict[int, list[dict]]:
    """The seeds' runs as replicas (`ktfast.engine.replicas`); the callbacks get every replica's rows."""
    hooks = [_on_epoch(t, with_tensorboard, callbacks) for t in trainers]
    try:
        return Replicas(trainers).fit(on_epoch=[on_epoch for on_epoch, _ in hooks])
    finally:
        for _, log in hooks:
            if log is not None:
                log.close()


def trained_models(trainer) -> dict:
    """{model node: its module} as the run trained it (the module inside torch.compile's wrapper)."""
    return {name: uncompiled(m) for name, m in trainer.models.items()}
