"""Train a graph through the Python API (docs/python_api.md), then fine-tune its nodes in a loop of
one's own with the same transfer step.

    python examples/custom/train_api.py                       # examples/custom/graph.json
    python examples/custom/train_api.py examples/dml2_resnet8.json --epochs 1 --train-fraction 0.1

It prints each epoch's test accuracies (from a callback: the place for W&B or MLflow), reads the run
back, and runs one more epoch of `ktfast.TransferStep` over the trained models.
"""

import argparse
from pathlib import Path

import torch

import ktfast
from ktfast.data import make_loader

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("graph", nargs="?", default=str(HERE / "graph.json"))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-fraction", type=float, default=None)
    p.add_argument("--out", default="runs/custom-api")
    args = p.parse_args()

    def report(row: dict) -> None:  # a callback: each epoch's metrics row
        accs = ", ".join(f"{node} {v['acc']:.1%}" for node, v in row["test"].items())
        print(f"epoch {row['epoch']}: test {accs}", flush=True)

    run = ktfast.train(
        args.graph,
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=32,
        lr=0.05,
        train_fraction=args.train_fraction,
        out=args.out,
        callbacks=[report],
    )
    run = ktfast.load_run(run.dir)  # what a later session would do
    graph, cfg = run.graph, run.config

    # One more epoch in a loop of one's own: the trained models, a gentler optimizer of one's choice.
    models = run.models
    trainable = [p for node in graph.trainable for p in models[node.name].parameters()]
    optimizer = torch.optim.SGD(trainable, lr=0.005, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = make_loader(
        cfg.dataset, "train", cfg.batch_size, cfg.device, seed=1, train_fraction=cfg.train_fraction
    )
    step = ktfast.TransferStep(graph, models, optimizer, total_steps=len(loader))
    for x, y in loader:
        losses = step(x, y)
    print("own loop, last step:", ", ".join(f"{t} {v:.3f}" for t, v in losses.items()))


if __name__ == "__main__":
    main()
