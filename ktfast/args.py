"""What every command shares: its error, the parser that turns a bad flag into one line, the value
types of flags, and the recipe flags that make a `TrainConfig`."""

from __future__ import annotations

import argparse

from ktfast.config import ConfigError, TrainConfig, flag_fields


class UsageError(ConfigError):
    """A bad command-line value; the message is one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise UsageError(message)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The flags that set a training run's recipe; defaults are the papers' CIFAR recipe. They parse
    to None when not given (`config_from_args` fills the default in), so that `--resume` can tell a
    flag given at its default value from one left out, and `--like` keeps the run's value."""
    d = TrainConfig()
    p.add_argument(
        "--dataset",
        help=f"{d.dataset} (offline default), cifar10, cifar100, tinyimagenet, "
        "imagefolder:path=DIR[,size=S,crop=C], synthetic[:classes=C,size=S,train=N,test=N]",
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=positive_int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    p.add_argument("--optimizer", choices=["sgd", "adam"], help=f"default {d.optimizer}")
    p.add_argument("--lr", type=float, help=f"default {d.lr}")
    p.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument(
        "--lr-decay-at",
        type=floats,
        help="fractions of the run at which the lr is multiplied by --lr-decay "
        f"(default {','.join(map(str, d.lr_decay_at))})",
    )
    p.add_argument("--lr-decay", type=float, help=f"default {d.lr_decay}")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="train on a class-balanced fraction of the training set",
    )
    p.add_argument(
        "--loader",
        help="auto | dali | gpu | torch: DALI pipeline, device-resident tensors, "
        f"torchvision on the CPU (default {d.loader})",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="mixed precision: bf16 where supported, fp16 with a grad scaler otherwise (default off)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default off)")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="on CUDA, capture the whole training step as one CUDA graph and replay it "
        "(default on; ignored on a CPU)",
    )
    p.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run nodes of the same model and role as one fused module (default: on the CUDA fast path)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        default=None,
        help="plain eager PyTorch losses (the reference path)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")


def config_from_args(args, seed: int = 0, base: TrainConfig | None = None) -> TrainConfig:
    """The config of a run: `base` (the defaults, or the run that `--like` names), with every field
    whose option `args` holds (not None: given) replaced by it. `args` is a namespace: the command
    line's, or the keywords of `ktfast.train`."""
    import torch

    like = base is not None
    base = base or TrainConfig()
    given = {name: getattr(args, name) for name in flag_fields() if getattr(args, name, None) is not None}
    if "lr_decay_at" in given:
        given["lr_decay_at"] = tuple(given["lr_decay_at"])
    device = args.device or (base.device if like else "cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA device is available"
            + (" (--device cpu to train on the CPU)" if like else "")
        )
    cfg = base.replace(**{**given, "seed": seed, "device": device})
    if cfg.train_fraction is not None and not 0 < cfg.train_fraction <= 1:
        raise UsageError(f"--train-fraction: must be in (0, 1], got {cfg.train_fraction}")
    if cfg.lr <= 0:
        raise UsageError(f"--lr: must be > 0, got {cfg.lr}")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise UsageError(f"--val-fraction: must be in (0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction is not None and cfg.split == "search":
        raise UsageError("--val-fraction: not with --split search, which evaluates on its own held-out split")
    return cfg.replace(fuse=cfg.fused())  # config.json records what the run did


def logger(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    return log
