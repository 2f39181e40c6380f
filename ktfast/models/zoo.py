"""Models of the ecosystem's zoos as graph nodes (docs/ARCHITECTURE.md §1): `timm:NAME` and `torchvision:NAME`.

They follow the registry's forward contract: logits, and with `return_attention=True` also the
channel mean of the last feature map before pooling, `[B, H, W]` — timm's `forward_features`;
for torchvision the input of the model's `avgpool`, taken by `torchvision.models.feature_extraction`.
`weights=True` loads the zoo's published weights (every tensor but the classifier, which is sized
for the graph's classes): that needs the network, or the zoo's download cache.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn as nn

from ktfast.models.layer_attention import AttentionLayerError, LayerAttention, check_layer

ZOOS = ("timm", "torchvision")


class ZooError(ValueError):
    """A zoo model that cannot be had (unknown name, zoo not installed, weights out of reach); one line."""


def split_name(name: str) -> tuple[str, str] | None:
    """("timm", "resnet18") for "timm:resnet18"; None for a registry name."""
    zoo, sep, model = name.partition(":")
    return (zoo, model) if sep and zoo in ZOOS else None


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))  # classification only


def problem(name: str) -> str | None:
    """Why a zoo name cannot be built, or None when it can."""
    zoo, model = split_name(name)
    if zoo == "timm":
        if importlib.util.find_spec("timm") is None:
            return f"{name}: timm is not installed (pip install 'ktfast[timm]')"
        import timm

        return (
            None
            if timm.is_model(model)
            else f"unknown model {name!r}: timm {timm.__version__} has no {model!r}"
        )
    return (
        None
        if model in _torchvision_names()
        else f"unknown model {name!r}: not a torchvision classification model"
    )


def build(name: str, num_classes: int, weights: bool = False, attention: str | None = None) -> nn.Module:
    """`attention`: the layer (a name of the zoo network's `named_modules()`) whose output's channel
    mean is the attention map, instead of the last feature map."""
    reason = problem(name)
    if reason:
        raise ZooError(reason)
    zoo, model = split_name(name)
    if weights and os.environ.get("KTFAST_OFFLINE"):
        raise ZooError(f"{name}: the zoo's weights need the network (KTFAST_OFFLINE is set)")
    try:
        if zoo == "timm":
            return TimmModel(model, num_classes, weights, attention)
        return TorchvisionModel(model, num_classes, weights, attention)
    except Exception as e:  # no network, a download cut short, a hub that is down: one line
        if not weights or isinstance(e, AttentionLayerError):
            raise
        text = str(e).strip().splitlines()
        raise ZooError(
            f"{name}: cannot fetch the zoo's weights (offline?): {text[0] if text else type(e).__name__}"
        ) from None


class TimmModel(nn.Module):
    def __init__(self, model: str, num_classes: int, weights: bool, attention: str | None = None):
        super().__init__()
        import timm

        # With weights, timm loads all of them but the classifier, which it sizes for num_classes.
        self.net = timm.create_model(model, pretrained=weights, num_classes=num_classes)
        self.layer = attention
        if attention is not None:
            self.net = LayerAttention(self.net, attention)  # the same state dict, traced

    def forward(self, x, return_attention: bool = False):
        if self.layer is not None:
            return self.net(x, return_attention=return_attention)
        features = self.net.forward_features(x)
        logits = self.net.forward_head(features)
        return (logits, attention_map(features, "forward_features")) if return_attention else logits


class TorchvisionModel(nn.Module):
    def __init__(self, model: str, num_classes: int, weights: bool, attention: str | None = None):
        super().__init__()
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
        if weights:
            _load_all_but_classifier(
                net, torchvision.models.get_model_weights(model).DEFAULT.get_state_dict(progress=False)
            )
        nodes, _ = get_graph_node_names(net)
        if attention is not None:
            check_layer(net, attention)
            self.last_map = attention  # a module's name: the output of its last operation
            self.net = create_feature_extractor(net, {attention: "features", nodes[-1]: "logits"})
            return
        if "avgpool" not in nodes:
            self.net, self.last_map = net, None  # no pooling stage to take the attention map before
            return
        self.last_map = nodes[nodes.index("avgpool") - 1]
        self.net = create_feature_extractor(net, {self.last_map: "features", nodes[-1]: "logits"})

    def forward(self, x, return_attention: bool = False):
        if self.last_map is None:
            if return_attention:
                raise ValueError("has no avgpool stage to take an attention map from")
            return self.net(x)
        out = self.net(x)
        return (
            (out["logits"], attention_map(out["features"], self.last_map))
            if return_attention
            else out["logits"]
        )


def attention_map(features: torch.Tensor, where: str) -> torch.Tensor:
    if features.dim() != 4:
        raise ValueError(f"its last feature map ({where}) is not spatial: shape {tuple(features.shape)}")
    return features.mean(1)


def _load_all_but_classifier(net: nn.Module, state: dict) -> None:
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(fitting, strict=False)
