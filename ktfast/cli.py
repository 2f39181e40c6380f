"""The `ktfast` command line (DESIGN §7). Bad input ends with exit code 2 and one line."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ktfast.config import TrainConfig
from ktfast.data import DatasetError, dataset_info
from ktfast.graph import Graph, GraphError


class UsageError(ValueError):
    """A bad command-line value; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise UsageError(message)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The flags that set a training run's recipe; defaults are the papers' CIFAR recipe."""
    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="digits (offline default), cifar10, cifar100, tinyimagenet, "
                   "imagefolder:path=DIR[,size=S,crop=C], synthetic[:classes=C,size=S,train=N,test=N]")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-decay-at", type=_floats, default=d.lr_decay_at,
                   help="fractions of the run at which the lr is multiplied by --lr-decay (0.3,0.6,0.9)")
    p.add_argument("--lr-decay", type=float, default=d.lr_decay)
    p.add_argument("--train-fraction", type=float, default=None,
                   help="train on a class-balanced fraction of the training set")
    p.add_argument("--loader", default=d.loader,
                   help="auto | dali | gpu | torch: DALI pipeline, device-resident tensors, torchvision on the CPU")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision: bf16 where supported, fp16 with a grad scaler otherwise")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=d.cuda_graph,
                   help="on CUDA, capture the whole training step as one CUDA graph and replay it "
                        "(default on; ignored on a CPU)")
    p.add_argument("--reference", action="store_true", help="plain eager PyTorch losses (the reference path)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")


def config_from_args(args, seed: int = 0) -> TrainConfig:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise UsageError(f"--train-fraction: must be in (0, 1], got {args.train_fraction}")
    if args.lr <= 0:
        raise UsageError(f"--lr: must be > 0, got {args.lr}")
    return TrainConfig(dataset=args.dataset, data_dir=args.data_dir, train_fraction=args.train_fraction,
                       epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       momentum=args.momentum, weight_decay=args.weight_decay, lr_decay_at=args.lr_decay_at,
                       lr_decay=args.lr_decay, seed=seed, device=device, amp=args.amp, compile=args.compile,
                       cuda_graph=args.cuda_graph,
                       reference=args.reference, loader=args.loader, split=getattr(args, "split", "train"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ktfast", description="Train and search knowledge transfer graphs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a graph file")
    p.add_argument("--graph", help="graph file (JSON)")
    add_recipe_args(p)
    p.add_argument("--split", choices=["train", "search"], default="train",
                   help="search: train and evaluate on the search's held-out split of the training set "
                        "(CIFAR 40k/10k, image folders class-balanced halves), never the test set")
    p.add_argument("--seeds", type=_seeds, default=[0], help="e.g. 0,1,2,3,4: report mean ± std")
    p.add_argument("--out", help="run directory (default runs/<graph name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="fill the pretrain cache with a label-only model")
    p.add_argument("--model", required=True)
    add_recipe_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    from ktfast.search import add_search_commands  # here, not at the top: search imports this module
    add_search_commands(sub)
    from ktfast.plots import add_picture_commands  # show, attention, report
    add_picture_commands(sub)
    return parser


# ---- train -----------------------------------------------------------------------------------
def _free_run_dir(base: Path) -> Path:
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_new_run_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out: {path} exists and is not empty (use --resume {path} to continue it)")


def cmd_train(args) -> int:
    from ktfast.train import Trainer

    if args.resume:
        return _resume(Path(args.resume), args)
    if not args.graph:
        raise UsageError("--graph: required (or --resume DIR)")
    graph = Graph.load(args.graph)
    configs = [config_from_args(args, seed) for seed in args.seeds]
    dataset_info(configs[0].dataset, configs[0].data_dir)
    if args.out:
        root = Path(args.out)
        _check_new_run_dir(root)
    else:
        root = _free_run_dir(Path("runs") / graph.name)
    multi = len(configs) > 1
    finals = {}
    for cfg in configs:
        out = root / f"seed{cfg.seed}" if multi else root
        log = _logger(args.quiet)
        # Everything that can fail on bad input happens here, before the directory exists.
        trainer = Trainer(graph, cfg, out=out, log=log, progress=not args.quiet)
        out.mkdir(parents=True, exist_ok=True)
        graph.save(out / "graph.json")
        cfg.save(out / "config.json")
        print(f"run {out}: graph {graph.name}, {cfg.dataset}, seed {cfg.seed}, {cfg.epochs} epochs, "
              f"{cfg.device}{', amp' if cfg.amp else ''}{', compile' if cfg.compile else ''}", flush=True)
        rows = trainer.fit()
        finals[cfg.seed] = rows[-1]["test"]
    print(result_table(graph, finals, configs[0].split))
    if multi:
        (root / "summary.json").write_text(json.dumps(summary(graph, finals), indent=2) + "\n")
    return 0


def _resume(run: Path, args) -> int:
    from ktfast.train import CHECKPOINT, METRICS, Trainer

    if not (run / "graph.json").is_file() or not (run / "config.json").is_file():
        raise UsageError(f"--resume: {run} is not a run directory (no graph.json / config.json)")
    graph = Graph.load(run / "graph.json")
    cfg = TrainConfig.load(run / "config.json")
    trainer = Trainer(graph, cfg, out=run, log=_logger(args.quiet), progress=not args.quiet)
    done = 0
    if (run / CHECKPOINT).exists():
        trainer.load_checkpoint(run / CHECKPOINT)
        done = trainer.epoch
    # Rows past the checkpoint belong to an epoch that will be trained again.
    metrics = run / METRICS
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    kept = [r for r in rows if r["epoch"] <= done]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"resuming {run} after epoch {done} of {cfg.epochs}", flush=True)
    new_rows = trainer.fit()
    final = (kept + new_rows)[-1]["test"] if kept or new_rows else {}
    print(result_table(graph, {cfg.seed: final}, cfg.split))
    return 0


def _logger(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            print(message, flush=True)
    return log


def summary(graph: Graph, finals: dict) -> dict:
    """Mean ± sample std over seeds of each node's final test accuracy, in percent."""
    out = {}
    for name in graph.nodes:
        accs = [100 * finals[s][name]["acc"] for s in finals]
        out[name] = {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "runs": accs}
    return out


def result_table(graph: Graph, finals: dict, split: str = "train") -> str:
    stats = summary(graph, finals)
    multi = len(finals) > 1
    what = "validation accuracy on the search split" if split == "search" else "test accuracy"
    head = f"{what} (%){f', mean ± std of {len(finals)} seeds' if multi else ''}"
    lines = [head, f"{'node':<12} {'model':<22} {'accuracy':>16}"]
    for name, node in graph.nodes.items():
        kind = getattr(node, "model", None) or f"{node.reduce} of {'+'.join(node.members)}"
        mark = (" (target)" if name == graph.target else "") + (" (frozen)" if getattr(node, "frozen", False) else "")
        value = f"{stats[name]['mean']:.2f} ± {stats[name]['std']:.2f}" if multi else f"{stats[name]['mean']:.2f}"
        lines.append(f"{name:<12} {kind:<22} {value:>16}{mark}")
    return "\n".join(lines)


# ---- pretrain --------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from ktfast.models import is_model_name
    from ktfast.pretrain import pretrain

    if not is_model_name(args.model):
        raise UsageError(f"--model: unknown model {args.model!r}")
    cfg = config_from_args(args)
    dataset_info(cfg.dataset, cfg.data_dir)
    path = pretrain(args.model, cfg, log=_logger(args.quiet), progress=not args.quiet)
    print(path)
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (GraphError, DatasetError, UsageError) as e:
        print(f"ktfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
