"""`ktfast.TransferStep` (docs/ARCHITECTURE.md §8): the training step of `ktfast train` inside one's own loop.

One call is one optimizer step of every trainable node on one batch — a single forward of every
node, Σ L_t back-propagated once (docs/ARCHITECTURE.md §2) — taken by the Trainer's own step, a
`ktfast.engine.step.Step`, so the two cannot part. On CUDA that is the step with its fast parts (a stream
per unit, the fused loss kernels, the whole step captured as a CUDA graph) and, where asked,
torch.compile and the fusion of same-architecture nodes; on a CPU the plain step.

The caller owns the models, the optimizer and its schedule; the step owns its bookkeeping.
"""

from __future__ import annotations

import torch

from ktfast.config import ConfigError, TrainConfig
from ktfast.engine.build import check_fusion
from ktfast.engine.distributed import Placement
from ktfast.engine.fast import CudaStreams, stream_bank
from ktfast.engine.fuse import make_units
from ktfast.engine.nodes import attention_nodes, branch_nodes
from ktfast.engine.step import Step, Sums
from ktfast.engine.trainer import RunPaths
from ktfast.graph import Graph
from ktfast.graph.gates import (
    TIMED_GATES,  # the gates whose weight is a function of k / k_end: they need k_end
)
from ktfast.losses import loss_targets
from ktfast.paths import Compiled, amp_dtype, resolve_paths


def as_graph(graph) -> Graph:
    """A graph given as a path, a dict (a graph file's contents) or a Graph; raises GraphError."""
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, dict):
        return Graph.from_dict(graph)
    return Graph.load(graph)


class TransferStep:
    """`step = TransferStep(graph, models, optimizer)`, then `losses = step(x, y)` per batch:
    {target: L_t as a float}. `models` maps every model node to its module, `optimizer` steps
    the trainable ones (its state is the caller's). `total_steps` is k_end of the time gates
    (linear, gamma, warmup…), required where the graph has one; the k-th call is step k.
    `amp`, `compile`, `cuda_graph`, `fuse` and `reference` are `ktfast train`'s switches; `paths`
    says where each went here (a fast component that cannot run falls back, in one line)."""

    def __init__(
        self,
        graph,
        models: dict,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | None = None,
        amp: bool = False,
        compile: bool = False,
        cuda_graph: bool = True,
        fuse: bool | None = None,
        reference: bool = False,
    ):
        self.graph = graph = as_graph(graph)
        missing = [n.name for n in graph.model_nodes if n.name not in models]
        if missing:
            raise ConfigError(
                f"TransferStep: models: no module for node {missing[0]!r} of graph {graph.name}"
            )
        timed = [e for e in graph.active_edges if e.gate in TIMED_GATES]
        if timed and (not isinstance(total_steps, int) or total_steps < 1):
            edge = timed[0]
            raise ConfigError(
                f"TransferStep: total_steps: the {edge.gate} gate of edge {edge.source}->{edge.target} "
                f"needs the run's number of steps, got {total_steps!r}"
            )
        device = next(p.device for m in models.values() for p in m.parameters())
        cfg = TrainConfig(
            device=str(device),
            amp=amp,
            compile=compile,
            cuda_graph=cuda_graph,
            fuse=fuse,
            reference=reference,
            loader="torch",
        )
        self.paths = paths = RunPaths(
            {k: v["path"] for k, v in resolve_paths(cfg, None).items() if k != "loader"}
        )
        models = {n.name: models[n.name] for n in graph.model_nodes}
        for node in graph.model_nodes:
            if node.frozen:
                models[node.name].eval()  # a teacher's BatchNorm statistics never move
        want_attention = attention_nodes(graph)
        self.fast_path = device.type == "cuda" and not reference
        if self.fast_path:
            for model in models.values():
                model.to(memory_format=torch.channels_last)
            if paths["cuda_graph"] == "on":  # a replay reads the lr the caller's schedule sets
                for group in optimizer.param_groups:
                    if not torch.is_tensor(group["lr"]):
                        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        compiled = None
        if compile:

            def compiled(module):
                """torch.compile(module), or the module itself once compiling failed (`ktfast.paths.Compiled`)."""
                return Compiled(module, paths, lambda e: paths.fall_back("compile", "off", e))

            models = {k: compiled(m) for k, m in models.items()}
        units = make_units(
            graph, models, want_attention, branch_nodes(graph), fuse=cfg.fused(), compile=compiled
        )
        placement = Placement(graph, "data", 0, 1)
        scaler = torch.amp.GradScaler(enabled=amp and amp_dtype(cfg) == torch.float16)
        # The step of `ktfast train` (`ktfast.engine.step.Step`); its units are checked at the first batch.
        self.step = Step(
            graph,
            units,
            models,
            optimizer,
            scaler,
            [Sums(graph, placement.metric_mask(device))],
            paths=paths,
            fall_back=paths.fall_back,
            total_steps=total_steps or 1,
            want_attention=want_attention,
            device=device,
            amp=amp_dtype(cfg) if amp else None,
            placement=placement,
            compiled=compile,
        )
        self.k, self.checked = 0, False  # steps taken; whether the units were checked
        self.rows = [list(graph.nodes).index(t) for t in loss_targets(graph)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        step = self.step
        (sums,) = step.sums
        x, y = x.to(step.device, non_blocking=True), y.to(step.device, non_blocking=True)
        if not self.checked:  # each fused group runs as its nodes would, or they run one by one
            step.units = check_fusion(
                step.units, step.models, step.want_attention, x.shape[-1], step.device, self.paths.fall_back
            )
            if self.fast_path:  # on the units that passed
                step.use_streams(CudaStreams(step.device), stream_bank(step.device))
            self.checked = True
        self.k += 1
        sums.loss_sums.zero_()
        step(x, y, self.k)
        values = sums.loss_sums.tolist()
        return {t: values[i] for t, i in zip(loss_targets(self.graph), self.rows)}
