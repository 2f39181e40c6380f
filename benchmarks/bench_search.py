"""Search efficiency: trials finished per hour with K trials sharing each GPU, for every way of packing
them (`ktfast search --pack`: plain processes, time-sliced; threads of one worker on their own CUDA
streams; processes through a CUDA MPS daemon), side by side in one run, with the best objective each
row reached (search_val accuracy of the target) and when: trials per GPU-hour at a fixed accuracy,
the figure a searcher pays for.

Every row runs the same graphs (enqueued in a fresh study, so no sampler luck), the same epochs per
trial and no pruning, through the real `ktfast search` command: worker start-up is included in the
wall time, and "steady" counts from the first trial's start to the last one's end; "best_after_s"
from the search's start to the end of the trial that reached the best objective (the first such). No graph has a
frozen node, so no teacher is pre-trained inside the timing. K = 1 is one row: with one trial per GPU
there is nothing to pack. The GPU busy fraction is NVML's utilization (the share of time a kernel
ran), sampled every 0.2 s over the whole run and over its steady part; null on a CPU. Where MPS cannot
run, its rows are left out and the result says why.

    python benchmarks/bench_search.py                      # on a GPU: K = 1, 2, 4, 8, ResNet32 3-node graphs
    python benchmarks/bench_search.py --packs threads,mps --ks 1,4
    python benchmarks/bench_search.py --gpus 0,1 --amp     # options it does not know go to `ktfast search`
    python benchmarks/bench_search.py --smoke              # CPU-sized, what CI runs: K = 1, 2
"""

from __future__ import annotations

import argparse
import datetime
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch
from common import environment, write_result

from ktfast.args import config_from_args
from ktfast.cli import build_parser
from ktfast.commands.search import space_from_args
from ktfast.graph import LABEL
from ktfast.graph_search.packing import MPSDaemon
from ktfast.graph_search.search import Space
from ktfast.graph_search.study import open_storage, open_study

SAMPLE_S = 0.2


def graphs(space: Space, n: int, seed: int) -> list[dict]:
    """n fixed parameter sets: random gates between nodes, label edges never cut off (no frozen node)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        params = {f"model {m}": rng.choice(space.models) for m in space.names[1:]}
        for s, t in space.edges():
            params[f"gate {s}->{t}"] = rng.choice(
                [g for g in space.gates if g != "cutoff"] if s == LABEL else space.gates
            )
        out.append(params)
    return out


class BusySampler:
    """NVML's utilization of the given GPUs, sampled in a thread while a search runs."""

    def __init__(self, gpus: list[int] | None):
        self.gpus, self.samples, self._stop = gpus, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(SAMPLE_S):
            busy = sum(torch.cuda.utilization(g) for g in self.gpus) / len(self.gpus)
            self.samples.append((datetime.datetime.now(), busy / 100))

    def __enter__(self):
        try:
            if self.gpus:
                torch.cuda.utilization(self.gpus[0])
        except Exception:  # no NVML bindings (pynvml): no figure rather than a wrong one
            self.gpus = None
        if self.gpus:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.gpus:
            self._thread.join()

    def mean(self, start=None, end=None) -> float | None:
        inside = [b for t, b in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return sum(inside) / len(inside) if inside else None


def run(cli: list[str], params: list[dict], workdir: Path, gpus: list[int] | None) -> dict:
    """One `ktfast search` over a fresh study holding `params` as its queued trials. Per GPU-hour: the
    trials/hour over the GPUs the row used (None on a CPU)."""
    args = build_parser().parse_args(cli)
    space, cfg = space_from_args(args), config_from_args(args).replace(split="search")
    study = open_study(open_storage(args.storage), args.study, space, cfg, args.pruner, args.min_resource)
    for p in params:
        study.enqueue_trial(p)
    start, started = time.perf_counter(), datetime.datetime.now()
    with BusySampler(gpus) as busy:
        search = subprocess.run(
            [sys.executable, "-m", "ktfast", *cli],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    wall = time.perf_counter() - start
    assert search.returncode == 0, search.stderr[-2000:]
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == len(params), f"{len(done)} of {len(params)} trials completed"
    first, last = min(t.datetime_start for t in done), max(t.datetime_complete for t in done)
    trial_s = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    best = max(done, key=lambda t: (t.value, -t.datetime_complete.timestamp()))  # the first to reach it
    row = {
        "trials": len(done),
        "wall_s": wall,
        "trials_per_hour": 3600 * len(done) / wall,
        "trials_per_gpu_hour": 3600 * len(done) / wall / len(gpus) if gpus else None,
        "best_objective": best.value,
        "best_trial": best.number,
        "best_after_s": (best.datetime_complete - started).total_seconds(),
        "steady_trials_per_hour": 3600 * len(done) / (last - first).total_seconds(),
        "mean_trial_s": sum(trial_s) / len(trial_s),
        "gpu_busy": busy.mean(),
        "gpu_busy_steady": busy.mean(first, last),
    }
    return row


def parse_args():
    """The options, and the flags passed on to `ktfast search` as they are."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    ap.add_argument("--ks", default=None, help="trials per GPU to compare (default 1,2,4,8; smoke 1,2)")
    ap.add_argument(
        "--packs",
        default=None,
        help="ways to pack K > 1 (default processes,threads,mps; smoke processes,threads)",
    )
    ap.add_argument("--trials", type=int, default=None, help="trials per row (default 16; smoke 4)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--model", default=None, help="model of every node (default resnet32; smoke resnet8)")
    ap.add_argument(
        "--dataset",
        default=None,
        help="default synthetic:classes=100,size=32,train=5000,test=1000 (smoke: a tiny one)",
    )
    ap.add_argument("--gpus", default="0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the graphs")
    ap.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
    return ap.parse_known_args()


def main():
    args, passthrough = parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    ks = [int(k) for k in (args.ks or ("1,2,4,8" if cuda else "1,2")).split(",")]
    packs = (args.packs or ("processes,threads,mps" if cuda else "processes,threads")).split(",")
    n = args.trials or (16 if cuda else 4)
    model = args.model or ("resnet32" if cuda else "resnet8")
    dataset = args.dataset or (
        "synthetic:classes=100,size=32,train=5000,test=1000"
        if cuda
        else "synthetic:classes=4,size=16,train=96,test=40"
    )
    gpus = [int(g) for g in args.gpus.split(",")] if cuda else None
    base = [
        "search",
        "--nodes",
        str(args.nodes),
        "--target-model",
        model,
        "--models",
        model,
        "--dataset",
        dataset,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--trials",
        str(n),
        "--pruner",
        "none",
        "--quiet",
        *passthrough,
    ]
    result = {
        "benchmark": "search",
        **environment(cuda),
        "gpus": args.gpus if cuda else None,
        "objective": "target accuracy on search_val",
        "optuna": optuna.__version__,
        "dataset": dataset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "graph": f"{args.nodes} x {model}, random gates, no frozen node",
        "search_args": passthrough,
        "mps": None,
        "rows": [],
    }
    rows = result["rows"]
    plan = packing_plan(ks, packs, args.gpus, result)
    with tempfile.TemporaryDirectory() as tmp:
        for k, pack in plan:
            per_k = (
                ["--device", "cuda", "--gpus", args.gpus, "--trials-per-gpu", str(k)]
                if cuda
                else ["--device", "cpu", "--workers", str(k)]
            )
            cli = [
                *base,
                *per_k,
                "--pack",
                pack,
                "--storage",
                f"sqlite:///{tmp}/{pack}-k{k}.db",
                "--study",
                f"bench-{pack}-k{k}",
            ]
            space = space_from_args(build_parser().parse_args(cli))
            row = {
                "pack": pack,
                "trials_per_gpu": k,
                **run(cli, graphs(space, n, args.seed), Path(tmp), gpus),
            }
            row["speedup"] = row["trials_per_hour"] / rows[0]["trials_per_hour"] if rows else 1.0
            row["steady_speedup"] = (
                row["steady_trials_per_hour"] / rows[0]["steady_trials_per_hour"] if rows else 1.0
            )
            rows.append(row)
            print_row(row)
            written = write_result(
                "search", result, cuda, args.out
            )  # after every row: a cut-off run keeps its rows
    print(f"wrote {written}")


def packing_plan(ks: list[int], packs: list[str], gpus: str, result: dict) -> list[tuple[int, str]]:
    """The rows to measure: K = 1 once (nothing to pack), then every way of packing each K > 1; MPS
    only where its daemon runs (the result says whether it does)."""
    plan = [(k, "processes") for k in ks if k == 1] + [(k, pack) for k in ks if k > 1 for pack in packs]
    if "mps" in packs:
        with MPSDaemon(gpus.split(",")[0], max(ks)) as mps:  # says why on stderr where it cannot run
            result["mps"] = "available" if mps.why is None else f"cannot run: {mps.why}"
        if mps.why is not None:  # its rows would be the processes' again
            plan = [(k, pack) for k, pack in plan if pack != "mps"]
    return plan


def print_row(row: dict) -> None:
    busy = f"{row['gpu_busy_steady']:6.1%} busy" if row["gpu_busy_steady"] is not None else ""
    print(
        f"{row['pack']:<9} K={row['trials_per_gpu']:<2} {row['wall_s']:8.1f} s  {row['trials_per_hour']:9.1f} "
        f"trials/h  (steady {row['steady_trials_per_hour']:9.1f})  best {row['best_objective']:6.1%} after "
        f"{row['best_after_s']:6.1f} s  {row['mean_trial_s']:7.1f} s/trial  "
        f"x{row['speedup']:.2f} (steady x{row['steady_speedup']:.2f})  {busy}",
        flush=True,
    )


if __name__ == "__main__":
    main()
