"""The model registry (docs/ARCHITECTURE.md §3): names are a contract shared by graph files and the search.

Every model's forward is `forward(x, return_attention=False)`; with `return_attention=True` it
returns `(logits, attention)`, the attention map being the channel mean of the last stage's
feature map, `[B, H, W]` (`abn18`: its attention branch's map). Multi-branch models
(`branch{N}_resnet8`) also take `return_branches=True`, which appends the tuple of the N branches'
logits to what they return. Models of the timm and torchvision zoos are named `timm:NAME` and
`torchvision:NAME` (`ktfast.models.zoo`); the user's own, `py:MODULE:FACTORY` and the names of the
entry-point group `ktfast.models`, in `ktfast.models.user`. A node's `"attention": "LAYER"` takes its
attention map at that submodule instead (`ktfast.models.layer_attention`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch.nn as nn

from ktfast.models import user, zoo
from ktfast.models.abn import ABN18
from ktfast.models.branch_resnet import BranchResNet8
from ktfast.models.cifar_resnet import CifarResNet
from ktfast.models.imagenet_resnet import ResNet18
from ktfast.models.layer_attention import AttentionLayerError, LayerAttention
from ktfast.models.user import UserModel, UserModelError
from ktfast.models.wrn import WideResNet
from ktfast.usercode import is_user_code

__all__ = [
    "MODEL_NAMES",
    "AttentionLayerError",
    "LayerAttention",
    "UserModel",
    "UserModelError",
    "build_model",
    "is_model_name",
    "is_user_model",
    "model_problem",
]

# A constructor takes (num_classes, image_size).
Constructor = Callable[[int, int], nn.Module]

_FIXED: dict[str, Constructor] = {
    f"resnet{d}": partial(CifarResNet, d) for d in (8, 14, 20, 26, 32, 44, 56, 110)
}
_FIXED.update({f"resnet{d}x4": partial(CifarResNet, d, stem=32, widths=(64, 128, 256)) for d in (8, 32)})
_FIXED["resnet18"] = ResNet18
_FIXED["abn18"] = ABN18


def _wrn(depth: int, k: int) -> Constructor | None:
    if (depth - 4) % 6 or depth < 10:  # depth 4 would have no blocks at all
        return None
    return partial(WideResNet, depth, k)


# Parametrised families: a full-match pattern whose integer groups go to a factory that returns the
# constructor, or None where the numbers do not make a valid model. ([1-9] keeps names canonical.)
_FAMILIES: list[tuple[re.Pattern, Callable[..., Constructor | None]]] = [
    (re.compile(r"wrn([1-9]\d*)_([1-9]\d*)"), _wrn),
    (re.compile(r"branch([1-9]\d*)_resnet8"), lambda n: partial(BranchResNet8, n)),
]

# For help texts and search defaults: the fixed names, the WRN the papers use and an EKD student.
MODEL_NAMES: tuple[str, ...] = (*_FIXED, "wrn28_2", "branch3_resnet8")


def _constructor(name: str) -> Constructor | None:
    if name in _FIXED:
        return _FIXED[name]
    for pattern, factory in _FAMILIES:
        m = pattern.fullmatch(name)
        if m:
            return factory(*map(int, m.groups()))
    return None


def model_problem(name: str) -> str | None:
    """Why `name` names no model (one line), or None when it does."""
    if zoo.split_name(name):
        return zoo.problem(name)
    if is_user_code(name):
        return user.problem(name)
    if _constructor(name) is not None or user.registered(name) is not None:
        return None
    return f"unknown model {name!r}"


def is_user_model(name: str) -> bool:
    """Whether `name` runs code from outside ktfast's registry and zoos (`py:`, entry points)."""
    return not zoo.split_name(name) and _constructor(name) is None and user.is_user_model(name)


def is_model_name(name: str) -> bool:
    return model_problem(name) is None


def build_model(
    name: str, num_classes: int, image_size: int = 32, zoo_weights: bool = False, attention: str | None = None
) -> nn.Module:
    """`zoo_weights`: a zoo model with its published weights (raises zoo.ZooError when out of reach).
    `attention`: the submodule whose output's channel mean is the attention map (raises
    AttentionLayerError); the state dict stays the plain model's. A user's model that cannot be built
    raises UserModelError."""
    if zoo.split_name(name):
        return zoo.build(name, num_classes, weights=zoo_weights, attention=attention)
    make = _constructor(name)
    if make is not None:
        model = make(num_classes, image_size)
    elif is_user_code(name) or user.registered(name) is not None:
        model = user.build(name, num_classes, image_size)
    else:
        raise ValueError(f"unknown model {name!r}")
    if attention is None:
        return model
    if isinstance(model, UserModel):  # the layer is named as in the user's network
        return UserModel(LayerAttention(model.net, attention))
    return LayerAttention(model, attention)
