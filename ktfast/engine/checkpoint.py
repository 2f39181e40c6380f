"""The run directory's checkpoint and metrics rows (docs/ARCHITECTURE.md §2): written so that a failed write leaves
the previous state whole, and read back only when they belong to the run that resumes them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ktfast.config import data_fields


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (truncated, corrupt, another run's); one line."""


class RunWriteError(RuntimeError):
    """A write into the run directory failed (a full disk, say); one line. What was there is kept."""


def _failed(path: Path, e: OSError, kept: str) -> RunWriteError:
    return RunWriteError(f"cannot write {path}: {e.strerror or e}; {kept}")


def save_atomic(state: dict, path: Path) -> None:
    """Serialise in memory, write a temporary file, then rename: a failure at any point (a killed
    process, a full disk) leaves the previous checkpoint as it was."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _replace(path, buffer.getbuffer(), "the previous checkpoint is kept")


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text`, or (on a failure) what it held before."""
    _replace(path, text.encode(), "its previous content is kept")


def _replace(path: Path, data, kept: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _failed(path, e, kept) from None


def append_line(path: Path, line: str) -> int:
    """Append one line; on failure cut the file back to where it was, so that no half row stays.
    Returns the file's size before the append (to undo it with `truncate`). Unbuffered: a buffer
    would try the failed bytes again when closed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = memoryview((line + "\n").encode())
        try:
            while data:  # a write may take only part of the data before the disk is full
                data = data[os.write(fd, data) :]
        except OSError as e:
            os.ftruncate(fd, size)
            raise _failed(path, e, "its previous rows are kept") from None
    finally:
        os.close(fd)
    return size


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def read_checkpoint(path: Path, graph: dict, config: dict, device) -> dict:
    """The state saved by `Trainer.state_dict`, checked to be of this graph and these data."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip, random bytes, a pickle of something else
        raise CheckpointError(
            f"{path}: cannot read the checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    if not isinstance(state, dict) or not {"epoch", "models", "optimizer", "scheduler", "scaler"} <= set(
        state
    ):
        raise CheckpointError(f"{path}: not a ktfast checkpoint")
    theirs = state.get("graph", graph)
    if theirs != graph:
        raise CheckpointError(
            f"{path}: the checkpoint is of another graph (its {_difference(theirs, graph)} "
            f"differ from {path.parent / 'graph.json'})"
        )
    saved = state.get("config", config)
    for key in data_fields():  # what the weights were trained on, the seed among them
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path}: the checkpoint was trained with {key} {saved.get(key)!r}, but "
                f"{path.parent / 'config.json'} names {config.get(key)!r}"
            )
    return state


def load_models(state: dict, models: dict, path: Path) -> None:
    """Every node's weights, strictly: a node missing, extra or of another shape is another graph's."""
    if set(state["models"]) != set(models):
        raise CheckpointError(
            f"{path}: the checkpoint holds nodes {sorted(state['models'])}, the graph {sorted(models)}"
        )
    for name, module in models.items():
        try:
            module.load_state_dict(state["models"][name])
        except RuntimeError:
            raise CheckpointError(f"{path}: the weights of node {name} do not fit its model") from None


def _difference(a: dict, b: dict) -> str:
    keys = [k for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
    return ", ".join(keys)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
