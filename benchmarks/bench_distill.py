"""Logit distillation measured on the offline digits set: the student alone, KD, KD with logit
standardization, DKD, DIST and a DCL graph, each trained by `ktfast train --seeds` on the same
recipe, the same seeds and the same pre-trained teacher; the target's final test accuracy, mean ±
sample std over the seeds (docs/distillation_digits.md reads the committed result).

    python benchmarks/bench_distill.py --out runs/bench_distill      # the comparison: 5 seeds (≈ 25 min, 2 CPU cores)
    python benchmarks/bench_distill.py --smoke --out /tmp/distill    # 1 seed, 1 epoch: what the tests run

--out receives graphs/ (the graph of each method), runs/ (each method's run directory), cache/ (the
pretrain cache: one teacher per seed, as a train fraction draws each seed's subset, shared by every
method) and distill-digits.{json,md,png}. Every run takes the reference losses (`--reference`):
what is compared is the losses, not a kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import environment

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's ktfast, for the subprocesses too (see run_method)

from ktfast.pictures.plots import save_figure  # noqa: E402

STUDENT, TEACHER = "resnet8", "resnet14"
T = 4.0  # one temperature for KD, KD + standardize, DKD and DIST (see docs/distillation_digits.md)
RECIPE = {"epochs": 12, "batch_size": 32, "lr_decay_at": "0.5,0.75", "train_fraction": 0.1}
SEEDS = [0, 1, 2, 3, 4]
SMOKE_RECIPE = {**RECIPE, "epochs": 1}
NAME = "distill-digits"


def _label(node: str) -> dict:
    return {"from": "label", "to": node, "loss": "ce", "gate": "through"}


def _from_teacher(name: str, description: str, edge: dict) -> dict:
    """The student and a frozen pre-trained teacher: label CE plus one edge teacher → student."""
    return {
        "version": 1,
        "name": name,
        "description": description,
        "target": "student",
        "nodes": [
            {"name": "student", "model": STUDENT},
            {"name": "teacher", "model": TEACHER, "init": "pretrained"},
        ],
        "edges": [_label("student"), {"from": "teacher", "to": "student", **edge}],
    }


def graphs() -> dict[str, dict]:
    """The compared methods, in the order of the table."""
    kl = {"loss": "kl", "gate": "through", "temperature": T}
    return {
        "alone": {
            "version": 1,
            "name": "alone",
            "description": f"the student ({STUDENT}) on the labels alone",
            "target": "student",
            "nodes": [{"name": "student", "model": STUDENT}],
            "edges": [_label("student")],
        },
        "kd": _from_teacher("kd", f"KD (Hinton et al.), T {T:g}", kl),
        "kd_ls": _from_teacher(
            "kd_ls", f"KD on standardized logits (Sun et al., 2024), T {T:g}", {**kl, "standardize": True}
        ),
        # DKD's warm-up is 20 of 240 epochs; the gate counts fractions of the run, so w = 1/12 keeps
        # its share of a short run (α·TCKD + 8·NCKD at full strength from the first step is what it avoids).
        "dkd": _from_teacher(
            "dkd",
            f"DKD (Zhao et al., 2022), alpha 1, beta 8, T {T:g}, warm-up 1/12 of the run",
            {"loss": "dkd", "gate": "warmup", "warmup": 1 / 12, "temperature": T, "alpha": 1.0, "beta": 8.0},
        ),
        "dist": _from_teacher(
            "dist",
            f"DIST's inter-class relation (Huang et al., 2022), T {T:g}",
            {"loss": "dist", "gate": "through", "temperature": T},
        ),
        # examples/dcl3.json's gates; the target n1 is the student's model, n2 the teacher's (from
        # scratch, as every DCL node), n3 a second student.
        "dcl": {
            "version": 1,
            "name": "dcl",
            "target": "n1",
            "description": f"DCL, examples/dcl3.json's gates: n1 {STUDENT} (target), n2 {TEACHER}, n3 {STUDENT}, "
            "all trained together from scratch",
            "nodes": [
                {"name": "n1", "model": STUDENT},
                {"name": "n2", "model": TEACHER},
                {"name": "n3", "model": STUDENT},
            ],
            "edges": [
                _label("n1"),
                _label("n2"),
                {**_label("n3"), "gate": "correct"},
                {"from": "n2", "to": "n1", "loss": "kl", "gate": "through"},
                {"from": "n3", "to": "n1", "loss": "kl", "gate": "linear"},
                {"from": "n1", "to": "n2", "loss": "kl", "gate": "correct"},
                {"from": "n3", "to": "n2", "loss": "kl", "gate": "cutoff"},
                {"from": "n1", "to": "n3", "loss": "kl", "gate": "linear"},
                {"from": "n2", "to": "n3", "loss": "kl", "gate": "correct"},
            ],
        },
    }


def train_args(graph: str, recipe: dict, seeds: list[int], run: str) -> list[str]:
    """The arguments of `ktfast train` for one method (paths relative to --out, where it runs)."""
    return [
        "train",
        "--graph",
        graph,
        "--dataset",
        "digits",
        "--train-fraction",
        str(recipe["train_fraction"]),
        "--epochs",
        str(recipe["epochs"]),
        "--batch-size",
        str(recipe["batch_size"]),
        "--lr-decay-at",
        recipe["lr_decay_at"],
        "--seeds",
        ",".join(map(str, seeds)),
        "--reference",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        run,
    ]


def run_method(out: Path, name: str, recipe: dict, seeds: list[int]) -> dict:
    args = train_args(f"graphs/{name}.json", recipe, seeds, f"runs/{name}")
    env = {
        **os.environ,
        "KTFAST_CACHE": "cache",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    }
    print(f"== {name}: ktfast {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ktfast", *args], cwd=out, env=env)
    if done.returncode:
        sys.exit(f"bench_distill: {name}: ktfast train ended with exit code {done.returncode}")
    return {"command": f"KTFAST_CACHE=cache ktfast {shlex.join(args)}", "wall_s": time.perf_counter() - start}


def final_accuracies(run: Path, seeds: list[int]) -> dict[str, list[float]]:
    """{node: [final test accuracy (%) of each seed]} from the runs' metrics.jsonl."""
    accs: dict[str, list[float]] = {}
    for seed in seeds:
        folder = run / f"seed{seed}" if len(seeds) > 1 else run  # as `ktfast train --seeds` lays them out
        last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        for node, v in last["test"].items():
            accs.setdefault(node, []).append(100 * v["acc"])
    return accs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(result: dict) -> str:
    """The markdown table: each method's target accuracy, mean ± std, each seed, the difference to alone."""
    seeds = result["seeds"]
    base = result["methods"]["alone"]["mean"]
    lines = [
        f"| method | test acc. (%), mean ± std of {len(seeds)} | Δ vs alone | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | wall (s) |",
        "|---|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for name, m in result["methods"].items():
        delta = "" if name == "alone" else f"{m['mean'] - base:+.2f}"
        lines.append(
            f"| {name} | {m['mean']:.2f} ± {m['std']:.2f} | {delta} | "
            + " | ".join(f"{a:.2f}" for a in m["acc"])
            + f" | {m['wall_s']:.0f} |"
        )
    teacher = result.get("teacher_acc")
    if not teacher:
        return "\n".join(lines)
    lines.append("")
    each = ", ".join(f"{a:.2f}" for a in teacher["acc"])
    lines.append(
        f"Teacher ({TEACHER}, pre-trained on each seed's subset, frozen): "
        f"{teacher['mean']:.2f} ± {teacher['std']:.2f} % ({each})"
    )
    return "\n".join(lines)


def figure(result: dict):
    """A dot per seed, the mean as a bar with ± one std, per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    for i, m in enumerate(result["methods"].values()):
        ax.scatter([i] * len(m["acc"]), m["acc"], s=18, color=f"C{i}", alpha=0.7, zorder=3)
        ax.errorbar(
            i + 0.18, m["mean"], yerr=m["std"], fmt="_", markersize=14, color="k", capsize=3, zorder=4
        )
    base = result["methods"]["alone"]
    ax.axhspan(
        base["mean"] - base["std"], base["mean"] + base["std"], color="0.85", zorder=1, label="alone, ± 1 std"
    )
    ax.set_xticks(range(len(result["methods"])), list(result["methods"]))
    ax.set_ylabel(f"{STUDENT} test accuracy (%)")
    r = result["recipe"]
    ax.set_title(
        f"digits, train fraction {r['train_fraction']}, {r['epochs']} epochs, {len(result['seeds'])} seeds; "
        f"teacher {TEACHER}",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", required=True, help="a new folder: graphs, runs, the teacher cache and the report"
    )
    ap.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch (the tests)")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "runs").exists():
        print(f"bench_distill: --out: {out} already holds runs/ (choose a new folder)", file=sys.stderr)
        sys.exit(2)
    recipe, seeds = (SMOKE_RECIPE, [0]) if args.smoke else (RECIPE, SEEDS)
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    methods = graphs()
    for name, g in methods.items():
        (out / "graphs" / f"{name}.json").write_text(json.dumps(g, indent=2) + "\n")
    result = {
        "benchmark": "distill",
        **environment(False),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dataset": "digits",
        "recipe": recipe,
        "seeds": seeds,
        "student": STUDENT,
        "teacher": TEACHER,
        "temperature": T,
        "methods": {},
    }
    start = time.perf_counter()
    for name, g in methods.items():
        ran = run_method(out, name, recipe, seeds)
        accs = final_accuracies(out / "runs" / name, seeds)
        mean, std = mean_std(accs[g["target"]])
        result["methods"][name] = {
            "description": g["description"],
            "graph": f"graphs/{name}.json",
            **ran,
            "acc": accs[g["target"]],
            "mean": mean,
            "std": std,
            "nodes": accs,
        }
        if "teacher" in accs:  # a frozen teacher scores the same in every method that loads it
            mean, std = mean_std(accs["teacher"])
            result["teacher_acc"] = {"acc": accs["teacher"], "mean": mean, "std": std}
        result["complete"] = len(result["methods"]) == len(methods)
        result["total_wall_s"] = time.perf_counter() - start
        write_report(out, result)  # after every method: a cut-off run keeps the methods it finished
    print(table(result))
    print(f"wrote {out / NAME}.{{json,md,png}} ({result['total_wall_s']:.0f} s)")


def write_report(out: Path, result: dict) -> None:
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(table(result) + "\n")
    save_figure(figure(result), out / f"{NAME}.png", flag="--out")


if __name__ == "__main__":
    main()
