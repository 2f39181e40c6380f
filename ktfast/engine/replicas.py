"""Seeds as replicas (docs/ARCHITECTURE.md §2): `--seeds 0,1,2` trains the S runs of one graph in one process as
one step. Each seed's run is an ordinary Trainer — its own seeded initialisation, data loader
(order and augmentation), optimizer, schedule, metric sums and run directory `OUT/seed{s}` — and
`Replicas` steps them together: each node is stacked with its counterparts of the other replicas
(and, with `--fuse`, with the nodes of its fusion group) into one `ReplicaGroup`, which runs the
model once under two `vmap`s, over the replicas (each on its own batch) and over the nodes.

The step is the Trainer's step over S graphs at once: one forward of every group, each replica's
losses from its own logits and labels, Σ of all replicas' losses back-propagated once (the replicas
share no tensor, so each one's gradients are those of its own Σ_t L_t), every replica's optimizer
stepped: the one training step (`ktfast.engine.step.Step`) with stacked units and a per-seed loss split;
on CUDA with its fast parts (streams, fused kernels, the whole step as one CUDA graph).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch
from torch.func import functional_call, vmap

from ktfast.config import TrainConfig
from ktfast.data import dataset_info
from ktfast.engine.fast import CudaStreams, stream_bank
from ktfast.engine.fuse import FusedGroup, Unit, fusion_fault, fusion_groups
from ktfast.engine.nodes import attention_nodes, branch_nodes
from ktfast.engine.step import Step, seed_name
from ktfast.engine.trainer import Trainer, autocast, forward
from ktfast.hold import hold
from ktfast.internals import uncompiled
from ktfast.paths import Compiled, amp_dtype, fall_back

HEADROOM = 0.8  # the share of the free GPU memory the replicas of one group may take


def replica_reason(cfg: TrainConfig, world: int) -> str:
    """Why the seeds of a run train one by one rather than as replicas ("" where they can)."""
    if world > 1:
        return f"{world} processes (a replica step has no collectives)"
    if cfg.reference:
        return "--reference (the reference path stacks nothing)"
    if cfg.amp and amp_dtype(cfg) == torch.float16:
        return "fp16's grad scaler (each seed's skips its own steps)"
    return ""


def seed_groups(configs: list, per_group: int) -> list[list]:
    """`configs` in as few groups of at most `per_group` as there can be, of sizes within one."""
    count = math.ceil(len(configs) / per_group)
    size, extra = divmod(len(configs), count)
    groups, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        groups.append(configs[start:end])
        start = end
    return groups


def replicas_per_group(trainer: Trainer, count: int) -> int:
    """How many replicas of `trainer`'s run fit in the GPU's free memory (all `count` on a CPU):
    one replica's step measured (its activations' peak, from a forward and backward of a batch of
    random images) plus its weights and optimizer state, twice the activations since a captured
    step keeps a memory pool of its own beside the eager warm-up's."""
    device = torch.device(trainer.cfg.device)
    if device.type != "cuda" or count == 1:
        return count
    models = trainer.models
    weights = sum(p.numel() * p.element_size() for p in models.parameters())
    saved = [b.clone() for b in models.buffers()]
    size = dataset_info(trainer.cfg.dataset, trainer.cfg.data_dir).image_size
    x = torch.randn(trainer.cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with autocast(trainer.cfg):
        logits, _ = forward(
            trainer.units,
            x.to(device).contiguous(memory_format=torch.channels_last),
            attention_nodes(trainer.graph),
        )
    trained = [z.float().square().mean() for z in logits.values() if z.requires_grad]
    if trained:
        sum(trained).backward()
    activations = torch.cuda.max_memory_allocated(device) - base
    del logits, trained
    models.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, old in zip(models.buffers(), saved):
            b.copy_(old)
    free, _ = torch.cuda.mem_get_info(device)
    need = 2 * activations + 3 * weights
    return max(1, min(count, int(HEADROOM * free // max(need, 1))))


def _fall_back(trainers: list[Trainer], switch: str, path: str, error: BaseException) -> None:
    """As a Trainer's fallback, said once for all replicas, recorded in each one's config.json."""
    first = trainers[0].paths
    fall_back(first, switch, path, f"{type(error).__name__}: {error}")
    for r in trainers:
        r.paths.update(first)
        r.paths.record()


def train_replicas(configs: list, build, fit=None, say=print) -> dict[int, list[dict]]:
    """Train the runs of `configs` (one per seed) as replicas, in as few groups as fit in memory;
    `build(cfg)` makes a seed's Trainer (and its run directory), `fit(trainers)` trains a group
    ({seed: rows}; default `Replicas(trainers).fit()`). {seed: the metrics rows}."""
    fit = fit or (lambda trainers: Replicas(trainers).fit())
    first = build(configs[0])
    per_group = replicas_per_group(first, len(configs))
    groups = seed_groups(configs, per_group)
    if len(groups) > 1:
        say(
            f"--seeds: {len(configs)} replicas do not fit in GPU memory together: they train in {len(groups)} "
            f"groups, seeds {' then '.join(','.join(str(c.seed) for c in g) for g in groups)}",
            flush=True,
        )
    rows = {}
    for i, group in enumerate(groups):
        trainers = ([first] if i == 0 else []) + [build(cfg) for cfg in group[1 if i == 0 else 0 :]]
        first = None  # a finished group's memory is free for the next
        rows.update(fit(trainers))
        del trainers
    return rows


class ReplicaGroup(FusedGroup):
    """The counterparts of N nodes of one architecture in S replicas, members replica-major
    (replica 0's N nodes, then replica 1's, ...). `forward(x)` takes x [S, B, C, H, W], one batch
    per replica, which each of the replica's nodes sees; or x [B, C, H, W], seen by every member
    (as FusedGroup's, which the fusion check and evaluation use). Outputs stacked [S·N, ...]."""

    def __init__(self, members: list, replicas: int):
        super().__init__(members)
        self.replicas = replicas

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x[i // (len(self.members) // self.replicas)] if x.dim() == 5 else x

    def forward(self, x, **options):
        if x.dim() != 5:
            return super().forward(x, **options)
        shape = (self.replicas, len(self.members) // self.replicas)

        def one(params, buffers, x):
            return functional_call(self.members[0], (params, buffers), (x,), options)

        params = {name: p.unflatten(0, shape) for name, p in zip(self.param_names, self.params)}
        buffers = {
            name: getattr(self, f"buffer{k}").unflatten(0, shape) for k, name in enumerate(self.buffer_names)
        }
        nodes = vmap(one, in_dims=(0, 0, None), randomness="error")  # a replica's nodes, on its batch
        return _flatten(vmap(nodes, randomness="error")(params, buffers, x))


def _flatten(out):
    if torch.is_tensor(out):
        return out.flatten(0, 1)
    return type(out)(_flatten(o) for o in out)


class Optimizers:
    """The replicas' optimizers as the step asks of one."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @property
    def param_groups(self) -> list:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _replica_input(count: int, unit: Unit, x):
    """x: the replicas' batches concatenated; a unit of one node (a group that could not be fused)
    sees its replica's."""
    x = x.view(count, -1, *x.shape[1:])
    return x if isinstance(uncompiled(unit.module), ReplicaGroup) else x[int(unit.name.split("/", 1)[0])]


class Replicas:
    """The Trainers of one graph's seeds (built alike, one process; `replica_reason` is empty),
    stepped as one by a `Step` of their stacked units and their sums. `train_step(x, y, step)` takes
    the replicas' batches concatenated: x [S·B, ...]."""

    def __init__(self, trainers: list[Trainer]):
        t = self.first = trainers[0]
        self.trainers, self.graph, self.cfg, self.count = trainers, t.graph, t.cfg, len(trainers)
        units = self._units(dataset_info(t.cfg.dataset, t.cfg.data_dir).image_size)
        for r in trainers:  # each evaluates with its own nodes; its own fused groups are stale now
            r.units = [
                Unit([n], r.models[n.name], n.name in branch_nodes(r.graph)) for n in r.graph.model_nodes
            ]
            r.step = None  # (and its streams go back to the bank)
        models = {seed_name(s, k): m for s, r in enumerate(trainers) for k, m in r.models.items()}
        want_attention = {seed_name(s, n) for s in range(self.count) for n in attention_nodes(t.graph)}
        self.step = Step(
            t.graph,
            units,
            models,
            Optimizers([r.optimizer for r in trainers]) if t.optimizer is not None else None,
            t.scaler,  # disabled: fp16's scaler trains one by one (replica_reason)
            [r.sums for r in trainers],
            paths=t.paths,
            fall_back=functools.partial(_fall_back, trainers),
            total_steps=t.total_steps,
            want_attention=want_attention,
            device=t.cfg.device,
            amp=amp_dtype(t.cfg) if t.cfg.amp else None,
            placement=t.placement,
            compiled=t.cfg.compile,
            per_seed=True,
            inputs=functools.partial(_replica_input, self.count),
        )
        if torch.device(t.cfg.device).type == "cuda":
            self.step.use_streams(CudaStreams(self.step.device), stream_bank(self.step.device))

    @property
    def units(self) -> list[Unit]:
        return self.step.units

    def _units(self, image_size: int) -> list[Unit]:
        """A ReplicaGroup per fusion group (with fuse) or per node, checked as a Trainer's fused
        groups are (`ktfast.engine.build.check_fusion`): where one cannot stand in for its members, they
        run one by one."""
        t, count = self.first, len(self.trainers)
        want_attention, want_branches = attention_nodes(t.graph), branch_nodes(t.graph)
        groups = (
            fusion_groups(t.graph, want_attention, want_branches)
            if t.cfg.fused()
            else [[n] for n in t.graph.model_nodes]
        )
        x = torch.randn(count, 2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        x = x.to(t.cfg.device)
        units = []
        for group in groups:
            nodes = [dataclasses.replace(n, name=seed_name(s, n.name)) for s in range(count) for n in group]
            members = [uncompiled(r.models[n.name]) for r in self.trainers for n in group]
            branches = group[0].name in want_branches
            if len(members) == 1:  # one replica's one node (a group of one seed): as its Trainer runs it
                units.append(Unit(nodes, self.trainers[0].models[group[0].name], branches))
                continue
            unit = Unit(nodes, ReplicaGroup(members, count), branches)
            fault = fusion_fault(unit, x, group[0].name in want_attention)
            if fault is not None:
                _fall_back(
                    self.trainers,
                    "fuse",
                    "off",
                    RuntimeError(f"replicas of {', '.join(n.name for n in group)}: {fault}"),
                )
                units += [Unit([n], m, branches) for n, m in zip(nodes, members)]
                continue
            if t.cfg.compile:
                unit.module = Compiled(
                    unit.module, t.paths, functools.partial(_fall_back, self.trainers, "compile", "off")
                )
            units.append(unit)
        return units

    def train_step(self, x, y, step) -> None:
        """Every replica's step, as one."""
        self.step(x, y, step)

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, on_epoch: list | None = None) -> dict[int, list[dict]]:
        """Every replica's Trainer.fit, the epochs' steps taken together: {seed: metrics rows}.
        `on_epoch`: each replica's callback (or None), as Trainer.fit's."""
        trainers, t = self.trainers, self.first
        on_epoch = on_epoch or [None] * self.count
        rows = {r.cfg.seed: [] for r in trainers}
        for r in trainers:
            r.paths.start()
        while t.epoch < t.cfg.epochs:
            start = time.perf_counter()
            for r in trainers:
                r.start_epoch()
            seen = steps = 0
            for batches in t.bar(zip(*(r.train_loader for r in trainers))):
                steps += 1
                x, y = (torch.cat(part) for part in zip(*batches))
                self.train_step(x, y, t.epoch * t.steps_per_epoch + steps)
                seen += batches[0][1].shape[0]
                hold(t.epoch + 1, steps)  # returns at once outside the tests
            epochs = [r.close_epoch(seen, steps, start) for r in trainers]
            for r, epoch, callback in zip(trainers, epochs, on_epoch):
                rows[r.cfg.seed].append(r.end_epoch(start, *epoch, callback))
        return rows
