"""The graph drawn as the papers draw it (Minami et al., Fig. 3/4; Okamoto et al., Fig. 4), for
`ktfast show`: the nodes on a circle around the label node, the target red, frozen pre-trained
nodes blue and starred, ensemble nodes as hexagons, each non-cut-off edge an arrow labelled with
its loss and gate (and T, weight where not 1), and with a run, each node's final test accuracy
in parentheses. matplotlib is imported inside the functions that draw."""

from __future__ import annotations

import math

from ktfast.graph import LABEL, EnsembleNode, Graph, owner
from ktfast.graph.gates import GAMMA_GATES

# Colours of the papers' figures: red target, blue pre-trained (frozen) source; ensembles get a
# colour of their own since the ensemble paper's red ensemble node is also its search target.
TARGET, FROZEN, ENSEMBLE, MODEL, LABEL_FILL = "#ea9999", "#9fc5e8", "#f9cb9c", "white", "#d9d9d9"
# The layout's unit is the inch: node texts and edge labels have fixed point sizes, so the geometry
# must be measured in the same units as the text to leave room for it.
NODE_RADIUS = 0.42  # fits "resnet110*" and "(73.46)" at 8.5 pt
MIN_ARC = 1.5  # visible length of an arc between neighbours: room for one edge label
EDGE_FONT = 7  # points
PAD = 0.06  # inches kept between an edge label and other labels or nodes, where it can be


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
    extras = [f"T={edge.temperature:g}{soften}"] * (edge.temperature != 1.0 or bool(soften)) + [
        f"w={edge.weight:g}"
    ] * (edge.weight != 1.0)
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
    pos = _layout(graph)
    # Ensemble nodes are defined in lines under the title: lines from every member would cross
    # the whole graph.
    captions = [
        f"{e.name} = {e.reduce}({', '.join(e.members)})" + ("" if e.detach else ", trains its members")
        for e in graph.ensemble_nodes
    ]
    fig, ax, total = _canvas(graph, pos, len(captions))
    patches = _draw_nodes(ax, graph, pos, accuracies)
    _draw_edges(ax, graph, pos, patches)
    _draw_legend(fig, graph)
    fig.text(0.5, 1 - 0.25 / total, title or graph.name, ha="center", va="center", fontsize=11)
    for i, line in enumerate(captions):
        fig.text(0.5, 1 - (0.5 + 0.2 * i) / total, line, ha="center", va="center", fontsize=8)
    return fig


def _canvas(graph: Graph, pos: dict, captions: int):
    """The figure, its axes around the nodes (room below for the legend, above for the title and
    `captions` lines), and the figure's height in inches."""
    from matplotlib.figure import Figure

    # Room for arcs bulging out of the circle, and for self-loops with their labels beyond them.
    loops = any(owner(e.source) == owner(e.target) for e in graph.active_edges)
    margin = NODE_RADIUS + (1.2 if loops else 0.8)
    xs, ys = [x for x, _ in pos.values()], [y for _, y in pos.values()]
    # At least as wide as the legend and the title; a one-node graph is narrower than that.
    width, height = max(5.5, max(xs) - min(xs) + 2 * margin), max(ys) - min(ys) + 2 * margin
    legend_h, title_h = 0.5, 0.45 + 0.2 * captions
    fig = Figure(figsize=(width, height + legend_h + title_h))
    total = height + legend_h + title_h
    ax = fig.add_axes((0, legend_h / total, 1, height / total))
    ax.set_xlim((min(xs) + max(xs) - width) / 2, (min(xs) + max(xs) + width) / 2)
    ax.set_ylim(min(ys) - margin, max(ys) + margin)
    ax.set_aspect("equal")  # the arcs' geometry (and _bezier) assume round circles
    ax.axis("off")
    return fig, ax, total


def _draw_nodes(ax, graph: Graph, pos: dict, accuracies: dict | None) -> dict:
    """Every node's circle (a hexagon for an ensemble) and text; {node: its patch}."""
    from matplotlib.patches import Circle, RegularPolygon

    patches = {}
    for name, xy in pos.items():
        ensemble = name != LABEL and isinstance(graph.nodes[name], EnsembleNode)
        style = dict(
            facecolor=_node_fill(graph, name),
            edgecolor="black",
            zorder=3,
            linewidth=2.5 if name == graph.target else 1.2,
        )
        patch = (
            RegularPolygon(xy, 6, radius=NODE_RADIUS * 1.1, **style)
            if ensemble
            else Circle(xy, NODE_RADIUS, **style)
        )
        ax.add_patch(patch)
        patches[name] = patch
        acc = accuracies.get(name) if accuracies else None
        text = _node_text(graph, name, acc)
        ax.text(
            *xy,
            text,
            ha="center",
            va="center",
            fontsize=_fitting_size(text),
            zorder=4,
            fontweight="bold" if name == graph.target else "normal",
        )
    return patches


def _draw_edges(ax, graph: Graph, pos: dict, patches: dict) -> None:
    """Every edge not cut off, as an arc (a loop for a node teaching its own branch) with its label."""
    from matplotlib.patches import FancyArrowPatch

    parallel: dict[tuple[str, str], int] = {}
    placed: list[tuple] = []  # the boxes of the edge labels drawn so far (see _label_box)
    for edge in graph.active_edges:
        s, t = owner(edge.source), owner(edge.target)
        colour = "dimgrey" if edge.source == LABEL else "black"
        # A white box under the label interrupts the arcs it lies on, and keeps it readable.
        text_style = dict(
            ha="center",
            va="center",
            fontsize=EDGE_FONT,
            color=colour,
            zorder=5,
            rotation_mode="anchor",
            bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85),
        )
        if s == t:  # e.g. a multi-branch node teaching its own branch: a loop on the outer side
            _self_loop(ax, pos[s], _edge_text(edge), colour, text_style)
            continue
        # Opposite edges of a pair bulge to opposite sides with the same `rad`; further edges of
        # the same ordered pair (several branches) bulge further.
        k = parallel.get((s, t), 0)
        parallel[(s, t)] = k + 1
        # Label edges are straight spokes: nothing flows back into the label node to tell apart.
        rad = _clear_rad(pos, s, t, (0.0 if s == LABEL else 0.18) + 0.16 * k)
        ax.add_patch(
            FancyArrowPatch(
                pos[s],
                pos[t],
                patchA=patches[s],
                patchB=patches[t],
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=14,
                color=colour,
                linewidth=1.2,
                zorder=2,
            )
        )
        text = _edge_text(edge)
        xy, angle = _place_label(pos, s, t, rad, text, placed)
        ax.text(*xy, text, rotation=angle, **text_style)


def _place_label(pos: dict, s: str, t: str, rad: float, text: str, placed: list) -> tuple:
    """Where the label of the arc s→t goes (its centre, its angle), added to `placed`. It runs along
    its arc, preferably past the middle, nearer the target: the labels of the two edges of a pair lie
    on their own arcs, and crossing diagonals do not meet in the middle (a short spoke's label stays
    central, clear of the arrowhead). Where another label is already close, it slides along the arc."""
    along = (0.5, 0.4, 0.6) if s == LABEL else (0.6, 0.45, 0.72, 0.35, 0.8)
    boxes = [_label_box(*_bezier(pos[s], pos[t], rad, at), text) for at in along]
    box = min(boxes, key=lambda b: _overlap(b, placed, pos.values()))  # the first of the best
    placed.append(box)
    return box[0], box[1]


def _draw_legend(fig, graph: Graph) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [Patch(facecolor=TARGET, edgecolor="black", linewidth=2.5, label="target")]
    if any(n.frozen for n in graph.model_nodes):
        legend.append(Patch(facecolor=FROZEN, edgecolor="black", label="frozen, pre-trained (*)"))
    if graph.ensemble_nodes:
        legend.append(Patch(facecolor=ENSEMBLE, edgecolor="black", label="ensemble"))
    legend.append(Line2D([], [], color="black", marker=">", label="loss · gate (cut-off edges omitted)"))
    fig.legend(handles=legend, loc="lower center", ncol=min(3, len(legend)), fontsize=7.5, frameon=False)


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
    return min(
        _point_segment(a, c, d), _point_segment(b, c, d), _point_segment(c, a, b), _point_segment(d, a, b)
    )


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
        ends.append(
            (
                x + NODE_RADIUS * (ux * math.cos(a) - uy * math.sin(a)),
                y + NODE_RADIUS * (ux * math.sin(a) + uy * math.cos(a)),
            )
        )
    rad = -2.5  # negative: arc3's control point then lies outside the node (see _bezier)
    ax.add_patch(
        FancyArrowPatch(
            *ends,
            connectionstyle=f"arc3,rad={rad}",
            arrowstyle="-|>",
            mutation_scale=12,
            color=colour,
            linewidth=1.2,
            zorder=2,
            shrinkA=0,
            shrinkB=0,
        )
    )
    (apex_x, apex_y), _ = _bezier(*ends, rad, 0.5)
    ax.text(apex_x + 0.2 * ux, apex_y + 0.2 * uy, text, **text_style)  # level, beyond the loop's apex
