"""The CUDA parts of the training step (`ktfast.engine.step.Step`, whose options they are): its streams,
the fused kernels' loss vector, and what a CUDA-graph capture saves and puts back.

* every unit (a node, or a fused group of nodes) forwards on its own CUDA stream (autograd runs
  each backward on the stream of its forward, so the backward passes overlap too);
* channels_last activations, AMP (bf16, or fp16 with a grad scaler), a fused multi-tensor SGD/Adam;
* the fused loss kernels hand out Σ_t L_t directly, the tensor the step back-propagates;
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
"""

from __future__ import annotations

import threading
import weakref

import torch

from ktfast.internals import initial_scale, scaler_tensors
from ktfast.losses import loss_targets

# One CUDA-graph capture at a time in a process (torch's caching allocator keeps one capture's
# private pool per stream, and torch.compile is not thread-safe): packed trials hold this lock
# while they capture, or warm up a compiled step, and at no other time.
CAPTURE_LOCK = threading.Lock()
POOL = 32  # streams per device and priority in torch's round-robin pool (c10/cuda/CUDAStream.cpp)


def step_losses(graph, logits: dict, labels, step, total_steps, attention, scratch=None):
    """({target: L_t}, Σ_t L_t) from the fused kernels, which hand out the losses as one vector in
    `loss_targets` order: this is where each L_t is paired with its target. The time gates' factor
    is step / total_steps (on the fast path a device tensor, with total_steps 1)."""
    from ktfast.kernels import fused_loss_vector

    targets = loss_targets(graph)
    if not targets:
        return {}, None
    losses, total = fused_loss_vector(graph, logits, labels, step, total_steps, attention, scratch=scratch)
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
                raise RuntimeError(
                    f"all {self._pool} CUDA streams of the pool are held by other steps of this "
                    "process: run fewer trials per GPU (--trials-per-gpu)"
                )
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
    """The process's StreamBank of a CUDA device: one per GPU, whether it is named "cuda" (a run's
    config) or "cuda:N" (the packed search's slots), so that no two steps lease one stream."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
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


def capturing() -> bool:
    """Whether this thread's current CUDA stream is being captured (a failure there is the capture's)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---- what a capture's warm-up changes ---------------------------------------------------------------
def snapshot(models, optimizer, scaler, sums: list) -> dict:
    """Copies of the weights, optimizer and grad-scaler state and the metric sums (`sums`, tensors)."""
    return {
        "models": {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in models.items()},
        "optimizer": {
            id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in (optimizer.state.items() if optimizer else ())
        },
        "scaler": [v.clone() for v in scaler_tensors(scaler)],
        "metrics": [v.clone() for v in sums],
    }


def restore(models, optimizer, scaler, sums: list, saved: dict) -> None:
    """Put back what `snapshot` copied; state made since (by a warm-up) as if no step had been taken."""
    with torch.no_grad():
        for k, m in models.items():
            for n, v in m.state_dict().items():
                v.copy_(saved["models"][k][n])
        if optimizer:
            for p, state in optimizer.state.items():
                for k, v in state.items():
                    if torch.is_tensor(v):
                        if id(p) in saved["optimizer"] and k in saved["optimizer"][id(p)]:
                            v.copy_(saved["optimizer"][id(p)][k])
                        else:  # state the warm-up created: as if no step had been taken
                            v.zero_()
        now = scaler_tensors(scaler)
        if len(now) == len(saved["scaler"]):
            for v, old in zip(now, saved["scaler"]):
                v.copy_(old)
        else:  # made by the warm-up: the scale it started from
            now[0].fill_(initial_scale(scaler))
            now[1].zero_()
        for v, old in zip(sums, saved["metrics"]):
            v.copy_(old)
