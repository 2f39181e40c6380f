"""The benchmarks' CPU smoke runs: each runs end to end and writes a JSON with its rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def smoke(name: str, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(tmp_path), *args], check=True,
                   env=env, cwd=tmp_path, timeout=600)
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_bench_kernels_smoke(tmp_path):
    result = smoke("bench_kernels", tmp_path)
    assert result["rows"] and result["device"]
    for row in result["rows"]:
        assert row["fused_us"] > 0 and row["eager_us"] > 0 and row["fused_GBps"] > 0


def test_bench_step_smoke(tmp_path):
    result = smoke("bench_step", tmp_path, "--profile")
    (row,) = result["rows"]
    assert result["profile"]["top_kernels"] and 0 < result["profile"]["gpu_busy"] <= 1
    assert row["reference"]["images_per_s"] > 0 and row["fast"]["images_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["fast"]["images_per_s"] / row["reference"]["images_per_s"])
    assert row["fuse_speedup"] == pytest.approx(row["fused"]["images_per_s"] / row["fast"]["images_per_s"])


def test_bench_search_smoke(tmp_path):
    result = smoke("bench_search", tmp_path)
    assert [r["trials_per_gpu"] for r in result["rows"]] == [1, 2]
    assert all(r["trials"] == 4 and r["trials_per_hour"] > 0 for r in result["rows"])


def test_bench_loader_smoke(tmp_path):
    from ktfast.data import decode

    result = smoke("bench_loader", tmp_path)
    (row,) = result["rows"]
    kinds = ["gpu", "torch"] + (["dali"] if decode.available() else [])
    assert all(row[k]["images_per_s"] > 0 for k in kinds) and result["dali"] == decode.available()
