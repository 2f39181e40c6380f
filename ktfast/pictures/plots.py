"""Pictures of runs: attention maps of every model node over sample test images, with the entropy of
each node's prediction (Okamoto et al., Fig. 5); accuracy and loss curves of every node over the
epochs of a run (of each seed of a run of several, with the band of mean ± std); the parameters
and FLOPs of a model (the EKD paper's tables); and the writing of any figure, never half-done.

matplotlib is imported inside the functions that draw: the command line imports this module to
register its commands, and `ktfast train` should not pay for matplotlib.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ktfast.args import UsageError
from ktfast.config import TrainConfig
from ktfast.data import dataset_info, make_loader
from ktfast.engine.trainer import CHECKPOINT, METRICS
from ktfast.graph import EnsembleNode, Graph
from ktfast.models import build_model


# ---- runs ----------------------------------------------------------------------------------
def run_file(run: Path, name: str, flag: str = "RUN") -> Path:
    if not run.is_dir():
        raise UsageError(f"{flag}: {run} is not a directory")
    path = run / name
    if not path.is_file():
        raise UsageError(f"{flag}: {run} has no {name} (not a run directory, or no epoch finished yet)")
    return path


def read_metrics(run: Path, flag: str = "RUN") -> list[dict]:
    """The rows of a run's metrics.jsonl, one per finished epoch (at least one)."""
    path = run_file(run, METRICS, flag)
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"{flag}: {path} line {i} is not JSON") from None
    if not rows:
        raise UsageError(f"{flag}: {path} holds no epoch yet")
    return rows


def read_seed_runs(run: Path, flag: str = "RUN") -> dict[int | None, list[dict]]:
    """{seed: metrics rows} of a run of several seeds (its seed{s} folders), or {None: rows} of a
    run of one."""
    if (run / METRICS).is_file() or not run.is_dir():
        return {None: read_metrics(run, flag)}
    seeds = sorted(
        int(m[1]) for d in run.iterdir() if (m := re.fullmatch(r"seed(\d+)", d.name)) and d.is_dir()
    )
    if not seeds:
        read_metrics(run, flag)  # says what is missing
    return {s: read_metrics(run / f"seed{s}", flag) for s in seeds}


def check_nodes(graph: Graph, rows: list[dict], flag: str) -> None:
    """Every row has train and test numbers of every node of the graph (else: another graph's run)."""
    for row in rows:
        for split in ("train", "test"):
            missing = [name for name in graph.nodes if name not in row.get(split, {})]
            if missing:
                raise UsageError(
                    f"{flag}: epoch {row.get('epoch')} has no {split} numbers of node "
                    f"{missing[0]!r}: a run of another graph?"
                )


# ---- attention maps ------------------------------------------------------------------------
@dataclass
class AttentionSamples:
    images: torch.Tensor  # [N, H, W, 3] in [0, 1], as shown
    labels: list[int]
    maps: dict[str, torch.Tensor]  # model node -> [N, H, W] in [0, 1], upsampled to the image
    predictions: dict[str, list[int]]
    entropies: dict[str, list[float]]  # of softmax(logits), in nats


@torch.no_grad()
def attention_samples(run: Path, images: int) -> AttentionSamples:
    """The first `images` test images of the run's dataset through every model node of its final
    checkpoint, on the CPU (a handful of images: no reason to need a GPU)."""
    graph = Graph.load(run_file(run, "graph.json"))
    cfg = TrainConfig.load(run_file(run, "config.json"))
    checkpoint = run_file(run, CHECKPOINT)
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["models"]
    except Exception as e:  # a truncated or foreign file: one line
        raise UsageError(f"RUN: cannot read {checkpoint}: {e}") from None
    info = dataset_info(cfg.dataset, cfg.data_dir)
    loader = make_loader(cfg.dataset, "test", images, "cpu", cfg.seed, data_dir=cfg.data_dir)
    x, y = next(iter(loader))
    out = AttentionSamples(
        (x * loader.std + loader.mean).clamp(0, 1).permute(0, 2, 3, 1), y.tolist(), {}, {}, {}
    )
    for node in graph.model_nodes:
        model = build_model(node.model, info.num_classes, info.image_size, attention=node.attention)
        try:
            model.load_state_dict(saved[node.name])
        except (KeyError, RuntimeError):
            raise UsageError(
                f"RUN: {checkpoint} holds no {node.model} weights for node {node.name!r}"
            ) from None
        logits, att = model.eval()(x, return_attention=True)
        att = F.interpolate(att[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]
        low = att.amin((1, 2), keepdim=True)
        span = att.amax((1, 2), keepdim=True) - low
        out.maps[node.name] = (att - low) / span.clamp_min(1e-12)  # each map on its own [0, 1] scale
        out.predictions[node.name] = logits.argmax(1).tolist()
        # entr(p) = -p ln p, 0 at p = 0 and +0 at p = 1: a confident prediction shows H=0.00, not -0.00
        out.entropies[node.name] = torch.special.entr(F.softmax(logits.float(), 1)).sum(1).tolist()
    return out


def attention_figure(samples: AttentionSamples, title: str = ""):
    """Rows: images; columns: the image, then each model node's attention map blended over it,
    titled with the node's prediction (green when right) and its entropy."""
    from matplotlib.figure import Figure

    nodes = list(samples.maps)
    rows, cols = len(samples.labels), 1 + len(nodes)
    fig = Figure(figsize=(1.7 * cols, 1.85 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, label in enumerate(samples.labels):
        image = samples.images[i].numpy()
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"class {label}", fontsize=8)
        for ax, name in zip(axes[i, 1:], nodes):
            pred = samples.predictions[name][i]
            ax.imshow(image)
            ax.imshow(samples.maps[name][i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(
                f"{name}: {pred}, H={samples.entropies[name][i]:.2f}",
                fontsize=8,
                color="green" if pred == label else "red",
            )
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


# ---- curves --------------------------------------------------------------------------------
def curves_figure(graph: Graph, rows: list[dict] | dict[int, list[dict]], title: str = ""):
    """A grid, accuracy and loss by train, test (and val, where the run held a val split out), one
    line per node (ensembles dashed). The train loss is the node's L_t (its gated edge losses), the
    test loss the cross-entropy. `rows` of several seeds ({seed: rows}): each seed's line thin (gid
    "NODE seed S"), their mean labelled by the node, and the band mean ± sample std (gid "NODE band"),
    over the epochs every seed finished."""
    from matplotlib.figure import Figure

    runs = rows if isinstance(rows, dict) else {None: rows}
    first = next(iter(runs.values()))
    splits = ["train", "test"] + (["val"] if all("val" in r for rs in runs.values() for r in rs) else [])
    fig = Figure(figsize=(5 * len(splits), 7), layout="constrained")
    axes = fig.subplots(2, len(splits), sharex=True)
    epochs = [r["epoch"] for r in first[: min(len(rs) for rs in runs.values())]]
    losses = {
        "train": "train loss (L_t)",
        "test": "test loss (cross-entropy)",
        "val": "val loss (cross-entropy)",
    }
    panels = [(s, "acc", f"{s} accuracy (%)") for s in splits] + [(s, "loss", losses[s]) for s in splits]
    for ax, (split, key, name) in zip(axes.flat, panels):
        for i, node in enumerate(graph.nodes):
            per_seed = {
                s: [r[split][node][key] * (100 if key == "acc" else 1) for r in rs[: len(epochs)]]
                for s, rs in runs.items()
            }
            style = dict(
                color=f"C{i % 10}", linestyle="--" if isinstance(graph.nodes[node], EnsembleNode) else "-"
            )
            if len(runs) > 1:
                for s, values in per_seed.items():
                    ax.plot(epochs, values, linewidth=0.7, alpha=0.35, gid=f"{node} seed {s}", **style)
                mean = [statistics.fmean(v) for v in zip(*per_seed.values())]
                std = [statistics.stdev(v) for v in zip(*per_seed.values())]
                ax.fill_between(
                    epochs,
                    [m - d for m, d in zip(mean, std)],
                    [m + d for m, d in zip(mean, std)],
                    color=style["color"],
                    alpha=0.18,
                    linewidth=0,
                    gid=f"{node} band",
                )
            else:
                mean = next(iter(per_seed.values()))
            ax.plot(
                epochs,
                mean,
                marker="o",
                markersize=3,
                linewidth=2.2 if node == graph.target else 1.3,
                label=node + (" (target)" if node == graph.target else ""),
                **style,
            )
        # Losses span orders of magnitude early in a run; a log axis needs them positive (cosine
        # losses are similarities and can be negative).
        if key == "loss" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


# ---- model cost ----------------------------------------------------------------------------
@torch.no_grad()
def model_cost(name: str, num_classes: int, image_size: int) -> tuple[int, int]:
    """(parameters, FLOPs of one forward pass of one image). FLOPs as torch's FlopCounterMode counts
    them: 2 per multiply-add of the convolutions and matrix products (BatchNorm, ReLU and pooling
    are not counted); the EKD paper's "FLOPs" are multiply-adds, half this number."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, num_classes, image_size).eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


# ---- writing -------------------------------------------------------------------------------
def picture_format(path: Path, flag: str = "-o") -> str:
    """The file format a path's suffix names (png, pdf, svg, …), checked before any work is done."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = path.suffix[1:].lower()
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(
            f"{flag}: {path}: the name must end in one of {', '.join('.' + f for f in supported)}"
        )
    return fmt


def save_figure(fig, path: Path, flag: str = "-o") -> None:
    """Render to a temporary file beside `path`, then rename: never a half-written picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the Agg renderer, whatever pyplot's backend is: no display needed
    fmt = picture_format(path, flag)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=150)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
