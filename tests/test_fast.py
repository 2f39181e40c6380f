"""The fast path computes what the reference path computes: same per-step losses, same updates.

On CPU the fast path is the compiled step (torch.compile of every node); on CUDA it adds streams,
channels_last, fused kernels, the fused optimizer and the CUDA-graph capture of the whole step.
"""
import pytest
import torch

from ktfast import Graph
from ktfast.config import TrainConfig
from ktfast.train import Trainer

DATA = "synthetic:classes=6,size=16,train=128,test=32"
GRAPH = {"version": 1, "name": "three", "target": "a",
         "nodes": [{"name": "a", "model": "resnet8"}, {"name": "b", "model": "resnet8"},
                   {"name": "c", "model": "resnet14"}, {"name": "ens", "ensemble": ["a", "b", "c"]}],
         "edges": [{"from": "label", "to": "a", "loss": "ce", "gate": "through"},
                   {"from": "label", "to": "b", "loss": "ce", "gate": "correct"},
                   {"from": "label", "to": "c", "loss": "ce", "gate": "linear"},
                   {"from": "b", "to": "a", "loss": "kl", "gate": "linear", "temperature": 2.0},
                   {"from": "c", "to": "a", "loss": "kl", "gate": "correct"},
                   {"from": "a", "to": "b", "loss": "kl+att_mse", "gate": "through", "crops": [1, 3]},
                   {"from": "ens", "to": "c", "loss": "kl", "gate": "through"}]}


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))


def per_step_losses(cfg: TrainConfig, steps: int) -> list[torch.Tensor]:
    trainer = Trainer(Graph.from_dict(GRAPH), cfg, out=None, progress=False)
    trainer.train_loader.set_epoch(0)
    out, previous = [], torch.zeros_like(trainer.loss_sums)
    for k, (x, y) in zip(range(steps), trainer.train_loader):
        trainer.train_step(x, y, k + 1)
        now = trainer.loss_sums.detach().clone()
        out.append((now - previous).cpu())
        previous = now
    return out


def config(**kw):
    base = dict(dataset=DATA, epochs=2, batch_size=32, device="cpu", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def test_compiled_cpu_step_matches_reference(monkeypatch):
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    ref = per_step_losses(config(reference=True), 3)
    fast = per_step_losses(config(compile=True), 3)
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


def test_amp_step_stays_within_bound(monkeypatch):
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    ref = per_step_losses(config(reference=True), 3)
    amp = per_step_losses(config(amp=True), 3)
    # bf16 activations: about 3 significant digits per op, compounded through 14 layers.
    for r, a in zip(ref, amp):
        torch.testing.assert_close(a, r, rtol=5e-2, atol=5e-2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("compile_", [False, True], ids=["streams", "compile+cudagraph"])
def test_cuda_fast_step_matches_reference(compile_):
    ref = per_step_losses(config(device="cuda", reference=True), 4)
    fast = per_step_losses(config(device="cuda", compile=compile_), 4)
    for r, f in zip(ref, fast):
        # cuDNN picks different convolution algorithms on each path: float32 rounding, not more.
        torch.testing.assert_close(f, r, rtol=2e-3, atol=2e-3)


@cuda
def test_cuda_graph_epoch_metrics_match_eager_fast_path():
    rows = {}
    for compile_ in (False, True):
        trainer = Trainer(Graph.from_dict(GRAPH), config(device="cuda", compile=compile_), out=None, progress=False)
        rows[compile_] = trainer.fit()
    for a, b in zip(rows[False], rows[True]):
        for node in a["train"]:
            assert a["train"][node]["loss"] == pytest.approx(b["train"][node]["loss"], rel=1e-2, abs=1e-3)
