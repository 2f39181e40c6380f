"""The graph file (docs/ARCHITECTURE.md §1): parsing, validation and the frozen rule.

A `Graph` is immutable once loaded; every error is a `GraphError` whose one-line message names the
offending field, so the command line can print it as it is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ktfast.graph.fields import GraphError, no_unknown_keys, typed
from ktfast.graph.gates import GAMMA_GATES, GATE_NAMES, WARMUP_GATES
from ktfast.graph.loss_kinds import ATTENTION_TERMS, LABEL_TERMS, LOSS_TERMS, TEMPERED_TERMS, TEMPERED_TEXT
from ktfast.graph.nodes import LABEL, REDUCES, USER_CODE, EnsembleNode, ModelNode, branch_count, parse_node

__all__ = [
    "ATTENTION_TERMS",
    "GAMMA_GATES",
    "GATES",
    "LABEL",
    "LOSS_TERMS",
    "REDUCES",
    "TEMPERED_TERMS",
    "USER_CODE",
    "Edge",
    "EnsembleNode",
    "Graph",
    "GraphError",
    "ModelNode",
    "branch_count",
    "owner",
]

# The loss kinds and the gates are the rows of `ktfast.graph.loss_kinds` and `ktfast.graph.gates`; their names here
# are the graph file's vocabulary.
GATES = GATE_NAMES
SOFTEN = ("both", "source")
DEFAULT_CROPS = (3, 5)

_BRANCH_ADDRESS = re.compile(r"^(.+)\.b(\d+)$")
_GRAPH_KEYS = {"version", "name", "target", "nodes", "edges", "description"}
_EDGE_KEYS = {
    "from",
    "to",
    "loss",
    "gate",
    "temperature",
    "weight",
    "crops",
    "soften",
    "gamma",
    "alpha",
    "beta",
    "standardize",
    "warmup",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    loss: str
    gate: str
    temperature: float = 1.0
    weight: float = 1.0
    crops: tuple[int, ...] = DEFAULT_CROPS
    soften: str = "both"  # "source": only the source's logits are divided by T, no T² (EKD's Eq. 8)
    gamma: float = 1.0  # the exponent 1/γ of the gamma gates
    alpha: float = 1.0  # dkd: the weight of TCKD
    beta: float = 8.0  # dkd: the weight of NCKD
    standardize: bool = False  # the kl, dkd and dist terms see standardized logits (Sun et al., 2024)
    warmup: float | None = None  # the warmup gate's fraction w of the run

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.loss.split("+"))

    @property
    def uses_attention(self) -> bool:
        return any(t in ATTENTION_TERMS for t in self.terms)

    def to_dict(self) -> dict:
        d = {"from": self.source, "to": self.target, "loss": self.loss, "gate": self.gate}
        if self.temperature != 1.0:
            d["temperature"] = self.temperature
        if self.weight != 1.0:
            d["weight"] = self.weight
        if self.uses_attention:
            d["crops"] = list(self.crops)
        if self.soften != "both":
            d["soften"] = self.soften
        if self.gamma != 1.0:
            d["gamma"] = self.gamma
        if "dkd" in self.terms:
            d["alpha"], d["beta"] = self.alpha, self.beta
        if self.standardize:
            d["standardize"] = True
        if self.warmup is not None:
            d["warmup"] = self.warmup
        return d


class Graph:
    def __init__(self, version, name, target, nodes, edges, description=""):
        self.version = version
        self.name = name
        self.target = target
        self.nodes: dict[str, ModelNode | EnsembleNode] = nodes
        self.edges: tuple[Edge, ...] = tuple(edges)
        self.description = description

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> Graph:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise GraphError(f"graph file not found: {path}") from None
        except OSError as e:
            raise GraphError(f"cannot read graph file {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GraphError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, default_name=path.stem, base=path.resolve().parent)

    @classmethod
    def from_dict(cls, data, default_name: str = "graph", base: Path | None = None) -> Graph:
        """`base`: the folder that a `py:` model's relative `.py` file is relative to (the graph
        file's; the working directory when None). The graph holds such files as absolute paths."""
        if not isinstance(data, dict):
            raise GraphError("graph: the file must hold one JSON object")
        no_unknown_keys(data, _GRAPH_KEYS, "graph")
        version = data.get("version", 1)
        if version != 1:
            raise GraphError(f"version: unsupported graph file version {version!r} (expected 1)")
        name = typed(data, "name", str, "graph", default=default_name)
        description = typed(data, "description", str, "graph", default="")
        raw_nodes = typed(data, "nodes", list, "graph")
        raw_edges = typed(data, "edges", list, "graph", default=[])
        target = typed(data, "target", str, "graph")

        parsed = [parse_node(n, i, base) for i, n in enumerate(raw_nodes)]
        if not parsed:
            raise GraphError("nodes: the graph has no nodes")
        names = set()
        for node in parsed:
            if node["name"] in names:
                raise GraphError(f"nodes: duplicate node name {node['name']!r}")
            names.add(node["name"])
        models = {n["name"]: n for n in parsed if "model" in n}
        for node in parsed:
            for member in node.get("ensemble", ()):
                if not _is_model_endpoint(member, models):
                    raise GraphError(f"nodes[{node['name']}].ensemble: unknown member {member!r}")
        edges = [_parse_edge(e, i, parsed, models) for i, e in enumerate(raw_edges)]
        seen = set()
        for e in edges:
            if (e.source, e.target) in seen:
                raise GraphError(f"edges: duplicate edge {e.source} -> {e.target}")
            seen.add((e.source, e.target))
        if target not in names:
            raise GraphError(f"target: unknown node {target!r}")

        trainable = _trainable_models(parsed, edges)
        nodes = {}
        for n in parsed:
            if "model" in n:
                frozen = n["name"] not in trainable
                init = n["init"]
                if frozen and init == "scratch":
                    init = "pretrained"  # a frozen node is a teacher: it must have learnt something
                nodes[n["name"]] = ModelNode(
                    n["name"], n["model"], init, frozen, n["lr_scale"], n["attention"]
                )
            else:
                nodes[n["name"]] = EnsembleNode(n["name"], tuple(n["ensemble"]), n["reduce"], n["detach"])
        return cls(version, name, target, nodes, edges, description)

    # ---- views ---------------------------------------------------------------------------
    @property
    def model_nodes(self) -> list[ModelNode]:
        return [n for n in self.nodes.values() if isinstance(n, ModelNode)]

    @property
    def ensemble_nodes(self) -> list[EnsembleNode]:
        return [n for n in self.nodes.values() if isinstance(n, EnsembleNode)]

    @property
    def active_edges(self) -> list[Edge]:
        """Edges that are computed: every one but the cut-off edges."""
        return [e for e in self.edges if e.gate != "cutoff"]

    @property
    def targets(self) -> list[str]:
        """Nodes with a non-cut-off incoming edge, in file order: the keys of graph_losses."""
        into = {e.target for e in self.active_edges}
        return [name for name in self.nodes if name in into]

    @property
    def trainable(self) -> list[ModelNode]:
        return [n for n in self.model_nodes if not n.frozen]

    @property
    def uses_attention(self) -> bool:
        return any(e.uses_attention for e in self.active_edges)

    @property
    def user_code(self) -> list[str]:
        """The `py:` models the graph names: building the run imports and runs that code."""
        return sorted({n.model for n in self.model_nodes if n.model.startswith(USER_CODE)})

    def to_dict(self) -> dict:
        nodes = []
        for n in self.nodes.values():
            if isinstance(n, ModelNode):
                nodes.append({"name": n.name, "model": n.model, "init": n.init})
                if n.lr_scale != 1.0:
                    nodes[-1]["lr_scale"] = n.lr_scale
                if n.attention is not None:
                    nodes[-1]["attention"] = n.attention
            else:
                nodes.append(
                    {"name": n.name, "ensemble": list(n.members), "reduce": n.reduce, "detach": n.detach}
                )
        d = {
            "version": self.version,
            "name": self.name,
            "target": self.target,
            "nodes": nodes,
            "edges": [e.to_dict() for e in self.edges],
        }
        if self.description:
            d["description"] = self.description
        return d

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---- parsing ------------------------------------------------------------------------------
def _is_model_endpoint(name: str, models: dict) -> bool:
    """A model node, or branch i of a multi-branch model node (`node.b{i}`)."""
    if name in models:
        return True
    m = _BRANCH_ADDRESS.match(name)
    return bool(m) and m.group(1) in models and int(m.group(2)) < branch_count(models[m.group(1)]["model"])


def _parse_edge(raw, index: int, nodes: list, models: dict) -> Edge:
    where = f"edges[{index}]"
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: expected an object, got {json.dumps(raw)}")
    no_unknown_keys(raw, _EDGE_KEYS, where)
    source, target, where = _endpoints(raw, where, nodes, models)
    loss, terms = _loss_terms(raw, where, source)
    gate = typed(raw, "gate", str, where)
    if gate not in GATES:
        raise GraphError(f"{where}.gate: unknown gate {gate!r}")
    temperature = typed(raw, "temperature", float, where, default=1.0)
    if not math.isfinite(temperature) or temperature <= 0:
        raise GraphError(f"{where}.temperature: must be > 0, got {temperature}")
    weight = typed(raw, "weight", float, where, default=1.0)
    if not math.isfinite(weight):
        raise GraphError(f"{where}.weight: must be a finite number, got {weight}")
    crops = typed(raw, "crops", list, where, default=list(DEFAULT_CROPS))
    if not crops or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in crops):
        raise GraphError(f"{where}.crops: expected a non-empty list of positive integers")
    if any(t in ATTENTION_TERMS for t in terms):
        for end in (source, target):
            if end not in models:
                raise GraphError(f"{where}.loss: attention losses need model nodes at both ends, not {end!r}")
    soften = typed(raw, "soften", str, where, default="both")
    if soften not in SOFTEN:
        raise GraphError(f"{where}.soften: unknown soften {soften!r} (expected both or source)")
    if "soften" in raw and "kl" not in terms:
        raise GraphError(f"{where}.soften: only edges with a 'kl' term soften, not loss {loss!r}")
    gamma = _gamma(raw, where, gate)
    alpha, beta = _dkd_weights(raw, where, loss, terms)
    standardize = typed(raw, "standardize", bool, where, default=False)
    if standardize and not any(t in TEMPERED_TERMS for t in terms):
        raise GraphError(
            f"{where}.standardize: only a {TEMPERED_TEXT} term sees standardized logits, "
            f"and loss {loss!r} has none"
        )
    warmup = _warmup(raw, where, gate)
    return Edge(
        source, target, loss, gate, float(temperature), float(weight), tuple(crops), soften, gamma, alpha, beta,
        standardize, warmup,
    )  # fmt: skip


def _endpoints(raw: dict, where: str, nodes: list, models: dict) -> tuple[str, str, str]:
    """The edge's source and target, each a node or a model node's branch, and where it is, named by them."""
    source = typed(raw, "from", str, where)
    target = typed(raw, "to", str, where)
    where = f"edges[{source}->{target}]"
    names = {n["name"] for n in nodes}
    if source != LABEL and source not in names and not _is_model_endpoint(source, models):
        raise GraphError(f"{where}.from: unknown node {source!r}")
    if target == LABEL:
        raise GraphError(f"{where}.to: the label node has no network to train")
    if target not in names and not _is_model_endpoint(target, models):
        raise GraphError(f"{where}.to: unknown node {target!r}")
    if source == target:
        raise GraphError(f"{where}: an edge from a node to itself")
    return source, target, where


def _loss_terms(raw: dict, where: str, source: str) -> tuple[str, list[str]]:
    """The edge's loss and its terms: known, none twice, the label's loss on the label's edges only."""
    loss = typed(raw, "loss", str, where)
    terms = loss.split("+")
    for term in terms:
        if term not in LOSS_TERMS:
            raise GraphError(f"{where}.loss: unknown loss {term!r}")
    if len(set(terms)) != len(terms):
        raise GraphError(f"{where}.loss: {loss!r} repeats a term")
    if source == LABEL and "dkd" in terms:
        raise GraphError(
            f"{where}.loss: 'dkd' decouples a teacher's logits around the label, and 'label' has none"
        )
    if any(t in LABEL_TERMS for t in terms) != (source == LABEL) or (source == LABEL and len(terms) != 1):
        label_loss = " or ".join(map(repr, LABEL_TERMS))
        raise GraphError(f"{where}.loss: {label_loss} is the loss of edges from 'label', and only it")
    return loss, terms


def _gamma(raw: dict, where: str, gate: str) -> float:
    gamma = typed(raw, "gamma", float, where, default=1.0)
    if "gamma" in raw and gate not in GAMMA_GATES:
        takers = " and ".join(GAMMA_GATES)
        raise GraphError(f"{where}.gamma: only the {takers} gates take it, not gate {gate!r}")
    if not math.isfinite(gamma) or gamma <= 0:
        raise GraphError(f"{where}.gamma: must be > 0, got {gamma}")
    return float(gamma)


def _dkd_weights(raw: dict, where: str, loss: str, terms: list[str]) -> tuple[float, float]:
    """DKD's α and β: only on an edge with a dkd term, each >= 0."""
    dkd = {}
    for key, default in (("alpha", 1.0), ("beta", 8.0)):
        value = typed(raw, key, float, where, default=default)
        if key in raw and "dkd" not in terms:
            raise GraphError(f"{where}.{key}: only edges with a 'dkd' term take it, not loss {loss!r}")
        if not math.isfinite(value) or value < 0:
            raise GraphError(f"{where}.{key}: must be >= 0, got {value}")
        dkd[key] = float(value)
    return dkd["alpha"], dkd["beta"]


def _warmup(raw: dict, where: str, gate: str) -> float | None:
    """The warmup gate's fraction of the run, required there and refused elsewhere."""
    warmup = typed(raw, "warmup", float, where, default=None)
    if gate in WARMUP_GATES:
        if warmup is None:
            raise GraphError(
                f"{where}.warmup: the {gate} gate needs the fraction of the run it warms up over (0 < w <= 1)"
            )
        if not math.isfinite(warmup) or not 0 < warmup <= 1:
            raise GraphError(f"{where}.warmup: must be in (0, 1], got {warmup}")
        return float(warmup)
    if warmup is not None:
        takers = " and ".join(WARMUP_GATES)
        raise GraphError(f"{where}.warmup: only the {takers} gate takes it, not gate {gate!r}")
    return None


def owner(endpoint: str) -> str:
    """The node an endpoint belongs to: branch `s.b2` is part of node `s` (node names have no '.')."""
    return endpoint.partition(".")[0]


def _trainable_models(nodes: list, edges: list) -> set:
    """Model nodes that some non-cut-off edge trains.

    An edge into a model node (or one of its branches) trains it; an edge into a non-detached
    ensemble trains its members, since the loss back-propagates through the reduction.
    """
    ensembles = {n["name"]: n for n in nodes if "ensemble" in n}
    trained = set()
    for e in edges:
        if e.gate == "cutoff":
            continue
        if e.target in ensembles:
            if not ensembles[e.target]["detach"]:
                trained.update(owner(m) for m in ensembles[e.target]["ensemble"])
        else:
            trained.add(owner(e.target))
    return trained
