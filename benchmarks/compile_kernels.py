"""Every Triton kernel of kernels/ compiled ahead of time for sm_80 and sm_90, on a machine without a
GPU: registers, stack, spills and shared memory of every launch the code makes, for every dtype of
the logits and attention maps, at the kernel benchmark's sizes and the examples'.

The launches are the code's own: the entry points (`fused_graph_losses` as the kernel benchmark
calls it, `fused_loss_vector` as the training step does), forward and backward, run on CPU tensors
with the GPU's SM count given to the launch plans, and each kernel launch is recorded instead of run.
Triton's launcher binds the recorded arguments (the specialisation a launch on that GPU gets:
`create_function_from_signature` and `JITFunction._pack_args`, the launcher's own, alike in
Triton 3.6 and 3.8), and `triton.compile` compiles each distinct one for GPUTarget("cuda", 80 or
90, 32), running the ptxas bundled with Triton; `cuobjdump -res-usage` on the cubin gives
registers, stack and shared memory, ptxas's own log the spill bytes.

    python benchmarks/compile_kernels.py                 # everything: ~460 compiles, 9-12 min on 2 cores
    python benchmarks/compile_kernels.py --quick --arch 90 --out /tmp/c.json   # each kernel's worst case (CI)

Prints a table, writes JSON (default benchmarks/results/compile-kernels.json) and exits non-zero if a
compile fails.
"""

from __future__ import annotations

import os
import tempfile

# Before Triton is imported: compiled, not interpreted, into a cache of its own (a kernel found in a
# cache is not compiled again, and leaves no ptxas log), with ptxas's log printed (it has the spills).
os.environ.pop("TRITON_INTERPRET", None)
_CACHE = tempfile.TemporaryDirectory(prefix="ktfast-compile-")  # removed at exit
os.environ["TRITON_CACHE_DIR"] = _CACHE.name
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from common import RESULTS, environment  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ktfast import Graph  # noqa: E402
from ktfast.kernels import attention, edge_losses, fused_graph_losses, fused_loss_vector, plans  # noqa: E402
from ktfast.kernels.edge_table import edge_table  # noqa: E402

ARCHS = {80: 108, 90: 132}  # compute capability: SMs of the GPU the plans are made for (A100, H100)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_BATCH = 64  # the recipe's batch size, what the examples train with
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass(frozen=True)
class Case:
    name: str
    graph: Graph
    B: int
    C: int
    hw: int | None  # attention maps hw × hw, where the graph has attention edges
    # "bench": fused_graph_losses, a float step, Σ L_t back-propagated; "step": fused_loss_vector, a
    # device tensor's factor, the total back-propagated
    path: str


def bench_cases() -> list[Case]:
    """The kernel benchmark's KL graphs at its sizes, and its graphs of the other kinds (dkd, dist,
    standardize) at B = 64…1024, C = 10…1000."""
    from bench_kernels import FULL, NEW_KINDS, make_graph

    kl = [Case(f"bench M={m}", make_graph(m), b, c, None, "bench") for m, b, c in FULL]
    sizes = [(b, c) for b in (64, 256, 1024) for c in (10, 100, 1000)]
    return (
        kl
        + [
            Case(f"bench M={m} {kind}", make_graph(m, kind), b, c, None, "bench")
            for kind in NEW_KINDS
            for m in (3, 7)
            for b, c in sizes
        ]
        + [
            Case("every kind", every_kind_graph(), b, c, None, path)
            for b, c in sizes
            for path in ("bench", "step")
        ]
    )


def every_kind_graph() -> Graph:
    """One graph with every logit term, standardized edges and every kind of gate: the kernels compile
    the code of the terms a graph has (`EdgeTable.kinds`), so this is the largest variant."""
    edges = [
        ("label", "a", "ce", "through", {}),
        ("b", "a", "kl", "linear", {"temperature": 2}),
        ("c", "a", "dkd+dist", "warmup", {"warmup": 0.5, "standardize": True, "temperature": 4}),
        ("a", "b", "cos", "correct", {}),
        ("d", "b", "mse+kl", "gamma", {"standardize": True, "gamma": 2}),
        ("a", "c", "dkd", "negative_linear", {}),
        ("b", "d", "kl", "negative_gamma", {"soften": "source"}),
    ]
    return Graph.from_dict(
        {
            "target": "a",
            "nodes": [{"name": n, "model": "resnet8"} for n in "abcd"],
            "edges": [
                {"from": s, "to": t, "loss": loss, "gate": gate, **extra} for s, t, loss, gate, extra in edges
            ],
        }
    )


def example_cases() -> list[Case]:
    """Each example graph at the CIFAR sizes (32 px, 10 and 100 classes); with attention edges also at
    224 px (ABN's 14×14 map, 100 classes) and with 56×56 maps, the largest the kernels are planned for."""
    cases = []
    for path in sorted((ROOT / "examples").glob("*.json")):
        g = Graph.from_dict(json.loads(path.read_text()))
        att = any(e.uses_attention for e in g.active_edges)
        sizes = [(10, 8), (100, 8), (100, 14), (100, 56)] if att else [(10, None), (100, None)]
        cases += [Case(path.stem, g, STEP_BATCH, c, hw, "step") for c, hw in sizes]
    return cases


def quick_cases() -> list[Case]:
    """Each kernel at its largest block: an ABN graph at the step's size with the largest maps, and
    the edge-loss kernels' widest rows (1000 classes at B = 1024); and the graph of every kind at the
    plan of one row of 128 classes, where its backward spilled with one warp."""
    from bench_kernels import make_graph

    abn = Graph.from_dict(json.loads((ROOT / "examples" / "abn2.json").read_text()))
    return [
        Case("abn2", abn, STEP_BATCH, 100, 56, "step"),
        Case("bench M=3", make_graph(3), 1024, 1000, None, "bench"),
        Case("bench M=3 dkd+dist std", make_graph(3, "dkd+dist std"), 1024, 1000, None, "bench"),
        Case("every kind", every_kind_graph(), 1024, 1000, None, "step"),
        Case("every kind", every_kind_graph(), 64, 100, None, "bench"),
    ]  # spilled once: one warp


def entry_points() -> set[str]:
    """The kernels the package launches (`name[grid](...)`), as opposed to device functions."""
    source = "\n".join(p.read_text() for p in (ROOT / "kernels").glob("*.py"))
    return {
        name
        for module in (edge_losses, attention)
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction) and f"{name}[" in source
    }


@dataclass
class Launch:
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    fn: JITFunction

    def key(self):
        return (
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            self.options.num_warps,
            self.options.num_stages,
        )

    def plan(self) -> dict:
        named = {self.fn.arg_names[path[0]]: value for path, value in self.constexprs.items()}
        return {
            "rows": named.get("ROWS", 1),
            "block": named.get("BLOCK_C", named.get("BLOCK")),
            "warps": self.options.num_warps,
        }


def record(case: Case, dtype: torch.dtype, target: GPUTarget, sms: int) -> list[Launch]:
    """The kernel launches the code makes for this case on a GPU of `sms` SMs, bound as Triton's
    launcher binds them for `target`; nothing runs."""
    backend = make_backend(target)
    launches = []

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn
            self.binder = create_function_from_signature(fn.signature, fn.params, backend)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                bound, spec, options = self.binder(*args, **kwargs)
                packed = self.fn._pack_args(backend, options, bound, spec, options)
                options, signature, constexprs, attrs = packed
                launches.append(Launch(self.name, signature, constexprs, attrs, options, self.fn))

            return launch

    g = case.graph
    table = edge_table(g, torch.device("cpu"))
    names = [n.name for n in g.model_nodes] + [n for n in table.endpoints if n not in g.nodes]
    logits = {n: torch.zeros(case.B, case.C, dtype=dtype, requires_grad=True) for n in names}
    labels = torch.zeros(case.B, dtype=torch.int64)
    maps = None
    if table.attention is not None:
        maps = {
            n: torch.zeros(case.B, case.hw, case.hw, dtype=dtype, requires_grad=True)
            for n in table.attention.nodes
        }
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(plans, "multiprocessors", lambda device: sms))
        for module in (edge_losses, attention):
            for name in entry_points() & set(vars(module)):
                stack.enter_context(mock.patch.object(module, name, Recorder(name, getattr(module, name))))
        if case.path == "step":
            _, total = fused_loss_vector(g, logits, labels, torch.tensor(0.5), 1, maps)
        else:
            total = sum(fused_graph_losses(g, logits, labels, 5, 10, maps).values())
        total.backward()
    return launches


def resources(cubin: bytes, log: str) -> dict:
    """Registers, stack and shared memory from cuobjdump, spill bytes from ptxas's log."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if spills is None:
        raise RuntimeError(f"no spill figures in ptxas's log:\n{log}")
    return {
        "registers": int(found["REG"]),
        "stack": int(found["STACK"]),
        "local": int(found["LOCAL"]),
        "spill_stores": int(spills[1]),
        "spill_loads": int(spills[2]),
    }


def compile_launch(launch: Launch, target: GPUTarget) -> dict:
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(
            ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
            target=target,
            options=launch.options.__dict__,
        )
    return {**resources(compiled.asm["cubin"], log.getvalue()), "shared": compiled.metadata.shared}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, of " + ",".join(map(str, ARCHS)))
    ap.add_argument("--dtype", default=",".join(DTYPES), help="dtypes of the logits and maps")
    ap.add_argument("--quick", action="store_true", help="each kernel's largest case only (what CI compiles)")
    ap.add_argument("--out", default=str(RESULTS / "compile-kernels.json"), help="the JSON written")
    args = ap.parse_args()
    from tqdm import tqdm

    archs = [int(a) for a in args.arch.split(",")]
    dtypes = args.dtype.split(",")
    cases = quick_cases() if args.quick else bench_cases() + example_cases()
    start = time.perf_counter()
    rows, compiled, errors = [], {}, []
    jobs = [(case, arch, dtype) for arch in archs for dtype in dtypes for case in cases]
    with tqdm(jobs, desc="compile", unit="case", file=sys.stderr) as bar:
        for case, arch, dtype in bar:
            target = GPUTarget("cuda", arch, 32)
            for launch in record(case, DTYPES[dtype], target, ARCHS[arch]):
                key = (arch, launch.key())
                if key not in compiled:
                    bar.set_postfix_str(f"sm_{arch} {dtype} {launch.kernel} {case.name} B={case.B}")
                    try:
                        compiled[key] = compile_launch(launch, target)
                    except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
                        compiled[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                        errors.append(
                            {
                                "kernel": launch.kernel,
                                "arch": arch,
                                "dtype": dtype,
                                "case": case.name,
                                "error": compiled[key]["error"],
                            }
                        )
                size = f"{case.hw}x{case.hw}" if launch.kernel.startswith("_att") else case.C
                rows.append(
                    {
                        "kernel": launch.kernel,
                        "arch": f"sm_{arch}",
                        "dtype": dtype,
                        "case": case.name,
                        "B": case.B,
                        "C_or_map": size,
                        **launch.plan(),
                        **compiled[key],
                    }
                )
    missing = entry_points() - {r["kernel"] for r in rows}
    if missing:
        errors.append({"error": f"kernels no case launched: {sorted(missing)}"})
    summary = summarise(rows)
    print_table(summary)
    result = {
        "benchmark": "compile-kernels",
        **environment(False),
        "archs": {f"sm_{a}": ARCHS[a] for a in archs},
        "seconds": round(time.perf_counter() - start, 1),
        "compiles": len(compiled),
        "errors": errors,
        "table": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(compiled)} compiles in {result['seconds']:.0f} s; wrote {out}")
    for e in errors:
        print("FAILED:", e, file=sys.stderr)
    sys.exit(1 if errors else 0)


FIGURES = ("registers", "stack", "local", "spill_stores", "spill_loads", "shared")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (kernel, arch, dtype, B, C or map, plan): the most of each figure over the cases
    (graphs) that launch it, and their names."""
    table = {}
    for r in rows:
        key = (
            r["kernel"],
            r["arch"],
            r["dtype"],
            r["B"],
            str(r["C_or_map"]),
            r["rows"],
            r["block"],
            r["warps"],
        )
        entry = table.setdefault(
            key,
            {k: r[k] for k in ("kernel", "arch", "dtype", "B", "C_or_map", "rows", "block", "warps")}
            | {"cases": []},
        )
        entry["cases"].append(r["case"])
        if "error" in r:
            entry["error"] = r["error"]
        for f in FIGURES:
            if f in r:
                entry[f] = max(entry.get(f, 0), r[f])
    return sorted(
        table.values(), key=lambda e: (e["kernel"], e["arch"], e["dtype"], e["B"], str(e["C_or_map"]))
    )


def print_table(summary: list[dict]) -> None:
    print(
        f"\n{'kernel':<15} {'arch':<6} {'dtype':<5} {'B':>5} {'C/map':>6} | {'rows':>4} {'block':>5} {'warps':>5} "
        f"| {'regs':>4} {'stack':>5} {'spill':>5} {'shared':>6} | cases"
    )
    for e in summary:
        figures = (
            f"{e['registers']:>4} {e['stack']:>5} {e['spill_stores']:>5} {e['shared']:>6}"
            if "error" not in e
            else "compile FAILED".ljust(24)
        )
        print(
            f"{e['kernel']:<15} {e['arch']:<6} {e['dtype']:<5} {e['B']:>5} {e['C_or_map']!s:>6} | {e['rows']:>4} "
            f"{e['block']:>5} {e['warps']:>5} | {figures} | {len(e['cases'])}"
        )


if __name__ == "__main__":
    main()
