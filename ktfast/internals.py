"""The private internals of torch and Optuna that ktfast relies on, each where no public API does the
same, and only here (tests/test_internals.py fails when one of them changes).

Written for torch 2.14 (the GPU machines' 2.11 has the same) and Optuna 5.1.
"""

from __future__ import annotations

import torch
from torch import nn

# Optuna's SuccessiveHalvingPruner (ASHA) records the rungs a trial passed as system attributes
# `completed_rung_{rung}` (optuna/pruners/_successive_halving.py, `_completed_rung_key`).
ASHA_RUNG_PREFIX = "completed_rung_"


def without_asha_rungs(system_attrs: dict) -> dict:
    """A trial's system attributes less the ASHA rungs it passed: a copy that trains from epoch 0
    must earn its rungs again."""
    return {k: v for k, v in system_attrs.items() if not k.startswith(ASHA_RUNG_PREFIX)}


def uncompiled(m: nn.Module) -> nn.Module:
    """The module inside torch.compile's wrapper (`OptimizedModule._orig_mod`), or `m` itself."""
    return getattr(m, "_orig_mod", m)


def scaler_tensors(scaler: torch.amp.GradScaler) -> list[torch.Tensor]:
    """The grad scaler's device tensors [scale, growth tracker] (`_scale`, `_growth_tracker`), once
    its first `scale()` has made them, else []. Read without a synchronisation: the public
    `get_scale()` reads the scale back to the host."""
    return [
        v
        for v in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
        if torch.is_tensor(v)
    ]


def initial_scale(scaler: torch.amp.GradScaler) -> float:
    """The scale the grad scaler started from (its `init_scale`, kept as `_init_scale`)."""
    return scaler._init_scale
