"""The EKD limited-data study on digits (issue 13; the EKD paper's Fig. 3): the student alone
(branch3_alone.json), EKD (ekd.json) and EKD with gently fine-tuned teachers (ekd_gentle.json) at
several training fractions, Adam lr 0.01, 60 epochs, seeds 0, 1, 2.

    python examples/ekd_study.py run  [--root runs/ekd_study] [--rows ekd@0.1,alone@0.1,...] [--seeds 0,1,2]
    python examples/ekd_study.py plot [--root runs/ekd_study] [-o docs/ekd_fraction.png]

`run` trains each (row, fraction, seed) as its own run directory ROOT/ROW-fFRACTION/seedS, one
after another, skipping runs that finished and resuming runs that were interrupted. `plot` reads
whatever has finished: it prints the table (mean ± sample std of the student's final test
accuracy, n = finished seeds) and draws test accuracy against the training fraction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
GRAPHS = {"alone": "branch3_alone.json", "ekd": "ekd.json", "ekd_gentle": "ekd_gentle.json"}
LABELS = {"alone": "student alone", "ekd": "EKD", "ekd_gentle": "EKD, teachers' lr_scale 0.1"}
# Smallest fractions first: they are the cheapest and the paper's point (EKD helps most there).
DEFAULT_ROWS = [
    "alone@0.1",
    "ekd@0.1",
    "ekd_gentle@0.1",
    "alone@0.25",
    "ekd@0.25",
    "alone@0.5",
    "ekd@0.5",
    "alone@1.0",
    "ekd@1.0",
]
EPOCHS, SEEDS = 60, (0, 1, 2)
RECIPE = ["--dataset", "digits", "--epochs", str(EPOCHS), "--optimizer", "adam", "--lr", "0.01"]


def parse_row(text: str) -> tuple[str, float]:
    name, _, fraction = text.partition("@")
    if name not in GRAPHS or not fraction:
        raise SystemExit(f"--rows: expected NAME@FRACTION with NAME in {', '.join(GRAPHS)}, got {text!r}")
    return name, float(fraction)


def run_dir(root: Path, name: str, fraction: float, seed: int) -> Path:
    return root / f"{name}-f{fraction:g}" / f"seed{seed}"


def finished_rows(run: Path) -> list[dict]:
    """The run's epoch rows if it trained all EPOCHS, else []."""
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return rows if len(rows) == EPOCHS else []


def run(root: Path, rows: list[str], seeds=SEEDS) -> None:
    for name, fraction in map(parse_row, rows):
        for seed in seeds:
            out = run_dir(root, name, fraction, seed)
            if finished_rows(out):
                continue
            where = ["--resume", str(out)] if (out / "checkpoint.pt").exists() else ["--out", str(out)]
            cmd = [
                sys.executable,
                "-m",
                "ktfast",
                "train",
                "--graph",
                str(EXAMPLES / GRAPHS[name]),
                *RECIPE,
                "--train-fraction",
                str(fraction),
                "--seeds",
                str(seed),
                "--quiet",
                *where,
            ]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def collect(root: Path) -> dict:
    """{(name, fraction): {"s": [final test %, ...], "teachers": [...]}} over the finished seeds."""
    out = {}
    for row_dir in sorted(root.glob("*-f*")):
        name, _, fraction = row_dir.name.rpartition("-f")
        if name not in GRAPHS:
            continue
        finals = [rows[-1]["test"] for seed in SEEDS if (rows := finished_rows(row_dir / f"seed{seed}"))]
        if finals:
            out[name, float(fraction)] = {
                node: [f[node]["acc"] * 100 for f in finals]
                for node in ("s", "teachers")
                if node in finals[0]
            }
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    fractions = sorted({f for _, f in results})
    lines = ["| fraction | " + " | ".join(LABELS[n] for n in GRAPHS) + " |", "|---|" + "---|" * len(GRAPHS)]
    for f in fractions:
        cells = []
        for name in GRAPHS:
            r = results.get((name, f))
            if r is None:
                cells.append("–")
                continue
            m, s = mean_std(r["s"])
            cell = f"{m:.2f} ± {s:.2f} (n={len(r['s'])})"
            if "teachers" in r:
                cell += f"; teacher sum {mean_std(r['teachers'])[0]:.2f}"
            cells.append(cell)
        lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in GRAPHS:
        points = sorted((f, *mean_std(r["s"])) for (n, f), r in results.items() if n == name)
        if points:
            f, m, s = zip(*points)
            ax.errorbar(f, m, yerr=s, marker="o", capsize=3, label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xticks([0.1, 0.25, 0.5, 1.0], ["0.1", "0.25", "0.5", "1.0"])
    ax.set_xlabel("training fraction of digits")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(
        f"EKD vs the student alone on digits\n{EPOCHS} epochs, Adam, mean ± std over seeds", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "plot"])
    p.add_argument("--root", type=Path, default=Path("runs/ekd_study"))
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="NAME@FRACTION, in the order to train")
    p.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help="of the rows, these seeds (a first seed of every row first, say)",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("docs/ekd_fraction.png"))
    args = p.parse_args(argv)
    if args.command == "run":
        run(args.root, args.rows.split(","), [int(s) for s in args.seeds.split(",")])
        return
    results = collect(args.root)
    if not results:
        raise SystemExit(f"{args.root}: no finished runs")
    print(table(results))
    plot(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
