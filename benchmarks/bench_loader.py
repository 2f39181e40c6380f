"""Loader throughput: DALI vs the device-resident tensors vs torchvision, side by side in one run.

Each loader runs whole training epochs (random crop, flip, normalise) of the same set; images/s
and milliseconds per batch, the first epoch excluded (DALI builds, caches warm). When a step
benchmark result of this device exists, each loader's time per batch is also given as a fraction
of the fast path's step time on the DCL 3-node graph at the same batch size: what the loader would
cost a training run that waited for it.

    python benchmarks/bench_loader.py            # on a GPU: CIFAR-size synthetic set, batch 64 and 256
    python benchmarks/bench_loader.py --smoke    # CPU-sized, what CI runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import environment, result_path, write_result

from ktfast.data import decode, make_loader


def throughput(dataset: str, kind: str, batch_size: int, device: str, epochs: int, workers: int) -> dict:
    loader = make_loader(
        dataset,
        "train",
        batch_size,
        device,
        0,
        loader=kind,
        **({"num_workers": workers} if kind == "torch" else {}),
    )
    cuda = device == "cuda"
    times = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for _ in loader:
            pass
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_epoch = sum(times[1:]) / epochs
    return {
        "images_per_s": len(loader) * batch_size / per_epoch,
        "ms_per_batch": 1e3 * per_epoch / len(loader),
    }


def fast_step_ms(cuda: bool, out_dir) -> dict:
    """{batch size: ms per fast step of the DCL 3-node graph}, from this device's step benchmark
    in the same folder."""
    path = result_path("step", cuda, out_dir)
    if not cuda or not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["batch_size"]: r["fast"]["ms_per_step"] for r in rows if r["graph"].startswith("dcl3")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    ap.add_argument("--dataset", default=None, help="default: synthetic CIFAR-size, 50,000 training images")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers of the torchvision loader")
    ap.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dataset = args.dataset or (
        "synthetic:classes=100,size=32,train=50000,test=16"
        if cuda
        else "synthetic:classes=10,size=16,train=256,test=16"
    )
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if cuda else [32]
    epochs, workers = (args.epochs, args.workers) if cuda else (1, 0)
    kinds = ["gpu", "torch"] + (["dali"] if decode.available() else [])
    steps = fast_step_ms(cuda, args.out)
    result = {
        "benchmark": "loader",
        **environment(cuda),
        "dataset": dataset,
        "epochs": epochs,
        "torch_workers": workers,
        "dali": decode.available(),
        "rows": [],
    }
    for bs in batch_sizes:
        row = {"batch_size": bs}
        for kind in kinds:
            row[kind] = throughput(dataset, kind, bs, device, epochs, workers)
            if bs in steps:
                row[kind]["fraction_of_fast_step"] = row[kind]["ms_per_batch"] / steps[bs]
        result["rows"].append(row)
        print(
            f"B={bs:<4} "
            + "   ".join(
                f"{k} {row[k]['images_per_s']:10.0f} img/s ({row[k]['ms_per_batch']:.3f} ms)" for k in kinds
            ),
            flush=True,
        )
        written = write_result("loader", result, cuda, args.out)
    if not decode.available():
        print(f"dali: not measured ({decode.MISSING})")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
