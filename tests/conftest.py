import getpass
import os
import tempfile
import time

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter; it must be chosen before any
# kernel is defined, so here, before the test modules import ktfast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk cache is not keyed by the vector width ATEN_CPU_CAPABILITY selects: C++
# compiled for this CPU (AVX-512, say) would be reused under =avx2 and give NaN, or fail to build
# under =default. One cache per capability.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"
        ),
    )


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A pretrain cache of the test's own, and the reference losses (the kernels have tests of their own)."""
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run directories and default storages land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


class Hold:
    """The test's side of the pause point of `ktfast.hold`: the environment that makes training loops
    stop there, who has stopped, and the release."""

    def __init__(self, folder):
        from ktfast.hold import ENV

        self.file = folder / "hold-release"
        self.env = {ENV: str(self.file)}

    def set_in(self, monkeypatch) -> None:
        """In this process's environment, for the tests that run a command in-process (the workers
        it starts inherit it)."""
        for var, value in self.env.items():
            monkeypatch.setenv(var, value)

    def held(self) -> list[tuple[int, str]]:
        """(pid, thread name) of every loop that has stopped at the hold, in the order they came."""
        path = self.file.with_name(self.file.name + ".held")
        lines = path.read_text().splitlines() if path.exists() else []
        return [(int(pid), name) for pid, name in (line.split(" ", 1) for line in lines)]

    def wait(self, count: int, timeout: float, procs=()) -> list[tuple[int, str]]:
        """The holders once `count` loops have stopped. `timeout` bounds a hang only; a process of
        `procs` that ends first fails the wait at once."""
        deadline = time.monotonic() + timeout
        while len(held := self.held()) < count:
            ended = [p.args for p in procs if p.poll() is not None]
            assert not ended, f"ended before {count} training loops reached the hold: {ended}"
            assert time.monotonic() < deadline, f"{len(held)} of {count} training loops reached the hold"
            time.sleep(0.05)
        return held

    def release(self) -> None:
        self.file.touch()


@pytest.fixture
def hold(tmp_path):
    """A `Hold`, released when the test ends whatever happened, so that no process stays held."""
    h = Hold(tmp_path)
    yield h
    h.release()
