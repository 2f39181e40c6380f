"""The nodes of a graph file (docs/ARCHITECTURE.md §1, §3): model and ensemble nodes, parsed and checked one by one;
`ktfast.graph` checks how they relate."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ktfast.graph.fields import GraphError, no_unknown_keys, typed

LABEL = "label"
REDUCES = ("mean", "sum")
USER_CODE = "py:"  # a model from the user's code (`ktfast.usercode`): the graph runs that code
_BRANCH_MODEL = re.compile(r"^branch(\d+)_resnet8$")
_MODEL_KEYS = {"name", "model", "init", "lr_scale", "attention"}
_ENSEMBLE_KEYS = {"name", "ensemble", "reduce", "detach"}


@dataclass(frozen=True)
class ModelNode:
    name: str
    model: str
    init: str | dict  # "scratch" | "pretrained" | "zoo" | {"checkpoint": path}, as resolved
    frozen: bool
    lr_scale: float = 1.0  # the node's learning rate is the run's times this
    attention: str | None = None  # the submodule whose output's channel mean is the attention map

    @property
    def checkpoint(self) -> str | None:
        return self.init["checkpoint"] if isinstance(self.init, dict) else None


@dataclass(frozen=True)
class EnsembleNode:
    name: str
    members: tuple[str, ...]
    reduce: str
    detach: bool


def _model_problem(name: str) -> str | None:
    from ktfast.models import model_problem

    return model_problem(name)


def branch_count(model: str) -> int:
    """Branches a model exposes as `node.b{i}` (0 for single-branch models)."""
    m = _BRANCH_MODEL.match(model)
    return int(m.group(1)) if m else 0


def parse_node(raw, index: int, base: Path | None = None) -> dict:
    where = f"nodes[{index}]"
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: expected an object, got {json.dumps(raw)}")
    name = typed(raw, "name", str, where)
    where = f"nodes[{name}]"
    if not name or name == LABEL:
        raise GraphError(f"{where}.name: {name!r} is reserved" if name else f"{where}.name: empty")
    if "." in name:
        raise GraphError(f"{where}.name: {name!r} may not contain '.' (it addresses branches)")
    if "model" in raw and "ensemble" in raw:
        raise GraphError(f"{where}: a node has either 'model' or 'ensemble', not both")
    if "ensemble" in raw:
        no_unknown_keys(raw, _ENSEMBLE_KEYS, where)
        members = typed(raw, "ensemble", list, where)
        if not members or not all(isinstance(m, str) for m in members):
            raise GraphError(f"{where}.ensemble: expected a non-empty list of node names")
        reduce = typed(raw, "reduce", str, where, default="mean")
        if reduce not in REDUCES:
            raise GraphError(f"{where}.reduce: unknown reduce {reduce!r} (expected mean or sum)")
        detach = typed(raw, "detach", bool, where, default=True)
        return {"name": name, "ensemble": members, "reduce": reduce, "detach": detach}
    no_unknown_keys(raw, _MODEL_KEYS, where)
    model = typed(raw, "model", str, where)
    if model.startswith(USER_CODE):
        from ktfast.usercode import UserCodeError, resolve

        try:
            model = resolve(model, base)
        except UserCodeError as e:
            raise GraphError(f"{where}.model: {e}") from None
    problem = _model_problem(model)
    if problem:
        raise GraphError(f"{where}.model: {problem}")
    init = raw.get("init", "scratch")
    if isinstance(init, dict):
        if set(init) != {"checkpoint"} or not isinstance(init["checkpoint"], str):
            raise GraphError(
                f'{where}.init: expected "scratch", "pretrained", "zoo" or {{"checkpoint": path}}'
            )
    elif init == "zoo":
        if ":" not in model:
            raise GraphError(
                f'{where}.init: "zoo" loads the published weights of a timm: or torchvision: '
                f"model, and {model!r} is not one"
            )
    elif init not in ("scratch", "pretrained"):
        raise GraphError(f"{where}.init: unknown init {json.dumps(init)}")
    lr_scale = typed(raw, "lr_scale", float, where, default=1.0)
    if not math.isfinite(lr_scale) or lr_scale <= 0:
        raise GraphError(f"{where}.lr_scale: must be > 0, got {lr_scale}")
    attention = typed(raw, "attention", str, where, default=None)
    if attention is not None and (not attention or branch_count(model)):
        raise GraphError(
            f"{where}.attention: "
            + ("empty" if not attention else f"a branch model ({model}) has no attention layer to name")
        )
    return {"name": name, "model": model, "init": init, "lr_scale": float(lr_scale), "attention": attention}
