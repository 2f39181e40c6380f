"""The fast training step on CUDA (DESIGN §2): the same computation as `Trainer.train_step`, laid out
for the GPU.

* every node's forward runs on its own CUDA stream (autograd runs each backward on the stream of
  its forward, so the backward passes overlap too);
* channels_last activations, AMP (bf16, or fp16 with a grad scaler), a fused multi-tensor SGD/Adam;
* the fused loss kernels hand out Σ_t L_t directly, the tensor the step back-propagates;
* the per-step bookkeeping (loss sums, correct counts) stays on the device: nothing in the step
  reads a value back to the host;
* with `cuda_graph` (the default), with or without torch.compile: the whole step — forwards,
  fused losses, backward, optimizer step, metric accumulation — captured once as a CUDA graph and
  replayed, since an eager step of small networks is bound by kernel launches. Graph replays read
  the linear-gate factor from a device tensor, so changing it re-captures nothing; the learning
  rate is a plain float in torch's SGD, so the graph is captured again when the schedule changes
  it (a handful of times per run). fp16's grad scaler is captured too: the fused optimizers take
  its scale and inf flag as device tensors (`GradScaler.step` reads nothing back for them) and
  `GradScaler.update` runs on the device.

`loss_function` is where the step chooses between the fused kernels and the reference losses.
"""
from __future__ import annotations

import os
import threading

import torch

from ktfast.losses import loss_targets, reference_graph_losses

# One CUDA-graph capture at a time in a process (torch.cuda.graph's rule; torch.compile is not
# thread-safe either): search trials packed as threads of one worker (ktfast.packing) warm up and
# capture in turn, each on its own stream.
CAPTURE_LOCK = threading.Lock()


def loss_function(cfg):
    """The graph-loss function of a run: the fused Triton kernels on CUDA, the reference losses of
    `ktfast.losses` with `--reference` and on the CPU. KTFAST_KERNELS=1 forces the kernels (on a
    CPU, through Triton's interpreter: see ktfast/__init__.py), KTFAST_KERNELS=0 the reference."""
    choice = os.environ.get("KTFAST_KERNELS")
    fused = choice == "1" if choice is not None else torch.device(cfg.device).type == "cuda"
    if cfg.reference or not fused:
        return reference_graph_losses
    from ktfast.kernels import fused_graph_losses  # imports Triton: only for runs that use it

    return fused_graph_losses


class FastStep:
    def __init__(self, trainer):
        self.t = trainer
        cfg, graph = trainer.cfg, trainer.graph
        self.device = torch.device(cfg.device)
        for name in trainer.models:
            trainer.models[name].to(memory_format=torch.channels_last)
        self.streams = {n.name: torch.cuda.Stream(self.device) for n in graph.model_nodes}
        self.factor = torch.zeros((), device=self.device)  # step / total_steps, for linear gates
        self.targets = loss_targets(graph)
        # Over several ranks the step holds collectives: it runs eagerly (DESIGN §10).
        self.use_graph = cfg.cuda_graph and trainer.placement.world == 1
        # Warm-up and capture share one stream: the kernels' cached scratch then lives outside the graph.
        self.side = torch.cuda.Stream(self.device)
        self.graph = None
        self.graph_lr = None
        self.static = None

    def _losses(self, logits, y, attention):
        """({target: L_t}, Σ_t L_t) of the step."""
        t = self.t
        if t.loss_fn is not reference_graph_losses and self.targets:
            from ktfast.kernels import fused_loss_vector

            losses, total = fused_loss_vector(t.graph, logits, y, self.factor, 1, attention)
            return dict(zip(self.targets, losses.unbind(0))), total
        losses = t.loss_fn(t.graph, logits, y, step=self.factor, total_steps=1, attention=attention)
        return losses, sum(losses.values())

    def _body(self, x, y) -> None:
        t = self.t
        current = torch.cuda.current_stream(self.device)
        logits, attention = {}, {}
        for unit in t.units:  # a node, or a fused group of nodes on its first node's stream
            stream = self.streams[unit.name]
            stream.wait_stream(current)
            with torch.cuda.stream(stream), t.autocast_context():
                out, att = t.forward_unit(unit, x)
                logits.update(out)
                attention.update(att)
        for stream in self.streams.values():
            current.wait_stream(stream)
        logits, attention = t.exchange(logits, attention)
        losses, total = self._losses(logits, y, attention or None)
        t.optimizer_step(total if t.placement.world == 1 else t.placement.total(losses))  # counts the fp16 scaler's skipped steps on the device, no sync
        t.accumulate(losses, logits, y)

    def __call__(self, x, y, step: int) -> None:
        t = self.t
        self.factor.fill_(step / t.total_steps)
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.use_graph:
            if t.optimizer is not None:
                t.optimizer.zero_grad(set_to_none=True)
            self._body(x, y)
            return
        lr = [g["lr"] for g in t.optimizer.param_groups] if t.optimizer else None
        if self.graph is None or lr != self.graph_lr or x.shape != self.static[0].shape:
            with CAPTURE_LOCK:
                self._capture(x, y)
            self.graph_lr = lr
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        self.graph.replay()

    def _capture(self, x, y) -> None:
        """Warm up on the side stream (compiles kernels, creates optimizer state), then capture.

        The warm-up steps are real optimizer steps on this batch, so the parameters, the optimizer
        and grad-scaler state and the metric accumulators are restored afterwards: capture must not
        change what is computed.
        """
        t = self.t
        saved = _snapshot(t)
        self.static = (x.clone(), y.clone())
        self.graph = None  # the previous graph's memory is free for the new one
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for _ in range(2):
                if t.optimizer is not None:
                    t.optimizer.zero_grad(set_to_none=True)
                self._body(*self.static)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        # Gradients allocated inside the capture are overwritten, not accumulated, by each replay.
        if t.optimizer is not None:
            t.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: what the other threads of the process launch meanwhile is not part of it.
        with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
            self._body(*self.static)
        self.graph = graph
        _restore(t, saved)


def _scaler_state(t) -> list[torch.Tensor]:
    """The grad scaler's device tensors (scale, growth tracker), once it has made them."""
    return [v for v in (getattr(t.scaler, "_scale", None), getattr(t.scaler, "_growth_tracker", None))
            if torch.is_tensor(v)]


def _snapshot(t) -> dict:
    return {"models": {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in t.models.items()},
            "optimizer": {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                          for p, s in (t.optimizer.state.items() if t.optimizer else ())},
            "scaler": [v.clone() for v in _scaler_state(t)],
            "metrics": (t.loss_sums.clone(), t.correct.clone(), t.skipped.clone())}


def _restore(t, saved) -> None:
    with torch.no_grad():
        for k, m in t.models.items():
            for n, v in m.state_dict().items():
                v.copy_(saved["models"][k][n])
        if t.optimizer:
            for p, state in t.optimizer.state.items():
                for k, v in state.items():
                    if torch.is_tensor(v):
                        if id(p) in saved["optimizer"] and k in saved["optimizer"][id(p)]:
                            v.copy_(saved["optimizer"][id(p)][k])
                        else:  # state the warm-up created: as if no step had been taken
                            v.zero_()
        now = _scaler_state(t)
        if len(now) == len(saved["scaler"]):
            for v, old in zip(now, saved["scaler"]):
                v.copy_(old)
        else:  # made by the warm-up: the scale it started from
            now[0].fill_(t.scaler._init_scale)
            now[1].zero_()
        t.loss_sums.copy_(saved["metrics"][0])
        t.correct.copy_(saved["metrics"][1])
        t.skipped.copy_(saved["metrics"][2])
