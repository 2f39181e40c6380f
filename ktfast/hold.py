"""A pause point for the tests, and for nothing else: users never set KTFAST_TEST_HOLD.

The tests that kill a worker, a rank or a run, stop a database server or hold an SQLite lock need
the run at a known point, whatever the relative speed of the processes and threads sharing the
machine. With KTFAST_TEST_HOLD=FILE in its environment, every training loop (a run, each rank of a
distributed run, each trial of a search and each teacher pre-trained for it) stops after the first
optimizer step of its second epoch — its first epoch reported, and checkpointed where it keeps a
run directory — appends the line "PID THREAD-NAME" to FILE.held, and waits until FILE exists. A
loop that gets there after FILE exists goes straight on.
"""

from __future__ import annotations

import os
import threading
import time

ENV = "KTFAST_TEST_HOLD"
EPOCH, STEP = 2, 1  # 1-based: the first step of the second epoch
POLL_S = 0.05


def hold(epoch: int, step: int) -> None:
    """Called after every training step; returns at once unless the test hold applies."""
    path = os.environ.get(ENV)
    if not path or (epoch, step) != (EPOCH, STEP) or os.path.exists(path):
        return
    with open(f"{path}.held", "a") as f:  # one short append: the lines of several holders never mix
        f.write(f"{os.getpid()} {threading.current_thread().name}\n")
    while not os.path.exists(path):
        time.sleep(POLL_S)
