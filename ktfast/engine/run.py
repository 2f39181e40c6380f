"""Planning a run: the graph's pretrained teachers are found in the pretrain cache, or trained into
it first (`ktfast.engine.pretrain`), and only then is the Trainer built, so that training knows nothing
of pretraining."""

from __future__ import annotations

from pathlib import Path

from ktfast.config import TrainConfig
from ktfast.data import load_arrays
from ktfast.engine.build import build_trainer
from ktfast.engine.distributed import Placement, rank_zero_first
from ktfast.engine.pretrain import pretrained_path
from ktfast.engine.trainer import Trainer
from ktfast.graph import Graph


def pretrained_paths(graph: Graph, cfg: TrainConfig, log=print, progress=True) -> dict[str, Path]:
    """The pretrain-cache file of every `"init": "pretrained"` node, made where missing."""
    return {
        node.name: pretrained_path(node.model, cfg, log=log, progress=progress)
        for node in graph.model_nodes
        if node.init == "pretrained" and not node.checkpoint
    }


def make_trainer(
    graph: Graph,
    cfg: TrainConfig,
    out: Path | None,
    log=print,
    progress=True,
    placement: Placement | None = None,
) -> Trainer:
    """The Trainer of a run (of this rank's part in a run of several: `placement`)."""

    # Pretraining first: it draws random numbers, and the Trainer's seeded initialisation must not
    # depend on whether the cache already held the teachers. Over several ranks, rank 0 fills the
    # caches (data and teachers) before the others look.
    def prepare():
        load_arrays(cfg.dataset, cfg.data_dir)
        return pretrained_paths(graph, cfg, log, progress)

    paths = rank_zero_first(prepare)
    return build_trainer(graph, cfg, out, log, progress, pretrained=paths, placement=placement)
