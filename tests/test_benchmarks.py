"""The GPU suite's smoke run: the whole plan at CPU size — every benchmark script end to end, time
boxes, the summary — and what each benchmark reports, checked against what it measured."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The budget and the timeout bound a hang, not the speed: the whole run takes 130 s on one CPU core
    # shared with a busy process.
    run = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--smoke", "--budget", "1200", "--out",
                          str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "stdout": run.stdout, "summary": summary,
            "parts": {p["name"]: p for p in summary["parts"]}}


def result(suite, name: str) -> dict:
    return suite["parts"][name]["result"]["json"]


def test_suite_runs_every_part_and_writes_few_files(suite):
    parts = suite["parts"]
    assert list(parts) == ["tests", "kernels", "step", "step-compile", "loader", "search"]
    assert parts["tests"]["status"].startswith("skipped") and parts["step-compile"]["status"].startswith("skipped")
    for name in ("kernels", "step", "loader", "search"):
        assert parts[name]["status"] == "ok" and parts[name]["result"]["file"] == f"{name}-smoke.json"
    # At most five files come back from a GPU machine's output folder: everything fits in them.
    assert sorted(p.name for p in suite["out"].iterdir()) == ["benchmarks.log", "summary.json", "summary.txt"]
    text = (suite["out"] / "summary.txt").read_text()
    assert suite["stdout"].rstrip().endswith(text.rstrip())  # the summary is printed last
    for heading in ("kernels (edge losses", "step on", "loader on", "search on", "goals"):
        assert heading in text
    assert "==== step: python benchmarks/bench_step.py" in (suite["out"] / "benchmarks.log").read_text()


def test_unpack_writes_the_benchmark_jsons(suite, tmp_path):
    subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--unpack", str(suite["out"] / "summary.json"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-smoke.json", "loader-smoke.json",
                                                         "search-smoke.json", "step-smoke.json"]
    assert json.loads((tmp_path / "step-smoke.json").read_text()) == result(suite, "step")


def test_kernels_rows_count_the_graph_and_the_bytes(suite):
    rows = result(suite, "kernels")["rows"]
    new_kinds = ["dkd", "dist", "kl std", "dkd+dist std"]  # the modern logit distillation's rows follow KL's
    assert [(r["kind"], r["M"], r["B"], r["C"]) for r in rows] == [("kl", 2, 8, 10), ("kl", 3, 4, 100)] + [
        (k, 2, 8, 10) for k in new_kinds]
    for r in rows:
        m, b, c = r["M"], r["B"], r["C"]
        assert r["edges"] == m + m * (m - 1)  # a label edge into each node, an edge of the kind per ordered pair
        # Logits read twice, their gradient written once (fp32), the labels (int64) read once.
        assert r["fused_GBps"] == pytest.approx((3 * m * b * c * 4 + 8 * b) / (r["fused_us"] * 1e-6) / 1e9)
        assert r["step_entry"]["host_us"] > 0


def test_step_rows_count_each_image_once_in_the_time_measured(suite):
    step = result(suite, "step")
    (row,) = step["rows"]
    assert step["profile"]["top_kernels"] and 0 < step["profile"]["gpu_busy"] <= 1
    assert step["profile"]["path"] == "fast"
    measured = 0.0
    for path in ("reference", "fast", "fast-eager", "fused"):
        r = row[path]
        # images/s counts each image once for the whole graph (not once per node)
        assert r["images"] == step["steps"] * row["batch_size"]
        assert r["images_per_s"] == pytest.approx(r["images"] / r["elapsed_s"])
        assert r["config"]["reference"] == (path == "reference")
        assert not r["cuda_graph_used"]  # a CPU has no CUDA graph, whatever the flag says
        measured += r["elapsed_s"]
    assert row["fast-eager"]["config"]["cuda_graph"] is False and row["fast"]["config"]["cuda_graph"] is True
    assert row["fused"]["config"]["fuse"] is True and row["fast"]["config"]["fuse"] is False
    assert measured < suite["parts"]["step"]["seconds"]  # the timed steps lie inside the part's run


def test_search_and_loader_rows(suite):
    from ktfast.data import decode

    search = result(suite, "search")["rows"]
    assert [(r["pack"], r["trials_per_gpu"]) for r in search] == [("processes", 1), ("processes", 2), ("threads", 2)]
    for r in search:
        assert r["trials"] == 2
        # Steady throughput leaves out the workers' start-up: it can only be the higher one.
        assert r["steady_trials_per_hour"] >= r["trials_per_hour"] > 0
        assert r["gpu_busy"] is None and r["gpu_busy_steady"] is None  # no GPU to sample
    loader = result(suite, "loader")
    (row,) = loader["rows"]
    kinds = ["gpu", "torch"] + (["dali"] if decode.available() else [])
    assert all(row[k]["images_per_s"] > 0 for k in kinds) and loader["dali"] == decode.available()


def test_bad_input_exits_2_with_one_line(tmp_path):
    for args in (["--unpack", str(tmp_path / "missing.json")], []):
        run = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), *args], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
