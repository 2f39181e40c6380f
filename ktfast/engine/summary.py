"""A run's `summary.json` (docs/ARCHITECTURE.md §2): each node's test accuracy after the last epoch and at the epoch of
the target's best val accuracy, as mean ± sample std over the seeds and per seed, read back from each
seed's metrics.jsonl once every seed has finished, however the seeds ran; and the table printed from it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ktfast.args import UsageError
from ktfast.engine.checkpoint import write_text_atomic
from ktfast.engine.trainer import METRICS
from ktfast.graph import Graph

SUMMARY = "summary.json"


def seed_dirs(root: Path, seeds: list[int]) -> dict[int, Path]:
    """Where each seed's run directory is: OUT/seed{s} with several seeds, OUT itself with one."""
    return {s: root / f"seed{s}" for s in seeds} if len(seeds) > 1 else {seeds[0]: root}


def _rows(run: Path) -> list[dict]:
    path = run / METRICS
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    if not rows:
        raise UsageError(f"{run} holds no finished epoch (no rows in its {METRICS})")
    return rows


def best_val_row(rows: list[dict], target: str) -> dict | None:
    """The row of the first epoch with the target's best val accuracy (checkpoint-best.pt's), or None
    without a val split."""
    with_val = [r for r in rows if "val" in r]
    return max(with_val, key=lambda r: r["val"][target]["acc"]) if with_val else None  # max keeps the first


def _stats(accs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "per_seed": accs,
    }


def summarise(graph: Graph, runs: dict[int, Path]) -> dict:
    """{"target", "seeds", "nodes": {node: {"last": {"mean", "std", "per_seed"}, "best_val": {…, "epochs"}}}}:
    test accuracies in [0, 1], `per_seed` (and `epochs`, the best-val epoch of the target) in the order
    of `seeds`; `best_val` only where every seed has a val split."""
    rows = {s: _rows(run) for s, run in runs.items()}
    best = {s: best_val_row(r, graph.target) for s, r in rows.items()}
    nodes = {}
    for name in graph.nodes:
        nodes[name] = {"last": _stats([r[-1]["test"][name]["acc"] for r in rows.values()])}
        if all(b is not None for b in best.values()):
            nodes[name]["best_val"] = {
                **_stats([b["test"][name]["acc"] for b in best.values()]),
                "epochs": [b["epoch"] for b in best.values()],
            }
    return {"target": graph.target, "seeds": list(runs), "nodes": nodes}


def write_summary(root: Path, graph: Graph, runs: dict[int, Path]) -> dict:
    """summary.json at the top of the run directory `root`, written atomically; returns it."""
    summary = summarise(graph, runs)
    write_text_atomic(root / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def result_table(graph: Graph, summary: dict, split: str = "train") -> str:
    """Each node's last test accuracy (%) and, with a val split, its test accuracy at the target's best
    val epoch; mean ± std with several seeds."""
    seeds = len(summary["seeds"])
    multi = seeds > 1
    with_val = "best_val" in summary["nodes"][graph.target]
    what = "validation accuracy on the search split" if split == "search" else "test accuracy"
    head = f"{what} (%){f', mean ± std of {seeds} seeds' if multi else ''}"
    columns = [("last", "last epoch" if with_val else "accuracy")] + (
        [("best_val", "at best val")] if with_val else []
    )
    lines = [head, f"{'node':<12} {'model':<22} " + " ".join(f"{title:>16}" for _, title in columns)]
    for name, node in graph.nodes.items():
        kind = getattr(node, "model", None) or f"{node.reduce} of {'+'.join(node.members)}"
        mark = (" (target)" if name == graph.target else "") + (
            " (frozen)" if getattr(node, "frozen", False) else ""
        )
        cells = []
        for key, _ in columns:
            s = summary["nodes"][name][key]
            cells.append(
                f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if multi else f"{100 * s['mean']:.2f}"
            )
        lines.append(f"{name:<12} {kind:<22} " + " ".join(f"{c:>16}" for c in cells) + mark)
    if with_val:
        epochs = summary["nodes"][graph.target]["best_val"]["epochs"]
        lines.append(
            f"best val epoch of {graph.target}: "
            + ", ".join(f"{e} (seed {s})" if multi else str(e) for s, e in zip(summary["seeds"], epochs))
        )
    return "\n".join(lines)
