"""Run by each rank of `torchrun --nproc-per-node 2 tests/dist_prepare.py SECONDS`: rank 0 takes
SECONDS to make a value (as when it pretrains the teachers) while the other rank waits for it;
every rank prints what it received."""

import sys
import time

from ktfast.engine.distributed import from_rank_zero, process_group


def slow_make():
    time.sleep(float(sys.argv[1]))
    return "teachers ready"


with process_group("cpu") as (rank, world):
    print(f"rank {rank}: {from_rank_zero(slow_make)}", flush=True)
