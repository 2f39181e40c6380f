"""The pretrain cache: label-only checkpoints that `"init": "pretrained"` nodes start from.

A checkpoint is made once per (model, dataset, split, recipe) and shared by every run and search
worker; a file lock makes concurrent workers wait for the one that trains it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ktfast.config import TrainConfig, cache_key
from ktfast.engine.build import build_trainer
from ktfast.graph import Graph


def cache_dir() -> Path:
    return Path(os.environ.get("KTFAST_CACHE", Path.home() / ".cache" / "ktfast")) / "pretrained"


def cache_path(model: str, cfg: TrainConfig) -> Path:
    # Everything that changes what the teacher learns is part of the key; the run's seed is not,
    # so the five seeds of a study share one teacher, as in the papers. With a train fraction the
    # seed draws the subset: then each seed's teacher learns that seed's subset and nothing else.
    # The val fraction is in the key (the teacher never sees the run's val part) only when set.
    recipe = cache_key(cfg)
    if cfg.train_fraction is not None:
        recipe["subset_seed"] = cfg.seed
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.dataset)
    return cache_dir() / f"{model}-{dataset}-{cfg.split}-e{cfg.epochs}-{digest}.pt"


def label_only_graph(model: str) -> Graph:
    return Graph.from_dict(
        {
            "name": f"pretrain-{model}",
            "target": "m",
            "nodes": [{"name": "m", "model": model}],
            "edges": [{"from": "label", "to": "m", "loss": "ce", "gate": "through"}],
        }
    )


def pretrain(model: str, cfg: TrainConfig, log=print, progress=True) -> Path:
    """Train `model` on the labels alone and store it in the cache (if it is not there yet)."""
    path = cache_path(model, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process trains; the others wait, then load it
        if path.exists():
            return path
        log(f"pretraining {model} on {cfg.dataset} ({cfg.epochs} epochs) for the pretrain cache")
        seed = cfg.seed if cfg.train_fraction is not None else 0  # see cache_path
        trainer = build_trainer(
            label_only_graph(model),
            cfg.replace(seed=seed, compile=False),
            out=None,
            log=log,
            progress=progress,
        )
        rows = trainer.fit()
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "model": model,
                "dataset": cfg.dataset,
                "config": cfg.to_dict(),
                "test": rows[-1]["test"]["m"] if rows else None,
                "state_dict": trainer.models["m"].state_dict(),
            },
            tmp,
        )
        os.replace(tmp, path)
        log(f"saved {path}")
    return path


def pretrained_path(model: str, cfg: TrainConfig, log=print, progress=True) -> Path:
    path = cache_path(model, cfg)
    if path.exists():
        return path
    log(f"no pretrained {model} for {cfg.dataset} in the cache: training it first (ktfast pretrain)")
    return pretrain(model, cfg, log=log, progress=progress)
