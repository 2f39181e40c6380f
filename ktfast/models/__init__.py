"""The model registry (DESIGN §3): names are a contract shared by graph files and the search.

Every model's forward is `forward(x, return_attention=False)`; with `return_attention=True` it
returns `(logits, attention)`, the attention map being the channel mean of the last stage's
feature map, `[B, H, W]`.
"""
from __future__ import annotations

import re

import torch.nn as nn

from ktfast.models.cifar_resnet import CifarResNet
from ktfast.models.imagenet_resnet import ResNet18
from ktfast.models.wrn import WideResNet

_CIFAR_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
_FIXED = {f"resnet{d}": (lambda d: lambda c, s: CifarResNet(d, c, s))(d) for d in _CIFAR_DEPTHS}
_FIXED["resnet18"] = lambda c, s: ResNet18(c, s)
_WRN = re.compile(r"^wrn(\d+)_(\d+)$")

MODEL_NAMES = tuple(_FIXED) + ("wrn28_2",)


def _wrn_args(name: str):
    m = _WRN.match(name)
    if not m:
        return None
    depth, k = int(m.group(1)), int(m.group(2))
    return (depth, k) if depth >= 10 and (depth - 4) % 6 == 0 and k >= 1 else None


def is_model_name(name: str) -> bool:
    return name in _FIXED or _wrn_args(name) is not None


def build_model(name: str, num_classes: int, image_size: int = 32) -> nn.Module:
    if name in _FIXED:
        return _FIXED[name](num_classes, image_size)
    args = _wrn_args(name)
    if args is None:
        raise ValueError(f"unknown model {name!r}")
    return WideResNet(*args, num_classes, image_size)
