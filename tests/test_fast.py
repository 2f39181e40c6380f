"""The fast path computes what the reference path computes: same per-step losses, same updates.

On CPU the fast path is the compiled step (torch.compile of every node); on CUDA it adds streams,
channels_last, fused kernels, the fused optimizer and the CUDA-graph capture of the whole step.
"""

import pytest
import torch

from ktfast import Graph
from ktfast.config import TrainConfig
from ktfast.engine import build, trainer
from ktfast.engine.build import build_trainer
from ktfast.engine.trainer import Trainer

DATA = "synthetic:classes=6,size=16,train=128,test=32"
GRAPH = {
    "version": 1,
    "name": "three",
    "target": "a",
    "nodes": [
        {"name": "a", "model": "resnet8"},
        {"name": "b", "model": "resnet8"},
        {"name": "c", "model": "resnet14"},
        {"name": "ens", "ensemble": ["a", "b", "c"]},
    ],
    "edges": [
        {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
        {"from": "label", "to": "b", "loss": "ce", "gate": "correct"},
        {"from": "label", "to": "c", "loss": "ce", "gate": "linear"},
        {"from": "b", "to": "a", "loss": "kl", "gate": "linear", "temperature": 2.0},
        {"from": "c", "to": "a", "loss": "kl", "gate": "correct"},
        {"from": "a", "to": "b", "loss": "kl+att_mse", "gate": "through", "crops": [1, 3]},
        {"from": "ens", "to": "c", "loss": "kl", "gate": "through"},
    ],
}


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))


def per_step_losses(cfg: TrainConfig, steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The graph's per-step losses, the models built and run in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return step_by_step(build_trainer(Graph.from_dict(GRAPH), cfg, out=None, progress=False), steps)
    finally:
        torch.set_default_dtype(previous)


def step_by_step(trainer: Trainer, steps: int) -> list[torch.Tensor]:
    """Each step's per-node losses, as the step adds them to the epoch sums (images in the dtype the
    sums, like the models, were built in)."""
    trainer.train_loader.set_epoch(0)
    out, previous = [], torch.zeros_like(trainer.loss_sums)
    for k, (x, y) in zip(range(steps), trainer.train_loader):
        trainer.train_step(x.to(trainer.loss_sums.dtype), y, k + 1)
        now = trainer.loss_sums.detach().clone()
        out.append((now - previous).cpu())
        previous = now
    return out


def config(**kw):
    base = dict(dataset=DATA, epochs=2, batch_size=32, device="cpu", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def test_compiled_cpu_step_matches_reference(monkeypatch):
    """In float64. Compiled, the step fuses and reorders the same sums: rounding, ~1e-16 amplified by
    three steps (measured: 4e-16), where a fault (a gate's factor, a loss term, a BatchNorm mode
    that differs) moves an O(1) loss by 1e-3 or more. 1e-9 lies six orders from either, relative
    and absolute alike (the losses are of order 1). Not float32: an arg-max near-tie (the `correct`
    gates) or a pre-activation within rounding of 0 goes the other way on one path, and the losses
    part by O(1/B) at once."""
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    ref = per_step_losses(config(reference=True), 3, torch.float64)
    fast = per_step_losses(config(compile=True), 3, torch.float64)
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9)


def test_cuda_graph_flag_is_ignored_on_a_cpu(monkeypatch):
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    steps = {}
    for flag in (True, False):
        trainer = build_trainer(Graph.from_dict(GRAPH), config(cuda_graph=flag), out=None, progress=False)
        assert trainer.step.streams is None
        steps[flag] = step_by_step(trainer, 2)
    for a, b in zip(steps[True], steps[False]):
        assert torch.equal(a, b)


def test_amp_step_stays_within_bound(monkeypatch):
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    ref = per_step_losses(config(reference=True), 3)
    amp = per_step_losses(config(amp=True), 3)
    # Another computation, not another order: float64 cannot help. bf16 keeps 8 significant bits
    # (u = 2^-8 ≈ 4e-3); autocast rounds both operands of each of ResNet-14's 14 convolutions and
    # linear layers (2u each, accumulated in fp32), and independent roundings add in quadrature:
    # 2u·√14 ≈ 3e-2 of a forward's logits and losses. The updates differ by as much of lr·g, which
    # moves the next steps' losses by a few % of that again: 5e-2, relative and absolute (the
    # losses are of order 1). Measured: 7e-4 at most, on AVX-512, AVX2 and without vectors.
    for r, a in zip(ref, amp):
        torch.testing.assert_close(a, r, rtol=5e-2, atol=5e-2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize(
    "compile_,graph",
    [(False, False), (False, True), (True, True)],
    ids=["streams", "cudagraph", "compile+cudagraph"],
)
def test_cuda_fast_step_matches_reference(compile_, graph):
    ref = per_step_losses(config(device="cuda", reference=True), 4)
    fast = per_step_losses(config(device="cuda", compile=compile_, cuda_graph=graph), 4)
    for r, f in zip(ref, fast):
        # cuDNN picks different convolution algorithms on each path: float32 rounding, not more.
        torch.testing.assert_close(f, r, rtol=2e-3, atol=2e-3)


def graphed_and_eager(monkeypatch, **kw) -> dict:
    """{cuda_graph: (trainer, per-step losses)} over 6 steps of the same batches: the linear gates'
    factor changes every step and the schedule divides the lr by 10 after step 3."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same algorithm on both paths
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = {}
    for graph in (False, True):
        trainer = build_trainer(
            Graph.from_dict(GRAPH), config(device="cuda", cuda_graph=graph, **kw), out=None, progress=False
        )
        assert trainer.step.use_graph == graph and trainer.cfg.milestones()[0] == 1
        trainer.train_loader.set_epoch(0)
        batches = list(trainer.train_loader)
        batches = batches + batches[:2]
        losses, previous = [], torch.zeros_like(trainer.loss_sums)
        for k, (x, y) in enumerate(batches):
            if k == 3:
                trainer.scheduler.step()
            trainer.train_step(x, y, k + 1)
            now = trainer.loss_sums.clone()
            losses.append(now - previous)
            previous = now
        assert float(trainer.optimizer.param_groups[0]["lr"]) == pytest.approx(0.005)
        # The lr is read from the device: the milestone changed it without a second capture.
        assert trainer.step.captures == graph
        out[graph] = trainer, losses
    return out


def state(trainer) -> dict:
    tensors = {f"{k}.{n}": v for k, m in trainer.models.items() for n, v in m.state_dict().items()}
    tensors.update(
        (f"momentum {i}", s["momentum_buffer"]) for i, s in enumerate(trainer.optimizer.state.values())
    )
    tensors["correct"] = trainer.correct
    return tensors


@cuda
def test_cuda_graph_step_equals_eager_fast_step(monkeypatch):
    """Captured and replayed, the step computes what the eager fast step computes: the same kernels
    in the same order on the same data (deterministic cuDNN), so fp32 agrees to a few roundings:
    the tolerance is fp32's own (8 ulps), not a fit."""
    runs = graphed_and_eager(monkeypatch)
    (eager, eager_losses), (graphed, graphed_losses) = runs[False], runs[True]
    tol = dict(rtol=8 * torch.finfo(torch.float32).eps, atol=8 * torch.finfo(torch.float32).eps)
    for a, b in zip(graphed_losses, eager_losses):
        torch.testing.assert_close(a, b, **tol)
    eager_state = state(eager)
    for name, value in state(graphed).items():
        torch.testing.assert_close(value, eager_state[name], **tol, msg=name)


@cuda
def test_fp16_grad_scaler_step_is_captured(monkeypatch):
    """fp16 with the grad scaler: captured too (the fused SGD takes the scaler's scale and inf flag
    on the device), and the scale, which the captured update changes in place, ends as the eager
    step's does."""
    for module in (build, trainer):  # the run's grad scaler and step (build), its evaluation (trainer)
        monkeypatch.setattr(module, "amp_dtype", lambda cfg: torch.float16)
    runs = graphed_and_eager(monkeypatch, amp=True)
    (eager, eager_losses), (graphed, graphed_losses) = runs[False], runs[True]
    assert graphed.scaler.is_enabled() and graphed.step.captures == 1
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()
    # fp16 activations: the two paths may round differently where cuBLAS picks another algorithm.
    tol = dict(rtol=8 * torch.finfo(torch.float16).eps, atol=8 * torch.finfo(torch.float16).eps)
    for a, b in zip(graphed_losses, eager_losses):
        torch.testing.assert_close(a, b, **tol)


@cuda
def test_cuda_graph_epoch_metrics_match_eager_fast_path():
    rows = {}
    for graph in (False, True):
        trainer = build_trainer(
            Graph.from_dict(GRAPH), config(device="cuda", cuda_graph=graph), out=None, progress=False
        )
        rows[graph] = trainer.fit()
    for a, b in zip(rows[False], rows[True]):
        for node in a["train"]:
            assert a["train"][node]["loss"] == pytest.approx(b["train"][node]["loss"], rel=1e-2, abs=1e-3)
