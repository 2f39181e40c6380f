"""A search whose storage goes away for a while: the PostgreSQL server stopped and started again
mid-search (the real server `.ci/run` starts), an SQLite file locked by another process past the
workers' lock timeout. The workers wait and carry on: every trial completes once, none is lost or
failed by the fault, none runs twice."""

import os
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
from test_search import HOLD_TIMEOUT_S, SEARCH_TIMEOUT_S

from ktfast.graph_search.storage_retry import RetryingRDBStorage, transient
from ktfast.graph_search.study import open_storage

TINY = "synthetic:classes=4,size=16,train=96,test=40"
SEARCH = [
    "search",
    "--nodes",
    "2",
    "--target-model",
    "resnet8",
    "--models",
    "resnet8",
    "--dataset",
    TINY,
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--device",
    "cpu",
    "--quiet",
    "--pruner",
    "none",
    "--gates",
    "through,correct",
]  # no cutoff: no graph is refused (a frozen target), every trial trains
EPOCHS, TRIALS = 4, 4
# Bounds the wait for a worker's first retry once the fault is there (it comes within seconds: the
# end of the held epoch, or the launcher's next poll); within the ~76 s the workers wait at least.
RETRY_TIMEOUT_S = 60


pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def required(names: list[str]) -> list[str]:
    values = [os.environ.get(n) for n in names]
    if all(values):
        return values
    if os.environ.get("CI"):
        pytest.fail(f"{' / '.join(names)} unset in CI: .ci/run exports them for this test")
    pytest.skip(f"{' / '.join(names)} unset: no PostgreSQL server this test may restart (.ci/run starts one)")


def pg_ctl(action: str) -> None:
    """Stop (fast: every connection cut) or start the test server, as the system user owning it."""
    ctl, data = required(["KTFAST_TEST_PG_CTL", "KTFAST_TEST_PGDATA"])
    cmd = [ctl, "-D", data, "-w", *(["-m", "fast"] if action == "stop" else ["-l", f"{data}/log"]), action]
    user = os.environ.get("KTFAST_TEST_PG_USER")
    if user and os.geteuid() == 0:
        cmd = ["su", user, "-s", "/bin/sh", "-c", shlex.join(cmd)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def search(url: str, name: str, workers: int, errors, env: dict) -> subprocess.Popen:
    """The search, its workers' stderr in the file `errors` (read while they run)."""
    cmd = [
        sys.executable,
        "-m",
        "ktfast",
        *SEARCH,
        "--epochs",
        str(EPOCHS),
        "--trials",
        str(TRIALS),
        "--workers",
        str(workers),
        "--storage",
        url,
        "--study",
        name,
    ]
    with open(errors, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env})


def wait_for_text(path, text: str, proc: subprocess.Popen) -> None:
    """Until `text` is in the file; RETRY_TIMEOUT_S bounds a hang, a process that ends first fails it."""
    deadline = time.monotonic() + RETRY_TIMEOUT_S
    while text not in path.read_text():
        assert proc.poll() is None, f"the search ended before it said {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} in {RETRY_TIMEOUT_S} s"
        time.sleep(0.05)


def assert_every_trial_complete_once(url: str, name: str) -> None:
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS
    for t in complete:  # each trained through once, reported every epoch, none a re-run of a failed one
        assert sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) and t.user_attrs["graph"]
        assert "failed_trial" not in t.system_attrs
    # Nothing else failed but the search's own give-way: a worker that finds --trials already running
    # fails its fresh trial untrained ("surplus"), which is not counted.
    others = [(t.state, t.user_attrs.get("fail_reason", "")) for t in trials if t not in complete]
    assert all(
        state == optuna.trial.TrialState.FAIL and reason.startswith("surplus") for state, reason in others
    ), others


def test_postgres_restarted_mid_search_the_workers_reconnect_and_lose_no_trial(tmp_path, hold):
    [url] = required(["KTFAST_TEST_POSTGRES"])
    required(["KTFAST_TEST_PG_CTL", "KTFAST_TEST_PGDATA"])
    name, errors = f"restart-{uuid.uuid4().hex[:8]}", tmp_path / "stderr"
    launcher = search(url, name, 2, errors, hold.env)
    try:
        hold.wait(2, HOLD_TIMEOUT_S, [launcher])  # both workers in a trial, with epochs still to report
        pg_ctl("stop")
        try:
            hold.release()
            wait_for_text(errors, "retry 1 of", launcher)  # a call met the stopped server, and waits
        finally:
            pg_ctl("start")
        out, _ = launcher.communicate(timeout=SEARCH_TIMEOUT_S)
    finally:
        launcher.kill()
    err = errors.read_text()
    assert launcher.returncode == 0, err[-3000:]
    assert "ktfast: storage:" in err  # the server was away, and was waited for
    assert f"{TRIALS} of {TRIALS} trials finished: {TRIALS} complete" in out
    assert_every_trial_complete_once(url, name)


def test_sqlite_locked_past_the_timeout_under_4_workers_loses_no_trial(tmp_path, hold):
    db, errors = tmp_path / "search.db", tmp_path / "stderr"
    url, name = f"sqlite:///{db}", "locked"
    # Writers give up on the lock after 0.2 s instead of 120 s: the test need not hold it for minutes.
    launcher = search(url, name, 4, errors, {"KTFAST_SQLITE_TIMEOUT_S": "0.2", **hold.env})
    try:
        hold.wait(4, HOLD_TIMEOUT_S, [launcher])  # every worker in a trial, with epochs still to report
        holder = sqlite3.connect(db, timeout=60, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # no worker reads or writes while this is held
        try:
            hold.release()
            wait_for_text(errors, "database is locked; retry 1 of", launcher)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        out, _ = launcher.communicate(timeout=SEARCH_TIMEOUT_S)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, errors.read_text()[-3000:]
    assert_every_trial_complete_once(url, name)


def take(storage, trial_id: int, state) -> bool:
    try:
        return storage.set_trial_state_values(trial_id, state)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker finished (failed) it first
        return False


@pytest.mark.parametrize("move", ["queued trial taken", "stale trial failed"])
def test_sqlite_lets_one_worker_only_move_a_trial(move, tmp_path, monkeypatch):
    # Two workers (two connections) move one trial at the same moment — take a queued trial (WAITING →
    # RUNNING), or fail a trial whose worker died (RUNNING → FAIL, which queues its retry): each stops
    # between reading the trial's state and writing its own until the other has read it too, or 3 s.
    url = f"sqlite:///{tmp_path / 'search.db'}"
    first, second = open_storage(url), open_storage(url)
    study = optuna.create_study(storage=first, study_name="queued")
    study.enqueue_trial({"x": 1})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    state = optuna.trial.TrialState.RUNNING
    if move == "stale trial failed":
        assert first.set_trial_state_values(trial_id, state)
        state = optuna.trial.TrialState.FAIL
    both_read = threading.Barrier(2)
    check = RetryingRDBStorage.check_trial_is_updatable

    def read_then_wait(self, trial_id, trial_state):
        try:
            both_read.wait(timeout=3)  # with the write lock held from the read, the other cannot read yet
        except threading.BrokenBarrierError:
            pass
        return check(self, trial_id, trial_state)

    monkeypatch.setattr(RetryingRDBStorage, "check_trial_is_updatable", read_then_wait)
    moved = []
    workers = [
        threading.Thread(target=lambda s=s: moved.append(take(s, trial_id, state))) for s in (first, second)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert sorted(moved) == [False, True]


def test_a_held_sqlite_lock_is_transient_and_every_storage_method_retries(tmp_path):
    """The error of a write that found the file locked past its timeout (its SQLAlchemy
    OperationalError, under Optuna's) is waited out; an error of another type is not, whatever its
    text. The heartbeat interface (a base class of RDBStorage: `get_failed_trial_callback` is its own
    alone) is retried with the storage's calls and the private ones Optuna's cache calls."""
    db = tmp_path / "search.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.05}})
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "locked")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception) as locked:
            storage.create_new_trial(study_id)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert transient(locked.value)
    assert not transient(ValueError("database is locked")) and not transient(None)
    for name in ("create_new_trial", "_get_trials", "record_heartbeat", "get_failed_trial_callback"):
        wrapped = getattr(RetryingRDBStorage, name).__wrapped__
        assert wrapped is getattr(optuna.storages.RDBStorage, name), name
