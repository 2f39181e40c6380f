"""The CUDA step's bookkeeping, on a CPU: the whole step with its fast parts (`ktfast.engine.step.Step.use_streams`)
runs with stand-in streams that record
what the step asks of them (forks, joins, which unit ran where), so the stream plan, the leases of
the process's stream pool, the pairing of the kernels' loss vector with its targets and the step's
lifetime are checked without a GPU. The numerics of the CUDA path itself are in the GPU suite."""

import gc
import itertools
import weakref
from contextlib import contextmanager

import pytest
import torch

from ktfast import Graph
from ktfast.config import TrainConfig
from ktfast.engine.build import build_trainer
from ktfast.engine.fast import StreamBank, step_losses
from ktfast.losses import loss_targets, reference_graph_losses

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(autouse=True)
def float64():
    """The comparisons run in float64: two computations of the same step that differ by a rounding
    (here the time gates' factor, k / k_end, taken once on the device and once in Python) part by
    1e-15 to 1e-12 in three steps, while a fault (a loss paired with another target, a gradient lost,
    the capture's warm-up left in the weights) moves them by 1e-3 or more; 1e-9 lies between. Not
    float32: there a pre-activation within rounding of 0 can take the ReLU's other branch on one
    side only and part the runs by O(|g|) (tests/test_fuse.py)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


DATA = "synthetic:classes=5,size=16,train=64,test=16"
# Three resnet8 (one fused group when fused) and a resnet14 (a unit of its own): four model nodes,
# two units; four targets of the loss vector, so a pairing that shifts or reverses shows.
GRAPH = {
    "version": 1,
    "name": "g",
    "target": "a",
    "nodes": [
        {"name": "a", "model": "resnet8"},
        {"name": "b", "model": "resnet8"},
        {"name": "c", "model": "resnet14"},
        {"name": "d", "model": "resnet8"},
    ],
    "edges": [
        {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
        {"from": "label", "to": "b", "loss": "ce", "gate": "through", "weight": 2.0},
        {"from": "label", "to": "c", "loss": "ce", "gate": "through"},
        {"from": "a", "to": "b", "loss": "kl", "gate": "linear", "temperature": 2.0},
        {"from": "b", "to": "d", "loss": "mse", "gate": "through", "weight": 0.5},
        {"from": "c", "to": "a", "loss": "kl", "gate": "correct"},
    ],
}


class Stream:
    """A stand-in CUDA stream: a handle like torch's, and the waits it is asked for."""

    def __init__(self, handle: int, log: list):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other) -> None:
        self.log.append(("wait", self.cuda_stream, other.cuda_stream))


class Streams:
    """What the step asks of CUDA (current stream, `with stream`), recorded."""

    def __init__(self, log: list):
        self.log, self.now = log, Stream(-1, log)
        self.active = self.now

    def current(self):
        return self.now

    @contextmanager
    def use(self, stream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before


def pool(size: int = 32, log=None):
    """torch's stream pool as seen from Python: round-robin over `size` handles."""
    handles = itertools.cycle(range(size))
    log = [] if log is None else log
    return lambda: Stream(next(handles), log)


def cfg(**kw):
    return TrainConfig(**{**dict(dataset=DATA, epochs=2, batch_size=16, device="cpu", lr=0.05), **kw})


def fast_trainer(bank=None, record=True, **kw):
    """A CPU Trainer whose step runs on stand-in streams (the fast path); the log of the waits
    and, per forward (`record`), the stream it ran on."""
    trainer = build_trainer(Graph.from_dict(GRAPH), cfg(**kw), out=None, progress=False)
    log = []
    bank = bank or StreamBank(pool(log=log))
    streams = Streams(log)
    if record:  # (the recording closure holds the trainer: a cycle of the test's own)
        forward = trainer.step.forward_unit

        def recorded(unit, x):
            log.append(("forward", unit.name, streams.active.cuda_stream))
            return forward(unit, x)

        trainer.step.forward_unit = recorded
    trainer.step.use_streams(streams, bank)
    return trainer, log


def steps(trainer, n: int) -> list[torch.Tensor]:
    trainer.train_loader.set_epoch(0)
    out, before = [], torch.zeros_like(trainer.loss_sums)
    for k, (x, y) in zip(range(n), trainer.train_loader):
        trainer.train_step(x.to(torch.get_default_dtype()), y, k + 1)
        out.append(trainer.loss_sums - before)
        before = trainer.loss_sums.clone()
    return out


def assert_same(fast, plain, got, want) -> None:
    """Per-step losses and final weights within 1e-9 of each tensor's scale (the fixture's bound)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=0)
    for name, model in plain.models.items():
        theirs = fast.models[name].state_dict()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                scale = max(v.abs().max().item(), 1e-3)
                assert (theirs[k] - v).abs().max().item() <= 1e-9 * scale, f"{name}.{k}"
            else:
                assert torch.equal(theirs[k], v), f"{name}.{k}"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_the_step_joins_exactly_the_streams_it_forked(fuse):
    trainer, log = fast_trainer(fuse=fuse)
    steps(trainer, 2)
    units = trainer.units
    assert len(units) == (2 if fuse else 4)
    forked = {w[2] for w in log if w[0] == "wait" and w[1] == -1}  # the current stream waits on them
    started = {w[1] for w in log if w[0] == "wait" and w[2] == -1}  # they wait on the current stream
    ran_on = {f[1]: f[2] for f in log if f[0] == "forward"}
    assert forked == started == set(ran_on.values())
    assert len(forked) == len(units) and ran_on.keys() == {u.name for u in units}
    assert (
        trainer.step.streams.count == len(units) + 1 and trainer.step.streams.side.cuda_stream not in forked
    )


@pytest.mark.parametrize(
    "fuse,kernels", [(True, "0"), (False, "0"), (True, "1")], ids=["fused", "unfused", "fused+kernels"]
)
def test_the_fast_step_computes_what_the_trainer_step_computes(fuse, kernels, monkeypatch):
    """Same units, same batches: the step with its streams (and its own kernel scratch) and the
    Trainer's own step compute the same (float64: the bound of the fixture above)."""
    monkeypatch.setenv("KTFAST_KERNELS", kernels)
    torch.manual_seed(0)
    fast, _ = fast_trainer(fuse=fuse)
    plain = build_trainer(Graph.from_dict(GRAPH), cfg(fuse=fuse), out=None, progress=False)
    assert (fast.step.scratches[0] is not None) == (kernels == "1")
    got, want = steps(fast, 3), steps(plain, 3)
    assert len(got) == len(want) == 3 and all(bool(w.abs().min() > 0) for w in want)
    assert_same(fast, plain, got, want)


def test_steps_of_one_process_never_share_a_stream():
    """Seven trials of 4 units + a side stream each want 35 of the pool's 32 streams: nobody
    shares, the last one gets fewer (at least one) and shares them among its own units, an eighth
    finds none, and a freed step gives its streams back."""
    bank = StreamBank(pool(32))
    leases = [bank.lease(5) for _ in range(7)]
    handles = [[s.cuda_stream for s in lease] for lease in leases]
    flat = [h for lease in handles for h in lease]
    assert len(flat) == len(set(flat)) == 32 == bank.held
    assert [len(h) for h in handles] == [5] * 6 + [2]
    with pytest.raises(RuntimeError, match="held by other steps"):
        bank.lease(1)
    bank.release(leases[0])
    assert sorted(s.cuda_stream for s in bank.lease(9)) == sorted(handles[0])


def test_a_short_bank_makes_a_step_share_streams_among_its_own_units():
    bank = StreamBank(pool(32))
    bank.lease(30)
    trainer, log = fast_trainer(bank=bank, fuse=False)  # wants 5, gets 2: the side stream and one
    steps(trainer, 1)
    plan = trainer.step.streams
    assert plan.count == 2 and len(plan.forks) == 1 and len(plan.forks[0][1]) == 4
    assert {f[2] for f in log if f[0] == "forward"} == {plan.forks[0][0].cuda_stream}


def test_a_finished_trainer_is_freed_without_the_garbage_collector():
    """The step holds its trainer weakly: nothing of a finished trial (models, CUDA graphs, their
    memory pools, its streams) waits for a collection."""
    torch.set_default_dtype(torch.float32)  # a run as users run it (the fixture puts float64 back after)
    bank = StreamBank(pool(32))
    gc.collect()
    gc.disable()
    try:
        trainer, _ = fast_trainer(bank=bank, record=False)
        trainer.fit()
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None
        assert bank.held == 0
    finally:
        gc.enable()


def test_the_kernels_loss_vector_is_paired_with_its_targets(monkeypatch):
    """The fused kernels hand out one vector of L_t: each entry must reach its own target. Four
    targets with different weights and losses (a reversed or shifted pairing shows) against the
    reference, through Triton's interpreter."""
    pytest.importorskip("triton")
    graph = Graph.from_dict(GRAPH)
    torch.manual_seed(1)
    logits = {
        n.name: torch.randn(8, 5, dtype=torch.float32) * (i + 1) for i, n in enumerate(graph.model_nodes)
    }
    labels = torch.randint(0, 5, (8,))
    factor = torch.tensor(0.25, dtype=torch.float32)
    got, total = step_losses(graph, logits, labels, factor, 1, None)
    want = reference_graph_losses(graph, logits, labels, step=1, total_steps=4)
    assert list(got) == loss_targets(graph) == list(want) and len(want) == 4
    values = torch.stack(list(want.values()))
    assert len(set(values.tolist())) == 4  # distinct: any other pairing differs
    # float32 sums of ≤ 5 classes × 8 rows per edge: a few roundings of values ≤ 20 (1e-6 relative)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total, values.sum(), rtol=1e-5, atol=1e-6)


def test_the_lr_schedule_fills_the_optimizers_lr_tensor_in_place_and_checkpoints_hold_floats():
    """On the captured step each group's lr is a device tensor the graph reads: the schedule must
    change it in place (a new object would leave the graph at the old lr), a checkpoint holds plain
    floats, and loading one keeps the tensor."""
    from ktfast.engine.optim import load_keeping_lr_tensors, plain_lrs, plain_schedule

    w = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.1)
    opt = torch.optim.SGD([{"params": [w], "lr": lr}], lr=0.1, momentum=0.9, foreach=False)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)
    w.grad = torch.ones(3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)
    saved = plain_lrs(opt.state_dict())
    assert type(saved["param_groups"][0]["lr"]) is float
    assert all(type(v) is float for v in plain_schedule(sched.state_dict())["_last_lr"])
    saved["param_groups"][0]["lr"] = 0.001
    load_keeping_lr_tensors(opt, saved)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.001)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_on_a_gpu_five_steps_of_nine_streams_get_distinct_streams():
    """45 streams from the real pool of 32: every step's own, none shared across steps."""
    bank = StreamBank(lambda: torch.cuda.Stream())
    plans = [[s.cuda_stream for s in bank.lease(9)] for _ in range(5)]
    flat = [h for plan in plans for h in plan]
    assert len(flat) == len(set(flat)) <= 32 and all(plan for plan in plans)


@cuda
@pytest.mark.parametrize("model", ["resnet8", "abn18"])
def test_on_a_gpu_a_fused_group_runs_batchnorm_as_its_nodes(model):
    """vmap's BatchNorm in training mode takes cuDNN's path on a GPU: the fused group must run
    and equal its members (or the trainer falls back to them; under KTFAST_STRICT, as in the GPU
    suite, that is an error)."""
    from ktfast.engine.fuse import FusedGroup, fusion_fault

    size = 32 if model == "resnet8" else 64
    g = Graph.from_dict(
        {
            "version": 1,
            "name": "g",
            "target": "a",
            "nodes": [{"name": "a", "model": model}, {"name": "b", "model": model}],
            "edges": [
                {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
                {"from": "a", "to": "b", "loss": "kl", "gate": "through"},
            ],
        }
    )
    trainer = build_trainer(
        g,
        cfg(device="cuda", dataset=f"synthetic:classes=5,size={size},train=32,test=8", fuse=True),
        out=None,
        progress=False,
    )
    (unit,) = trainer.units
    assert isinstance(getattr(unit.module, "_orig_mod", unit.module), FusedGroup)
    x = torch.randn(8, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    assert fusion_fault(unit, x, False) is None


def test_a_capture_that_fails_falls_back_to_the_eager_step_and_computes_what_it_computes(monkeypatch, capsys):
    """The capture's warm-up takes two real optimizer steps, then the capture fails (as where a
    CUDA graph cannot be captured): the state is put back, the run goes on eagerly, one line says
    so, and every step computes what the eager step computes."""
    monkeypatch.delenv("KTFAST_STRICT", raising=False)

    class Graph_:
        def capture_begin(self, **kw):
            raise RuntimeError("operation not permitted when stream is capturing")

        def capture_end(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph_)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    torch.manual_seed(0)
    fast, _ = fast_trainer(fuse=True)
    fast.paths["cuda_graph"] = "on"  # as on a GPU
    plain = build_trainer(Graph.from_dict(GRAPH), cfg(fuse=True), out=None, progress=False)
    got, want = steps(fast, 3), steps(plain, 3)
    assert fast.paths["cuda_graph"] == "off" and fast.step.captures == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "falls back" in line] == [
        "ktfast: cuda_graph falls back to off: RuntimeError: operation not permitted when stream is capturing"
    ]
    assert_same(fast, plain, got, want)
