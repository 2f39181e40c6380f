"""K search trials on one GPU (docs/ARCHITECTURE.md §6). Separate processes only time-slice a GPU: their kernels
never overlap. Two ways around it, chosen by `ktfast search --pack`:

* `threads`: the K trials of a GPU run in one worker process, each in its own thread on its own CUDA
  stream (the current stream is per thread; every stream of a slot and of its steps is leased from
  `ktfast.engine.fast.StreamBank`, so no two slots share one), so their kernels share the GPU. The global RNG and
  CUDA-graph capture are taken in turn (`ktfast.engine.nodes.INIT_LOCK`, `ktfast.engine.fast.CAPTURE_LOCK`), and the
  CUDA cache is emptied only when no trial of the process runs.
* `mps`: K processes, as `processes`, through a CUDA MPS control daemon that the search starts for
  itself (private pipe and log folders, stopped on exit, Ctrl-C included): MPS runs the kernels of
  all its clients at once. Where it cannot run, one line says why and the processes go on without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ktfast.engine.fast import stream_bank

PACKS = ("processes", "threads", "mps")
MPS_CONTROL = "nvidia-cuda-mps-control"
# A CUDA client through the daemon. The daemon starts where its server cannot (not permitted, a GPU
# in exclusive mode, …), so one client must get through before the workers are sent to it.
PROBE = "import torch; torch.ones(1, device='cuda').sum().item()"
TIMEOUT_S = 120


# ---- threads ------------------------------------------------------------------------------------------
class Slots:
    """`count` trial loops in one process: the first in the calling thread when it is alone, else each
    in a thread of its own on its own CUDA stream."""

    def __init__(self, count: int, cuda: bool):
        self.count, self.cuda = count, cuda
        self._lock = threading.Lock()
        self._running = 0

    def run(self, loop: Callable[[threading.Event], None]) -> None:
        """Call `loop(stop)` in every slot; the first error sets `stop` (the other loops end after their
        current trial) and is raised here once all have ended."""
        stop = threading.Event()
        if self.count == 1:
            loop(stop)
            return
        errors = []

        def slot():
            try:
                with _own_stream() if self.cuda else nullcontext():
                    loop(stop)
            except BaseException as e:
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=slot, name=f"trial slot {i}") for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def in_turn(self, fn: Callable) -> Callable:
        """`fn` called by one slot at a time."""
        lock = threading.Lock()

        def one_at_a_time(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)

        return one_at_a_time

    @contextmanager
    def trial(self):
        """Around one trial: when the last running trial of the process ends, the CUDA cache goes back
        to the GPU for the other processes there (never while a trial runs: it may be capturing)."""
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and torch.cuda.is_initialized():
                    torch.cuda.empty_cache()


@contextmanager
def _own_stream():
    """A CUDA stream of the slot's own for as long as it runs: leased from the process's bank, so
    that no step of another slot ever runs on it."""
    bank = stream_bank(torch.device("cuda", torch.cuda.current_device()))
    lease = bank.lease(1)
    try:
        with torch.cuda.stream(lease[0]):
            yield
    finally:
        bank.release(lease)


# ---- MPS ----------------------------------------------------------------------------------------------
class MPSDaemon:
    """`with MPSDaemon(gpu) as mps:` starts a private MPS control daemon and checks that a CUDA client on
    `gpu` gets through; `mps.env` then holds what the workers need in their environment. Where it cannot
    run, `mps.env` is None and one line on stderr says why."""

    def __init__(self, gpu: str | None, trials_per_gpu: int):
        self.gpu, self.trials_per_gpu = gpu, trials_per_gpu
        self.env: dict[str, str] | None = None
        self.why: str | None = None  # why it cannot run
        self._root: Path | None = None  # the daemon's folders
        self._exe: str | None = None  # set while a daemon of ours runs
        self._daemon_env: dict[str, str] = {}

    def __enter__(self) -> MPSDaemon:
        self.why = self._start()
        if self.why is not None:
            self._cleanup()
            print(
                f"ktfast: CUDA MPS cannot run here ({self.why}): the {self.trials_per_gpu} trials of each GPU run "
                f"as separate processes, time-sliced",
                file=sys.stderr,
                flush=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _start(self) -> str | None:
        self._exe = shutil.which(MPS_CONTROL)
        if self._exe is None:
            return f"{MPS_CONTROL} not found"
        self._root = root = Path(tempfile.mkdtemp(prefix="ktfast-mps-"))
        dirs = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
        for d in dirs.values():
            os.mkdir(d)
        # The workers name absolute GPU ids: the daemon's server sees every GPU.
        self._daemon_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | dirs
        why = _call([self._exe, "-d"], self._daemon_env, root / "start.out")
        if why is not None:
            self._exe = None  # nothing to stop
            return f"{MPS_CONTROL} -d: {why}"
        probe_env = dict(
            self._daemon_env, **({"CUDA_VISIBLE_DEVICES": self.gpu} if self.gpu is not None else {})
        )
        why = _call([sys.executable, "-c", PROBE], probe_env, root / "probe.out")
        if why is not None:
            return f"the daemon started, but a CUDA client could not connect: {why}"
        self.env = dirs
        return None

    def _cleanup(self) -> None:
        if self._exe is not None:  # quit stops the daemon and its server; the workers have ended by now
            why = _call([self._exe], self._daemon_env, self._root / "quit.out", stdin="quit\n")
            self._exe = None
            if why is not None:  # its folders stay: the pipe is the only way to stop it
                pipe = self._daemon_env["CUDA_MPS_PIPE_DIRECTORY"]
                print(
                    f"ktfast: could not stop the MPS daemon ({why}); stop it with: echo quit | "
                    f"CUDA_MPS_PIPE_DIRECTORY={pipe} {MPS_CONTROL}",
                    file=sys.stderr,
                )
                self._root = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _call(cmd: list[str], env: dict, out: Path, stdin: str | None = None) -> str | None:
    """Run a command to its end with its output in a file (a daemon it forks may keep a pipe open for
    ever); None when it succeeded, else why not, in a few words."""
    try:
        with open(out, "w+") as f:
            given = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
            run = subprocess.run(
                cmd,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
                text=True,
                start_new_session=True,
                **given,
            )  # Ctrl-C is the launcher's to handle
            if run.returncode == 0:
                return None
            f.seek(0)
            lines = [line.strip() for line in f if line.strip()]
    except subprocess.TimeoutExpired:
        return f"no answer in {TIMEOUT_S} s"
    except OSError as e:
        return e.strerror or str(e)
    return lines[-1] if lines else f"exit code {run.returncode}"
