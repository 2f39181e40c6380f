"""graph_losses forward+backward: fused Triton kernels vs the eager reference vs torch.compile of the
reference, side by side in one run, with the bandwidth the fused version reaches.

Bytes counted (the fewest a separate forward and backward must move): the stacked logits read by
the forward, read again by the backward, and their gradient written — 3·M·B·C elements — plus the
labels. The ceiling is measured in the same run: a large device-to-device copy, bytes read plus
bytes written.

    python benchmarks/bench_kernels.py            # on a GPU: the full table
    python benchmarks/bench_kernels.py --smoke    # tiny, on CPU through Triton's interpreter (CI)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def make_graph(m: int):
    from ktfast import Graph

    names = [f"n{i}" for i in range(m)]
    gates = itertools.cycle(["through", "linear", "correct"])
    edges = [{"from": "label", "to": n, "loss": "ce", "gate": next(gates)} for n in names]
    edges += [{"from": s, "to": t, "loss": "kl", "gate": next(gates), "temperature": 2.0}
              for s, t in itertools.permutations(names, 2)]
    return Graph.from_dict({"version": 1, "target": "n0", "nodes": [{"name": n, "model": "resnet8"} for n in names],
                            "edges": edges})


def timer(fn, cuda: bool) -> float:
    """Median seconds per call."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def copy_bandwidth(cuda: bool) -> float | None:
    if not cuda:
        return None
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB, several times L2
    y = torch.empty_like(x)
    t = timer(lambda: y.copy_(x), True)
    return 2 * x.numel() * 4 / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["KTFAST_KERNELS"] = "1"
    from ktfast.kernels import fused_graph_losses
    from ktfast.losses import reference_graph_losses

    device = "cuda" if cuda else "cpu"
    if cuda:
        sizes = list(itertools.product([2, 3, 4, 7], [64, 256, 1024], [10, 100, 1000])) + [(4, 8192, 1000),
                                                                                          (7, 8192, 1000)]
    else:
        sizes = [(2, 8, 10), (3, 4, 100)]
    bandwidth = copy_bandwidth(cuda)
    compiled = None if args.no_compile or not cuda else torch.compile(reference_graph_losses)
    rows = []
    for m, b, c in sizes:
        g = make_graph(m)
        gen = torch.Generator(device=device).manual_seed(0)
        z = {n.name: torch.randn(b, c, device=device, generator=gen).requires_grad_() for n in g.model_nodes}
        y = torch.randint(0, c, (b,), device=device, generator=gen)

        def run(fn):
            def step():
                losses = fn(g, z, y, 5, 10)
                torch.autograd.grad(sum(losses.values()), list(z.values()))
            return step

        row = {"M": m, "B": b, "C": c, "edges": len(g.active_edges)}
        row["fused_us"] = 1e6 * timer(run(fused_graph_losses), cuda)
        row["eager_us"] = 1e6 * timer(run(reference_graph_losses), cuda)
        if compiled is not None:
            row["compiled_us"] = 1e6 * timer(run(compiled), cuda)
        nbytes = 3 * m * b * c * 4 + b * 8
        row["fused_GBps"] = nbytes / (row["fused_us"] * 1e-6) / 1e9
        if bandwidth:
            row["fraction_of_copy_bw"] = row["fused_GBps"] * 1e9 / bandwidth
        row["speedup_vs_eager"] = row["eager_us"] / row["fused_us"]
        if "compiled_us" in row:
            row["speedup_vs_compiled"] = row["compiled_us"] / row["fused_us"]
        rows.append(row)
        print(f"M={m} B={b:<5} C={c:<5} fused {row['fused_us']:9.1f} us  eager {row['eager_us']:9.1f} us  "
              + (f"compiled {row['compiled_us']:9.1f} us  " if "compiled_us" in row else "")
              + f"x{row['speedup_vs_eager']:.1f} vs eager  {row['fused_GBps']:7.1f} GB/s"
              + (f" ({100 * row['fraction_of_copy_bw']:.0f}% of copy)" if bandwidth else ""), flush=True)
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    import triton

    result = {"benchmark": "kernels", "device": name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
              "bytes_counted": "3*M*B*C*4 (logits read fwd, read bwd, grad written) + labels", "rows": rows}
    out = RESULTS / f"kernels-{name.replace(' ', '_') if cuda else 'smoke'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
