"""`ktfast info [--json]`: the versions, GPUs and paths a bug report needs, as this machine has them."""

import importlib.metadata
import json
import platform
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torchvision

import ktfast
from ktfast.cli import main
from ktfast.paths import SWITCHES

SWITCH_KEYS = set(SWITCHES)


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    monkeypatch.delenv("KTFAST_KERNELS", raising=False)


def info(capsys, *flags):
    assert main(["info", *flags]) == 0
    return capsys.readouterr().out


def pip_version(name: str) -> str:
    """The version pip lists for `name` (DALI's distribution name ends in its CUDA: nvidia-dali-cuda130)."""
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    found = [n for n in names if n == name or (name == "nvidia-dali" and n.startswith("nvidia-dali-"))]
    return importlib.metadata.version(found[0]) if found else "not installed"


def expected_versions() -> dict:
    return {
        "ktfast": ktfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": pip_version("triton"),
        "dali": pip_version("nvidia-dali"),
        "optuna": pip_version("optuna"),
        "timm": pip_version("timm"),
        "torchvision": torchvision.__version__,  # with its local part (+cu130), as torch's
        "numpy": pip_version("numpy"),
    }


def test_json_gives_the_versions_gpus_and_paths_of_this_machine(capsys):
    facts = json.loads(info(capsys, "--json"))
    assert set(facts) == {"versions", "platform", "gpus", "device", "paths"}
    versions = facts.pop("versions")
    assert list(versions) == [
        "ktfast",
        "python",
        "torch",
        "cuda",
        "driver",
        "triton",
        "dali",
        "optuna",
        "timm",
        "torchvision",
        "numpy",
    ]
    assert {k: v for k, v in versions.items() if k != "driver"} == expected_versions()
    if shutil.which("nvidia-smi") is None:
        assert versions["driver"] == "none"
    assert facts["platform"] == platform.platform()
    assert len(facts["gpus"]) == torch.cuda.device_count()
    assert set(facts["paths"]) == SWITCH_KEYS
    assert all(set(p) == {"path", "reason"} for p in facts["paths"].values())
    if not torch.cuda.is_available():
        assert facts["device"] == "cpu" and facts["gpus"] == []
        assert facts["paths"]["cuda_graph"] == {"path": "off", "reason": "CPU"}
        assert facts["paths"]["kernels"] == {
            "path": "reference",
            "reason": "CPU (KTFAST_KERNELS=1 for the interpreter)",
        }
        assert facts["paths"]["loader"] == {"path": "gpu", "reason": ""}  # digits, resident in host memory
    else:
        assert facts["device"] == "cuda" and facts["paths"]["kernels"]["path"] == "triton"


def test_text_says_the_same_one_fact_a_line(capsys):
    out = info(capsys)
    lines = out.splitlines()
    for name, version in expected_versions().items():
        assert f"{name:<12} {version}" in lines
    assert f"{'platform':<12} {platform.platform()}" in lines
    if not torch.cuda.is_available():
        assert f"{'GPUs':<12} no CUDA device" in lines
        assert "paths of the default config here (device cpu):" in lines
        assert "  cuda_graph  off: CPU" in lines
        assert "  kernels     reference: CPU (KTFAST_KERNELS=1 for the interpreter)" in lines
        assert "  loader      gpu" in lines
    assert sum(line.startswith("  ") for line in lines) == len(SWITCHES)


def test_gpus_and_the_driver_as_torch_reports_them(capsys, monkeypatch):
    from torch.utils import collect_env

    h100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=85_520_809_984)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: h100)
    monkeypatch.setattr(collect_env, "get_nvidia_driver_version", lambda run: "550.54.15")
    facts = json.loads(info(capsys, "--json"))
    assert facts["versions"]["driver"] == "550.54.15"
    assert facts["gpus"] == [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.6} for i in (0, 1)
    ]
    lines = info(capsys).splitlines()
    assert "GPU 1        NVIDIA H100 80GB HBM3, capability 9.0, 79.6 GiB" in lines
    assert "driver       550.54.15" in lines


def test_a_missing_or_broken_package_is_reported_not_raised(capsys, monkeypatch, tmp_path):
    broken = tmp_path / "timm"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    versions = json.loads(info(capsys, "--json"))["versions"]
    assert versions["dali"] == "not installed"
    assert versions["timm"] == "import fails: OSError: libcudart.so.13: cannot open shared object file"
    assert versions["torch"] == torch.__version__


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    assert main(["info", "--yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--yaml" in err
