"""The Python API (docs/ARCHITECTURE.md §8): `ktfast.train`, `ktfast.load_run`, `ktfast.search` and
`ktfast.TransferStep`. The keywords are the command's flags (`--batch-size` is `batch_size`), and
the command line is a thin layer over the same sessions (`ktfast.engine.session`, `ktfast.graph_search.session`):
what `ktfast train` computes, `ktfast.train` computes. Bad input raises a typed exception with a
one-line message (GraphError, ConfigError, DatasetError; CheckpointError for a run that does not
fit); nothing is printed unless `progress=True`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from ktfast.config import ConfigError, TrainConfig, flag_fields
from ktfast.data import dataset_info
from ktfast.engine.checkpoint import load_models, read_checkpoint
from ktfast.engine.distributed import PLACES
from ktfast.engine.session import run_dirs, run_session
from ktfast.engine.trainer import CHECKPOINT, METRICS
from ktfast.engine.transfer_step import TransferStep, as_graph
from ktfast.graph import Graph
from ktfast.graph_search.session import SEARCH_OPTIONS, run_search
from ktfast.models import build_model

__all__ = ["Run", "load_run", "train", "search", "TransferStep"]

# `ktfast train`'s options beside the settings that flags set (`config.flag_fields`) and their defaults.
RUN_OPTIONS = {
    "graph": None,
    "seeds": None,
    "seeds_one_by_one": False,
    "out": None,
    "resume": None,
    "like": None,
    "tensorboard": False,
}
# The values a keyword may take where the flag has choices.
CHOICES = {
    "optimizer": ("sgd", "adam"),
    "device": ("cuda", "cpu"),
    "split": ("train", "search"),
    "place": PLACES,
}


def train_options() -> tuple[str, ...]:
    """The keywords of `ktfast.train` but `progress` and `callbacks`: `ktfast train`'s flags."""
    return (*RUN_OPTIONS, *flag_fields())


class Run:
    """A run directory: `metrics` (the first seed's metrics.jsonl rows), `per_seed` ({seed: rows}),
    `summary` (summary.json, None where the run has none), `models` ({node: nn.Module}, the first
    seed's, as trained or as its checkpoint holds them), `graph`, `config` and `dir`."""

    def __init__(self, dir, models: dict | None = None):
        self.dir = Path(dir)
        self._models = models

    @property
    def seeds(self) -> dict[int, Path]:
        return run_dirs(self.dir)

    def _first(self) -> Path:
        return next(iter(self.seeds.values()))

    @property
    def per_seed(self) -> dict[int, list[dict]]:
        return {seed: _rows(d / METRICS) for seed, d in self.seeds.items()}

    @property
    def metrics(self) -> list[dict]:
        return _rows(self._first() / METRICS)

    @property
    def summary(self) -> dict | None:
        path = self.dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def graph(self) -> Graph:
        return Graph.load(self._first() / "graph.json")

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.load(self._first() / "config.json")

    @property
    def models(self) -> dict:
        if self._models is None:
            self._models = _load_models(self._first(), self.graph, self.config)
        return self._models

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _load_models(run: Path, graph: Graph, cfg: TrainConfig) -> dict:
    """The model nodes as the run's checkpoint holds them (its last epoch)."""
    device = cfg.device if torch.device(cfg.device).type != "cuda" or torch.cuda.is_available() else "cpu"
    info = dataset_info(cfg.dataset, cfg.data_dir)
    models = {
        n.name: build_model(n.model, info.num_classes, info.image_size, attention=n.attention)
        for n in graph.model_nodes
    }
    path = run / CHECKPOINT
    load_models(read_checkpoint(path, graph.to_dict(), cfg.to_dict(), "cpu"), models, path)
    for node in graph.model_nodes:
        models[node.name].to(device).train(not node.frozen)
    return models


def load_run(dir) -> Run:
    """The run in `dir` (what `ktfast.train` returned); raises ConfigError where `dir` holds none."""
    if not run_dirs(Path(dir)):
        raise ConfigError(f"load_run: {dir} is not a run directory (no graph.json / config.json)")
    return Run(dir)


def _silent(message: str) -> None:
    pass


def _options(defaults: dict, given: dict, what: str) -> SimpleNamespace:
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise ConfigError(
            f"ktfast.{what}: unknown keyword {unknown[0]!r} (the keywords are the flags of "
            f"`ktfast {what}`: {', '.join(defaults)})"
        )
    for key, value in given.items():
        if key in CHOICES and value is not None and value not in CHOICES[key]:
            raise ConfigError(f"--{key.replace('_', '-')}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return SimpleNamespace(**{**defaults, **given})


def _check_numbers(opts) -> None:
    """What the flags' types check on the command line."""
    for key in ("epochs", "batch_size"):
        value = getattr(opts, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"--{key.replace('_', '-')}: expected a positive integer, got {value!r}")
    seeds = opts.seeds
    if seeds is not None:
        if (
            not isinstance(seeds, (list, tuple))
            or not seeds
            or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            raise ConfigError(f"--seeds: expected distinct integers, got {seeds!r}")
        opts.seeds = list(seeds)


def train(
    graph=None, *, progress: bool = False, callbacks: tuple[Callable[[dict], None], ...] = (), **options
) -> Run:
    """Train `graph` (a path, a dict or a Graph; or None with `like=RUN` or `resume=DIR`) as
    `ktfast train` does with the flags `options` (`epochs=5`, `batch_size=32`, `seeds=[0, 1]`,
    `out="runs/x"`, …). Each callback gets every epoch's metrics row (rank 0; seed after seed)."""
    opts = _options({k: RUN_OPTIONS.get(k) for k in train_options()}, options, "train")
    _check_numbers(opts)
    if graph is not None:
        opts.graph = as_graph(graph)
    say = functools.partial(print, flush=True) if progress else _silent
    root, models = run_session(opts, say=say, progress=progress, callbacks=tuple(callbacks))
    return Run(root, models)


def search(*, progress: bool = False, **options):
    """Run the search `ktfast search` runs with the flags `options` (`nodes=3`, `target_model=
    "resnet32"`, `trials=20`, `models=["resnet8", …]`, `dataset="digits"`, `epochs=4`, …), to the
    end; the optuna.Study, whose trials hold each graph (`user_attrs["graph"]`)."""
    recipe = {name: None for name in flag_fields() if name != "split"}  # a search trains on its own split
    opts = _options({**SEARCH_OPTIONS, **recipe}, options, "search")
    for key in ("nodes", "target_model", "trials"):
        if getattr(opts, key) is None:
            raise ConfigError(f"ktfast.search: {key} is required")
    _check_numbers(SimpleNamespace(epochs=opts.epochs, batch_size=opts.batch_size, seeds=None))
    for key in ("models", "gates", "losses"):  # lists, or comma-separated as on the command line
        value = getattr(opts, key)
        if isinstance(value, (list, tuple)):
            setattr(opts, key, ",".join(value))
    study = run_search(opts, quiet=not progress)
    if progress:
        from ktfast.graph_search.workers import summary

        print(summary(study, opts.storage, opts.trials), flush=True)
    return study
