"""Training-step throughput: the fast path vs the reference path, and the fast path with horizontal
fusion (`--fuse`) vs without, side by side in one run.

images/s counts each training image once for the whole graph (as metrics.jsonl does). Each
configuration trains real steps on synthetic CIFAR-size data; the first steps (compilation,
CUDA-graph capture) are excluded, the loader is included.

    python benchmarks/bench_step.py                 # on a GPU: reference, fast, fast without the CUDA graph
    python benchmarks/bench_step.py --paths reference,fast-compile --graphs dcl3 --batch-sizes 64
    python benchmarks/bench_step.py --smoke         # CPU-sized, what CI runs
    python benchmarks/bench_step.py --seeds 5 --graphs dcl3 --batch-sizes 64   # 5 seeds: replicas vs one by one

With `--seeds S` each row compares the S seeds' runs trained as replicas (one stacked step,
`ktfast.engine.replicas`) with the same S runs one by one, in images/s × S (each replica's images
counted), with the default switches of `ktfast train --amp` (on a CPU, of `ktfast train`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from common import environment, write_result

from ktfast import Graph
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.replicas import Replicas
from ktfast.engine.trainer import Trainer


def graph(name: str, models: list[str]) -> Graph:
    nodes = [f"n{i + 1}" for i in range(len(models))]
    edges = [{"from": "label", "to": n, "loss": "ce", "gate": "through"} for n in nodes]
    gates = itertools.cycle(["through", "linear", "correct"])
    edges += [
        {"from": s, "to": t, "loss": "kl", "gate": next(gates)} for s, t in itertools.permutations(nodes, 2)
    ]
    return Graph.from_dict(
        {
            "version": 1,
            "name": name,
            "target": "n1",
            "nodes": [{"name": n, "model": m} for n, m in zip(nodes, models)],
            "edges": edges,
        }
    )


GRAPHS = {
    "dcl3 (R32,R110,R32)": ["resnet32", "resnet110", "resnet32"],
    "dml4 (4xR32)": ["resnet32"] * 4,
    "abn5 (5xABN18)": ["abn18"] * 5,
    "7 nodes (R32,R110,WRN28-2,..)": [
        "resnet32",
        "resnet110",
        "wrn28_2",
        "resnet32",
        "resnet56",
        "wrn28_2",
        "resnet20",
    ],
}
SMOKE_GRAPHS = {"dml2 (2xR8)": ["resnet8", "resnet8"]}
# The paths a row compares, as TrainConfig flags; "fast" is the main command, `ktfast train --amp`.
PATHS = {
    "reference": dict(reference=True, cuda_graph=False, fuse=False),
    "fast": dict(amp=True, fuse=False),
    "fast-eager": dict(amp=True, cuda_graph=False, fuse=False),
    "fast-compile": dict(amp=True, compile=True, fuse=False),
    "fused": dict(amp=True, fuse=True),
}
DESCRIPTIONS = {
    "reference": "eager, fp32, per-edge torch losses",
    "fast": "streams, channels_last, fused losses, fused SGD, AMP, the step as one CUDA graph",
    "fast-eager": "as fast, without the CUDA graph (--no-cuda-graph)",
    "fast-compile": "as fast, with torch.compile of every node (--compile)",
    "fused": "as fast, with the nodes of one model and role fused into one module (--fuse)",
}


def batches(trainer: Trainer):
    """The training batches, epoch after epoch, endlessly."""
    epoch = 0
    while True:
        trainer.train_loader.set_epoch(epoch)
        yield from trainer.train_loader
        epoch += 1


def replica_batches(replicas: Replicas):
    """The replicas' batches, each its own seed's, concatenated as `Replicas.train_step` takes them."""
    streams = [batches(t) for t in replicas.trainers]
    while True:
        x, y = zip(*(next(s) for s in streams))
        yield torch.cat(x), torch.cat(y)


def seeds_row(g: Graph, cfg: TrainConfig, seeds: int, steps: int, warmup: int) -> dict:
    """S seeds' runs one by one (each alone, in turn) and as replicas: images/s × S, and the time of
    a replica step against one seed's step (the goal: 5 seeds in <= 2x one seed's time)."""
    configs = [cfg.replace(seed=s) for s in range(seeds)]
    alone = []
    for c in configs:  # one trainer at a time, as --seeds-one-by-one trains them
        trainer = build_trainer(g, c, out=None, progress=False, log=lambda _: None)
        alone.append(throughput(trainer, batches(trainer), steps, warmup))
        del trainer
    replicas = Replicas([build_trainer(g, c, out=None, progress=False, log=lambda _: None) for c in configs])
    together = throughput(replicas, replica_batches(replicas), steps, warmup)
    one_by_one = {
        "images_per_s": sum(r["images"] for r in alone) / sum(r["elapsed_s"] for r in alone),
        "ms_per_seed_step": sum(r["ms_per_step"] for r in alone) / seeds,
        "runs": alone,
    }
    return {
        "seeds": seeds,
        "one_by_one": one_by_one,
        "replicas": together,
        "speedup": together["images_per_s"] / one_by_one["images_per_s"],
        "time_vs_one_seed": together["ms_per_step"] / one_by_one["ms_per_seed_step"],
    }


def throughput(trainer: Trainer, it, steps: int, warmup: int) -> dict:
    cfg = trainer.cfg
    cuda = cfg.device == "cuda"
    for k in range(warmup):
        trainer.train_step(*next(it), k + 1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    images = 0
    start = time.perf_counter()
    for k in range(steps):
        x, y = next(it)
        trainer.train_step(x, y, warmup + k + 1)
        images += y.shape[0]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {
        "images_per_s": images / elapsed,
        "ms_per_step": 1e3 * elapsed / steps,
        "images": images,
        "elapsed_s": elapsed,
        "peak_mem_mib": peak,
        "config": {k: getattr(cfg, k) for k in ("reference", "amp", "compile", "cuda_graph", "fuse")},
        "cuda_graph_used": trainer.step.use_graph,
    }


def profile(trainer: Trainer, it, first_step: int, steps: int = 20) -> dict:
    """Where a (warm) fast step's time goes: the kernels by GPU time per step, and how busy the GPU
    is (kernel time / wall time; the rest is launch gaps, host work and the loader). On a CPU, the
    operators stand in for the kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = trainer.cfg.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for k in range(steps):
            trainer.train_step(*next(it), first_step + k)
        sync()
        wall = time.perf_counter() - start
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == device and (cuda or e.name.startswith("aten::"))]
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
    per_name: dict = {}
    for e in kernels:
        t, n = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "ms_per_step": 1e3 * wall / steps,
        "gpu_busy": busy / (1e6 * wall),
        "kernels_per_step": len(kernels) / steps,
        "top_kernels": [
            {"name": n, "us_per_step": t / steps, "calls_per_step": c / steps} for n, (t, c) in top
        ],
    }


def _union_us(intervals: list) -> float:
    """Total length of a union of intervals: kernels on concurrent streams overlap."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    ap.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default 64,256 on a GPU, 16 on a CPU)"
    )
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 60; 3 on a CPU)")
    ap.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="compare S seeds trained as replicas with S runs one by one (instead of the paths)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile the fast path of the first row")
    ap.add_argument("--graphs", default=None, help="only the graphs whose names start so (comma-separated)")
    ap.add_argument(
        "--paths",
        default="reference,fast,fast-eager,fused",
        help=f"comma-separated, of {', '.join(PATHS)} (fast-compile adds minutes of compilation)",
    )
    ap.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
    return ap.parse_args()


def chosen_graphs(starts: str | None, cuda: bool) -> dict:
    """The graphs to measure: the device's table, or those of either table whose names start as
    --graphs says (on a CPU too); exits 2 where none does."""
    if not starts:
        return GRAPHS if cuda else SMOKE_GRAPHS
    graphs = {
        n: m for n, m in {**GRAPHS, **SMOKE_GRAPHS}.items() if any(n.startswith(w) for w in starts.split(","))
    }
    if not graphs:
        print(
            f"--graphs: no graph's name starts with {starts!r} (the graphs: "
            f"{', '.join([*GRAPHS, *SMOKE_GRAPHS])})",
            file=sys.stderr,
        )
        sys.exit(2)
    return graphs


def main():
    args = parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    graphs = chosen_graphs(args.graphs, cuda)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("64,256" if cuda else "16")).split(",")]
    steps, warmup = (args.steps or 60, 15) if cuda else (args.steps or 3, 1)
    dataset = (
        "synthetic:classes=100,size=32,train=8192,test=256"
        if cuda
        else "synthetic:classes=10,size=16,train=64,test=16"
    )
    names = args.paths.split(",")
    unknown = [p for p in names if p not in PATHS]
    if unknown:
        print(f"--paths: unknown path {unknown[0]!r} (expected {', '.join(PATHS)})", file=sys.stderr)
        sys.exit(2)
    paths = {p: PATHS[p] for p in names}
    if args.seeds:
        return seeds_main(args, graphs, batch_sizes, dataset, device, cuda, steps, warmup)
    result = {
        "benchmark": "step",
        **environment(cuda),
        "dataset": dataset,
        "steps": steps,
        "warmup": warmup,
        "paths": {
            p: DESCRIPTIONS[p] + ("" if cuda else " (CPU: the eager step, no CUDA graph, no AMP)")
            for p in paths
        },
        "rows": [],
    }
    for (name, models), bs in itertools.product(graphs.items(), batch_sizes):
        row, runs = paths_row(graph(name, models), bs, paths, dataset, device, steps, warmup)
        row = {"graph": name, "batch_size": bs, **row}
        result["rows"].append(row)
        print(
            f"{name:<32} B={bs:<4} "
            + "   ".join(f"{p} {row[p]['images_per_s']:9.0f} img/s" for p in paths)
            + "".join(
                f"   {p} x{row[p]['speedup_vs_reference']:.2f}"
                for p in paths
                if "speedup_vs_reference" in row[p]
            ),
            flush=True,
        )
        if args.profile and "profile" not in result:
            path = "fast" if "fast" in runs else names[-1]
            result["profile"] = profiled(runs[path], name, bs, path, warmup + steps + 1, cuda)
        written = write_result(
            "step", result, cuda, args.out
        )  # after every row: a cut-off run keeps its rows
    print(f"wrote {written}")


def paths_row(g: Graph, bs: int, paths: dict, dataset: str, device: str, steps: int, warmup: int):
    """Every path's throughput on graph g at batch size bs, with the speed-ups between them, and
    {path: (its trainer, its batches)}."""
    cuda = device == "cuda"
    row, runs = {}, {}
    for path, flags in paths.items():
        amp = flags.get("amp", False) and cuda  # bf16 on a CPU would only measure slow bf16 kernels
        cfg = TrainConfig(dataset=dataset, epochs=100, batch_size=bs, device=device, **{**flags, "amp": amp})
        trainer = build_trainer(g, cfg, out=None, progress=False, log=lambda _: None)
        runs[path] = trainer, batches(trainer)
        row[path] = throughput(*runs[path], steps, warmup)
    for path in paths:
        if "reference" in paths and path != "reference":
            row[path]["speedup_vs_reference"] = row[path]["images_per_s"] / row["reference"]["images_per_s"]
    if "fast" in paths and "fast-eager" in paths:  # what capturing the step as a CUDA graph gains
        row["fast"]["speedup_vs_eager_step"] = row["fast"]["images_per_s"] / row["fast-eager"]["images_per_s"]
    if "fast" in paths and "fused" in paths:  # what fusing the same-model nodes gains
        row["fused"]["speedup_vs_fast"] = row["fused"]["images_per_s"] / row["fast"]["images_per_s"]
    return row, runs


def profiled(run: tuple, name: str, bs: int, path: str, first_step: int, cuda: bool) -> dict:
    """The profile of one path's steps (the result's "profile"), printed with its top kernels."""
    p = {"graph": name, "batch_size": bs, "path": path, **profile(*run, first_step, steps=20 if cuda else 2)}
    print(
        f"  profile of the {path} step: GPU busy {100 * p['gpu_busy']:.0f} % of {p['ms_per_step']:.2f} ms, "
        f"{p['kernels_per_step']:.0f} kernels; the top ones:"
    )
    for k in p["top_kernels"][:8]:
        print(f"  {k['us_per_step']:8.1f} us/step {k['calls_per_step']:5.1f}x  {k['name'][:90]}", flush=True)
    return p


def seeds_main(
    args, graphs: dict, batch_sizes: list[int], dataset: str, device: str, cuda: bool, steps: int, warmup: int
) -> None:
    result = {
        "benchmark": "replicas",
        **environment(cuda),
        "dataset": dataset,
        "steps": steps,
        "warmup": warmup,
        "switches": "ktfast train's defaults" + (" with --amp" if cuda else " (a CPU: the eager step)"),
        "rows": [],
    }
    for (name, models), bs in itertools.product(graphs.items(), batch_sizes):
        cfg = TrainConfig(dataset=dataset, epochs=100, batch_size=bs, device=device, amp=cuda)
        row = {
            "graph": name,
            "batch_size": bs,
            **seeds_row(graph(name, models), cfg, args.seeds, steps, warmup),
        }
        result["rows"].append(row)
        print(
            f"{name:<32} B={bs:<4} {args.seeds} seeds: one by one {row['one_by_one']['images_per_s']:9.0f} img/s, "
            f"replicas {row['replicas']['images_per_s']:9.0f} img/s (x{row['speedup']:.2f}); a replica step "
            f"{row['time_vs_one_seed']:.2f}x one seed's",
            flush=True,
        )
        written = write_result("replicas", result, cuda, args.out)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
