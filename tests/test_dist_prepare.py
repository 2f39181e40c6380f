"""Over several ranks, rank 0 fills the caches (pretraining teachers can take hours) while the
others wait: that wait is bounded by KTFAST_PREPARE_TIMEOUT, not by the run's collective timeout
(whose NCCL watchdog would abort the run)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_wait_for_rank_zero_longer_than_the_collective_timeout():
    # Rank 0 works 3× the collective timeout: the state is made by the numbers, not by timing luck.
    env = {**os.environ, "KTFAST_DIST_TIMEOUT": "2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "tests" / "dist_prepare.py"),
            "6",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0: teachers ready",
        "rank 1: teachers ready",
    ]
