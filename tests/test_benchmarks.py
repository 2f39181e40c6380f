"""The GPU suite's smoke run: the whole plan at CPU size — every benchmark script end to end, time
boxes, the summary — and what each benchmark reports, checked against what it measured."""

import json
import os
import statistics
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
    run = subprocess.run(
        [sys.executable, str(BENCH / "gpu_suite.py"), "--smoke", "--budget", "1200", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "out": out,
        "stdout": run.stdout,
        "summary": summary,
        "parts": {p["name"]: p for p in summary["parts"]},
    }


def result(suite, name: str) -> dict:
    return suite["parts"][name]["result"]["json"]


def test_suite_runs_every_part_and_writes_few_files(suite):
    parts = suite["parts"]
    assert list(parts) == ["tests", "kernels", "step", "replicas", "step-compile", "loader", "search", "ddp"]
    assert parts["tests"]["status"].startswith("skipped") and parts["step-compile"]["status"].startswith(
        "skipped"
    )
    for name in ("kernels", "step", "replicas", "loader", "search", "ddp"):
        assert parts[name]["status"] == "ok" and parts[name]["result"]["file"] == f"{name}-smoke.json"
    # At most five files come back from a GPU machine's output folder: everything fits in them.
    assert sorted(p.name for p in suite["out"].iterdir()) == ["benchmarks.log", "summary.json", "summary.txt"]
    text = (suite["out"] / "summary.txt").read_text()
    assert suite["stdout"].rstrip().endswith(text.rstrip())  # the summary is printed last
    for heading in (
        "kernels (edge losses",
        "step on",
        "seeds as replicas on",
        "loader on",
        "search on",
        "ddp on",
        "goals",
    ):
        assert heading in text
    assert "==== step: python benchmarks/bench_step.py" in (suite["out"] / "benchmarks.log").read_text()


def test_unpack_writes_the_benchmark_jsons(suite, tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_suite.py"),
            "--unpack",
            str(suite["out"] / "summary.json"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ddp-smoke.json",
        "kernels-smoke.json",
        "loader-smoke.json",
        "replicas-smoke.json",
        "search-smoke.json",
        "step-smoke.json",
    ]
    assert json.loads((tmp_path / "step-smoke.json").read_text()) == result(suite, "step")


def test_kernels_rows_count_the_graph_and_the_bytes(suite):
    rows = result(suite, "kernels")["rows"]
    new_kinds = ["dkd", "dist", "kl std", "dkd+dist std"]  # the modern logit distillation's rows follow KL's
    assert [(r["kind"], r["M"], r["B"], r["C"]) for r in rows] == [("kl", 2, 8, 10), ("kl", 3, 4, 100)] + [
        (k, 2, 8, 10) for k in new_kinds
    ]
    for r in rows:
        m, b, c = r["M"], r["B"], r["C"]
        assert r["edges"] == m + m * (
            m - 1
        )  # a label edge into each node, an edge of the kind per ordered pair
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


def test_replicas_rows_count_every_replica_s_images(suite):
    res = result(suite, "replicas")
    (row,) = res["rows"]
    steps, b, seeds = res["steps"], row["batch_size"], row["seeds"]
    assert seeds == 2 and len(row["one_by_one"]["runs"]) == seeds
    assert row["replicas"]["images"] == seeds * steps * b  # images/s x S: each replica's images counted
    assert all(r["images"] == steps * b for r in row["one_by_one"]["runs"])
    alone = row["one_by_one"]
    assert alone["images_per_s"] == pytest.approx(
        seeds * steps * b / sum(r["elapsed_s"] for r in alone["runs"])
    )
    assert row["speedup"] == pytest.approx(row["replicas"]["images_per_s"] / alone["images_per_s"])
    assert row["time_vs_one_seed"] == pytest.approx(
        row["replicas"]["ms_per_step"] / alone["ms_per_seed_step"]
    )


def test_the_replicas_goal_is_judged_on_dcl3_at_five_seeds():
    sys.path.insert(0, str(BENCH))
    import gpu_suite

    row = {"graph": "dcl3 (R32,R110,R32)", "batch_size": 64, "seeds": 5}
    for time_vs_one_seed, verdict in ((1.8, "met (worst 1.80)"), (2.4, "MISSED (worst 2.40)")):
        results = {
            "replicas": {
                "rows": [
                    {**row, "time_vs_one_seed": time_vs_one_seed},
                    {**row, "seeds": 2, "time_vs_one_seed": 9.0},
                ]
            }
        }
        (line,) = [x for x in gpu_suite.goal_lines(results, cuda=True) if "replicas" in x]
        assert line.endswith(verdict)


def test_search_and_loader_rows(suite):
    from ktfast.data import decode

    search = result(suite, "search")["rows"]
    assert [(r["pack"], r["trials_per_gpu"]) for r in search] == [
        ("processes", 1),
        ("processes", 2),
        ("threads", 2),
    ]
    for r in search:
        assert r["trials"] == 2
        # Steady throughput leaves out the workers' start-up: it can only be the higher one.
        assert r["steady_trials_per_hour"] >= r["trials_per_hour"] > 0
        assert r["gpu_busy"] is None and r["gpu_busy_steady"] is None  # no GPU to sample
        # The best objective: a search_val accuracy of the smoke set's 20 held-out images (5 per class).
        assert 0 <= r["best_objective"] <= 1 and r["best_objective"] * 20 == pytest.approx(
            round(r["best_objective"] * 20), abs=1e-9
        )
        assert (
            0 < r["best_after_s"] <= r["wall_s"] and r["trials_per_gpu_hour"] is None
        )  # no GPU-hours on a CPU
    loader = result(suite, "loader")
    (row,) = loader["rows"]
    kinds = ["gpu", "torch"] + (["dali"] if decode.available() else [])
    assert all(row[k]["images_per_s"] > 0 for k in kinds) and loader["dali"] == decode.available()


def test_ddp_rows_train_the_same_weights_as_the_flat_all_reduce(suite):
    """DDP (what place data runs) holds every trainable tensor, the flat variant none, and after the
    same steps on the same batches both copies' weights are equal bit for bit: at 2 processes each
    element's average is (a + b) / 2 either way (DDP halves first; halving is exact, + commutes)."""
    res = result(suite, "ddp")
    assert (res["world_size"], res["backend"]) == (2, "gloo")
    (row,) = res["rows"]
    assert row["ddp"]["ddp_params"] == row["trainable_params"] > 0 and row["flat"]["ddp_params"] == 0
    assert row["weights_equal"] and row["weights_max_abs_diff"] == 0.0
    for variant in ("flat", "ddp"):
        times = row[variant]["rounds_ms_per_step"]
        assert len(times) == res["rounds"]
        assert row[variant]["ms_per_step"] == pytest.approx(statistics.median(times))
    assert row["ddp_vs_flat"] == pytest.approx(row["ddp"]["ms_per_step"] / row["flat"]["ms_per_step"])


def test_bad_input_exits_2_with_one_line(tmp_path):
    for args in (["--unpack", str(tmp_path / "missing.json")], []):
        run = subprocess.run(
            [sys.executable, str(BENCH / "gpu_suite.py"), *args], capture_output=True, text=True
        )
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr


# ---- bench_distill.py: the logit distillation comparison on digits ----------------------------
DISTILL_METHODS = ["alone", "kd", "kd_ls", "dkd", "dist", "dcl"]


@pytest.fixture(scope="module")
def distill(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    # The timeout bounds a hang: the smoke run took 3 minutes on 2 busy CPU cores, 12 on 2 very busy ones.
    run = subprocess.run(
        [sys.executable, str(BENCH / "bench_distill.py"), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, json.loads((out / "distill-digits.json").read_text())


def test_distill_graphs_differ_in_the_method_alone(distill):
    from ktfast.graph import Graph

    out, result = distill
    assert list(result["methods"]) == DISTILL_METHODS
    graphs = {n: Graph.load(out / "graphs" / f"{n}.json") for n in DISTILL_METHODS}
    assert {g.nodes[g.target].model for g in graphs.values()} == {"resnet8"}
    edges = {n: [e for e in graphs[n].edges if e.source == "teacher"] for n in DISTILL_METHODS[1:5]}
    assert all(len(e) == 1 and graphs[n].nodes["teacher"].init == "pretrained" for n, e in edges.items())
    kd, kd_ls, dkd, dist = (edges[n][0] for n in DISTILL_METHODS[1:5])
    assert (kd.loss, kd.standardize, kd.temperature) == ("kl", False, 4.0)
    assert (kd_ls.loss, kd_ls.standardize, kd_ls.temperature) == ("kl", True, 4.0)
    assert (dkd.loss, dkd.alpha, dkd.beta, dkd.gate, dkd.warmup, dkd.temperature) == (
        "dkd",
        1,
        8,
        "warmup",
        1 / 12,
        4,
    )
    assert (dist.loss, dist.gate, dist.temperature) == ("dist", "through", 4.0)
    assert [e.source for e in graphs["alone"].edges] == ["label"]
    assert len(graphs["dcl"].edges) == 9 and not any(
        getattr(n, "frozen", False) for n in graphs["dcl"].nodes.values()
    )


def test_distill_figures_are_the_runs_final_epochs(distill):
    out, result = distill
    # One teacher for the seed, pre-trained once and loaded by the four methods that have one.
    assert len(list((out / "cache" / "pretrained").glob("*.pt"))) == 1
    teacher = result["teacher_acc"]["acc"]
    assert [result["methods"][n]["nodes"]["teacher"] for n in DISTILL_METHODS[1:5]] == [teacher] * 4
    md = (out / "distill-digits.md").read_text()
    for name in DISTILL_METHODS:
        m, run = result["methods"][name], out / "runs" / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        target = json.loads((run / "graph.json").read_text())["target"]
        config = json.loads((run / "config.json").read_text())
        assert (
            len(rows) == 1
            and config["epochs"] == 1
            and config["train_fraction"] == 0.1
            and config["reference"]
        )
        assert m["acc"] == [100 * rows[-1]["test"][target]["acc"]] and (m["mean"], m["std"]) == (
            m["acc"][0],
            0.0,
        )
        assert f"--graph graphs/{name}.json" in m["command"] and "--reference" in m["command"]
        assert f"| {name} | {m['mean']:.2f} ± 0.00 |" in md
    assert (out / "distill-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_mean_and_std_over_seeds(tmp_path, monkeypatch):
    """Two seeds at 50 % and 70 %: mean 60, sample std sqrt(((−10)² + 10²) / 1) = 10·√2."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_distill

    for seed, acc in ((0, 0.5), (1, 0.7)):
        (tmp_path / f"seed{seed}").mkdir()
        rows = [{"test": {"student": {"acc": 0.1}}}, {"test": {"student": {"acc": acc}}}]
        (tmp_path / f"seed{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accs = bench_distill.final_accuracies(tmp_path, [0, 1])["student"]
    assert accs == pytest.approx([50, 70])
    assert bench_distill.mean_std(accs) == pytest.approx((60, 10 * 2**0.5))


def test_distill_refuses_an_out_folder_with_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    run = subprocess.run(
        [sys.executable, str(BENCH / "bench_distill.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--out" in run.stderr, run.stderr
