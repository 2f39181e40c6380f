"""Work for tests/test_distributed.py, run by one process or by each rank of a torchrun launch:

torchrun --nproc-per-node 2 tests/dist_steps.py steps GRAPH PLACE SYNC_BN OUT
    a few training steps of a graph in float64; rank 0 saves the per-step losses and the final weights.
torchrun --nproc-per-node 2 tests/dist_steps.py batchnorm OUT
    GlobalBatchNorm in float64 on each rank's half of a batch; rank 0 saves its gradients.
"""

import json
import sys

import torch

from ktfast.config import TrainConfig
from ktfast.engine import distributed
from ktfast.engine.distributed import Placement, rank_zero_first
from ktfast.engine.run import make_trainer, pretrained_paths
from ktfast.engine.sync_bn import GlobalBatchNorm
from ktfast.graph import Graph

STEPS = 3
# Random images: digits' blank borders make BatchNorm ill-conditioned, and there, in float32, 1 or 2
# CPU threads alone (a different summation order) part the weights by 7e-5 within three steps.
CONFIG = dict(
    dataset="synthetic:classes=10,size=16,train=256,test=64",
    epochs=1,
    batch_size=32,
    lr=0.05,
    device="cpu",
    loader="gpu",
)


def steps(graph: Graph, place: str, sync_bn: bool, rank: int = 0, world: int = 1) -> dict:
    """{"losses": [per node L_t (or CE) and correct count, per step], "start" and "models": {node: state
    dict} before and after the steps}, computed in float64: the models are built in it, the images
    cast to it (pretrained teachers are trained first, in float32, as a run trains them)."""
    cfg = TrainConfig(**CONFIG, place=place, world_size=world, sync_bn=sync_bn)
    rank_zero_first(lambda: pretrained_paths(graph, cfg, progress=False))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        placement = Placement(graph, place, rank, world, sync_bn)
        trainer = make_trainer(graph, cfg, out=None, progress=False, placement=placement)
        start = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in trainer.models.items()}
        losses = []
        for step, (x, y) in enumerate(trainer.train_loader, 1):
            trainer.loss_sums.zero_()
            trainer.correct.zero_()
            trainer.train_step(x.double(), y, step)
            loss, correct, _, _ = placement.reduce_epoch(
                trainer.loss_sums.clone(), trainer.correct.clone(), trainer.skipped.clone(), 0
            )
            losses.append(torch.cat([loss, correct]).tolist())
            if step == STEPS:
                break
        placement.collect_state(dict(trainer.models), trainer.optimizer)
    finally:
        torch.set_default_dtype(default)
    return {
        "losses": losses,
        "start": start,
        "models": {k: m.state_dict() for k, m in trainer.models.items()},
    }


def batchnorm_case():
    """(input [8, 3, 4, 4], weight, bias, target) in float64: a BatchNorm with non-trivial affine terms."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1
    target = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    return (
        x,
        torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64),
        torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64),
        target,
    )


def batchnorm_grads(bn, x, target, world: int = 1) -> dict:
    """Gradients of mean((bn(x) · target)³) over the global batch (each rank holds its share of it),
    with the running statistics after the step."""
    x = x.clone().requires_grad_()
    (bn(x) * target).pow(3).sum().div(x.shape[0] * world).backward()
    return {
        "x": x.grad,
        "weight": bn.weight.grad,
        "bias": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def main(argv) -> None:
    torch.set_num_threads(1)
    with distributed.process_group("cpu") as (rank, world):
        if argv[0] == "steps":
            graph_file, place, sync_bn, out = argv[1:]
            result = steps(Graph.load(graph_file), place, json.loads(sync_bn), rank, world)
        else:
            out = argv[1]
            x, weight, bias, target = batchnorm_case()
            share = x.shape[0] // world
            bn = GlobalBatchNorm(3).double()
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
            part = slice(rank * share, (rank + 1) * share)
            result = batchnorm_grads(bn, x[part], target[part], world)
            for key in ("weight", "bias"):  # the parameters' gradients: each rank's share, added
                torch.distributed.all_reduce(result[key])
            xs = [torch.empty_like(result["x"]) for _ in range(world)]
            torch.distributed.all_gather(xs, result["x"])
            result["x"] = torch.cat(xs)
        if rank == 0:
            torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
