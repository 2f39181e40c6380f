"""Reading the fields of a graph file (docs/ARCHITECTURE.md §1): each bad field is a `GraphError` whose one-line
message names it, so the command line can print it as it is."""

from __future__ import annotations

import json


class GraphError(ValueError):
    """A graph file that breaks the contract; the message is one line naming the field."""


def typed(obj: dict, key: str, kind, where: str, default=...):
    """obj[key], checked to be of `kind`; `default` where it is absent (absent and no default: an error)."""
    if key not in obj:
        if default is ...:
            raise GraphError(f"{where}: missing field {key!r}")
        return default
    value = obj[key]
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = {
            str: "a string",
            list: "a list",
            bool: "true or false",
            dict: "an object",
            float: "a number",
            int: "a number",
        }
        raise GraphError(f"{where}.{key}: expected {names[kind]}, got {json.dumps(value)}")
    return value


def no_unknown_keys(obj: dict, allowed: set, where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise GraphError(f"{where}: unknown field {key!r}")
