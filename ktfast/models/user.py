"""Models from the user's code (docs/ARCHITECTURE.md §3): `py:MODULE:FACTORY`, and names that installed packages
register in the entry-point group `ktfast.models` (name -> factory).

`FACTORY(num_classes=C)` is called, with `image_size=S` too where the factory names that keyword
(a `**kwargs` catch-all does not count: torchvision's factories hand those on to the model's
constructor). What it returns must be an `nn.Module`; `UserModel` gives it the registry's forward.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points

import torch.nn as nn

from ktfast import usercode

GROUP = "ktfast.models"


class UserModelError(ValueError):
    """A user's model that cannot be built (import, factory, return value); one line naming it."""


def registered(name: str):
    """The entry point of `name` in the group `ktfast.models`, or None."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    return found[0] if found else None


def is_user_model(name: str) -> bool:
    return usercode.is_user_code(name) or registered(name) is not None


def problem(name: str) -> str | None:
    """Why a `py:` name cannot name a model, as far as can be seen without running its code."""
    return usercode.problem(name)


def _factory(name: str):
    if usercode.is_user_code(name):
        try:
            return usercode.factory(name)
        except usercode.UserCodeError as e:
            raise UserModelError(str(e)) from None
    try:
        return registered(name).load()
    except Exception as e:
        raise UserModelError(
            f"{name}: cannot load the entry point of group {GROUP}: {usercode.first_line(e)}"
        ) from None


def _takes(fn, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return keyword in params and params[keyword].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def build(name: str, num_classes: int, image_size: int) -> nn.Module:
    fn = _factory(name)
    kwargs = {"num_classes": num_classes}
    if _takes(fn, "image_size"):
        kwargs["image_size"] = image_size
    try:
        net = usercode.call(name, fn, **kwargs)
    except usercode.UserCodeError as e:
        raise UserModelError(str(e)) from None
    if not isinstance(net, nn.Module):
        raise UserModelError(f"{name}: the factory returned {type(net).__name__}, not a torch.nn.Module")
    return UserModel(net)


class UserModel(nn.Module):
    """The user's network with the registry's forward. Its attention map is the network's own where
    its forward takes `return_attention` (the registry's contract); else a node names a layer."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.own_attention = _takes(net.forward, "return_attention")

    def forward(self, x, return_attention: bool = False):
        if self.own_attention:
            return self.net(x, return_attention=return_attention)
        if return_attention:
            raise ValueError(
                "a py: model has no attention map of its own: name the layer whose output it is "
                '("attention": "LAYER")'
            )
        return self.net(x)
