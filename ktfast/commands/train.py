"""`ktfast train` and `ktfast pretrain` (docs/ARCHITECTURE.md §7): the flags of a training session (a graph trained
with one or several seeds into a run directory, like another run, or resumed from its last
checkpoint), run by `ktfast.engine.session` as `ktfast.train` runs it, and the pretrain cache filled by hand."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from ktfast.args import UsageError, add_recipe_args, config_from_args, logger, seeds
from ktfast.data import dataset_info
from ktfast.engine import distributed, tensorboard
from ktfast.engine.distributed import PLACES
from ktfast.engine.pretrain import pretrain
from ktfast.engine.session import check_plan, run_session
from ktfast.models import is_model_name


def register(sub) -> None:
    p = sub.add_parser("train", help="train a graph file")
    p.add_argument("--graph", help="graph file (JSON)")
    add_recipe_args(p)
    p.add_argument(
        "--split",
        choices=["train", "search"],
        help="search: train and evaluate on the search's held-out split of the training set "
        "(CIFAR 40k/10k, image folders class-balanced halves), never the test set",
    )
    p.add_argument(
        "--seeds",
        type=seeds,
        help="e.g. 0,1,2,3,4: report mean ± std (default 0); the seeds' runs "
        "train as replicas, stacked into one step",
    )
    p.add_argument("--seeds-one-by-one", action="store_true", help="train the seeds' runs one after another")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help="hold out a class-balanced fraction F of the training set (the same for every seed): "
        "metrics gain val rows, checkpoint-best.pt keeps the target's best-val epoch",
    )
    p.add_argument("--out", help="run directory (default runs/<graph name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument(
        "--like",
        metavar="RUN",
        help="train as RUN did: its graph.json and config.json (and seeds), the flags given override them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files under RUN/tensorboard/NODE",
    )
    p.add_argument(
        "--place",
        choices=PLACES,
        default=None,
        help="under torchrun: data (default) = every process holds every node and takes a share "
        "of each batch; nodes = each process runs a share of the nodes on every batch",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        default=None,
        help="with --place data: BatchNorm normalises over the global batch of all processes",
    )
    p.add_argument(
        "--gpus",
        type=gpu_list,
        default=None,
        help="e.g. 0,1,2,3: train on these GPUs of this machine (one torchrun process each)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="fill the pretrain cache with a label-only model")
    p.add_argument("--model", required=True)
    add_recipe_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain)


# ---- train -----------------------------------------------------------------------------------
def gpu_list(text: str) -> list[int]:
    gpus = seeds(text)  # distinct integers
    if min(gpus) < 0:
        raise ValueError(text)
    return gpus


def cmd_train(args) -> int:
    if args.tensorboard and not tensorboard.available():
        raise UsageError("--tensorboard: needs the tensorboard package (pip install 'ktfast[tensorboard]')")
    if args.gpus is not None:
        return _launch(args)
    run_session(args, say=functools.partial(print, flush=True), progress=not args.quiet)
    return 0


def _launch(args) -> int:
    """`ktfast train --gpus 0,1,…`: the same command under torchrun, one process per GPU."""
    import torch

    if distributed.world_size() > 1:
        raise UsageError("--gpus: already one of several processes (torchrun starts them; drop --gpus)")
    if args.device == "cpu" or not torch.cuda.is_available():
        raise UsageError(
            "--gpus: needs CUDA (on a CPU: torchrun --nproc-per-node N -m ktfast train ... --device cpu)"
        )
    if max(args.gpus) >= torch.cuda.device_count():
        raise UsageError(f"--gpus: this machine has {torch.cuda.device_count()} GPUs, numbered from 0")
    if not args.resume:  # a bad launch ends here, in one line, before any process starts
        check_plan(args, len(args.gpus))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, args.gpus))}
    return subprocess.run(launch_command(args.argv, len(args.gpus)), env=env).returncode


def launch_command(argv: list[str], processes: int) -> list[str]:
    """torchrun's command line for `ktfast ARGV` without its --gpus flag."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "ktfast",
        *rest,
    ]


# ---- pretrain ------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    if not is_model_name(args.model):
        raise UsageError(f"--model: unknown model {args.model!r}")
    cfg = config_from_args(args)
    dataset_info(cfg.dataset, cfg.data_dir)
    path = pretrain(args.model, cfg, log=logger(args.quiet), progress=not args.quiet)
    print(path)
    return 0
