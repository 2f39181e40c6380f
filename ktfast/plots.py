"""Pictures of graphs and runs: `ktfast show`, `ktfast attention`, `ktfast report`.

* the graph drawn as the papers draw it (Minami et al., Fig. 3/4; Okamoto et al., Fig. 4): the
  nodes on a circle around the label node, the target red, frozen pre-trained nodes blue and
  starred, ensemble nodes as hexagons, each non-cut-off edge an arrow labelled with its loss and
  gate (and T, weight where not 1), and with a run, each node's final test accuracy in parentheses;
* attention maps of every model node over sample test images, with the entropy of each node's
  prediction (Okamoto et al., Fig. 5);
* accuracy and loss curves of every node over the epochs of a run;
* the parameters and FLOPs of a model (the EKD paper's tables).

matplotlib is imported inside the functions that draw: the command line imports this module to
register its commands, and `ktfast train` should not pay for matplotlib.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ktfast.cli import UsageError, _positive_int
from ktfast.config import TrainConfig
from ktfast.data import dataset_info, make_loader
from ktfast.graph import GAMMA_GATES, LABEL, EnsembleNode, Graph
from ktfast.models import build_model, is_model_name
from ktfast.train import CHECKPOINT, METRICS

# Colours of the papers' figures: red target, blue pre-trained (frozen) source; ensembles get a
# colour of their own since the ensemble paper's red ensemble node is also its search target.
TARGET, FROZEN, ENSEMBLE, MODEL, LABEL_FILL = "#ea9999", "#9fc5e8", "#f9cb9c", "white", "#d9d9d9"
# The layout's unit is the inch: node texts and edge labels have fixed point sizes, so the geometry
# must be measured in the same units as the text to leave room for it.
NODE_RADIUS = 0.42  # fits "resnet110*" and "(73.46)" at 8.5 pt
MIN_ARC = 1.5  # visible length of an arc between neighbours: room for one edge label
EDGE_FONT = 7  # points
PAD = 0.06  # inches kept between an edge label and other labels or nodes, where it can be


# ---- the graph -----------------------------------------------------------------------------
def _owner(endpoint: str) -> str:
    """The node an edge endpoint belongs to: `s.b2` (branch 2 of s) is drawn at s."""
    return endpoint.partition(".")[0]


def _layout(graph: Graph) -> dict[str, tuple[float, float]]:
    """The nodes of the file clockwise on a circle from the top, the label node in its centre."""
    n = len(graph.nodes)
    # The circle grows with the number of nodes so that neighbours keep MIN_ARC between them.
    radius = max(2.1, (2 * NODE_RADIUS + MIN_ARC) / (2 * math.sin(math.pi / n))) if n > 1 else 2.1
    angles = [math.pi / 2 - 2 * math.pi * i / n for i in range(n)]
    pos = {name: (radius * math.cos(a), radius * math.sin(a)) for name, a in zip(graph.nodes, angles)}
    return {LABEL: (0.0, 0.0), **pos}


def _node_text(graph: Graph, name: str, accuracy: float | None) -> str:
    if name == LABEL:
        return "Label"
    node = graph.nodes[name]
    if isinstance(node, EnsembleNode):
        kind = f"{node.reduce} of {len(node.members)}"
    else:
        kind = node.model + ("*" if node.frozen else "")  # "*": pre-trained, as in the papers' tables
    acc = f"\n({100 * accuracy:.2f})" if accuracy is not None else ""
    return f"{name}\n{kind}{acc}"


def _node_fill(graph: Graph, name: str) -> str:
    if name == LABEL:
        return LABEL_FILL
    if name == graph.target:
        return TARGET
    node = graph.nodes[name]
    if isinstance(node, EnsembleNode):
        return ENSEMBLE
    return FROZEN if node.frozen else MODEL


def _edge_text(edge) -> str:
    gamma = f" γ={edge.gamma:g}" if edge.gate in GAMMA_GATES else ""
    lines = [f"{edge.loss} · {edge.gate}{gamma}"]
    soften = " (source)" if edge.soften == "source" else ""  # only the source's logits divided by T
    extras = ([f"T={edge.temperature:g}{soften}"] * (edge.temperature != 1.0 or bool(soften))
              + [f"w={edge.weight:g}"] * (edge.weight != 1.0))
    if extras:
        lines.append(", ".join(extras))
    if "." in edge.source or "." in edge.target:  # which branches of a multi-branch node it joins
        lines.insert(0, f"{edge.source}→{edge.target}")
    return "\n".join(lines)


def _bezier(a, b, rad: float, t: float) -> tuple[tuple[float, float], float]:
    """The point at t of matplotlib's `arc3,rad=…` curve from a to b (a quadratic Bézier), and the
    curve's direction there in degrees, turned to read left to right."""
    (x1, y1), (x2, y2) = a, b
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    s = 1 - t
    point = (s * s * x1 + 2 * s * t * cx + t * t * x2, s * s * y1 + 2 * s * t * cy + t * t * y2)
    angle = math.degrees(math.atan2(s * (cy - y1) + t * (y2 - cy), s * (cx - x1) + t * (x2 - cx)))
    return point, (angle + 90) % 180 - 90


def graph_figure(graph: Graph, accuracies: dict[str, float] | None = None, title: str | None = None):
    """The graph as a matplotlib Figure; `accuracies` ({node: test accuracy in [0, 1]}) are shown
    in parentheses under the nodes' models."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyArrowPatch, Patch, RegularPolygon

    pos = _layout(graph)
    # Room for arcs bulging out of the circle, and for self-loops with their labels beyond them.
    loops = any(_owner(e.source) == _owner(e.target) for e in graph.active_edges)
    margin = NODE_RADIUS + (1.2 if loops else 0.8)
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    # At least as wide as the legend and the title; a one-node graph is narrower than that.
    width, height = max(5.5, max(xs) - min(xs) + 2 * margin), max(ys) - min(ys) + 2 * margin
    # Ensemble nodes are defined in lines under the title: lines from every member would cross
    # the whole graph.
    captions = [f"{e.name} = {e.reduce}({', '.join(e.members)})" + ("" if e.detach else ", trains its members")
                for e in graph.ensemble_nodes]
    legend_h, title_h = 0.5, 0.45 + 0.2 * len(captions)
    fig = Figure(figsize=(width, height + legend_h + title_h))
    total = height + legend_h + title_h
    ax = fig.add_axes((0, legend_h / total, 1, height / total))
    ax.set_xlim((min(xs) + max(xs) - width) / 2, (min(xs) + max(xs) + width) / 2)
    ax.set_ylim(min(ys) - margin, max(ys) + margin)
    ax.set_aspect("equal")  # the arcs' geometry (and _bezier) assume round circles
    ax.axis("off")

    patches = {}
    for name, xy in pos.items():
        ensemble = name != LABEL and isinstance(graph.nodes[name], EnsembleNode)
        style = dict(facecolor=_node_fill(graph, name), edgecolor="black", zorder=3,
                     linewidth=2.5 if name == graph.target else 1.2)
        patch = (RegularPolygon(xy, 6, radius=NODE_RADIUS * 1.1, **style) if ensemble
                 else Circle(xy, NODE_RADIUS, **style))
        ax.add_patch(patch)
        patches[name] = patch
        acc = accuracies.get(name) if accuracies else None
        text = _node_text(graph, name, acc)
        ax.text(*xy, text, ha="center", va="center", fontsize=_fitting_size(text), zorder=4,
                fontweight="bold" if name == graph.target else "normal")

    parallel: dict[tuple[str, str], int] = {}
    placed: list[tuple] = []  # the boxes of the edge labels drawn so far (see _label_box)
    for edge in graph.active_edges:
        s, t = _owner(edge.source), _owner(edge.target)
        colour = "dimgrey" if edge.source == LABEL else "black"
        # A white box under the label interrupts the arcs it lies on, and keeps it readable.
        text_style = dict(ha="center", va="center", fontsize=EDGE_FONT, color=colour, zorder=5, rotation_mode="anchor",
                          bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))
        if s == t:  # e.g. a multi-branch node teaching its own branch: a loop on the outer side
            _self_loop(ax, pos[s], _edge_text(edge), colour, text_style)
            continue
        # Opposite edges of a pair bulge to opposite sides with the same `rad`; further edges of
        # the same ordered pair (several branches) bulge further.
        k = parallel.get((s, t), 0)
        parallel[(s, t)] = k + 1
        # Label edges are straight spokes: nothing flows back into the label node to tell apart.
        rad = _clear_rad(pos, s, t, (0.0 if s == LABEL else 0.18) + 0.16 * k)
        ax.add_patch(FancyArrowPatch(pos[s], pos[t], patchA=patches[s], patchB=patches[t],
                                     connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=14,
                                     color=colour, linewidth=1.2, zorder=2))
        # The label runs along its arc, preferably past the middle, nearer the target: the labels
        # of the two edges of a pair lie on their own arcs, and crossing diagonals do not meet in
        # the middle (a short spoke's label stays central, clear of the arrowhead). Where another
        # label is already close, it slides along the arc.
        text = _edge_text(edge)
        along = (0.5, 0.4, 0.6) if s == LABEL else (0.6, 0.45, 0.72, 0.35, 0.8)
        boxes = [_label_box(*_bezier(pos[s], pos[t], rad, at), text) for at in along]
        box = min(boxes, key=lambda b: _overlap(b, placed, pos.values()))  # the first of the best
        placed.append(box)
        xy, angle = box[0], box[1]
        ax.text(*xy, text, rotation=angle, **text_style)

    legend = [Patch(facecolor=TARGET, edgecolor="black", linewidth=2.5, label="target")]
    if any(n.frozen for n in graph.model_nodes):
        legend.append(Patch(facecolor=FROZEN, edgecolor="black", label="frozen, pre-trained (*)"))
    if graph.ensemble_nodes:
        legend.append(Patch(facecolor=ENSEMBLE, edgecolor="black", label="ensemble"))
    legend.append(Line2D([], [], color="black", marker=">", label="loss · gate (cut-off edges omitted)"))
    fig.legend(handles=legend, loc="lower center", ncol=min(3, len(legend)), fontsize=7.5, frameon=False)
    fig.text(0.5, 1 - 0.25 / total, title or graph.name, ha="center", va="center", fontsize=11)
    for i, line in enumerate(captions):
        fig.text(0.5, 1 - (0.5 + 0.2 * i) / total, line, ha="center", va="center", fontsize=8)
    return fig


def _fitting_size(text: str, size: float = 8.5) -> float:
    """A font size at which the text's longest line fits inside a node (long model names)."""
    fits = 2 * NODE_RADIUS * 72 * 0.9 / (0.6 * size)  # characters: average glyph width ≈ 0.6 em
    return size * min(1.0, fits / max(len(line) for line in text.splitlines()))


def _label_box(xy, angle: float, text: str) -> tuple:
    """An edge label as (centre, angle, half-length, half-height) in inches: a thick segment along
    its arc, sized from its characters (an average glyph is about 0.6 em wide)."""
    lines = text.splitlines()
    return xy, angle, 0.6 * EDGE_FONT / 72 * max(map(len, lines)) / 2, 1.2 * EDGE_FONT / 72 * len(lines) / 2


def _segment(box) -> tuple[tuple[float, float], tuple[float, float]]:
    (x, y), angle, half, _ = box
    dx, dy = half * math.cos(math.radians(angle)), half * math.sin(math.radians(angle))
    return (x - dx, y - dy), (x + dx, y + dy)


def _point_segment(p, a, b) -> float:
    (px, py), (ax, ay), (bx, by) = p, a, b
    length2 = (bx - ax) ** 2 + (by - ay) ** 2
    u = max(0.0, min(1.0, ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / length2)) if length2 else 0.0
    return math.dist(p, (ax + u * (bx - ax), ay + u * (by - ay)))


def _segments_distance(a, b, c, d) -> float:
    def side(p, q, r):  # which side of the line p→q the point r lies on
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    if side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0:
        return 0.0  # they cross
    return min(_point_segment(a, c, d), _point_segment(b, c, d), _point_segment(c, a, b), _point_segment(d, a, b))


def _overlap(box, placed: list, nodes) -> float:
    """How far (inches) a label box reaches into the labels already placed and into the nodes; 0
    where it is clear of them all."""
    a, b = _segment(box)
    worst = 0.0
    for other in placed:
        worst = max(worst, box[3] + other[3] + PAD - _segments_distance(a, b, *_segment(other)))
    for centre in nodes:
        worst = max(worst, NODE_RADIUS + box[3] + PAD - _point_segment(centre, a, b))
    return worst


def _clear_rad(pos: dict, s: str, t: str, rad: float) -> float:
    """The first curvature from `rad` up whose arc passes clear of every other node, so that an edge
    never seems to enter a node it does not touch (neighbours-but-one on the circle)."""
    others = [xy for name, xy in pos.items() if name not in (s, t)]
    for candidate in (rad + 0.15 * i for i in range(8)):
        points = [_bezier(pos[s], pos[t], candidate, i / 20)[0] for i in range(2, 19)]
        if all(math.dist(p, o) > 1.15 * NODE_RADIUS for p in points for o in others):
            return candidate
    return rad


def _self_loop(ax, centre, text: str, colour: str, text_style: dict) -> None:
    from matplotlib.patches import FancyArrowPatch

    x, y = centre
    norm = math.hypot(x, y) or 1.0
    ux, uy = x / norm, y / norm  # outward, away from the circle's centre
    ends = []
    for sign in (1, -1):
        a = sign * math.radians(35)
        ends.append((x + NODE_RADIUS * (ux * math.cos(a) - uy * math.sin(a)),
                     y + NODE_RADIUS * (ux * math.sin(a) + uy * math.cos(a))))
    rad = -2.5  # negative: arc3's control point then lies outside the node (see _bezier)
    ax.add_patch(FancyArrowPatch(*ends, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=12,
                                 color=colour, linewidth=1.2, zorder=2, shrinkA=0, shrinkB=0))
    (apex_x, apex_y), _ = _bezier(*ends, rad, 0.5)
    ax.text(apex_x + 0.2 * ux, apex_y + 0.2 * uy, text, **text_style)  # level, beyond the loop's apex


# ---- runs ----------------------------------------------------------------------------------
def _run_file(run: Path, name: str, flag: str = "RUN") -> Path:
    if not run.is_dir():
        raise UsageError(f"{flag}: {run} is not a directory")
    path = run / name
    if not path.is_file():
        raise UsageError(f"{flag}: {run} has no {name} (not a run directory, or no epoch finished yet)")
    return path


def read_metrics(run: Path, flag: str = "RUN") -> list[dict]:
    """The rows of a run's metrics.jsonl, one per finished epoch (at least one)."""
    path = _run_file(run, METRICS, flag)
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


def check_nodes(graph: Graph, rows: list[dict], flag: str) -> None:
    """Every row has train and test numbers of every node of the graph (else: another graph's run)."""
    for row in rows:
        for split in ("train", "test"):
            missing = [name for name in graph.nodes if name not in row.get(split, {})]
            if missing:
                raise UsageError(f"{flag}: epoch {row.get('epoch')} has no {split} numbers of node "
                                 f"{missing[0]!r}: a run of another graph?")


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
    graph = Graph.load(_run_file(run, "graph.json"))
    cfg = TrainConfig.load(_run_file(run, "config.json"))
    checkpoint = _run_file(run, CHECKPOINT)
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["models"]
    except Exception as e:  # a truncated or foreign file: one line
        raise UsageError(f"RUN: cannot read {checkpoint}: {e}") from None
    info = dataset_info(cfg.dataset, cfg.data_dir)
    loader = make_loader(cfg.dataset, "test", images, "cpu", cfg.seed, data_dir=cfg.data_dir)
    x, y = next(iter(loader))
    out = AttentionSamples((x * loader.std + loader.mean).clamp(0, 1).permute(0, 2, 3, 1), y.tolist(), {}, {}, {})
    for node in graph.model_nodes:
        model = build_model(node.model, info.num_classes, info.image_size)
        try:
            model.load_state_dict(saved[node.name])
        except (KeyError, RuntimeError):
            raise UsageError(f"RUN: {checkpoint} holds no {node.model} weights for node {node.name!r}") from None
        logits, att = model.eval()(x, return_attention=True)
        att = F.interpolate(att[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
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
            ax.set_title(f"{name}: {pred}, H={samples.entropies[name][i]:.2f}", fontsize=8,
                         color="green" if pred == label else "red")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


# ---- curves --------------------------------------------------------------------------------
def curves_figure(graph: Graph, rows: list[dict], title: str = ""):
    """A 2x2 grid, accuracy and loss by train and test, one line per node (ensembles dashed). The
    train loss is the node's L_t (its gated edge losses), the test loss the cross-entropy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    epochs = [r["epoch"] for r in rows]
    panels = [("train", "acc", "train accuracy (%)"), ("test", "acc", "test accuracy (%)"),
              ("train", "loss", "train loss (L_t)"), ("test", "loss", "test loss (cross-entropy)")]
    for ax, (split, key, name) in zip(axes.flat, panels):
        for i, node in enumerate(graph.nodes):
            values = [r[split][node][key] * (100 if key == "acc" else 1) for r in rows]
            ensemble = isinstance(graph.nodes[node], EnsembleNode)
            ax.plot(epochs, values, marker="o", markersize=3, color=f"C{i % 10}",
                    linestyle="--" if ensemble else "-", linewidth=2.2 if node == graph.target else 1.3,
                    label=node + (" (target)" if node == graph.target else ""))
        # Losses span orders of magnitude early in a run; a log axis needs them positive (cosine
        # losses are similarities and can be negative).
        if key == "loss" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 1].legend(fontsize=8)
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
        raise UsageError(f"{flag}: {path}: the name must end in one of {', '.join('.' + f for f in supported)}")
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


# ---- command line --------------------------------------------------------------------------
def add_picture_commands(sub) -> None:
    p = sub.add_parser("show", help="draw a graph file as the papers do, or print a model's parameters and FLOPs")
    p.add_argument("graph", nargs="?", help="graph file (JSON)")
    p.add_argument("-o", "--output", help="picture to write (.png, .pdf, .svg, …)")
    p.add_argument("--run", metavar="DIR", help="show each node's final test accuracy from this run")
    p.add_argument("--model", help="instead of a graph: a model name, to print its parameters and FLOPs")
    p.add_argument("--dataset", help="with --model: the dataset whose image size and classes to use "
                   f"(default {TrainConfig().dataset})")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("attention", help="attention maps of every model node of a run over test images")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("-o", "--output", required=True, help="picture to write")
    p.add_argument("--images", type=_positive_int, default=6, help="test images, one row each (default 6)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("report", help="accuracy and loss curves of every node of a run")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("-o", "--output", help="picture to write (default RUN/curves.png)")
    p.set_defaults(func=cmd_report)


def cmd_show(args) -> int:
    if (args.graph is None) == (args.model is None):
        raise UsageError("show: give exactly one of a graph file or --model NAME")
    if args.model is not None:
        return _show_model(args)
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir)):
        if value is not None:
            raise UsageError(f"{flag}: only with --model")
    if not args.output:
        raise UsageError("-o: required with a graph file")
    output = Path(args.output)
    picture_format(output)
    graph = Graph.load(args.graph)
    accuracies, title = None, graph.name
    if args.run:
        rows = read_metrics(Path(args.run), "--run")
        check_nodes(graph, rows, "--run")
        accuracies = {name: rows[-1]["test"][name]["acc"] for name in graph.nodes}
        title = f"{graph.name}: test accuracy (%) after epoch {rows[-1]['epoch']}"
    save_figure(graph_figure(graph, accuracies, title), output)
    print(output)
    return 0


def _show_model(args) -> int:
    for flag, value in (("-o", args.output), ("--run", args.run)):
        if value is not None:
            raise UsageError(f"{flag}: not with --model (it prints, it draws nothing)")
    if not is_model_name(args.model):
        raise UsageError(f"--model: unknown model {args.model!r}")
    dataset = args.dataset or TrainConfig().dataset
    info = dataset_info(dataset, args.data_dir)
    params, flops = model_cost(args.model, info.num_classes, info.image_size)
    print(f"model       {args.model}, {info.num_classes} classes, one 3x{info.image_size}x{info.image_size} "
          f"image ({dataset})")
    print(f"parameters  {params:,} ({params / 1e6:.2f} M)")
    print(f"FLOPs       {flops:,} ({flops / 1e6:.2f} M), 2 per multiply-add of convolutions and matrix products")
    print(f"MACs        {flops // 2:,} ({flops / 2e6:.2f} M), multiply-adds: what the EKD paper calls FLOPs")
    return 0


def cmd_attention(args) -> int:
    output = Path(args.output)
    picture_format(output)
    run = Path(args.run)
    samples = attention_samples(run, args.images)
    save_figure(attention_figure(samples, f"{run.name}: attention map, prediction and entropy H (nats)"), output)
    print(output)
    return 0


def cmd_report(args) -> int:
    run = Path(args.run)
    output = Path(args.output) if args.output else run / "curves.png"
    picture_format(output)
    rows = read_metrics(run)
    graph = Graph.load(_run_file(run, "graph.json"))
    check_nodes(graph, rows, "RUN")
    save_figure(curves_figure(graph, rows, f"{graph.name} ({run})"), output)
    print(output)
    return 0
