"""`ktfast info [--json]`: what a bug report needs about this machine, as torch's collect_env gives
it: the versions of ktfast and what it runs on, the GPUs, and the path each fast switch takes here
for the default config, with the reason where one is off."""

from __future__ import annotations

import argparse
import importlib
import json
import platform

import torch

import ktfast
from ktfast.config import TrainConfig
from ktfast.data import load_arrays
from ktfast.paths import SWITCHES, one_line, resolve_paths

# name in the report -> module whose __version__ it is (imported here only: a broken install is reported)
PACKAGES = {
    "triton": "triton",
    "dali": "nvidia.dali",
    "optuna": "optuna",
    "timm": "timm",
    "torchvision": "torchvision",
    "numpy": "numpy",
}

KEYS = """\
--json prints one object:
  versions  {ktfast, python, torch, cuda, driver, triton, dali, optuna, timm, torchvision, numpy}:
            version strings; "not installed" for a package that is absent, "import fails: …" for
            one that is broken; cuda (torch's build) and driver (NVIDIA's) "none" without them
  platform  the operating system, as Python's platform.platform() names it
  gpus      [{index, name, capability ("9.0"), memory_gib}], [] without a CUDA device
  device    the device of the default config ("cuda" where one is present, else "cpu")
  paths     {kernels, compile, cuda_graph, fuse, loader, amp: {path, reason}}: the path each switch
            takes here for the default config; reason says why one is off or degraded, else ""
"""


def register(sub) -> None:
    p = sub.add_parser(
        "info",
        help="versions, GPUs and the path each fast switch takes here (for bug reports)",
        epilog=KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="one JSON object (keys below)")
    p.set_defaults(func=cmd_info)


def package_version(module: str) -> str:
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return "not installed"
        return f"import fails: {one_line(e)}"
    except (
        Exception
    ) as e:  # a package whose import raises (missing libraries, a wrong CUDA) must not end info
        return f"import fails: {one_line(f'{type(e).__name__}: {e}')}"
    return str(getattr(imported, "__version__", "unknown"))


def driver_version() -> str:
    """The NVIDIA driver's version, as torch's collect_env reads it from nvidia-smi."""
    from torch.utils import collect_env

    try:
        return collect_env.get_nvidia_driver_version(collect_env.run) or "none"
    except Exception:  # no nvidia-smi, or one that fails: as good as no driver for this report
        return "none"


def gpus() -> list[dict]:
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
        )
    return out


def collect() -> dict:
    cfg = TrainConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    versions = {
        "ktfast": ktfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "driver": driver_version(),
    }
    versions.update((name, package_version(module)) for name, module in PACKAGES.items())
    return {
        "versions": versions,
        "platform": platform.platform(),
        "gpus": gpus(),
        "device": cfg.device,
        "paths": resolve_paths(cfg, load_arrays(cfg.dataset, cfg.data_dir)),
    }


def text(facts: dict) -> str:
    lines = [f"{name:<12} {version}" for name, version in facts["versions"].items()]
    lines.append(f"{'platform':<12} {facts['platform']}")
    for gpu in facts["gpus"] or [None]:
        lines.append(
            f"{'GPUs':<12} no CUDA device"
            if gpu is None
            else f"{'GPU ' + str(gpu['index']):<12} {gpu['name']}, capability {gpu['capability']}, "
            f"{gpu['memory_gib']} GiB"
        )
    lines.append(f"paths of the default config here (device {facts['device']}):")
    for switch in SWITCHES:
        path = facts["paths"][switch]
        lines.append(f"  {switch:<11} {path['path']}" + (f": {path['reason']}" if path["reason"] else ""))
    return "\n".join(lines)


def cmd_info(args) -> int:
    facts = collect()
    print(json.dumps(facts, indent=2) if args.json else text(facts))
    return 0
