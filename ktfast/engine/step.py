"""The training step (docs/ARCHITECTURE.md §2, step 3): one forward of every unit, the losses of
every target, Σ_t L_t back-propagated once, one optimizer step of every trainable node, the step's
metrics added on the device. It is the one step of the code base: the Trainer's, a replica group's
(`ktfast.engine.replicas`: stacked units, each seed's losses from its own logits and labels) and the user's
(`ktfast.TransferStep`).

The fast parts are its options, each a path of `ktfast.paths`:
* streams (`use_streams`, on CUDA): every unit forwards on its own stream, so the backward passes
  overlap too; the time gates' factor k / k_end lives on the device;
* the fused loss kernels (`paths["kernels"] == "triton"`): Σ_t L_t straight from the kernels;
* the CUDA graph (`paths["cuda_graph"] == "on"`, with streams): the whole step — forwards, losses,
  backward, optimizer step, metric sums — captured once per input shape and replayed
  (`ktfast.engine.fast` says how). Nothing in a step reads a value back to the host.
A kernel or a capture that fails here falls back to the next path (`fall_back`), in one line.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ktfast.engine.distributed import Placement
from ktfast.engine.fast import CAPTURE_LOCK, Streams, capturing, restore, snapshot, step_losses
from ktfast.engine.fuse import Unit, forward_unit
from ktfast.internals import scaler_tensors
from ktfast.losses import node_logits, reference_graph_losses


class Sums:
    """One run's per-node step metrics on the device (L_t, or the cross-entropy for nodes nothing
    trains; correct counts; steps the fp16 grad scaler skipped), read once per epoch."""

    def __init__(self, graph, mask: torch.Tensor):
        """`mask`: 1 for the nodes whose metrics this rank counts (`Placement.metric_mask`)."""
        self.graph, self.mask = graph, mask
        self.loss_sums = torch.zeros(len(graph.nodes), device=mask.device)
        self.correct = torch.zeros(len(graph.nodes), device=mask.device)
        self.skipped = torch.zeros((), device=mask.device)

    def tensors(self) -> tuple:
        return self.loss_sums, self.correct, self.skipped

    def zero(self) -> None:
        for v in self.tensors():
            v.zero_()

    @torch.no_grad()
    def add(self, losses: dict, logits: dict, y) -> None:
        """A step's losses and correct counts, without reading anything back to the host."""
        z = node_logits(self.graph, {k: v.detach() for k, v in logits.items()})
        dtype = self.loss_sums.dtype  # fp32 (AMP's half-precision logits too), float64 for float64 models
        per_node = [
            losses[name].detach().to(dtype) if name in losses else F.cross_entropy(z[name].to(dtype), y)
            for name in self.graph.nodes
        ]
        self.loss_sums += torch.stack(per_node) * self.mask
        self.correct += (
            torch.stack([(z[name].argmax(1) == y).sum() for name in self.graph.nodes]).float() * self.mask
        )


class _Here:
    """The step without streams: its units run one after another where the caller runs."""

    def current(self):
        return self

    def wait_stream(self, other) -> None:
        pass

    def use(self, stream):
        return nullcontext()


def seed_name(s: int, name: str) -> str:
    """Seed s's name of a node or target in a replica group (node names have no '/')."""
    return f"{s}/{name}"


class Step:
    """`step(x, y, k)`: the k-th (1-based) optimizer step on the batch (x, y).

    A replica group's step (`per_seed`) has one `Sums` per seed, takes x and y as the seeds'
    batches concatenated, `inputs(unit, x)` gives each unit its part, and its node names are
    tagged `s/name` (`seed_name`); each seed's losses come from its own logits and labels. The
    step holds the models, optimizer and sums it is handed, nothing of whoever built it, so a
    finished run (a search trial's) is freed at once, with its CUDA graphs."""

    def __init__(
        self,
        graph,
        units: list[Unit],
        models,
        optimizer,
        scaler,
        sums: list[Sums],
        *,
        paths: dict,
        fall_back,
        total_steps: int,
        want_attention: set[str],
        device,
        amp: torch.dtype | None = None,
        placement: Placement | None = None,
        exchange_grad: bool = False,
        compiled: bool = False,
        per_seed: bool = False,
        inputs=None,
    ):
        """`paths`: the path each switch takes (`ktfast.paths`), which `fall_back(switch, path,
        error)` changes; `amp`: the autocast dtype, None without; `compiled`: the models run
        through torch.compile (a warm-up before a capture then takes CAPTURE_LOCK)."""
        self.graph, self.units, self.models, self.optimizer, self.scaler = (
            graph,
            units,
            models,
            optimizer,
            scaler,
        )
        self.sums, self.paths, self.fall_back, self.total_steps = sums, paths, fall_back, total_steps
        self.want_attention, self.device, self.amp = want_attention, torch.device(device), amp
        self.placement = placement or Placement(graph, "data", 0, 1)
        self.exchange_grad, self.compiled, self.per_seed = exchange_grad, compiled, per_seed
        self.inputs = inputs or (lambda unit, x: x)
        self.scratches = [None] * len(sums)  # the kernels' scratch, one per seed (a step owns its own)
        if paths["kernels"] == "triton":
            from ktfast.kernels import Scratch  # imports Triton: only for runs that use it

            self.scratches = [Scratch() for _ in sums]
        self.cuda, self.streams, self.factor = _Here(), None, None
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (CUDA graph, static x, static y)
        self.captures = 0

    def use_streams(self, cuda, bank) -> None:
        """The fast path: a stream per unit leased from `bank` (`ktfast.engine.fast.StreamBank`), `cuda`
        what the step asks of CUDA (`ktfast.engine.fast.CudaStreams`; stand-ins in a CPU test); k / k_end
        on the device; on CUDA, channels_last batches and, where its path is on, the CUDA graph."""
        self.cuda = cuda
        self.streams = Streams([u.name for u in self.units], bank)
        self.factor = torch.zeros((), device=self.device)

    @property
    def use_graph(self) -> bool:
        return self.streams is not None and self.paths["cuda_graph"] == "on"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def __call__(self, x, y, step) -> None:
        k, total = step, self.total_steps
        if self.streams is not None:
            self.factor.fill_(step / self.total_steps)
            k, total = self.factor, 1
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if self.use_graph:
                key = (tuple(x.shape), tuple(y.shape))
                if key not in self.graphs:
                    self._capture(key, x, y)
                if key in self.graphs:
                    graph, static_x, static_y = self.graphs[key]
                    static_x.copy_(x)
                    static_y.copy_(y)
                    graph.replay()
                    return
        self._zero_grad()
        self._body(x, y, k, total)

    # ---- the body ---------------------------------------------------------------------------------
    def _body(self, x, y, k, total) -> None:
        logits, attention = self.forward(x)
        logits, attention = self.placement.exchange(logits, attention, grad=self.exchange_grad, phase="train")
        losses, loss = self.losses(logits, y, k, total, attention)
        self.optimizer_step(
            loss if loss is not None and self.placement.world == 1 else self.placement.total(losses)
        )
        for sums, (z, labels, _), own in zip(self.sums, self.split(logits, y, {}), self.split_losses(losses)):
            sums.add(own, z, labels)

    def forward(self, x) -> tuple[dict, dict]:
        """Every unit's logits (and attention maps where wanted), each fork of units on its stream."""
        current = self.cuda.current()
        forks = self.streams.forks if self.streams is not None else [(current, [u.name for u in self.units])]
        units = {u.name: u for u in self.units}
        logits, attention = {}, {}
        for stream, names in forks:
            stream.wait_stream(current)
            with self.cuda.use(stream), self.autocast():
                for name in names:
                    out, att = self.forward_unit(units[name], x)
                    logits.update(out)
                    attention.update(att)
        for stream, _ in forks:
            current.wait_stream(stream)
        return logits, attention

    def forward_unit(self, unit: Unit, x):
        return forward_unit(unit, self.inputs(unit, x), unit.name in self.want_attention)

    def split(self, logits: dict, y, attention: dict) -> list[tuple[dict, torch.Tensor, dict]]:
        """(logits, labels, attention maps) of each seed, under their own names."""
        if not self.per_seed:
            return [(logits, y, attention)]
        parts = [({}, labels, {}) for labels in y.view(len(self.sums), -1)]
        for i, d in ((0, logits), (2, attention)):
            for key, v in d.items():
                s, name = key.split("/", 1)
                parts[int(s)][i][name] = v
        return parts

    def split_losses(self, losses: dict) -> list[dict]:
        if not self.per_seed:
            return [losses]
        return [
            {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith(f"{s}/")}
            for s in range(len(self.sums))
        ]

    def losses(self, logits: dict, y, k, total, attention: dict):
        """({target: L_t}, Σ_t L_t from the kernels or None), each seed's from its own logits and labels."""
        if not self.per_seed:
            return self.seed_losses(logits, y, k, total, attention or None, self.scratches[0])
        losses, totals = {}, []
        for s, (z, labels, maps) in enumerate(self.split(logits, y, attention)):
            own, loss = self.seed_losses(z, labels, k, total, maps or None, self.scratches[s])
            losses.update((seed_name(s, t), v) for t, v in own.items())
            totals.append(loss)
        return losses, sum(totals) if totals and all(t is not None for t in totals) else None

    def seed_losses(self, logits: dict, y, k, total, attention, scratch):
        """The fused kernels where their path is on (a kernel that cannot compile or launch here falls
        back to the reference losses), else the reference losses; `k / total` is the time gates' factor."""
        if self.paths["kernels"] == "triton":
            try:
                return step_losses(self.graph, logits, y, k, total, attention, scratch)
            except Exception as e:
                if capturing():
                    raise
                self.fall_back("kernels", "reference", e)
        return reference_graph_losses(
            self.graph, logits, y, step=k, total_steps=total, attention=attention
        ), None

    def _zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, total) -> None:
        """`total` = Σ L_t backward once, one step of every trainable node. The fp16 grad scaler skips a step
        whose gradients overflowed and then lowers its scale: that is counted on the device, with
        no read-back (`_scale` is the scaler's device tensor; `get_scale()` would synchronise)."""
        if self.optimizer is None or not torch.is_tensor(total) or not total.requires_grad:
            return  # place nodes: a rank of frozen nodes only has nothing to step
        scaler = self.scaler
        scaler.scale(total).backward()
        self.placement.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        scale = scaler_tensors(scaler)[0].clone() if scaler.is_enabled() else None
        scaler.step(self.optimizer)
        scaler.update()
        if scale is not None:
            for sums in self.sums:
                sums.skipped += scaler_tensors(scaler)[0] < scale

    # ---- the CUDA graph ---------------------------------------------------------------------------
    def _state(self) -> tuple:
        return self.models, self.optimizer, self.scaler, [v for s in self.sums for v in s.tensors()]

    def _capture(self, key, x, y) -> None:
        """Warm up on the side stream (compiles kernels, creates optimizer state), then capture there.

        The warm-up steps are real optimizer steps on this batch, so the parameters, the optimizer
        and grad-scaler state and the metric sums are restored afterwards: capture must not change
        what is computed. A capture that fails falls back to the eager step."""
        saved = snapshot(*self._state())
        static = (x.clone(), y.clone())
        side = self.streams.side
        side.wait_stream(self.cuda.current())
        # torch.compile is not thread-safe: a compiled warm-up (it compiles) is taken in turn.
        with CAPTURE_LOCK if self.compiled else nullcontext(), self.cuda.use(side):
            for _ in range(2):
                self._zero_grad()
                self._body(*static, self.factor, 1)
        self.cuda.current().wait_stream(side)
        # Gradients allocated inside the capture are overwritten, not accumulated, by each replay.
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end rather than torch.cuda.graph, which synchronises the whole device and
            # empties the cache at every capture: other trials of the process would wait on it.
            # thread_local: what the other threads of the process launch meanwhile is not part of it.
            with CAPTURE_LOCK, self.cuda.use(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._body(*static, self.factor, 1)
                finally:
                    graph.capture_end()
        except Exception as e:
            restore(*self._state(), saved)
            self.fall_back("cuda_graph", "off", e)
            return
        self.graphs[key] = (graph, *static)
        self.captures += 1
        restore(*self._state(), saved)
