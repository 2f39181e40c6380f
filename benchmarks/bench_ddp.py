"""Data-parallel gradients (place data, docs/ARCHITECTURE.md §10): what `ktfast train` does, torch's
DistributedDataParallel on each unfused trainable node (`Placement.data_parallel`: bucketed
all-reduces launched during the backward, `gradient_as_bucket_view`, `static_graph`), against one flat
all-reduce of every gradient after the whole backward (`Placement.average_gradients` alone), side by
side in one run of 2 processes or more.

Both variants train their own copy of the same graph, seed and batches, in rounds that alternate which
goes first; a row gives the median ms per step over the rounds (rank 0's clock, the ranks in step), and
whether the two copies' weights are still equal bit for bit at the end (at 2 processes they must be:
a + b is commutative, and halving is exact whether it comes before the sum, as in DDP, or after it).

    python benchmarks/bench_ddp.py            # CPU: 2 gloo processes; CUDA: one per GPU (NCCL), one: skipped
    python benchmarks/bench_ddp.py --smoke    # CPU-sized, what CI runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_step import batches, graph
from common import environment, write_result

from ktfast.config import TrainConfig
from ktfast.engine import distributed
from ktfast.engine.build import build_trainer
from ktfast.engine.distributed import Placement
from ktfast.engine.trainer import Trainer

GRAPHS = {"dml2 (2xR8)": ["resnet8", "resnet8"], "dml2 (2xR32)": ["resnet32", "resnet32"]}
GPU_GRAPHS = {"dcl3 (R32,R110,R32)": ["resnet32", "resnet110", "resnet32"]}
SMOKE_DATA = "synthetic:classes=10,size=16,train=64,test=16"


class FlatPlacement(Placement):
    """Placement before DDP: every trainable node's gradients averaged in one flat all-reduce after
    the whole backward (`average_gradients` alone)."""

    def data_parallel(self, units) -> None:
        pass


def block(trainer: Trainer, it, steps: int, first: int, sync) -> float:
    """Seconds of `steps` training steps, the ranks starting together."""
    sync()
    dist.barrier()
    start = time.perf_counter()
    for k in range(steps):
        trainer.train_step(*next(it), first + k)
    sync()
    return time.perf_counter() - start


def compare(g, cfg: TrainConfig, rank: int, world: int, rounds: int, steps: int, warmup: int) -> dict:
    trainers = {}
    for variant, kind in (("flat", FlatPlacement), ("ddp", Placement)):
        trainer = build_trainer(
            g, cfg, out=None, progress=False, log=lambda _: None, placement=kind(g, "data", rank, world)
        )
        trainers[variant] = trainer, batches(trainer)
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    times = {v: [] for v in trainers}
    for trainer, it in trainers.values():
        block(trainer, it, warmup, 1, sync)
    for r in range(rounds):
        for variant in ("flat", "ddp") if r % 2 == 0 else ("ddp", "flat"):
            trainer, it = trainers[variant]
            times[variant].append(1e3 * block(trainer, it, steps, warmup + r * steps + 1, sync) / steps)
    row = {v: {"ms_per_step": statistics.median(t), "rounds_ms_per_step": t} for v, t in times.items()}
    row["ddp_vs_flat"] = row["ddp"]["ms_per_step"] / row["flat"]["ms_per_step"]
    # Each round's own ratio (its two blocks run back to back): steadier where other work loads the machine.
    row["ddp_vs_flat_paired"] = statistics.median(d / f for d, f in zip(times["ddp"], times["flat"]))
    # The parameter tensors each variant's DDP holds: all of them, and none (the flat all-reduce's).
    for variant, (trainer, _) in trainers.items():
        row[variant]["ddp_params"] = len(trainer.placement.held)
    groups = trainers["flat"][0].optimizer.param_groups
    row["trainable_params"] = sum(len(group["params"]) for group in groups)
    flat, ddp = (trainers[v][0].models for v in ("flat", "ddp"))
    pairs = [
        pair
        for name in flat
        for pair in zip(flat[name].state_dict().values(), ddp[name].state_dict().values())
    ]
    diff = max((a - b).abs().max().item() for a, b in pairs if a.numel())
    row.update(weights_equal=diff == 0.0, weights_max_abs_diff=diff)
    return row


def worker(args) -> None:
    """One rank: every row, rank 0 writing the JSON after each."""
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # a core per process
    with distributed.process_group(device) as (rank, world):
        graphs = GPU_GRAPHS if cuda else {k: v for k, v in GRAPHS.items() if not args.smoke or "R8" in k}
        dataset = (
            "synthetic:classes=100,size=32,train=8192,test=256"
            if cuda
            else SMOKE_DATA
            if args.smoke
            else "digits"
        )
        bs = args.batch_size or (8 if args.smoke else 32 if not cuda else 64 * world)
        rounds, steps, warmup = (2, 2, 1) if args.smoke else (args.rounds, args.steps, 3 if not cuda else 10)
        # The eager step on a CPU; on CUDA ktfast's fast path as it runs on several processes (no CUDA graph).
        flags = dict(amp=True, cuda_graph=False) if cuda else {}
        cfg = TrainConfig(
            dataset=dataset,
            epochs=100,
            batch_size=bs,
            lr=0.05,
            device=device,
            fuse=False,
            place="data",
            world_size=world,
            **flags,
        )
        result = {
            "benchmark": "ddp",
            **environment(cuda),
            "world_size": world,
            "backend": dist.get_backend(),
            "dataset": dataset,
            "rounds": rounds,
            "steps_per_round": steps,
            "warmup": warmup,
            "threads_per_process": torch.get_num_threads(),
            "rows": [],
        }
        for name, models in graphs.items():
            row = {
                "graph": name,
                "batch_size": bs,
                **compare(graph(name, models), cfg, rank, world, rounds, steps, warmup),
            }
            if rank == 0:
                result["rows"].append(row)
                weights = "equal" if row["weights_equal"] else f"differ by {row['weights_max_abs_diff']:.1e}"
                print(
                    f"{name:<22} B={bs:<4} flat all-reduce {row['flat']['ms_per_step']:8.1f} ms/step   DDP "
                    f"{row['ddp']['ms_per_step']:8.1f} ms/step   DDP/flat {row['ddp_vs_flat']:.3f}   "
                    f"weights {weights}",
                    flush=True,
                )
                written = write_result("ddp", result, cuda, args.out)
        if rank == 0:
            print(f"wrote {written}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of each variant (default 7)")
    ap.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default 32 on a CPU)")
    ap.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
    args = ap.parse_args()
    if min(args.rounds, args.steps) < 1:
        print("--rounds and --steps: at least 1", file=sys.stderr)
        return 2
    if "LOCAL_RANK" in os.environ:  # started by the torchrun below
        worker(args)
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    processes = torch.cuda.device_count() if cuda else 2
    if processes < 2:
        why = "one GPU: data-parallel gradients need two"
        written = write_result(
            "ddp", {"benchmark": "ddp", **environment(cuda), "rows": [], "skipped": why}, cuda, args.out
        )
        print(f"bench_ddp: skipped ({why}); wrote {written}")
        return 0
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            str(Path(__file__).resolve()),
            *sys.argv[1:],
        ]
    )
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
