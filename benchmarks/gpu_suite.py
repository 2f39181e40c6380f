"""Every GPU check in one call (docs/ARCHITECTURE.md §9): the whole test suite on the GPU, then every benchmark,
each part a subprocess in its own time box (a slow part cannot starve the rest), all results under
--out, and a summary table printed last.

    python benchmarks/gpu_suite.py --out DIR                     # one GPU: at most 9 minutes
    python benchmarks/gpu_suite.py --install --wheels .whl --out DIR   # a bare machine, offline
    python benchmarks/gpu_suite.py --smoke --out DIR             # the same plan at CPU size, no tests (CI)
    python benchmarks/gpu_suite.py --unpack DIR/summary.json     # its JSONs into benchmarks/results/

DIR receives five files at most, so that a machine that hands back only a few files hands back
all of them: summary.txt (the table below, as printed), summary.json (each part's status and time,
and the whole JSON of every benchmark), tests.xml and tests.log (the test suite: JUnit XML and
pytest's output), benchmarks.log (the setup's and every benchmark's output, one after another).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
BUDGET_S = 510  # the parts' boxes, with up to 20 s to stop an overrunning one, python start-up and the summary: 9 min


@dataclass
class Part:
    name: str
    argv: list[str]  # after `python`
    box_s: float  # its time box on a GPU; in the smoke run every part gets SMOKE_BOX_S
    benchmark: str | None = None  # the JSON name prefix the script writes
    gpu_only: str | None = None  # why the smoke run leaves it out
    folder: str = "shared"  # benchmark JSONs are written to the work folder of this name
    status: str = "not run"
    seconds: float = 0.0
    result: dict | None = field(default=None, repr=False)


# In the smoke run a box bounds a hang only: the slowest part (search) takes 95 s on one CPU core shared
# with a busy process.
SMOKE_BOX_S = 600


def plan(smoke: bool, out: Path) -> list[Part]:
    """The parts in order: the tests, then the benchmarks, goal rows first within each."""
    tests = [
        "-m",
        "pytest",
        "tests",
        "-q",
        "-rfEs",
        "--durations=20",
        "-p",
        "no:cacheprovider",
        "--junitxml",
        str(out / "tests.xml"),
    ]
    if importlib.util.find_spec("xdist"):  # 16 cores: the CPU-bound tests in parallel, a module per worker
        tests += ["-n", "8", "--dist", "loadfile"]
    size = ["--smoke"] if smoke else []
    return [
        Part("tests", tests, 175, gpu_only="CI runs the test suite"),
        Part("kernels", ["benchmarks/bench_kernels.py", *size], 75, "kernels"),
        Part("step", ["benchmarks/bench_step.py", "--profile", *size], 100, "step"),
        # 5 seeds of dcl3 as replicas against one by one (the smoke run: 2 seeds of its small graph).
        Part(
            "replicas",
            ["benchmarks/bench_step.py", "--seeds", "2", *size]
            if smoke
            else [
                "benchmarks/bench_step.py",
                "--seeds",
                "5",
                "--graphs",
                "dcl3",
                "--batch-sizes",
                "64",
                "--steps",
                "40",
            ],
            35,
            "replicas",
        ),
        Part(
            "step-compile",
            [
                "benchmarks/bench_step.py",
                "--paths",
                "reference,fast-compile",
                "--graphs",
                "dcl3",
                "--batch-sizes",
                "64",
            ],
            40,
            "step",
            gpu_only="torch.compile takes minutes on a CPU",
            folder="compile",
        ),
        Part(
            "loader",
            ["benchmarks/bench_loader.py", *size]
            if smoke
            else [
                "benchmarks/bench_loader.py",
                "--dataset",
                "synthetic:classes=100,size=32,train=10000,test=16",
                "--epochs",
                "1",
            ],
            25,
            "loader",
        ),
        Part(
            "search",
            ["benchmarks/bench_search.py", "--smoke", "--trials", "2"]
            if smoke
            else ["benchmarks/bench_search.py", "--ks", "1,4", "--trials", "4"],
            60,
            "search",
        ),
        # DDP against the flat all-reduce: 2 gloo processes in the smoke run; on one GPU it skips at once.
        Part("ddp", ["benchmarks/bench_ddp.py", *size], 30, "ddp"),
    ]


# ---- running ---------------------------------------------------------------------------------------
def run_boxed(argv: list[str], box_s: float, log, env: dict) -> tuple[int | None, float]:
    """(exit code, or None when the box ran out; seconds). The part runs in a process group of its
    own, so that a cut-off part takes its children (search workers, DataLoader workers) with it.
    Interrupted first (Ctrl-C): pytest then still lists what ran and writes its JUnit report."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        code = None
    return code, time.monotonic() - start


def collect(part: Part, work: Path) -> None:
    """The JSON the part's benchmark wrote (a cut-off one keeps the rows it finished)."""
    found = sorted((work / part.folder).glob(f"{part.benchmark}-*.json"))
    if found:
        part.result = {
            "file": found[0].name.replace(part.benchmark, part.name, 1),
            "json": json.loads(found[0].read_text()),
        }


def setup(args, log, env: dict) -> list[str]:
    """Offline installs where asked (wheels, then the repo itself), then what is importable."""
    if args.install:
        wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
        if wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        probe = subprocess.run(
            [sys.executable, "-c", "import ktfast.kernels"], cwd="/", env=env, capture_output=True
        )
        if probe.returncode != 0:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-build-isolation",
                    "-e",
                    str(ROOT),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
    missing = []
    for module, needed_by in (
        ("ktfast.kernels", "everything"),
        ("optuna", "the search tests and benchmark"),
        ("nvidia.dali", "the DALI loader and its tests (skipped without it)"),
    ):
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd="/", env=env, capture_output=True
        )
        if probe.returncode != 0:
            missing.append(f"{module} (needed by {needed_by})")
    return missing


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder of the results (on the GPU machine: $OUT)")
    ap.add_argument("--smoke", action="store_true", help="the same plan at CPU size, without the test suite")
    ap.add_argument(
        "--install",
        action="store_true",
        help="first install, offline, the wheels in --wheels and (if it is not importable) this repo",
    )
    ap.add_argument("--wheels", help="folder of wheels to install with --install (optuna's, DALI's, ...)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    ap.add_argument(
        "--unpack",
        metavar="SUMMARY",
        help="write a summary.json's benchmark JSONs to --out (default benchmarks/results) and stop",
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.unpack:
        return unpack(Path(args.unpack), Path(args.out) if args.out else RESULTS)
    if not args.out:
        print("gpu_suite: --out DIR is needed", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_suite: no CUDA device here; --smoke runs the plan at CPU size", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp, open(out / "benchmarks.log", "w") as log:
        work = Path(tmp)
        # KTFAST_STRICT: a fast path that falls back is an error here, not a quieter figure.
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "KTFAST_CACHE": str(work / "cache"),
            "KTFAST_STRICT": "1",
        }
        if args.smoke:
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        log.write("==== setup\n")
        log.flush()
        missing = setup(args, log, env)
        if any(m.startswith("ktfast.kernels") for m in missing):
            print(
                "gpu_suite: ktfast is not importable: install it (pip install -e .) or pass --install",
                file=sys.stderr,
            )
            return 2
        parts = plan(args.smoke, out)
        for part in parts:
            run_part(part, args.smoke, deadline - time.monotonic(), work, out, log, env)
        text = summary(parts, out, missing, cuda)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
                "missing": missing,
                "parts": [
                    {"name": p.name, "status": p.status, "seconds": p.seconds, "result": p.result}
                    for p in parts
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print("\n" + text)
    return 0 if all(p.status == "ok" or p.status.startswith("skipped") for p in parts) else 1


def run_part(part: Part, smoke: bool, left: float, work: Path, out: Path, log, env: dict) -> None:
    """Run one part in its box (at most the `left` seconds of the budget), its output into `log`
    (the tests' into tests.log); sets its status and seconds, and collects its result."""
    if smoke and part.gpu_only:
        part.status = f"skipped: {part.gpu_only}"
        return
    if left < 5:
        part.status = "skipped: no time left"
        return
    box = SMOKE_BOX_S if smoke else min(part.box_s, left)
    folder = work / part.folder
    folder.mkdir(exist_ok=True)
    argv = part.argv + (["--out", str(folder)] if part.benchmark else [])
    print(f"{part.name}: running (box {box:.0f} s)", flush=True)
    if part.benchmark:
        log.write(f"\n==== {part.name}: python {' '.join(argv)}\n")
        log.flush()
        code, part.seconds = run_boxed(argv, box, log, env)
        collect(part, work)
    else:
        with open(out / "tests.log", "w") as tests_log:
            code, part.seconds = run_boxed(argv, box, tests_log, env)
    part.status = "ok" if code == 0 else f"cut off at {box:.0f} s" if code is None else f"exit {code}"
    print(f"{part.name}: {part.status} ({part.seconds:.0f} s)", flush=True)


def unpack(path: Path, to: Path) -> int:
    try:
        parts = json.loads(path.read_text())["parts"]
    except (OSError, ValueError, KeyError) as e:
        print(f"gpu_suite: --unpack {path}: not a summary.json ({e})", file=sys.stderr)
        return 2
    to.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if part["result"]:
            (to / part["result"]["file"]).write_text(json.dumps(part["result"]["json"], indent=2) + "\n")
            print(f"wrote {to / part['result']['file']}")
    return 0


# ---- the summary -----------------------------------------------------------------------------------
def summary(parts: list[Part], out: Path, missing: list[str], cuda: bool) -> str:
    lines = ["part          status                          seconds"]
    lines += [f"{p.name:<13} {p.status:<31} {p.seconds:7.0f}" for p in parts]
    if missing:
        lines.append("not importable: " + "; ".join(missing))
    by_name = {p.name: p.result["json"] for p in parts if p.result}
    lines += tests_lines(out / "tests.xml") if not parts[0].status.startswith("skipped") else []
    lines += kernels_lines(by_name.get("kernels"))
    lines += step_lines(by_name.get("step"), by_name.get("step-compile"))
    lines += replicas_lines(by_name.get("replicas"))
    lines += loader_lines(by_name.get("loader"))
    lines += search_lines(by_name.get("search"))
    lines += ddp_lines(by_name.get("ddp"))
    lines += goal_lines(by_name, cuda)
    return "\n".join(lines)


def tests_lines(path: Path) -> list[str]:
    if not path.exists():
        return ["", "tests: no JUnit report (the run was cut off before pytest wrote it)"]
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [
        "",
        f"tests: {count['tests'] - count['failures'] - count['errors'] - count['skipped']} passed, "
        f"{count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped",
    ]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def _f(value, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def kernels_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = [
        "",
        f"kernels (edge losses fwd+bwd) on {result['device']}: us",
        "kind          M     B     C  fused gpu  eager gpu  x eager gpu  x eager wall  % copy bw  step entry "
        "host/gpu us",
    ]
    for r in result["rows"]:
        entry = r.get("step_entry", {})
        bandwidth = 100 * r["fraction_of_copy_bw"] if "fraction_of_copy_bw" in r else None
        lines.append(
            f"{r.get('kind', 'kl'):<12} {r['M']:>2} {r['B']:>5} {r['C']:>5} {_f(r.get('fused_gpu_us')):>10} "
            f"{_f(r.get('eager_gpu_us')):>10} {_f(r.get('gpu_speedup_vs_eager')):>12} "
            f"{_f(r.get('speedup_vs_eager')):>13} {_f(bandwidth, '.0f'):>10}"
            f"  {_f(entry.get('host_us'))} / {_f(entry.get('gpu_us'))}"
            + (f" (x{entry['host_over_gpu']:.1f})" if "host_over_gpu" in entry else "")
        )
    return lines


def step_lines(result: dict | None, compiled: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"step on {result['device']}: images/s (x the reference path)"]
    for res in (result, compiled):
        for r in (res or {}).get("rows", []):
            paths = res["paths"]
            lines.append(
                f"{r['graph']:<32} B={r['batch_size']:<4} "
                + "  ".join(
                    f"{p} {r[p]['images_per_s']:.0f}"
                    + (f" (x{r[p]['speedup_vs_reference']:.2f})" if "speedup_vs_reference" in r[p] else "")
                    for p in paths
                    if p in r
                )
                + (
                    f"  graph x{r['fast']['speedup_vs_eager_step']:.2f}"
                    if "speedup_vs_eager_step" in r.get("fast", {})
                    else ""
                )
            )
    if "profile" in result:
        p = result["profile"]
        lines.append(
            f"profile of the {p['path']} step ({p['graph']}, B={p['batch_size']}): busy "
            f"{100 * p['gpu_busy']:.0f} % of {p['ms_per_step']:.2f} ms, {p['kernels_per_step']:.0f} kernels"
        )
    return lines


def replicas_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"seeds as replicas on {result['device']}: images/s x S"]
    for r in result["rows"]:
        lines.append(
            f"{r['graph']:<32} B={r['batch_size']:<4} {r['seeds']} seeds: one by one "
            f"{r['one_by_one']['images_per_s']:.0f}  replicas {r['replicas']['images_per_s']:.0f} "
            f"(x{r['speedup']:.2f}); a replica step {r['time_vs_one_seed']:.2f}x one seed's"
        )
    return lines


def loader_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = [
        "",
        f"loader on {result['device']}: images/s" + ("" if result["dali"] else " (DALI not installed)"),
    ]
    for r in result["rows"]:
        lines.append(
            f"B={r['batch_size']:<4} "
            + "  ".join(f"{k} {v['images_per_s']:.0f}" for k, v in r.items() if isinstance(v, dict))
        )
    return lines


def search_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    lines = ["", f"search on {result['device']}: trials/hour, best objective reached"]
    for r in result["rows"]:
        per_gpu = f"  {r['trials_per_gpu_hour']:.1f}/GPU-h" if r.get("trials_per_gpu_hour") else ""
        best = (
            f"  best {r['best_objective']:.1%} after {r['best_after_s']:.0f} s"
            if "best_objective" in r
            else ""
        )
        lines.append(
            f"K={r['trials_per_gpu']:<2} {r['pack']:<9} {r['trials_per_hour']:8.1f} "
            f"(steady {r['steady_trials_per_hour']:.1f})  x{r['speedup']:.2f}{per_gpu}{best}"
        )
    return lines


def ddp_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    if result.get("skipped"):
        return ["", f"ddp on {result['device']}: skipped ({result['skipped']})"]
    lines = ["", f"ddp on {result['device']}, {result['world_size']} processes: ms/step, median of rounds"]
    for r in result["rows"]:
        lines.append(
            f"{r['graph']:<22} B={r['batch_size']:<4} flat {r['flat']['ms_per_step']:.1f}  DDP "
            f"{r['ddp']['ms_per_step']:.1f}  (DDP/flat {r['ddp_vs_flat']:.2f}, weights "
            f"{'equal' if r['weights_equal'] else 'differ'})"
        )
    return lines


def goal_lines(results: dict, cuda: bool) -> list[str]:
    """Issue 11's goals on one H100, each met, missed or not measured."""
    if not cuda:
        return ["", "goals: measured on a GPU only"]
    # The goals are about the KL graphs; the new kinds' rows are reported, not held to them.
    kernels = [r for r in (results.get("kernels") or {}).get("rows", []) if r.get("kind", "kl") == "kl"]
    step = (results.get("step") or {}).get("rows", [])
    small = [
        r.get("gpu_speedup_vs_eager") for r in kernels if r["B"] == 64 and r["C"] == 100 and 3 <= r["M"] <= 7
    ]
    large = [r.get("fraction_of_copy_bw") for r in kernels if r["B"] == 8192 and r["C"] == 1000]
    dcl = [
        r["fast"].get("speedup_vs_reference")
        for r in step
        if r["graph"].startswith("dcl3") and r["batch_size"] == 64 and "fast" in r
    ]
    host = [
        r["step_entry"].get("host_over_gpu")
        for r in kernels
        if (r["M"], r["B"], r["C"]) == (3, 64, 100) and "step_entry" in r
    ]
    replicas = [
        r["time_vs_one_seed"]
        for r in (results.get("replicas") or {}).get("rows", [])
        if r["graph"].startswith("dcl3") and r["batch_size"] == 64 and r["seeds"] == 5
    ]
    goals = [
        ("DCL 3-node step, B=64: fast >= 8x reference images/s", dcl, 8, True),
        ("5 seeds of dcl3, B=64, as replicas: <= 2x one seed's time", replicas, 2, False),
        ("edge losses fwd+bwd, M=3..7 B=64 C=100: >= 10x eager (GPU time)", small, 10, True),
        ("edge losses, B=8192 C=1000: >= 80 % of copy bandwidth", large, 0.8, True),
        ("fused loss entry, M=3 B=64 C=100: host-launched <= 3x GPU time", host, 3, False),
    ]
    lines = ["", "goals:"]
    for text, values, bound, at_least in goals:
        values = [v for v in values if isinstance(v, (int, float))]
        if not values:
            verdict = "not measured"
        else:
            worst = min(values) if at_least else max(values)
            verdict = f"{'met' if (worst >= bound if at_least else worst <= bound) else 'MISSED'} (worst {worst:.2f})"
        lines.append(f"  {text}: {verdict}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
