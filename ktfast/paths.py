"""The path each fast switch takes on this machine, and the fallbacks that are seen.

Six switches make the training step fast: `kernels` (the fused Triton losses, or the reference
losses), `compile` (torch.compile), `cuda_graph` (the whole step captured and replayed), `fuse`
(nodes of one model run as one module), `loader` (device-resident, DALI or torchvision) and `amp`
(bf16, fp16 or off). `resolve_paths` says where each goes for a config here, and why where it is
off or degraded; it is what `ktfast info` prints and what a run's config.json records as
`"paths"`.

A fast component that cannot run here (a kernel that fails to compile, torch.compile failing, a
capture that fails, DALI missing) never ends a run: `fall_back` switches the run to the next
slower path, says so in one line and changes the record. With KTFAST_STRICT=1 (the GPU suite) a
fallback is an error instead.

This module stands below everything that decides or falls back (the data layer, the step, the
trainer, the commands): it imports nothing of ktfast, and takes configs and datasets as they come.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

SWITCHES = ("kernels", "compile", "cuda_graph", "fuse", "loader", "amp")
REASON_CHARS = 240  # an error's text can run to pages (torch.compile's); the line keeps its head


class FallbackError(RuntimeError):
    """A fallback under KTFAST_STRICT=1; the message is one line."""


def strict() -> bool:
    return os.environ.get("KTFAST_STRICT") == "1"


def one_line(text: str) -> str:
    text = " ".join(str(text).split()) or "no reason given"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def fall_back(paths: dict, switch: str, path: str, reason: str, log=None) -> None:
    """`switch` cannot take its path here: record `path` in `paths` and say so in one line (`log`, or
    stdout, also where progress is quiet: a fallback is to be seen); under KTFAST_STRICT=1 raise
    FallbackError instead (and record nothing)."""
    reason = one_line(reason)
    if strict():
        raise FallbackError(f"{switch}: {reason} (KTFAST_STRICT=1: no fallback to {path})")
    paths[switch] = path
    (log or functools.partial(print, flush=True))(f"ktfast: {switch} falls back to {path}: {reason}")


# ---- the decisions, one place each ------------------------------------------------------------
def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype of `--amp`: bf16, or fp16 (with a grad scaler) on a GPU without bf16."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (a broken install counts as missing)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def loader_path(loader: str, device, data) -> tuple[str, str]:
    """(kind, reason) of `--loader` for `data` (the dataset's `Arrays`) on `device`; `auto` takes the
    device-resident loader where the set fits (the fastest, benchmarks/bench_loader.py), else DALI,
    else torchvision. A reason only where `auto` wanted DALI and it is not installed."""
    if loader != "auto":
        return loader, ""
    if not isinstance(data.train_x, torch.Tensor):  # a user's set too large for memory, read on demand
        return "torch", ""
    device = torch.device(device)
    if device.type != "cuda":
        # Resident in host memory, pad-crop sets are one gather per batch (6x torchvision's images/s);
        # resized crops are 3x faster by torchvision than by the CPU's roi_align (or DALI's CPU mode).
        return ("torch" if data.info.resized_crops else "gpu"), ""
    free, _ = torch.cuda.mem_get_info(device)
    if data.train_x.numel() + data.test_x.numel() < free // 4:
        return "gpu", ""
    return ("dali", "") if dali_available() else ("torch", "DALI not installed")


def _kernels(cfg) -> tuple[str, str]:
    """The fused Triton kernels on CUDA unless --reference; KTFAST_KERNELS=1 forces them (on a CPU
    through Triton's interpreter, see ktfast/__init__.py), any other value the reference."""
    choice = os.environ.get("KTFAST_KERNELS")
    if cfg.reference:
        return "reference", "--reference"
    if choice is not None:
        return ("triton", "") if choice == "1" else ("reference", f"KTFAST_KERNELS={choice}")
    if torch.device(cfg.device).type != "cuda":
        return "reference", "CPU (KTFAST_KERNELS=1 for the interpreter)"
    return "triton", ""


def _cuda_graph(cfg) -> tuple[str, str]:
    if torch.device(cfg.device).type != "cuda":
        return "off", "CPU"
    if cfg.reference:
        return "off", "--reference"
    if not cfg.cuda_graph:
        return "off", "--no-cuda-graph"
    if cfg.world_size > 1:
        return "off", "several processes (the step holds collectives)"
    return "on", ""


def _amp(cfg) -> tuple[str, str]:
    if not cfg.amp:
        return "off", "not asked (--amp)"
    if amp_dtype(cfg) == torch.float16:
        return "fp16", "no bf16 on this GPU"
    return "bf16", ""


def resolve_paths(cfg, data) -> dict[str, dict]:
    """{switch: {"path": …, "reason": …}} for `cfg` (a TrainConfig) on this machine; `data` is the
    dataset's `Arrays` (its size and crops decide `--loader auto`). The reason says why a path is
    off or degraded ("" where it is not)."""
    unfused = cfg.unfused_reason()
    return {
        switch: {"path": path, "reason": reason}
        for switch, (path, reason) in {
            "kernels": _kernels(cfg),
            "compile": ("on", "") if cfg.compile else ("off", "not asked (--compile)"),
            "cuda_graph": _cuda_graph(cfg),
            "fuse": ("off", unfused) if unfused else ("on", ""),
            "loader": loader_path(cfg.loader, cfg.device, data),
            "amp": _amp(cfg),
        }.items()
    }


# ---- compile, or run eagerly ---------------------------------------------------------------------
class Compiled(nn.Module):
    """`torch.compile(module)` that falls back to the module itself. Compile errors surface at a
    call (the first, or one that recompiles for a new shape or mode): that call runs eagerly and
    `on_failure(error)` falls back, which sets `paths["compile"]` off; every Compiled of the run
    then runs eagerly, so a run says it once. `_orig_mod` is the module, as in torch.compile's
    wrapper: callers unwrap both alike, and the state dict's keys are the same."""

    def __init__(self, module: nn.Module, paths: dict, on_failure):
        super().__init__()
        self._orig_mod = module
        # Not a submodule: it holds `module` too, whose tensors would appear twice in the state dict.
        self.__dict__["compiled"] = torch.compile(module)
        self.paths = paths
        self.on_failure = on_failure

    def forward(self, *args, **kwargs):
        if self.paths.get("compile") == "on":
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise  # a capture's failure is the capture's fallback (cuda_graph)
                self.on_failure(e)
        return self._orig_mod(*args, **kwargs)
