"""The model nodes of a run: built, seeded and initialised as the graph says, and what the edges ask
of them (attention maps, branch logits)."""

from __future__ import annotations

import threading

import torch

from ktfast.config import TrainConfig
from ktfast.graph import ATTENTION_TERMS, LABEL, Graph, GraphError, ModelNode, owner
from ktfast.models import AttentionLayerError, UserModelError, build_model, is_user_model
from ktfast.models.zoo import ZooError

# Seeding and building draw from torch's one global generator: search trials packed as threads of
# one process (ktfast.graph_search.packing) take turns, so that each starts from the weights it would get alone.
INIT_LOCK = threading.Lock()


def attention_nodes(graph: Graph) -> set[str]:
    return {
        end
        for e in graph.active_edges
        if any(t in ATTENTION_TERMS for t in e.terms)
        for end in (e.source, e.target)
    }


def branch_nodes(graph: Graph) -> set[str]:
    """Model nodes whose branches an edge or an ensemble addresses (`node.b{i}`): they must hand
    over their branch logits too. Node names have no '.', so any other endpoint is a branch."""
    ends = {end for e in graph.active_edges for end in (e.source, e.target)}
    ends.update(m for n in graph.ensemble_nodes for m in n.members)
    return {owner(end) for end in ends if end not in graph.nodes and end != LABEL}


def load_state(node: ModelNode, path) -> dict:
    """A state dict from a pretrain-cache file or a plain saved state dict."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GraphError(f"nodes[{node.name}].init: checkpoint not found: {path}") from None
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise GraphError(f"nodes[{node.name}].init: cannot read checkpoint {path}: {e}") from None
    if isinstance(blob, dict) and "state_dict" in blob:
        if blob.get("model") not in (None, node.model):
            raise GraphError(
                f"nodes[{node.name}].init: checkpoint holds {blob['model']}, node is {node.model}"
            )
        return blob["state_dict"]
    return blob


def _build(node: ModelNode, num_classes: int, image_size: int) -> torch.nn.Module:
    try:
        return build_model(
            node.model, num_classes, image_size, zoo_weights=node.init == "zoo", attention=node.attention
        )
    except ZooError as e:  # "init": "zoo" offline, say
        raise GraphError(f"nodes[{node.name}].init: {e}") from None
    except UserModelError as e:  # the user's module, factory or what it returns
        raise GraphError(f"nodes[{node.name}].model: {e}") from None
    except AttentionLayerError as e:
        raise GraphError(f"nodes[{node.name}].attention: {node.model}: {e}") from None


def build_models(
    graph: Graph, cfg: TrainConfig, num_classes: int, image_size: int, pretrained: dict | None = None
) -> torch.nn.ModuleDict:
    """Every model node, seeded, initialised as its `init` says, on the configured device.
    `pretrained` maps each `"init": "pretrained"` node to its pretrain-cache file (`ktfast.engine.run`
    finds or makes them first)."""
    pretrained = pretrained or {}
    missing = [
        n.name
        for n in graph.model_nodes
        if n.init == "pretrained" and not n.checkpoint and n.name not in pretrained
    ]
    if missing:
        raise ValueError(
            f"no pretrained checkpoint given for node {missing[0]!r}: build the run with ktfast.engine.run"
        )
    with INIT_LOCK:
        torch.manual_seed(cfg.seed)
        built = [_build(node, num_classes, image_size) for node in graph.model_nodes]
    models = torch.nn.ModuleDict()
    for node, model in zip(graph.model_nodes, built):
        if node.checkpoint:
            state = load_state(node, node.checkpoint)
        elif node.name in pretrained:
            state = load_state(node, pretrained[node.name])
        else:
            state = None
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError:
                raise GraphError(
                    f"nodes[{node.name}].init: checkpoint does not fit model {node.model}"
                ) from None
        if node.frozen:
            model.requires_grad_(False)
        models[node.name] = model.to(cfg.device)
    return models


def check_logits(graph: Graph, models, num_classes: int, image_size: int, device) -> None:
    """A user's model must map [B, 3, S, S] to logits [B, C]: one batch of two images, in eval mode,
    before anything is written (docs/ARCHITECTURE.md §3). The registry's and the zoos' models do by construction."""
    x = torch.zeros(2, 3, image_size, image_size, device=device)
    for node in graph.model_nodes:
        if not is_user_model(node.model):
            continue
        model = models[node.name]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:
            text = str(e).strip().splitlines()
            raise GraphError(
                f"nodes[{node.name}].model: {node.model}: its forward fails on a batch of "
                f"[2, 3, {image_size}, {image_size}]: {type(e).__name__}: {text[0] if text else ''}"
            ) from None
        finally:
            model.train(was_training)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != (2, num_classes):
            raise GraphError(
                f"nodes[{node.name}].model: {node.model} maps [2, 3, {image_size}, {image_size}] to "
                f"{shape}, not logits [2, {num_classes}]"
            )


def check_attention_sizes(graph: Graph, models, image_size: int, device) -> None:
    """A crop larger than the attention map is an error; find it before anything is written."""
    need = attention_nodes(graph)
    if not need:
        return
    x = torch.zeros(2, 3, image_size, image_size, device=device)
    sizes = {}
    with torch.no_grad():
        for name in need:
            was_training = models[name].training
            models[name].eval()
            try:
                sizes[name] = tuple(models[name](x, return_attention=True)[1].shape[1:])
            except ValueError as e:  # a zoo model without a spatial feature map
                raise GraphError(f"nodes[{name}].model: no attention map: {e}") from None
            models[name].train(was_training)
    for e in graph.active_edges:
        if e.uses_attention:
            h, w = sizes[e.source]
            if sizes[e.target] != (h, w):  # the crop at the source's arg-max is taken from both maps
                raise GraphError(
                    f"edges[{e.source}->{e.target}].loss: the attention maps differ in size ({e.source} "
                    f"{h}x{w}, {e.target} {sizes[e.target][0]}x{sizes[e.target][1]}): name layers "
                    f'of one size ("attention": "LAYER")'
                )
            if max(e.crops) > min(h, w):
                raise GraphError(
                    f"edges[{e.source}->{e.target}].crops: crop size {max(e.crops)} "
                    f"is larger than the {h}x{w} attention map"
                )
