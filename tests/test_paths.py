"""The path each fast switch takes, and fallbacks that are seen: one line, the record in config.json,
and with KTFAST_STRICT=1 an error (one line, no traceback) instead."""

import json

import pytest
import torch
from graphs import LABELS, pair
from torch import nn

import ktfast.data
from ktfast import paths as P
from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.data import TensorLoader, TorchLoader, load_arrays, make_loader
from ktfast.engine.build import build_trainer
from ktfast.graph import Graph
from ktfast.paths import Compiled, FallbackError, fall_back, resolve_paths

TINY = "synthetic:classes=4,size=16,train=96,test=40"
PAIR = pair(*LABELS, ("b", "a", "kl", "through"))
# What a run on this CPU records with the flags of `run` below (no --compile, no fallback).
CPU_PATHS = {
    "kernels": "reference",
    "compile": "off",
    "cuda_graph": "off",
    "fuse": "off",
    "loader": "gpu",
    "amp": "off",
}


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv("KTFAST_STRICT", raising=False)
    monkeypatch.delenv("KTFAST_KERNELS", raising=False)


# ---- fall_back ----------------------------------------------------------------------------------
def test_a_fallback_records_its_path_and_says_why_in_one_short_line():
    paths, lines = {"compile": "on"}, []
    fall_back(
        paths,
        "compile",
        "off",
        "BackendCompilerFailed: inductor\n  raised:\n\tno compiler " + "x" * 2000,
        lines.append,
    )
    assert paths == {"compile": "off"}
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 300
    assert lines[0].startswith(
        "ktfast: compile falls back to off: BackendCompilerFailed: inductor raised: no compiler x"
    )
    assert lines[0].endswith("…")


def test_under_strict_a_fallback_is_an_error_and_records_nothing(monkeypatch):
    monkeypatch.setenv("KTFAST_STRICT", "1")
    paths, lines = {"kernels": "triton"}, []
    with pytest.raises(
        FallbackError,
        match=r"^kernels: CompilationError: at 3:4 \(KTFAST_STRICT=1: no fallback to reference\)$",
    ):
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
        "amp": ("off", "not asked (--amp)"),
    }


@pytest.mark.parametrize(
    "env, changes, expected",
    [
        ({}, dict(reference=True), {"kernels": ("reference", "--reference"), "fuse": ("off", "--reference")}),
        ({"KTFAST_KERNELS": "1"}, {}, {"kernels": ("triton", "")}),
        ({"KTFAST_KERNELS": "0"}, {}, {"kernels": ("reference", "KTFAST_KERNELS=0")}),
        (
            {},
            dict(compile=True, amp=True, fuse=True),
            {"compile": ("on", ""), "amp": ("bf16", ""), "fuse": ("on", "")},
        ),
        (
            {},
            dict(fuse=True, sync_bn=True),
            {"fuse": ("off", "--sync-bn (the global BatchNorm's all-reduce does not run under vmap)")},
        ),
        ({}, dict(loader="torch"), {"loader": ("torch", "")}),
    ],
    ids=["reference", "kernels-forced", "kernels-off", "asked", "sync-bn", "loader-named"],
)
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
        return {
            k: (v["path"], v["reason"])
            for k, v in resolve_paths(TrainConfig(device="cuda", **changes), data).items()
        }

    assert on_gpu(amp=True) == {
        "kernels": ("triton", ""),
        "compile": ("off", "not asked (--compile)"),
        "cuda_graph": ("on", ""),
        "fuse": ("on", ""),
        "loader": ("gpu", ""),
        "amp": ("fp16", "no bf16 on this GPU"),
    }
    assert on_gpu(cuda_graph=False)["cuda_graph"] == ("off", "--no-cuda-graph")
    assert on_gpu(world_size=2)["cuda_graph"] == ("off", "several processes (the step holds collectives)")
    assert on_gpu(reference=True)["cuda_graph"] == ("off", "--reference")
    free["bytes"] = 4 * size - 4  # the set no longer fits in a quarter of the free memory
    assert on_gpu()["loader"] == ("torch", "DALI not installed")
    monkeypatch.setattr(P, "dali_available", lambda: True)
    assert on_gpu()["loader"] == ("dali", "")


# ---- the loader's fallback ------------------------------------------------------------------------
def test_auto_falls_back_to_torchvision_where_dali_is_missing_or_fails(monkeypatch, capsys):
    monkeypatch.setattr(
        ktfast.data, "loader_path", lambda loader, device, data: ("torch", "DALI not installed")
    )
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
    assert (
        capsys.readouterr().out
        == "ktfast: loader falls back to torch: DALI: RuntimeError: nvJPEG: no such device\n"
    )
    with pytest.raises(RuntimeError, match="nvJPEG"):  # asked for by name: no fallback
        make_loader(TINY, "train", 16, "cpu", 0, loader="dali")
    monkeypatch.setenv("KTFAST_STRICT", "1")
    with pytest.raises(FallbackError, match="^loader: DALI: RuntimeError: nvJPEG"):
        make_loader(TINY, "train", 16, "cpu", 0)
    assert isinstance(make_loader(TINY, "train", 16, "cpu", 0, loader="gpu"), TensorLoader)


# ---- compile, or eagerly --------------------------------------------------------------------------
class Failing:
    """What torch.compile hands back where it cannot compile: a module whose calls raise."""

    calls = 0

    def __init__(self, module):
        pass

    def __call__(self, *args, **kwargs):
        Failing.calls += 1
        raise RuntimeError("BackendCompilerFailed: backend='inductor' raised:\nCppCompileError: no compiler")


def test_a_module_that_fails_to_compile_runs_eagerly_and_the_run_says_it_once(monkeypatch):
    monkeypatch.setattr(torch, "compile", Failing)
    Failing.calls = 0
    record, lines = {"compile": "on"}, []

    def on_failure(e):
        fall_back(record, "compile", "off", f"{type(e).__name__}: {e}", lines.append)

    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    ca, cb = Compiled(a, record, on_failure), Compiled(b, record, on_failure)
    x = torch.randn(4, 3)
    assert torch.equal(ca(x), a(x)) and torch.equal(cb(x), b(x)) and torch.equal(ca(x), a(x))
    assert Failing.calls == 1  # once off, no Compiled of the run tries again
    assert record == {"compile": "off"}
    assert lines == [
        "ktfast: compile falls back to off: RuntimeError: BackendCompilerFailed: backend='inductor' "
        "raised: CppCompileError: no compiler"
    ]


def test_inside_a_cuda_graph_capture_a_compile_error_is_the_capture_s_to_handle(monkeypatch):
    monkeypatch.setattr(torch, "compile", Failing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    record = {"compile": "on"}
    with pytest.raises(RuntimeError, match="BackendCompilerFailed"):
        Compiled(nn.Linear(3, 2), record, lambda e: pytest.fail("no fallback inside a capture"))(
            torch.randn(1, 3)
        )
    assert record == {"compile": "on"}


def test_a_compiled_module_keeps_torch_compile_s_state_dict_keys():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert list(Compiled(m, {"compile": "on"}, print).state_dict()) == list(torch.compile(m).state_dict())


# ---- end to end: `ktfast train` -------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """`ktfast ARGV` in a folder of its own: (exit code, stdout, stderr)."""
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def train(tmp_path, cli):
    """`ktfast train` of a 2-node graph for one epoch on a tiny set into tmp_path/OUT."""
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(PAIR))

    def run(*flags, out="run"):
        return (
            *cli(
                "train",
                "--graph",
                str(graph),
                "--dataset",
                TINY,
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                out,
                *flags,
            ),
            tmp_path / out,
        )

    return run


def fallback_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "falls back" in line]


def test_a_run_whose_compile_fails_finishes_eagerly_says_it_once_and_records_it(train, monkeypatch):
    monkeypatch.setattr(torch, "compile", Failing)
    code, out, err, path = train("--compile")
    assert code == 0, err
    assert fallback_lines(out) == [
        "ktfast: compile falls back to off: RuntimeError: BackendCompilerFailed: "
        "backend='inductor' raised: CppCompileError: no compiler"
    ]
    assert json.loads((path / "config.json").read_text())["paths"] == {**CPU_PATHS, "compile": "off"}
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_where_dali_is_missing_takes_torchvision_says_it_once_and_records_it(train, monkeypatch):
    monkeypatch.setattr(
        ktfast.data, "loader_path", lambda loader, device, data: ("torch", "DALI not installed")
    )
    code, out, err, path = train()
    assert code == 0, err
    assert fallback_lines(out) == ["ktfast: loader falls back to torch: DALI not installed"]
    assert json.loads((path / "config.json").read_text())["paths"] == {**CPU_PATHS, "loader": "torch"}


def test_under_strict_a_fallback_ends_the_run_with_one_line_and_no_traceback(train, monkeypatch):
    monkeypatch.setenv("KTFAST_STRICT", "1")
    monkeypatch.setattr(torch, "compile", Failing)
    code, out, err, path = train("--compile")
    assert code == 1 and fallback_lines(out) == []
    assert err == (
        "ktfast: error: compile: RuntimeError: BackendCompilerFailed: backend='inductor' raised: "
        "CppCompileError: no compiler (KTFAST_STRICT=1: no fallback to off)\n"
    )
    assert not (path / "metrics.jsonl").exists()
    # A fallback the Trainer meets while it is built: before the run directory exists.
    monkeypatch.setattr(
        ktfast.data, "loader_path", lambda loader, device, data: ("torch", "DALI not installed")
    )
    code, out, err, path = train(out="run2")
    assert (
        code == 1
        and err == "ktfast: error: loader: DALI not installed (KTFAST_STRICT=1: no fallback to torch)\n"
    )
    assert not path.exists()


def test_paths_are_a_record_not_the_run_s_identity(train, cli, monkeypatch):
    """A resume on a machine whose paths differ continues, and records this machine's; a resume
    that fails leaves config.json as it was, even where a fallback happened before it failed."""
    code, out, err, path = train()
    config = json.loads((path / "config.json").read_text())
    assert code == 0 and config["paths"] == CPU_PATHS
    elsewhere = json.dumps({**config, "paths": {**CPU_PATHS, "kernels": "triton", "cuda_graph": "on"}})
    (path / "config.json").write_text(elsewhere)
    code, out, err = cli("train", "--resume", str(path), "--quiet")
    assert code == 0, err
    assert json.loads((path / "config.json").read_text()) == config  # this machine's paths again

    (path / "config.json").write_text(elsewhere)
    (path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(
        ktfast.data, "loader_path", lambda loader, device, data: ("torch", "DALI not installed")
    )
    code, out, err = cli("train", "--resume", str(path), "--quiet")
    assert code == 2 and "cannot read the checkpoint" in err
    assert (path / "config.json").read_text() == elsewhere


def test_a_fallback_before_the_run_trains_is_written_when_it_trains(tmp_path, capsys):
    """As a check while the Trainer is built (a fused group that cannot run here) falls back: a
    resume that fails after it must leave config.json as it was, so the record waits for `fit`."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(dataset=TINY, epochs=1, batch_size=32)
    cfg.save(out / "config.json")
    before = (out / "config.json").read_bytes()
    trainer = build_trainer(Graph.from_dict(PAIR), cfg, out=out, progress=False)
    trainer.fall_back("fuse", "off", RuntimeError("cuDNN: batch norm under vmap"))
    assert (out / "config.json").read_bytes() == before
    assert (
        capsys.readouterr().out
        == "ktfast: fuse falls back to off: RuntimeError: cuDNN: batch norm under vmap\n"
    )
    trainer.fit()
    assert json.loads((out / "config.json").read_text()) == {
        **cfg.to_dict(),
        "paths": {**CPU_PATHS, "fuse": "off"},
    }


def test_a_run_whose_kernels_fail_finishes_on_the_reference_losses_says_it_once_and_records_it(
    train, monkeypatch
):
    """KTFAST_KERNELS=1 on this CPU: the kernels through Triton's interpreter, made to fail as a
    kernel that cannot compile would."""
    from ktfast.kernels import EdgeLossFn

    def broken(*args):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_120")

    monkeypatch.setenv("KTFAST_KERNELS", "1")
    monkeypatch.setattr(EdgeLossFn, "apply", broken)
    code, out, err, path = train()
    assert code == 0, err
    assert fallback_lines(out) == [
        "ktfast: kernels falls back to reference: RuntimeError: PTX .version 9.9 does "
        "not support .target sm_120"
    ]
    assert json.loads((path / "config.json").read_text())["paths"] == {**CPU_PATHS, "kernels": "reference"}
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_fused_group_that_does_not_run_as_its_nodes_is_unfused_says_it_and_records_it(train, monkeypatch):
    """A backend where vmap's BatchNorm fails (a fused group raising) or computes something else:
    the nodes run one by one."""
    from ktfast.engine.fuse import FusedGroup

    def broken(self, x, **options):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")

    computes = FusedGroup.forward

    def shifted(self, x, **options):  # a wrong computation: every logit off by 1
        out = computes(self, x, **options)
        return out + 1 if torch.is_tensor(out) else (out[0] + 1, *out[1:])

    monkeypatch.setattr(FusedGroup, "forward", broken)
    code, out, err, path = train("--fuse")
    assert code == 0, err
    assert fallback_lines(out) == [
        "ktfast: fuse falls back to off: RuntimeError: a, b: RuntimeError: cuDNN error: "
        "CUDNN_STATUS_NOT_SUPPORTED"
    ]
    assert json.loads((path / "config.json").read_text())["paths"] == {**CPU_PATHS, "fuse": "off"}
    monkeypatch.setattr(FusedGroup, "forward", shifted)
    code, out, err, path = train("--fuse", out="run2")
    assert code == 0 and fallback_lines(out) == [
        "ktfast: fuse falls back to off: RuntimeError: a, b: node a's fused output differs from its own"
    ]
