"""`ktfast.TransferStep` (docs/ARCHITECTURE.md §8): the training step of `ktfast train` inside one's own loop.

One call is one optimizer step of every trainable node on one batch — a single forward of every
node, Σ L_t back-propagated once (docs/ARCHITECTURE.md §2) — computed by the Trainer's own step code: the methods
below are the Trainer's, so the two cannot part. On CUDA that is the fast step of `ktfast.fast`
(a stream per unit, the fused loss kernels, the whole step captured as a CUDA graph) and, where
asked, torch.compile and the fusion of same-architecture nodes; on a CPU the reference step.

The caller owns the models, the optimizer and its schedule; the step owns its bookkeeping.
"""
from __future__ import annotations

import torch

from ktfast.config import ConfigError, TrainConfig
from ktfast.distributed import Placement
from ktfast.fast import FastStep, loss_function
from ktfast.fuse import make_units
from ktfast.gates import TIMED_GATES  # the gates whose weight is a function of k / k_end: they need k_end
from ktfast.graph import Graph
from ktfast.losses import loss_targets
from ktfast.nodes import attention_nodes, branch_nodes
from ktfast.paths import Compiled, amp_dtype, resolve_paths
from ktfast.train import Trainer



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

    # The Trainer's step, the same code (`Trainer.train_step` and what it calls).
    autocast_context = Trainer.autocast_context
    forward_unit = Trainer.forward_unit
    losses = Trainer.losses
    fall_back = Trainer.fall_back
    record_paths = Trainer.record_paths
    exchange = Trainer.exchange
    optimizer_step = Trainer.optimizer_step
    accumulate = Trainer.accumulate
    check_fusion = Trainer.check_fusion
    _train_step = Trainer.train_step

    def __init__(self, graph, models: dict, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None,
                 amp: bool = False, compile: bool = False, cuda_graph: bool = True, fuse: bool | None = None,
                 reference: bool = False):
        self.graph = graph = as_graph(graph)
        missing = [n.name for n in graph.model_nodes if n.name not in models]
        if missing:
            raise ConfigError(f"TransferStep: models: no module for node {missing[0]!r} of graph {graph.name}")
        timed = [e for e in graph.active_edges if e.gate in TIMED_GATES]
        if timed and (not isinstance(total_steps, int) or total_steps < 1):
            edge = timed[0]
            raise ConfigError(f"TransferStep: total_steps: the {edge.gate} gate of edge {edge.source}->{edge.target} "
                              f"needs the run's number of steps, got {total_steps!r}")
        device = next(p.device for m in models.values() for p in m.parameters())
        self.cfg = cfg = TrainConfig(device=str(device), amp=amp, compile=compile, cuda_graph=cuda_graph,
                                     fuse=fuse, reference=reference, loader="torch")
        self.paths = {k: v["path"] for k, v in resolve_paths(cfg, None).items() if k != "loader"}
        self.out, self.recording, self.keeps_state = None, False, False
        self.placement = Placement(graph, "data", 0, 1)
        self.exchange_grad = False
        self.metric_mask = self.placement.metric_mask(device)
        self.models = {n.name: models[n.name] for n in graph.model_nodes}
        for node in graph.model_nodes:
            if node.frozen:
                self.models[node.name].eval()  # a teacher's BatchNorm statistics never move
        self.want_attention, self.want_branches = attention_nodes(graph), branch_nodes(graph)
        self.loss_fn = loss_function(self.paths)
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(enabled=amp and amp_dtype(cfg) == torch.float16)
        self.total_steps = total_steps or 1
        self.k = 0  # steps taken
        self.loss_sums = torch.zeros(len(graph.nodes), device=device)
        self.correct = torch.zeros(len(graph.nodes), device=device)
        self.skipped = torch.zeros((), device=device)
        self.rows = [list(graph.nodes).index(t) for t in loss_targets(graph)]
        fast = device.type == "cuda" and not reference
        if fast:
            for model in self.models.values():
                model.to(memory_format=torch.channels_last)
            if self.paths["cuda_graph"] == "on":  # a replay reads the lr the caller's schedule sets
                for group in optimizer.param_groups:
                    if not torch.is_tensor(group["lr"]):
                        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        compiled = self.compiled if compile else None
        if compiled:
            self.models = {k: compiled(m) for k, m in self.models.items()}
        self.units = make_units(graph, self.models, self.want_attention, self.want_branches, fuse=cfg.fused(),
                                compile=compiled)
        self.fast, self.fast_path, self.checked = None, fast, False

    def compiled(self, module):
        """torch.compile(module), or the module itself once compiling failed (`ktfast.paths.Compiled`)."""
        return Compiled(module, self.paths, lambda e: self.fall_back("compile", "off", e))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        device = self.loss_sums.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not self.checked:  # each fused group runs as its nodes would, or they run one by one
            self.check_fusion(x.shape[-1])
            self.fast = FastStep(self) if self.fast_path else None  # on the units that passed
            self.checked = True
        self.k += 1
        self.loss_sums.zero_()
        self._train_step(x, y, self.k)
        sums = self.loss_sums.tolist()
        return {t: sums[i] for t, i in zip(loss_targets(self.graph), self.rows)}
