"""The user's own code named in a graph or on the command line (docs/ARCHITECTURE.md §3, §5): `py:MODULE:FACTORY`,
MODULE a dotted import path or a file ending in `.py`. Both the model registry and the data layer
load factories through here; nothing is imported until a factory is asked for.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

PREFIX = "py:"


class UserCodeError(ValueError):
    """A `py:` name that names no factory (malformed, missing module or file, no such attribute); one line."""


def is_user_code(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def split(name: str) -> tuple[str, str]:
    """(MODULE, FACTORY) of `py:MODULE:FACTORY`. The module part may hold ':' (a Windows drive), the
    factory is what follows the last one."""
    module, sep, factory = name[len(PREFIX) :].rpartition(":")
    if not sep or not module or not factory.isidentifier():
        raise UserCodeError(f"{name!r}: expected py:MODULE:FACTORY (MODULE a dotted path or a .py file)")
    return module, factory


def resolve(name: str, base: Path | None) -> str:
    """`name` with a relative `.py` file made absolute against `base` (the graph file's folder; the
    working directory when None), so that the name means the same from a run directory."""
    module, factory = split(name)
    if not module.endswith(".py"):
        return name
    path = Path(module).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return f"{PREFIX}{path.resolve()}:{factory}"


def problem(name: str) -> str | None:
    """Why `name` cannot name a factory, seen without importing anything (the syntax, a missing
    file), or None."""
    try:
        module, _ = split(name)
    except UserCodeError as e:
        return str(e)
    if module.endswith(".py") and not Path(module).is_file():
        return f"{name}: file not found: {module}"
    return None


@functools.cache
def _import_file(path: str):
    """A `.py` file imported once per process, under a name of its own (its path's hash), so that
    two files of one name do not shadow each other."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    module_name = f"ktfast_user_{Path(path).stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling (DataLoader workers, dataclasses) finds it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def factory(name: str):
    """The callable `py:MODULE:FACTORY` names, its module imported (which runs its code)."""
    reason = problem(name)
    if reason:
        raise UserCodeError(reason)
    module, attr = split(name)
    try:
        mod = _import_file(module) if module.endswith(".py") else importlib.import_module(module)
    except Exception as e:
        raise UserCodeError(f"{name}: cannot import {module}: {first_line(e)}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UserCodeError(f"{name}: module {module} has no callable {attr!r}")
    return fn


def call(name: str, fn, *args, **kwargs):
    """fn(...), an exception it raises turned into one line naming `name`."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise UserCodeError(f"{name}: the factory raised {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
