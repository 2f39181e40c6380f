"""Training on several processes (docs/ARCHITECTURE.md §10): `torch.distributed`, launched by `torchrun` (or by
`ktfast train --gpus`), NCCL on CUDA and gloo on the CPU.

* place "data": every rank holds every node and takes its slice of each global batch (the epoch
  plan stays the single process's); each unfused trainable node runs under torch's
  DistributedDataParallel, whose bucketed all-reduces of its gradients start during the backward, and
  the nodes of fused groups are averaged after it in one flat all-reduce. With `sync_bn`, BatchNorm
  normalises over the global batch, and the ranks compute what one process computes.
* place "nodes": each rank runs a share of the model nodes (balanced by cost) on the whole batch;
  after the forwards the ranks all-gather the logits and attention maps, and each rank
  back-propagates the losses of the targets it owns. A non-detached ensemble's loss reaches its
  members on other ranks through an all-gather with autograd (`torch.distributed.nn`), whose
  backward every rank takes part in. Every rank keeps a copy of every node (for the checkpoint,
  brought up to date on rank 0 before each is written), so a run resumes at any world size.

Rank 0 alone writes the run directory; a rank whose peer is gone ends the run with one line.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.nn import functional as with_grad  # collectives that autograd differentiates
from torch.nn.parallel import DistributedDataParallel

from ktfast.args import UsageError
from ktfast.graph import Graph, owner

# torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns); torch 2.11,
# on the GPU machines, knows only the old one.
NO_BUFFER_SYNC = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)

PLACES = ("data", "nodes")
# The bound on a collective that waits for a rank that neither answers nor dies (a dead rank's
# sockets close at once and end the others' collectives within a second on gloo; torchrun ends the
# survivors of a dead rank on NCCL).
TIMEOUT_S = float(os.environ.get("KTFAST_DIST_TIMEOUT", "1800"))
# Rank 0 alone fills the caches (pretraining teachers can take hours) while the others wait for it:
# they wait on a gloo group of its own with this bound, not on the run's group, whose timeout (and
# NCCL's watchdog) is TIMEOUT_S.
PREPARE_TIMEOUT_S = float(os.environ.get("KTFAST_PREPARE_TIMEOUT", str(48 * 3600)))
_waiting: list = []  # the gloo group of the waits for rank 0, made once per process group


class PeerLost(RuntimeError):
    """A collective failed: another rank of the run stopped. One line."""


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str):
    """Joins the process group of a torchrun launch and leaves it at the end; yields (rank, world).
    Outside torchrun: (0, 1) and nothing else."""
    world = world_size()
    if world == 1:
        yield 0, 1
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:  # "cuda" then means this rank's GPU everywhere
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    try:
        yield dist.get_rank(), world
    except BaseException as e:
        if not is_peer_failure(e):  # leaving a group whose peer is gone can hang
            dist.destroy_process_group()
        raise
    finally:
        _waiting.clear()
    dist.destroy_process_group()


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception is a collective's failure (a rank gone), not this rank's own error. By
    type where torch gives one (NCCL's DistBackendError); gloo's is a plain RuntimeError (torch 2.14:
    "... Read error ...: Connection reset by peer"), whose message is the only mark of it, so it is
    read here and nowhere else (tests/test_distributed.py kills a rank and fails if it is missed)."""
    if not dist.is_available() or not dist.is_initialized() or not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")
    )


def agree(check) -> None:
    """Runs `check()` on every rank; if it raises on any, every rank raises the first rank's error,
    so that a bad launch ends every rank with the same line and exit code."""
    if world_size() == 1:
        return check()
    try:
        check()
        mine = None
    except Exception as e:  # sent to the other ranks, raised again below
        mine = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, mine)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_same(value, what: str) -> None:
    """Every rank was started with the same `value` (the graph and the recipe), or every rank says so."""
    if world_size() == 1:
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    for rank, theirs in enumerate(values):
        if theirs != values[0]:
            raise UsageError(
                f"rank {rank} was started with another {what} than rank 0: start every rank "
                "with the same command"
            )


def from_rank_zero(make):
    """`make()` on rank 0, its result (or its error) on every rank: one run directory's name, say."""
    if world_size() == 1:
        return make()
    # Made by every rank before rank 0 starts (creating a group is itself a collective).
    if not _waiting:
        _waiting.append(dist.new_group(backend="gloo", timeout=timedelta(seconds=PREPARE_TIMEOUT_S)))
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = make()
        except Exception as e:  # raised on every rank below
            box[1] = e
    dist.broadcast_object_list(box, src=0, group=_waiting[0])
    if box[1] is not None:
        raise box[1]
    return box[0]


def rank_zero_first(make):
    """`make()` on rank 0 first (it fills the caches: downloads, decoding, pretrained teachers), then
    on the others, which find them filled; an error on rank 0 is raised on every rank."""
    if world_size() == 1:
        return make()
    result = from_rank_zero(make)
    return result if dist.get_rank() == 0 else make()


class Placement:
    """This rank's part in a run of `world` processes, and the collectives of the training step."""

    def __init__(self, graph: Graph, place: str, rank: int, world: int, sync_bn: bool = False):
        self.graph, self.place, self.rank, self.world, self.sync_bn = graph, place, rank, world, sync_bn
        self.owner = {n.name: 0 for n in graph.model_nodes}
        self._layouts: dict = {}
        self.held: set[int] = set()  # ids of the parameters DDP averages (`data_parallel`)

    @property
    def nodes(self) -> bool:
        return self.place == "nodes"

    def assign(self, models) -> None:
        """place nodes: each model node to the least loaded rank, largest first (ties: graph order,
        lowest rank). A node's cost: its parameters, ×3 when trained (forward and backward)."""
        if not self.nodes:
            return
        cost = {
            n.name: sum(p.numel() for p in models[n.name].parameters()) * (1 if n.frozen else 3)
            for n in self.graph.model_nodes
        }
        load = [0] * self.world
        for name in sorted(cost, key=lambda k: -cost[k]):  # sorted() is stable: graph order on ties
            rank = min(range(self.world), key=lambda r: load[r])
            self.owner[name] = rank
            load[rank] += cost[name]

    def owns(self, name: str) -> bool:
        """Whether this rank runs a model node (place nodes; every rank runs every node with place data)."""
        return not self.nodes or self.owner[owner(name)] == self.rank

    def accounts_for(self, name: str) -> bool:
        """Whether this rank counts a node's metrics and back-propagates its loss (place nodes): its
        owner for a model node, rank 0 for an ensemble (whose gradient reaches remote members)."""
        if not self.nodes:
            return True
        return self.owner[owner(name)] == self.rank if owner(name) in self.owner else self.rank == 0

    # ---- the step ----------------------------------------------------------------------------
    def total(self, losses: dict):
        """What this rank back-propagates: Σ_t L_t of its targets. Other targets enter times zero, so
        that every rank's backward passes through the all-gather's collective backward."""
        if not self.nodes or self.world == 1:
            return sum(losses.values())
        return sum(v if self.accounts_for(t) else 0 * v for t, v in losses.items())

    def exchange(self, logits: dict, attention: dict, grad: bool, phase: str):
        """place nodes: every node's logits and attention maps on every rank, in one all-gather of
        one flat buffer per rank. `grad`: through `torch.distributed.nn`, so that gradients of
        remote losses reach this rank's nodes; else detached, this rank's own tensors kept live."""
        if not self.nodes or self.world == 1:
            return logits, attention
        own = [("logits", k, v) for k, v in sorted(logits.items())] + [
            ("attention", k, v) for k, v in sorted(attention.items())
        ]
        batch = own[0][2].shape[0] if own else 0
        key = (phase, batch)
        if key not in self._layouts:  # once per phase and batch size: every rank's names and shapes
            mine = [(kind, name, tuple(t.shape), t.dtype) for kind, name, t in own]
            layouts = [None] * self.world
            dist.all_gather_object(layouts, mine)
            self._layouts[key] = layouts
        layouts = self._layouts[key]
        device = next(iter(logits.values())).device if logits else torch.device("cpu")
        # One buffer of the widest dtype any rank sends: fp32 for AMP's bf16 logits beside fp32
        # maps, float64 for float64 models (the same on every rank: it is read from the layouts).
        dtype = functools.reduce(
            torch.promote_types, (d for layout in layouts for *_, d in layout), torch.float32
        )
        flat = _flatten([t.to(dtype) for _, _, t in own], dtype, device)
        longest = max(sum(_numel(shape) for _, _, shape, _ in layout) for layout in layouts)
        flat = torch.cat([flat, flat.new_zeros(longest - flat.numel())])
        if grad:
            if not flat.requires_grad:  # a rank of frozen nodes must still take part in the backward
                flat = flat.clone().requires_grad_()
            with warnings.catch_warnings():  # deprecated for functional collectives, which gloo lacks
                warnings.simplefilter("ignore", FutureWarning)
                gathered = with_grad.all_gather(flat)
        else:
            gathered = [torch.empty_like(flat) for _ in range(self.world)]
            dist.all_gather(gathered, flat.detach())
        out = {"logits": {}, "attention": {}}
        for rank, layout in enumerate(layouts):
            parts = _unflatten(gathered[rank], [shape for _, _, shape, _ in layout])
            for (kind, name, _, dtype), t in zip(layout, parts):
                out[kind][name] = t.to(dtype)
        if not grad:
            out["logits"].update(logits)
            out["attention"].update(attention)
        return out["logits"], out["attention"]

    def data_parallel(self, units) -> None:
        """place data: each unit of one trainable node run by torch's DistributedDataParallel, whose
        bucketed all-reduces of its gradients start during the backward. A fused group's nodes
        (stacked parameters under vmap, their gradients handed out after the backward) are left to
        `average_gradients`. BatchNorm statistics stay each rank's, as `share_buffers` expects; the
        ranks' weights are equal from the seed or the checkpoint, so DDP's initial broadcast is left out."""
        if self.nodes or self.world == 1:
            return
        for unit in units:
            params = [p for p in unit.module.parameters() if p.requires_grad]
            if len(unit.nodes) == 1 and not unit.nodes[0].frozen and params:
                device = params[0].device
                unit.module = DistributedDataParallel(
                    unit.module,
                    device_ids=[device] if device.type == "cuda" else None,
                    init_sync=False,
                    gradient_as_bucket_view=True,
                    static_graph=True,
                    **{NO_BUFFER_SYNC: False},
                )
                self.held.update(id(p) for p in params)

    def average_gradients(self, params) -> None:
        """place data: the gradients of every trainable node DDP does not hold (`data_parallel`)
        averaged over the ranks, in one all-reduce after the backward."""
        if self.nodes or self.world == 1:
            return

        def average(flat):
            dist.all_reduce(flat)
            flat /= self.world

        in_one_buffer([p.grad for p in params if p.grad is not None and id(p) not in self.held], average)

    # ---- metrics and state -------------------------------------------------------------------
    def metric_mask(self, device) -> torch.Tensor:
        """1 for the nodes whose step metrics this rank counts (every node with place data)."""
        return torch.tensor([float(self.accounts_for(name)) for name in self.graph.nodes], device=device)

    def reduce_epoch(self, loss_sums, correct, skipped, seen: int):
        """The epoch's per-node loss sums and correct counts over all ranks, each image counted once."""
        if self.world == 1:
            return loss_sums, correct, skipped, seen
        sums = torch.cat([loss_sums, correct])
        dist.all_reduce(sums)
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
        n = len(loss_sums)
        if self.nodes:
            return sums[:n], sums[n:], skipped, seen
        return sums[:n] / self.world, sums[n:], skipped, seen * self.world

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """place data: evaluation sums of every rank's block of the split, added."""
        if not self.nodes and self.world > 1:
            dist.all_reduce(sums)
        return sums

    def share_buffers(self, models) -> None:
        """place data: rank 0's BatchNorm statistics on every rank (without --sync-bn each rank's
        follow its own shard), so that evaluation and the checkpoint agree."""
        if self.nodes or self.world == 1:
            return
        in_one_buffer(
            [b for m in models.values() for b in m.buffers() if b.is_floating_point()],
            lambda flat: dist.broadcast(flat, src=0),
        )

    def collect_state(self, models: dict, optimizer) -> None:
        """place nodes: rank 0's copies of the other ranks' nodes brought up to date — weights,
        buffers, optimizer state — before it writes the checkpoint."""
        if not self.nodes or self.world == 1:
            return
        mine = {}
        for name, model in models.items():
            if self.owner[name] == self.rank and self.rank != 0:
                params = dict(model.named_parameters())
                state = optimizer.state if optimizer is not None else {}
                mine[name] = (
                    {k: v.cpu() for k, v in model.state_dict().items()},
                    {
                        p: {
                            k: (v.cpu(), v.device.type) if torch.is_tensor(v) else v
                            for k, v in state[t].items()
                        }
                        for p, t in params.items()
                        if t in state
                    },
                )
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank != 0:
            return
        for part in parts[1:]:
            for name, (weights, optim) in part.items():
                models[name].load_state_dict(weights)
                params = dict(models[name].named_parameters())
                for p, state in optim.items():
                    device = params[p].device
                    optimizer.state[params[p]] = {
                        k: v[0].to(device if v[1] != "cpu" else "cpu") if isinstance(v, tuple) else v
                        for k, v in state.items()
                    }


def in_one_buffer(tensors: list, collective) -> None:
    """`collective(flat)` on the tensors laid end to end in one buffer, the result written back
    into them: one collective for many small tensors (a node's dozens of gradients), not one each."""
    if tensors:
        flat = _flatten(tensors)
        collective(flat)
        for t, part in zip(tensors, _unflatten(flat, [t.shape for t in tensors])):
            t.copy_(part)


def _flatten(tensors: list, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The tensors laid end to end, flat (empty of `dtype` on `device` when there are none)."""
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    """Views of `flat`'s start, one per shape, in `_flatten`'s layout (what follows is padding)."""
    sizes = [_numel(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(flat[: sum(sizes)].split(sizes), shapes)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
