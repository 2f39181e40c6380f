"""The fast training step on CUDA: the same computation as `Trainer.train_step`, laid out for the GPU.

* every unit (a node, or a fused group of nodes) forwards on its own CUDA stream (autograd runs
  each backward on the stream of its forward, so the backward passes overlap too);
* channels_last activations, AMP (bf16, or fp16 with a grad scaler), a fused multi-tensor SGD/Adam;
* the fused loss kernels hand out Σ_t L_t directly, the tensor the step back-propagates;
* the per-step bookkeeping (loss sums, correct counts) stays on the device: nothing in the step
  reads a value back to the host;
* with `cuda_graph` (the default), with or without torch.compile: the whole step — forwards,
  fused losses, backward, optimizer step, metric accumulation — captured once per input shape as a
  CUDA graph and replayed, since an eager step of small networks is bound by kernel launches.
  Replays read the linear-gate factor and the learning rate from device tensors, so neither the
  gates nor the lr schedule re-capture. fp16's grad scaler is captured too: the fused optimizers
  take its scale and inf flag as device tensors and `GradScaler.update` runs on the device.

A step never shares a CUDA stream or the kernels' scratch with another step of the process (search
trials packed as threads run one step each): streams are leased from a `StreamBank`, and each step
owns its scratch. The stream bookkeeping is plain Python (`StreamBank`, `Streams`), so a CPU test
runs the whole step with stand-in streams.

The paths the step takes are the trainer's `paths` (`ktfast.paths`): the fused kernels or the
reference losses, the CUDA graph or the eager step; a kernel or a capture that fails here falls
back to the next one (`Trainer.fall_back`), which changes them.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext

import torch

from ktfast.internals import initial_scale, scaler_tensors
from ktfast.losses import loss_targets, reference_graph_losses

# One CUDA-graph capture at a time in a process (torch's caching allocator keeps one capture's
# private pool per stream, and torch.compile is not thread-safe): packed trials hold this lock
# while they capture, or warm up a compiled step, and at no other time.
CAPTURE_LOCK = threading.Lock()
POOL = 32  # streams per device and priority in torch's round-robin pool (c10/cuda/CUDAStream.cpp)


def loss_function(paths: dict):
    """The graph-loss function of a run: the fused kernels where its `kernels` path is "triton"
    (`ktfast.paths` decides), else the reference losses of `ktfast.losses`."""
    if paths["kernels"] != "triton":
        return reference_graph_losses
    from ktfast.kernels import fused_graph_losses  # imports Triton: only for runs that use it

    return fused_graph_losses


def step_losses(graph, logits: dict, labels, factor, attention, scratch=None):
    """({target: L_t}, Σ_t L_t) from the fused kernels, which hand out the losses as one vector in
    `loss_targets` order: this is where each L_t is paired with its target. `factor` = step / total
    (a device tensor on the fast path)."""
    from ktfast.kernels import fused_loss_vector

    targets = loss_targets(graph)
    if not targets:
        return {}, None
    losses, total = fused_loss_vector(graph, logits, labels, factor, 1, attention, scratch=scratch)
    return dict(zip(targets, losses.unbind(0))), total


# ---- streams ----------------------------------------------------------------------------------------
def _handle(stream) -> int:
    return stream.cuda_stream


class StreamBank:
    """The streams of one device, leased so that no two owners (steps, trial slots) ever hold the
    same one. torch hands out streams round-robin from a pool of `POOL`: drawn naively, K packed
    trials × (units + 1) streams past 32 would share one, and then one trial's CUDA-graph capture
    takes in the other's kernels. An owner that cannot get as many as it asks for gets fewer (at
    least one) and shares them among its own units."""

    def __init__(self, draw, pool: int = POOL):
        self._draw, self._pool = draw, pool
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def lease(self, count: int) -> list:
        """Up to `count` streams that no other owner holds, at least one."""
        with self._lock:
            got, seen = [], set()
            # Two turns of the pool: other code of the process may draw from it meanwhile.
            for _ in range(2 * self._pool):
                if len(got) == count:
                    break
                stream = self._draw()
                key = _handle(stream)
                if key not in self._held and key not in seen:
                    got.append(stream)
                    seen.add(key)
            if not got:
                raise RuntimeError(f"all {self._pool} CUDA streams of the pool are held by other steps of this "
                                   "process: run fewer trials per GPU (--trials-per-gpu)")
            self._held |= seen
            return got

    def release(self, streams) -> None:
        with self._lock:
            self._held -= {_handle(s) for s in streams}

    @property
    def held(self) -> int:
        return len(self._held)


_BANKS: dict = {}
_BANKS_LOCK = threading.Lock()


def stream_bank(device: torch.device) -> StreamBank:
    """The process's StreamBank of a CUDA device."""
    with _BANKS_LOCK:
        if device not in _BANKS:
            _BANKS[device] = StreamBank(lambda: torch.cuda.Stream(device))
        return _BANKS[device]


class CudaStreams:
    """What the step asks of CUDA streams; a CPU test hands the step stand-ins with the same methods."""

    def __init__(self, device):
        self.device = device

    def current(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)


class Streams:
    """A step's streams: the side stream (warm-up and capture) and one per unit, leased together.
    Units share streams only when the bank is short, and only among themselves. `forks` lists
    each stream once with the units it runs: the step forks and joins exactly these."""

    def __init__(self, unit_names: list[str], bank: StreamBank):
        leased = bank.lease(1 + len(unit_names))
        self.side = leased[0]
        own = leased[1:] or leased[:1]
        forks: dict[int, tuple] = {}
        for i, name in enumerate(unit_names):
            stream = own[i % len(own)]
            forks.setdefault(_handle(stream), (stream, []))[1].append(name)
        self.forks = list(forks.values())
        self.count = len(leased)
        weakref.finalize(self, bank.release, leased)  # back to the bank when the step is freed


# ---- the step ---------------------------------------------------------------------------------------
class FastStep:
    """The step of a Trainer on CUDA (or, in tests, with stand-in `streams` on a CPU).

    It holds its trainer weakly: a finished trainer (a search trial's) is freed at once, with its
    CUDA graphs and their memory pools, not whenever the garbage collector runs."""

    def __init__(self, trainer, bank: StreamBank | None = None, streams=None):
        self.t = weakref.proxy(trainer)
        cfg = trainer.cfg
        self.device = torch.device(cfg.device)
        self.cuda = streams or CudaStreams(self.device)
        self.streams = Streams([u.name for u in trainer.units], bank or stream_bank(self.device))
        self.units = {u.name: u for u in trainer.units}
        self.factor = torch.zeros((), device=self.device)  # step / total_steps, for the time gates
        self.scratch = None
        if self.kernels:
            from ktfast.kernels import Scratch

            self.scratch = Scratch()
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (CUDA graph, static x, static y)
        self.captures = 0

    @property
    def kernels(self) -> bool:
        return self.t.paths["kernels"] == "triton"

    @property
    def use_graph(self) -> bool:
        return self.t.paths["cuda_graph"] == "on"

    def _losses(self, logits, y, attention):
        """({target: L_t}, Σ_t L_t) of the step: the fused kernels, or the reference after a fallback."""
        t = self.t
        if self.kernels:
            try:
                return step_losses(t.graph, logits, y, self.factor, attention, self.scratch)
            except Exception as e:  # a kernel that cannot compile or launch here
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                t.fall_back("kernels", "reference", e)
        losses = reference_graph_losses(t.graph, logits, y, step=self.factor, total_steps=1, attention=attention)
        return losses, sum(losses.values())

    def _body(self, x, y) -> None:
        t = self.t
        current = self.cuda.current()
        logits, attention = {}, {}
        for stream, names in self.streams.forks:
            stream.wait_stream(current)
            with self.cuda.use(stream), t.autocast_context():
                for name in names:
                    out, att = t.forward_unit(self.units[name], x)
                    logits.update(out)
                    attention.update(att)
        for stream, _ in self.streams.forks:
            current.wait_stream(stream)
        logits, attention = t.exchange(logits, attention)
        losses, total = self._losses(logits, y, attention or None)
        t.optimizer_step(total if t.placement.world == 1 else t.placement.total(losses))  # counts the fp16 scaler's skipped steps on the device, no sync
        t.accumulate(losses, logits, y)

    def __call__(self, x, y, step: int) -> None:
        t = self.t
        self.factor.fill_(step / t.total_steps)
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
        if t.optimizer is not None:
            t.optimizer.zero_grad(set_to_none=True)
        self._body(x, y)

    def _capture(self, key, x, y) -> None:
        """Warm up on the side stream (compiles kernels, creates optimizer state), then capture there.

        The warm-up steps are real optimizer steps on this batch, so the parameters, the optimizer
        and grad-scaler state and the metric accumulators are restored afterwards: capture must not
        change what is computed. A capture that fails falls back to the eager step."""
        t = self.t
        saved = _snapshot(t)
        static = (x.clone(), y.clone())
        side = self.streams.side
        side.wait_stream(self.cuda.current())
        # torch.compile is not thread-safe: a compiled warm-up (it compiles) is taken in turn.
        with CAPTURE_LOCK if t.cfg.compile else nullcontext(), self.cuda.use(side):
            for _ in range(2):
                if t.optimizer is not None:
                    t.optimizer.zero_grad(set_to_none=True)
                self._body(*static)
        self.cuda.current().wait_stream(side)
        # Gradients allocated inside the capture are overwritten, not accumulated, by each replay.
        if t.optimizer is not None:
            t.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end rather than torch.cuda.graph, which synchronises the whole device and
            # empties the cache at every capture: other trials of the process would wait on it.
            # thread_local: what the other threads of the process launch meanwhile is not part of it.
            with CAPTURE_LOCK, self.cuda.use(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._body(*static)
                finally:
                    graph.capture_end()
        except Exception as e:
            _restore(t, saved)
            t.fall_back("cuda_graph", "off", e)
            return
        self.graphs[key] = (graph, *static)
        self.captures += 1
        _restore(t, saved)


def _snapshot(t) -> dict:
    return {"models": {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in t.models.items()},
            "optimizer": {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                          for p, s in (t.optimizer.state.items() if t.optimizer else ())},
            "scaler": [v.clone() for v in scaler_tensors(t.scaler)],
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
        now = scaler_tensors(t.scaler)
        if len(now) == len(saved["scaler"]):
            for v, old in zip(now, saved["scaler"]):
                v.copy_(old)
        else:  # made by the warm-up: the scale it started from
            now[0].fill_(initial_scale(t.scaler))
            now[1].zero_()
        t.loss_sums.copy_(saved["metrics"][0])
        t.correct.copy_(saved["metrics"][1])
        t.skipped.copy_(saved["metrics"][2])
