"""The gates, one row each (docs/ARCHITECTURE.md §1, Gates): what the graph file, the reference, the
kernels, the step and the search read of a gate. A new gate is a row here plus its branch in the
kernel's `kernels/rows.gate_weight`, keyed by the row's code; tests/test_registry.py holds the
table, the reference and the kernel to each other for every row.

`weight(step, total_steps, param, z_s, labels)` is the reference's per-sample weight: a scalar or a
[B] tensor. `param` is the edge's value of the field the gate reads (`gamma` or `warmup`; None for
gates that read none), z_s the source's logits (None for the label, which is always right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    name: str
    code: int | None  # the kernel's code (`kernels/rows.gate_weight`); None: the edge is not computed
    weight: Callable | None  # the reference's per-sample weight, as above; None where code is
    param: str | None = None  # the edge field it reads: "gamma" (optional, default 1) or "warmup" (required)
    timed: bool = False  # its weight is a function of k / k_end: a step needs k_end
    searched: bool = False  # `ktfast search` draws it by default (the papers' four)

    @property
    def drawable(self) -> bool:
        """Whether the search can draw it: it draws γ, not a warmup fraction."""
        return self.param != "warmup"


def _correct(z_s, labels):
    if z_s is None:  # the label is always right about itself
        return 1.0
    return (z_s.detach().argmax(1) == labels).float()


GATES = {
    g.name: g
    for g in (
        Gate("through", 0, lambda k, n, p, z_s, y: 1.0, searched=True),
        Gate("cutoff", None, None, searched=True),
        Gate("linear", 1, lambda k, n, p, z_s, y: k / n, timed=True, searched=True),
        Gate("correct", 2, lambda k, n, p, z_s, y: _correct(z_s, y), searched=True),
        Gate("negative_linear", 3, lambda k, n, p, z_s, y: 1 - k / n, timed=True),
        Gate("gamma", 4, lambda k, n, p, z_s, y: (k / n) ** (1 / p), "gamma", timed=True),
        Gate("negative_gamma", 5, lambda k, n, p, z_s, y: (1 - k / n) ** (1 / p), "gamma", timed=True),
        Gate("warmup", 6, lambda k, n, p, z_s, y: min(1.0, k / (p * n)), "warmup", timed=True),
    )
}

GATE_NAMES = tuple(GATES)
GAMMA_GATES = tuple(g.name for g in GATES.values() if g.param == "gamma")  # the gates that read `gamma`
WARMUP_GATES = tuple(g.name for g in GATES.values() if g.param == "warmup")  # ... that need `warmup`
TIMED_GATES = tuple(g.name for g in GATES.values() if g.timed)
DEFAULT_GATES = tuple(g.name for g in GATES.values() if g.searched)
DRAWABLE_GATES = tuple(g.name for g in GATES.values() if g.drawable)
