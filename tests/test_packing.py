"""`ktfast search --pack`: K trials packed as threads of one worker score exactly as the same trials run
one by one; a killed packed worker's K trials come back, each once; the global RNG is taken in turn; the
launcher packs as asked; the CUDA MPS daemon is started with private folders and stopped after the
workers (Ctrl-C and kill included), or one line says why it cannot run. The GPU tests skip without one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from test_search import (
    EXIT_TIMEOUT_S,
    HOLD_TIMEOUT_S,
    SEARCH,
    SEARCH_TIMEOUT_S,
    counted,
    load,
    queue,
    storage_url,
)

from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine import fast
from ktfast.engine.nodes import build_models
from ktfast.graph import Graph
from ktfast.graph_search.packing import MPS_CONTROL, MPSDaemon, Slots
from ktfast.graph_search.search import COUNTED, worker_study
from ktfast.graph_search.study import open_storage, requeue

RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def fixed_params(n: int, seed: int = 1) -> list[dict]:
    """n graphs of the 3-node space of SEARCH; label edges never cut off (no frozen node to pre-train)."""
    rng, names = random.Random(seed), ["n1", "n2", "n3"]
    out = []
    for _ in range(n):
        params = {f"model {m}": rng.choice(["resnet8", "resnet14"]) for m in names[1:]}
        for t in names:
            for s in ["label", *names]:
                if s != t:
                    choices = ["through", "linear", "correct"] + ([] if s == "label" else ["cutoff"])
                    params[f"gate {s}->{t}"] = rng.choice(choices)
        out.append(params)
    return out


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_trials_packed_as_threads_score_as_they_do_one_by_one(kind, tmp_path, hold, monkeypatch):
    url, params = storage_url(kind, tmp_path), fixed_params(4)
    scores = {}
    for pack, workers in (("processes", 1), ("threads", 3)):
        name = f"{pack}-{uuid.uuid4().hex[:8]}"
        cli = [
            *SEARCH,
            "--epochs",
            "2",
            "--trials",
            "4",
            "--pruner",
            "none",
            "--workers",
            str(workers),
            "--pack",
            pack,
            "--storage",
            url,
            "--study",
            name,
        ]
        for p in params:
            queue(cli, p)
        if pack == "threads":  # the 3 slots are held in their first trials until all 3 are there
            hold.set_in(monkeypatch)
            releaser = threading.Thread(target=release_when_held, args=(hold, 3))
            releaser.start()
        assert main(cli) == 0
        trials = counted(load(url, name))
        assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
        others = [
            t for t in load(url, name).get_trials() if t.state not in COUNTED
        ]  # slots that asked at once
        assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in others)
        scores[pack] = {key(t.params): (t.intermediate_values, t.value) for t in trials}
        if pack == "threads":  # one worker process, whose 3 slots each had a trial in training at once
            releaser.join()
            assert len({t.user_attrs["worker"] for t in trials}) == 1
            held = hold.held()
            assert {pid for pid, _ in held} == {int(trials[0].user_attrs["worker"].rpartition(":")[2])}
            assert sorted(slot for _, slot in held) == [f"trial slot {i}" for i in range(3)]
    assert sorted(scores["threads"]) == sorted(map(key, params))
    assert scores["threads"] == scores["processes"]


def release_when_held(hold, count: int) -> None:
    """Release the hold once `count` loops are there (or the wait gave up: the test then fails on what
    `hold.held()` shows, and the search still ends)."""
    try:
        hold.wait(count, HOLD_TIMEOUT_S)
    finally:
        hold.release()


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgres"])
def test_a_killed_packed_worker_has_its_trials_retried_and_none_lost(kind, tmp_path, hold):
    url, name, epochs = storage_url(kind, tmp_path), f"packkill-{uuid.uuid4().hex[:8]}", 6
    cmd = [
        sys.executable,
        "-m",
        "ktfast",
        *SEARCH,
        "--epochs",
        str(epochs),
        "--trials",
        "4",
        "--workers",
        "2",
        "--pack",
        "threads",
        "--pruner",
        "none",
        "--storage",
        url,
        "--study",
        name,
        "--heartbeat-interval",
        "1",
        "--grace-period",
        "3",
    ]
    launcher = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **hold.env}
    )
    try:
        # Both slots of the one worker stop in their trial's second epoch (or its teacher's, being
        # pre-trained) and stay there: the kill finds two trials in flight, however the two threads
        # shared the CPU until then.
        held = hold.wait(2, HOLD_TIMEOUT_S, [launcher])
        [pid] = {pid for pid, _ in held}
        assert sorted(slot for _, slot in held) == ["trial slot 0", "trial slot 1"]
        os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        launcher.kill()
    assert launcher.returncode == 1 and "killed by signal 9" in err and "run the same command again" in err
    victims = [t for t in load(url, name).get_trials() if t.state == RUNNING]
    assert len(victims) == 2 and all(t.user_attrs["worker"].endswith(f":{pid}") for t in victims)

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    trials = load(url, name).get_trials()
    for victim in victims:
        assert trials[victim.number].state == FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state in COUNTED
        assert sorted(retries[0].intermediate_values) == list(
            range(1, epochs + 1)
        )  # trained again from epoch 1
    assert len(counted(load(url, name))) == 4
    assert all(t.state in (*COUNTED, FAIL) for t in trials)


def test_a_stale_trial_failed_by_several_slots_at_once_is_queued_once(tmp_path):
    """On SQLite, slots that find the same stale trial at the same moment may each fail it: one retry."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"), direction="maximize")
    trial = study.ask({"gate label->n1": optuna.distributions.CategoricalDistribution(["through", "linear"])})
    study.tell(trial, state=FAIL)
    [failed], start = study.get_trials(), threading.Barrier(4)

    def fail_it():
        start.wait()
        requeue(study, failed)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=fail_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    retries = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.WAITING
    assert retries[0].params == failed.params


def test_slots_asking_at_once_never_take_the_same_queued_trial(tmp_path):
    """On SQLite, Optuna reads that a queued trial waits, then marks it running: the worker's slots ask in
    turn (without, about one round in five here hands a trial to two slots)."""
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    spec = {
        "storage": url,
        "study": "s",
        "heartbeat_interval": None,
        "grace_period": None,
        "sampler": "random",
        "pruner": "none",
        "min_resource": 1,
    }
    study = worker_study(spec, TrainConfig(), Slots(8, cuda=False))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            for i in range(8):
                study.enqueue_trial({"x": i})
            taken, start = [], threading.Barrier(8)

            def ask():
                start.wait()
                taken.append(study.ask().number)

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(set(taken)) == 8
    finally:
        sys.setswitchinterval(interval)


def test_models_built_in_threads_are_the_ones_built_alone():
    graph = Graph.from_dict(
        {
            "version": 1,
            "name": "g",
            "target": "a",
            "nodes": [{"name": n, "model": "resnet8"} for n in "abc"],
            "edges": [{"from": "label", "to": n, "loss": "ce", "gate": "through"} for n in "abc"],
        }
    )
    cfg = TrainConfig(seed=3)
    alone = build_models(graph, cfg, 4, 16).state_dict()
    built, start = [None] * 4, threading.Barrier(4)

    def build(i):
        start.wait()
        built[i] = build_models(graph, cfg, 4, 16).state_dict()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns as often as they can
    try:
        threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    for state in built:
        assert state.keys() == alone.keys() and all(torch.equal(state[k], alone[k]) for k in alone)


def test_an_error_in_one_slot_ends_the_others_after_their_trial_and_is_raised():
    slots, done, stopped = Slots(3, cuda=False), [], []

    def loop(stop):
        name = threading.current_thread().name
        while not stop.is_set():
            with slots.trial():
                done.append(name)
                if name == "trial slot 1":
                    if done.count(name) == 2:
                        raise RuntimeError("slot 1 broke")
                else:  # a trial that lasts until slot 1's error stops the slots; 60 s bounds a hang
                    stopped.append(stop.wait(60))
                    if not stopped[-1]:
                        return

    with pytest.raises(RuntimeError, match="slot 1 broke"):
        slots.run(loop)
    # The other slots ended after the trial they were in (a slot that had not begun yet ran none).
    assert done.count("trial slot 1") == 2 and all(done.count(f"trial slot {i}") <= 1 for i in (0, 2))
    assert all(stopped)


# ---- MPS ----------------------------------------------------------------------------------------------
FAKE = """#!/bin/sh
echo "${1:-stdin} $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY ${CUDA_VISIBLE_DEVICES:-all}" >> "$MPS_TRACE"
if [ "$1" = -d ]; then
  [ -n "$MPS_REFUSE" ] && { echo "$MPS_REFUSE" >&2; exit 1; }
  exit 0
fi
cat >> "$MPS_TRACE"
[ -n "$MPS_STUCK" ] && { echo "$MPS_STUCK" >&2; exit 1; }
exit 0
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """A stand-in for the MPS control program on PATH that writes down how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / MPS_CONTROL).write_text(FAKE)
    (bin_dir / MPS_CONTROL).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    return tmp_path / "trace"


def trace(path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_mps_runs_a_private_daemon_for_the_workers_and_stops_it_on_ctrl_c(fake_mps, monkeypatch, capsys):
    monkeypatch.setattr(
        "ktfast.graph_search.packing.PROBE", "pass"
    )  # no GPU here: a client that always gets through
    with pytest.raises(KeyboardInterrupt):
        with MPSDaemon("1", 4) as mps:
            folders = mps.env
            assert sorted(folders) == ["CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_PIPE_DIRECTORY"]
            assert all(os.path.isdir(d) for d in folders.values())
            raise KeyboardInterrupt
    pipe, log = folders["CUDA_MPS_PIPE_DIRECTORY"], folders["CUDA_MPS_LOG_DIRECTORY"]
    # started with every GPU visible, then told to quit through the same private pipe
    assert trace(fake_mps) == [["-d", pipe, log, "all"], ["stdin", pipe, log, "all"], ["quit"]]
    assert not os.path.exists(pipe) and capsys.readouterr().err == ""


def test_an_mps_daemon_that_will_not_quit_keeps_its_pipe_and_one_line_says_how_to_stop_it(
    fake_mps, monkeypatch, capsys
):
    monkeypatch.setattr("ktfast.graph_search.packing.PROBE", "pass")
    monkeypatch.setenv("MPS_STUCK", "Cannot find MPS control daemon process")
    with MPSDaemon("0", 2) as mps:
        pipe = mps.env["CUDA_MPS_PIPE_DIRECTORY"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Cannot find MPS control daemon" in err
    assert f"echo quit | CUDA_MPS_PIPE_DIRECTORY={pipe} {MPS_CONTROL}" in err and os.path.isdir(pipe)
    shutil.rmtree(Path(pipe).parent)


@pytest.mark.parametrize("case", ["missing", "refused", "no client"])
def test_mps_that_cannot_run_says_why_in_one_line(case, fake_mps, monkeypatch, capsys):
    if case == "missing":
        monkeypatch.setenv("PATH", "/nonexistent")
    if case == "refused":
        monkeypatch.setenv("MPS_REFUSE", "An instance of this daemon is already running")
    if case == "no client":  # the daemon starts, but a CUDA client cannot connect (here: no GPU at all)
        monkeypatch.setattr("ktfast.graph_search.packing.PROBE", "raise SystemExit('no CUDA device')")
    with MPSDaemon("0", 4) as mps:
        assert mps.env is None
    err = capsys.readouterr().err
    why = {
        "missing": f"{MPS_CONTROL} not found",
        "refused": "already running",
        "no client": "no CUDA device",
    }[case]
    assert err.count("\n") == 1 and why in err and "4 trials of each GPU run as separate processes" in err
    calls = trace(fake_mps) if fake_mps.exists() else []
    assert [c[0] for c in calls] == {"missing": [], "refused": ["-d"], "no client": ["-d", "stdin", "quit"]}[
        case
    ]


@pytest.mark.parametrize(
    "pack, devices",
    [
        ("processes", ["0", "0"]),
        ("threads", ["0", "0", "1", "1"]),
        ("mps", ["0", "0"]),
        ("mps", ["0"]),
        ("no mps", ["0", "0"]),
    ],
)
def test_the_launcher_packs_as_asked_and_a_kill_stops_workers_then_daemon(
    pack, devices, fake_mps, monkeypatch, capsys
):
    """The launcher's wiring, without GPUs: fake workers (sleeping processes), a fake MPS program, and a
    SIGTERM to the launcher while it watches."""
    import ktfast.graph_search.workers as search

    monkeypatch.setattr("ktfast.graph_search.packing.PROBE", "pass")
    if pack == "no mps":
        monkeypatch.setenv("PATH", "/nonexistent")
    started = {}

    def launch(spec, devices, extra_env=None):
        started.update(
            spec=spec, devices=devices, env=extra_env, trace=trace(fake_mps) if fake_mps.exists() else []
        )
        started["procs"] = [
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in devices
        ]
        return started["procs"]

    def watch(*_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the launcher's handler raises as soon as the signal arrives; 5 s bounds a hang

    def outside(*_):  # the test's own handler: were it reached, the launcher would not have taken the signal
        pass

    monkeypatch.setattr(search, "launch", launch)
    monkeypatch.setattr(search, "watch", watch)
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(KeyboardInterrupt):
            search.run_workers(None, {"trials": 4}, devices, pack.removeprefix("no "), 4, True)
        assert signal.getsignal(signal.SIGTERM) is outside  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert all(p.poll() == -signal.SIGTERM for p in started["procs"])  # stopped, not left behind
    daemon = pack == "mps" and len(devices) > 1
    assert started["devices"] == (["0", "1"] if pack == "threads" else devices)
    assert started["spec"].get("slots") == (2 if pack == "threads" else None)
    assert (started["env"] is not None) == daemon
    if daemon:  # started before the workers, told to quit after them, through the folders they were given
        pipe = started["env"]["CUDA_MPS_PIPE_DIRECTORY"]
        assert started["trace"] == [["-d", pipe, started["env"]["CUDA_MPS_LOG_DIRECTORY"], "all"]]
        assert [c[0] for c in trace(fake_mps)] == ["-d", "stdin", "quit"] and not os.path.exists(pipe)
    else:
        assert not fake_mps.exists()
    assert ("MPS cannot run" in capsys.readouterr().err) == (pack == "no mps")


def test_mps_on_the_cpu_is_bad_input(tmp_path, capsys):
    assert main([*SEARCH, "--trials", "1", "--pack", "mps", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pack mps" in err and not (tmp_path / "s.db").exists()


# ---- on a GPU -----------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_GPU = [*(a if a != "cpu" else "cuda" for a in SEARCH), "--gpus", "0"]


def mps_processes() -> set[int]:
    return {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and (p / "comm").exists()
        and (p / "comm").read_text().startswith("nvidia-cuda-mps")
    }


@gpu
def test_on_a_gpu_trials_packed_as_threads_share_it_and_score_as_one_by_one(tmp_path, monkeypatch):
    monkeypatch.delenv("KTFAST_KERNELS")  # the fused kernels, as a search on a GPU runs
    url, params, scores = f"sqlite:///{tmp_path}/s.db", fixed_params(4), {}
    for pack, k in (("processes", 1), ("threads", 2)):
        cli = [
            *ON_GPU,
            "--trials-per-gpu",
            str(k),
            "--epochs",
            "2",
            "--trials",
            "4",
            "--pruner",
            "none",
            "--pack",
            pack,
            "--storage",
            url,
            "--study",
            pack,
        ]
        for p in params:
            queue(cli, p)
        assert main(cli) == 0
        trials = counted(load(url, pack))
        scores[pack] = {key(t.params): t.intermediate_values for t in trials}
        if pack == "threads":
            assert len({t.user_attrs["worker"] for t in trials}) == 1
    # cuDNN may pick non-deterministic kernels: the same within a few images of the 40 (a wrong seed or a
    # disturbed capture is far off)
    for graph, values in scores["processes"].items():
        assert scores["threads"][graph] == pytest.approx(values, abs=0.1)


@gpu
@pytest.mark.skipif(shutil.which(MPS_CONTROL) is None, reason=f"no {MPS_CONTROL}")
def test_on_a_gpu_mps_runs_the_search_and_is_stopped_after_it(tmp_path):
    before = mps_processes()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ktfast",
            *ON_GPU,
            "--trials-per-gpu",
            "2",
            "--epochs",
            "1",
            "--trials",
            "4",
            "--pack",
            "mps",
            "--storage",
            f"sqlite:///{tmp_path}/s.db",
            "--study",
            "m",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "MPS cannot run" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr
    assert len(counted(load(f"sqlite:///{tmp_path}/s.db", "m"))) == 4
    assert mps_processes() <= before and not list(Path(tempfile.gettempdir()).glob("ktfast-mps-*"))


def test_a_gpu_has_one_stream_bank_however_it_is_named(monkeypatch):
    """A run's step asks for the bank of "cuda", a packed search's slot for "cuda:N" of the current
    device: both are the one bank of that GPU, or two trials could lease the same stream."""
    monkeypatch.setattr(fast, "_BANKS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    bank = fast.stream_bank(torch.device("cuda"))
    assert fast.stream_bank(torch.device("cuda", 1)) is bank
    assert fast.stream_bank(torch.device("cuda", 0)) is not bank
