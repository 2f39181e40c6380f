"""What every benchmark records: the device and versions it ran on, and where its JSON goes
(benchmarks/results/<name>-<device slug>.json; CPU smoke runs write <name>-smoke.json, not kept)."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(cuda: bool) -> str:
    return torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine() or "cpu"


def environment(cuda: bool) -> dict:
    import triton

    return {
        "device": device_name(cuda),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
    }


def result_path(name: str, cuda: bool, out_dir: str | Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name(cuda)).strip("_") if cuda else "smoke"
    return Path(out_dir or RESULTS) / f"{name}-{slug}.json"


def write_result(name: str, payload: dict, cuda: bool, out_dir: str | Path | None = None) -> Path:
    path = result_path(name, cuda, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
