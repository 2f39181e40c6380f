"""A node's attention map taken at a layer the graph names (`"attention": "LAYER"`, docs/ARCHITECTURE.md §3): the
channel mean of that submodule's output.

The network is traced once by torch.fx (torchvision's feature extraction, train and eval graphs
both, for models that branch on `self.training`) into code that returns the layer's output beside
the logits: no forward hook, so torch.compile, CUDA-graph capture and the vmap of `--fuse` see plain
tensor code. The wrapper holds the network's own submodules and tensors under their own names and
runs the traced code on itself: its state dict is the network's (a checkpoint or the pretrain cache
of the plain model loads as it is), and `functional_call` reaches every tensor the code reads.
"""

from __future__ import annotations

import difflib
import inspect

import torch
import torch.nn as nn


class AttentionLayerError(ValueError):
    """An attention layer that cannot be had (unknown name, a network fx cannot trace); one line."""


def _concrete_args(net: nn.Module) -> dict:
    """The forward's optional arguments at their defaults (the registry's `return_attention=False`):
    fx traces the plain logits path, never control flow on a proxy."""
    params = list(inspect.signature(net.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_layer(net: nn.Module, layer: str) -> None:
    names = [n for n, _ in net.named_modules() if n]
    if layer not in names:
        near = difflib.get_close_matches(layer, names, n=3)
        hint = (
            f" (did you mean {', '.join(map(repr, near))}?)"
            if near
            else f" (it has {len(names)} named submodules)"
        )
        raise AttentionLayerError(f"unknown attention layer {layer!r}{hint}")


class LayerAttention(nn.Module):
    """`net` with the registry's forward: `forward(x, return_attention=False)`, the attention map
    being the channel mean of `layer`'s output, `[B, H, W]`."""

    def __init__(self, net: nn.Module, layer: str):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        check_layer(net, layer)
        self.layer = layer
        concrete = _concrete_args(net)
        was_training = net.training
        try:
            train_nodes, eval_nodes = get_graph_node_names(net, concrete_args=concrete)
            # A module's name returns the output of its last operation (torchvision's convention);
            # the logits are the last node before the graph's output.
            traced = create_feature_extractor(
                net,
                train_return_nodes={layer: "attention", train_nodes[-1]: "logits"},
                eval_return_nodes={layer: "attention", eval_nodes[-1]: "logits"},
                concrete_args=concrete,
                suppress_diff_warning=True,
            )
        except Exception as e:  # data-dependent control flow, an untraceable call, ...
            text = str(e).strip().splitlines()
            raise AttentionLayerError(
                f"cannot trace the network with torch.fx to take layer {layer!r}: "
                f"{type(e).__name__}: {text[0] if text else ''}"
            ) from None
        traced.train(was_training)
        self.__dict__["_traced"] = traced  # not a submodule: its submodules are this module's own
        for name, module in traced.named_children():
            self.add_module(name, module)
        for name, p in traced.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in traced.named_buffers(recurse=False):
            self.register_buffer(name, b)
        for graph in (traced.train_graph, traced.eval_graph):  # root-level constants the code reads
            for node in graph.nodes:
                if node.op == "get_attr" and "." not in node.target and not hasattr(self, node.target):
                    setattr(self, node.target, getattr(traced, node.target))

    def train(self, mode: bool = True):
        super().train(mode)
        self._traced.train(mode)  # switches the traced code between the train and eval graphs
        return self

    def forward(self, x, return_attention: bool = False):
        out = type(self._traced).forward(self, x)  # the traced code, reading this module's tensors
        if not return_attention:
            return out["logits"]
        features = out["attention"]
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"layer {self.layer!r} gives {shape}, not a [B, C, H, W] feature map")
        return out["logits"], features.mean(1)
