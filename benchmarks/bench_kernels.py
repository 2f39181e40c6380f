"""graph_losses forward+backward: the fused Triton kernels vs the eager reference vs torch.compile of
the reference, side by side in one run, with the memory bandwidth the fused kernels reach.

Two times per implementation:
* wall: back-to-back calls timed on the host, launch overhead included (an uncaptured step);
* gpu: the median replay of a CUDA graph of one call (triton.testing.do_bench, which flushes L2
  between replays): the device's own time, launch overhead removed (a captured step).
And for the step's own entry (`fused_loss_vector`, Σ L_t back-propagated) at B ≤ 256: its
host-launched time against its GPU time (CUDA events around graph replays): the host overhead.
Bytes counted (the fewest the fused forward and backward must move): the logits read by the
forward, read again by the backward, their gradient written (3·M·B·C elements) and the labels. The
ceiling is measured in the same run: a 1 GiB device-to-device copy, bytes read plus bytes written.

    python benchmarks/bench_kernels.py             # on a GPU: the full table
    python benchmarks/bench_kernels.py --smoke     # tiny, on CPU through Triton's interpreter (CI)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch
from common import environment, write_result

# The papers' size and the large rows first: a run cut short still has the rows the goals are about.
FIRST = [(3, 64, 100), (4, 64, 100), (7, 64, 100), (2, 8192, 1000), (4, 8192, 1000), (7, 8192, 1000)]
FULL = FIRST + [
    s for s in itertools.product([2, 3, 4, 7], [64, 256, 1024], [10, 100, 1000]) if s not in FIRST
]
SMOKE = [(2, 8, 10), (3, 4, 100)]
# The modern logit distillation's edges (docs/ARCHITECTURE.md §1): rows of their own, after the KL rows.
KINDS = {
    "kl": {"loss": "kl", "temperature": 2.0},
    "dkd": {"loss": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 8.0},
    "dist": {"loss": "dist", "temperature": 4.0},
    "kl std": {"loss": "kl", "temperature": 2.0, "standardize": True},
    "dkd+dist std": {"loss": "dkd+dist", "temperature": 4.0, "standardize": True},
}
NEW_KINDS = [k for k in KINDS if k != "kl"]
KIND_SIZES = [(3, 64, 100), (3, 1024, 1000), (3, 8192, 1000)]
KIND_SMOKE = [(2, 8, 10)]


def make_graph(m: int, kind: str = "kl"):
    """m model nodes, a label edge into each and `kind` edges (KINDS: KL at T = 2 by default) between
    all pairs, gates mixed."""
    from ktfast import Graph

    names = [f"n{i}" for i in range(m)]
    gates = itertools.cycle(["through", "linear", "correct"])
    edges = [{"from": "label", "to": n, "loss": "ce", "gate": next(gates)} for n in names]
    edges += [
        {"from": s, "to": t, "gate": next(gates), **KINDS[kind]} for s, t in itertools.permutations(names, 2)
    ]
    return Graph.from_dict(
        {
            "version": 1,
            "target": "n0",
            "nodes": [{"name": n, "model": "resnet8"} for n in names],
            "edges": edges,
        }
    )


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def wall_time(fn, cuda: bool) -> float:
    """Median seconds per call over 5 batches of back-to-back calls, host time included (on a CPU,
    where only the smoke test runs, one batch: the interpreter is slow)."""
    fn()
    sync(cuda)
    start = time.perf_counter()
    fn()
    sync(cuda)
    reps = max(1, min(200, int(0.02 / (time.perf_counter() - start))))
    samples = []
    for _ in range(5 if cuda else 1):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(cuda)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def captured(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of fn, warmed up and captured on the same side stream (a fused call
    without a Scratch makes its own, inside the capture: from the graph's pool, zeroed by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return graph


def gpu_time(fn) -> float:
    """Median seconds per CUDA-graph replay of fn."""
    import triton.testing

    return triton.testing.do_bench(captured(fn).replay, warmup=25, rep=100, return_mode="median") / 1e3


def event_time(fn, replays: int = 200) -> float:
    """Seconds of GPU time per call of fn: CUDA events around back-to-back replays of its graph, so
    the GPU never waits for the host (L2 stays warm, as in a training step)."""
    graph = captured(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def host_overhead(g, z, y, cuda: bool) -> dict:
    """The training step's own entry, `fused_loss_vector` forward + Σ L_t backward, as a step without
    a CUDA graph calls it: host-launched wall time per call vs the GPU's time for the same work.
    Their ratio is what launching costs (goal: at most 3)."""
    from ktfast.kernels import fused_loss_vector

    def call():
        _, total = fused_loss_vector(g, z, y, 5, 10)
        torch.autograd.grad(total, list(z.values()))

    row = {"host_us": 1e6 * wall_time(call, cuda)}
    if cuda:
        row["gpu_us"] = 1e6 * event_time(call)
        row["host_over_gpu"] = row["host_us"] / row["gpu_us"]
    return row


def copy_bandwidth() -> float:
    import triton.testing

    x = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB, far past L2
    y = torch.empty_like(x)
    t = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") / 1e3
    return 2 * x.numel() * x.element_size() / t


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (automatic without CUDA)")
    ap.add_argument(
        "--first", action="store_true", help="only the goal rows: the papers' size and the large ones"
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    return ap.parse_args()


def main():
    args = parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before ktfast.kernels defines its kernels
    from ktfast.kernels import fused_graph_losses
    from ktfast.losses import reference_graph_losses

    bandwidth = copy_bandwidth() if cuda else None
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    impls = {"fused": fused_graph_losses, "eager": reference_graph_losses}
    if cuda and not args.no_compile:
        impls["compiled"] = torch.compile(reference_graph_losses, dynamic=True)  # one compile per graph
    rows = []
    result = {
        "benchmark": "kernels",
        **environment(cuda),
        "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
        "bytes_counted": "3*M*B*C*4 (fp32 logits read fwd, read bwd, grad written) + 8*B (labels)",
        "graph": "M model nodes; label->each: ce; every ordered pair: the row's kind (kl T=2 unless said; "
        "kinds: " + json.dumps(KINDS) + "); gates cycle through/linear/correct",
        "rows": rows,
    }
    sizes = (FIRST if args.first else FULL) if cuda else SMOKE
    kind_sizes = ([] if args.first else KIND_SIZES) if cuda else KIND_SMOKE
    for kind, m, b, c in [("kl", *s) for s in sizes] + [(k, *s) for k in NEW_KINDS for s in kind_sizes]:
        row = measure(kind, m, b, c, impls, cuda, bandwidth)
        rows.append(row)
        path = write_result(
            "kernels", result, cuda, args.out
        )  # after every row: a cut-off run keeps its rows
        times = " ".join(f"{k[:-3]} {v:.0f}" for k, v in row.items() if k.endswith("_us"))
        print(f"{kind} M={m} B={b} C={c}: {times}", flush=True)
    print_table(rows)
    print(f"wrote {path}")


def measure(kind: str, m: int, b: int, c: int, impls: dict, cuda: bool, bandwidth: float | None) -> dict:
    """One row: every implementation's forward + backward on M nodes' [B, C] logits (the graph of
    `make_graph(m, kind)`), timed on the wall (and the GPU), with the fused kernels' bandwidth."""
    device = "cuda" if cuda else "cpu"
    fused_graph_losses = impls["fused"]
    g = make_graph(m, kind)
    gen = torch.Generator(device=device).manual_seed(0)
    z = {
        n.name: (3 * torch.randn(b, c, device=device, generator=gen)).requires_grad_() for n in g.model_nodes
    }
    y = torch.randint(0, c, (b,), device=device, generator=gen)

    def step(fn):
        def call():
            losses = fn(g, z, y, 5, 10)
            torch.autograd.grad(sum(losses.values()), list(z.values()))

        return call

    row = {"kind": kind, "M": m, "B": b, "C": c, "edges": len(g.active_edges)}
    for name, fn in impls.items():
        row[f"{name}_us"] = 1e6 * wall_time(step(fn), cuda)
        if cuda:
            row[f"{name}_gpu_us"] = 1e6 * gpu_time(step(fn))
    if cuda:
        row["fused_fwd_gpu_us"] = 1e6 * gpu_time(lambda: fused_graph_losses(g, z, y, 5, 10))
    if b <= 256:  # the step's sizes, where launching can cost more than computing
        row["step_entry"] = host_overhead(g, z, y, cuda)
    nbytes = 3 * m * b * c * 4 + b * 8
    row["fused_GBps"] = nbytes / (row["fused_gpu_us" if cuda else "fused_us"] * 1e-6) / 1e9
    if bandwidth:
        row["fraction_of_copy_bw"] = row["fused_GBps"] * 1e9 / bandwidth
    for name in impls:
        if name != "fused":
            row[f"speedup_vs_{name}"] = row[f"{name}_us"] / row["fused_us"]
            if cuda:
                row[f"gpu_speedup_vs_{name}"] = row[f"{name}_gpu_us"] / row["fused_gpu_us"]
    return row


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'kind':<12} {'M':>2} {'B':>5} {'C':>5} | {'wall us: fused':>14} {'eager':>8} {'compiled':>8} "
        f"{'x eager':>8} "
        f"| {'gpu us: fused':>13} {'eager':>8} {'compiled':>8} | {'GB/s':>6} {'% bw':>5}"
    )
    for r in rows:
        print(
            f"{r['kind']:<12} {r['M']:>2} {r['B']:>5} {r['C']:>5} | {r['fused_us']:>14.1f} {r['eager_us']:>8.1f} "
            f"{r.get('compiled_us', float('nan')):>8.1f} {r['speedup_vs_eager']:>8.1f} | "
            f"{r.get('fused_gpu_us', float('nan')):>13.1f} {r.get('eager_gpu_us', float('nan')):>8.1f} "
            f"{r.get('compiled_gpu_us', float('nan')):>8.1f} | {r['fused_GBps']:>6.0f} "
            f"{100 * r.get('fraction_of_copy_bw', float('nan')):>5.0f}"
        )
    print("\nthe step's entry (fused_loss_vector fwd+bwd), host-launched vs GPU time:")
    for r in rows:
        if "step_entry" in r:
            e = r["step_entry"]
            print(
                f"{r['kind']} M={r['M']} B={r['B']} C={r['C']}: host {e['host_us']:.1f} us, "
                f"GPU {e.get('gpu_us', float('nan')):.1f} "
                f"us, x{e.get('host_over_gpu', float('nan')):.1f}"
            )


if __name__ == "__main__":
    main()
