"""The `ktfast` command line (docs/ARCHITECTURE.md §7): each command module registers its commands here; bad input
ends with exit code 2 and one line. Nothing imports this module back."""

from __future__ import annotations

import os
import sys

from ktfast.args import Parser
from ktfast.commands import info, pictures, search, train
from ktfast.config import ConfigError
from ktfast.data import DatasetError
from ktfast.engine.checkpoint import CheckpointError, RunWriteError
from ktfast.engine.distributed import PeerLost
from ktfast.engine.trainer import NonFiniteLoss
from ktfast.graph import GraphError
from ktfast.paths import FallbackError

COMMANDS = (
    train,
    search,
    pictures,
    info,
)  # train, pretrain | search, export | show, attention, report | info


def build_parser() -> Parser:
    parser = Parser(prog="ktfast", description="Train and search knowledge transfer graphs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --gpus` hands to torchrun
        return args.func(args)
    except (GraphError, DatasetError, ConfigError, CheckpointError) as e:
        print(f"ktfast: error: {e}", file=sys.stderr)
        return 2
    except (RunWriteError, FallbackError) as e:
        print(f"ktfast: error: {e}", file=sys.stderr)
        return 1
    except NonFiniteLoss as e:  # docs/ARCHITECTURE.md §2: numerical health has an exit code of its own
        print(f"ktfast: error: {e}", file=sys.stderr)
        return 3
    except PeerLost as e:
        print(f"ktfast: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group's threads would abort a normal exit once a peer is gone
    except KeyboardInterrupt:
        print("ktfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
