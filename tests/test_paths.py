"""The path each fast switch takes, and fallbacks that are seen: one line, the record,
and with KTFAST_STRICT=1 an error instead."""
import pytest
import torch

import ktfast.data
from ktfast import paths as P
from ktfast.config import TrainConfig
from ktfast.data import TensorLoader, TorchLoader, load_arrays, make_loader
from ktfast.paths import FallbackError, fall_back, resolve_paths

TINY = "synthetic:classes=4,size=16,train=96,test=40"


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv("KTFAST_STRICT", raising=False)
    monkeypatch.delenv("KTFAST_KERNELS", raising=False)


# ---- fall_back ----------------------------------------------------------------------------------
def test_a_fallback_records_its_path_and_says_why_in_one_short_line():
    paths, lines = {"compile": "on"}, []
    fall_back(paths, "compile", "off", "BackendCompilerFailed: inductor\n  raised:\n\tno compiler " + "x" * 2000,
              lines.append)
    assert paths == {"compile": "off"}
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 300
    assert lines[0].startswith("ktfast: compile falls back to off: BackendCompilerFailed: inductor raised: no compiler x")
    assert lines[0].endswith("…")


def test_under_strict_a_fallback_is_an_error_and_records_nothing(monkeypatch):
    monkeypatch.setenv("KTFAST_STRICT", "1")
    paths, lines = {"kernels": "triton"}, []
    with pytest.raises(FallbackError, match=r"^kernels: CompilationError: at 3:4 \(KTFAST_STRICT=1: no fallback to reference\)$"):
        fall_back(paths, "kernels", "reference", "CompilationError:\nat 3:4", lines.append)
    assert paths == {"kernels": "triton"} and lines == []


# ---- resolve_paths --------------------------------------------------------------------------------
def resolved(cfg) -> dict:
    return {k: (v["path"], v["reason"]) for k, v in resolve_paths(cfg, load_arrays(TINY)).items()}


def test_the_default_config_on_a_cpu_takes_the_reference_paths_and_says_why():
    assert resolved(TrainConfig(device="cpu")) == {
        "kernels": ("reference", "CPU (KTFAST_KERNELS=1 for the interpreter)"),
        "compile": ("off", "not asked (--compile)"),
        "cuda_graph": ("off", "CPU"),
        "fuse": ("off", "CPU (--fuse to turn it on)"),
        "loader": ("gpu", ""),  # resident in host memory
        "amp": ("off", "not asked (--amp)")}


@pytest.mark.parametrize("env, changes, expected", [
    ({}, dict(reference=True), {"kernels": ("reference", "--reference"), "fuse": ("off", "--reference")}),
    ({"KTFAST_KERNELS": "1"}, {}, {"kernels": ("triton", "")}),
    ({"KTFAST_KERNELS": "0"}, {}, {"kernels": ("reference", "KTFAST_KERNELS=0")}),
    ({}, dict(compile=True, amp=True, fuse=True), {"compile": ("on", ""), "amp": ("bf16", ""), "fuse": ("on", "")}),
    ({}, dict(fuse=True, sync_bn=True), {"fuse": ("off", "--sync-bn (the global BatchNorm's all-reduce does "
                                                           "not run under vmap)")}),
    ({}, dict(loader="torch"), {"loader": ("torch", "")}),
], ids=["reference", "kernels-forced", "kernels-off", "asked", "sync-bn", "loader-named"])
def test_flags_and_environment_on_a_cpu(monkeypatch, env, changes, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = resolved(TrainConfig(device="cpu", **changes))
    assert {k: got[k] for k in expected} == expected


def test_the_paths_on_a_gpu(monkeypatch):
    """What a GPU without bf16 takes, and the loader as the set's size and DALI decide (no GPU
    needed: the facts are what torch would report there)."""
    data = load_arrays(TINY)
    size = data.train_x.numel() + data.test_x.numel()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    free = {"bytes": 4 * size + 4}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * free["bytes"]))
    monkeypatch.setattr(P, "dali_available", lambda: False)

    def on_gpu(**changes):
        return {k: (v["path"], v["reason"]) for k, v in resolve_paths(TrainConfig(device="cuda", **changes), data).items()}

    assert on_gpu(amp=True) == {"kernels": ("triton", ""), "compile": ("off", "not asked (--compile)"),
                                "cuda_graph": ("on", ""), "fuse": ("on", ""), "loader": ("gpu", ""),
                                "amp": ("fp16", "no bf16 on this GPU")}
    assert on_gpu(cuda_graph=False)["cuda_graph"] == ("off", "--no-cuda-graph")
    assert on_gpu(world_size=2)["cuda_graph"] == ("off", "several processes (the step holds collectives)")
    assert on_gpu(reference=True)["cuda_graph"] == ("off", "--reference")
    free["bytes"] = 4 * size - 4  # the set no longer fits in a quarter of the free memory
    assert on_gpu()["loader"] == ("torch", "DALI not installed")
    monkeypatch.setattr(P, "dali_available", lambda: True)
    assert on_gpu()["loader"] == ("dali", "")


# ---- the loader's fallback ------------------------------------------------------------------------
def test_auto_falls_back_to_torchvision_where_dali_is_missing_or_fails(monkeypatch, capsys):
    monkeypatch.setattr(ktfast.data, "loader_path", lambda loader, device, data: ("torch", "DALI not installed"))
    record = {"loader": "dali"}
    assert isinstance(make_loader(TINY, "train", 16, "cpu", 0, paths=record), TorchLoader)
    assert record == {"loader": "torch"}
    assert capsys.readouterr().out == "ktfast: loader falls back to torch: DALI not installed\n"

    def broken(*args):
        raise RuntimeError("nvJPEG: no such device")

    monkeypatch.setattr(ktfast.data, "loader_path", lambda loader, device, data: ("dali", ""))
    monkeypatch.setattr(ktfast.data, "DaliLoader", broken)
    record = {"loader": "dali"}
    assert isinstance(make_loader(TINY, "train", 16, "cpu", 0, paths=record), TorchLoader)
    assert record == {"loader": "torch"}
    assert capsys.readouterr().out == "ktfast: loader falls back to torch: DALI: RuntimeError: nvJPEG: no such device\n"
    with pytest.raises(RuntimeError, match="nvJPEG"):  # asked for by name: no fallback
        make_loader(TINY, "train", 16, "cpu", 0, loader="dali")
    monkeypatch.setenv("KTFAST_STRICT", "1")
    with pytest.raises(FallbackError, match="^loader: DALI: RuntimeError: nvJPEG"):
        make_loader(TINY, "train", 16, "cpu", 0)
    assert isinstance(make_loader(TINY, "train", 16, "cpu", 0, loader="gpu"), TensorLoader)
