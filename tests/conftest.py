import getpass
import os
import tempfile

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
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A pretrain cache of the test's own, and the reference losses (the kernels have tests of their own)."""
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run directories and default storages land in the test's own folder."""
    monkeypatch.chdir(tmp_path)
