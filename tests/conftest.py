import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter; it must be chosen before any
# kernel is defined, so here, before the test modules import ktfast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A pretrain cache of the test's own, and the reference losses (the kernels have tests of their own)."""
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run directories and default storages land in the test's own folder."""
    monkeypatch.chdir(tmp_path)
