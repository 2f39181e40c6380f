"""The study of a search (docs/ARCHITECTURE.md §6): its storage — an SQLite file, an Optuna journal file or a
PostgreSQL server — opened with the retries SQLite's lock needs, the study created or joined,
its sampler and pruner, and the re-queueing of a dead worker's trial."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import threading
import warnings
from pathlib import Path

import optuna

from ktfast.args import UsageError
from ktfast.config import TrainConfig, recipe_fields
from ktfast.graph_search.storage_retry import RetryingRDBStorage
from ktfast.internals import without_asha_rungs

DEFAULT_STORAGE = "sqlite:///ktfast-search.db"
MAX_RETRY = 3  # a graph whose worker keeps dying (killed for memory, say) is given up after this
# How long an SQLite writer waits for the lock before "database is locked" (then its call is retried).
SQLITE_TIMEOUT_S = float(os.environ.get("KTFAST_SQLITE_TIMEOUT_S", 120))
_REQUEUE_LOCK = threading.Lock()


# Config fields a study's record may hold from an older ktfast, each with the one value it could have
# had: a study that has them is joined as one made now.
RETIRED = {"extra": {}}


def recipe(cfg: TrainConfig) -> dict:
    """What must be the same for every worker of a study (the settings marked recipe)."""
    values = cfg.to_dict()
    return {k: values[k] for k in recipe_fields()}


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def shown(url: str) -> str:
    """The storage URL without its password, for messages."""
    if is_journal(url):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads `postgresql://` as psycopg 3; psycopg2 (the `postgres` extra) serves as well."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """The storage a URL names: `journal:PATH` or a `.log` path is an Optuna journal file; anything else
    an SQLAlchemy URL (SQLite, PostgreSQL), whose calls wait out a lost server or a held lock
    (`ktfast.graph_search.storage_retry`). Workers pass `heartbeat_interval`: a trial whose worker stops beating
    for `grace_period` seconds (default twice the interval) is failed and queued again."""
    try:
        if is_journal(url):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        sqlite = url.startswith("sqlite")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {}
        storage = RetryingRDBStorage(
            _with_driver(url),
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=requeue if heartbeat_interval else None,
        )
        if sqlite:
            _immediate_transactions(storage.engine)
        return storage
    except Exception as e:  # unreachable server, bad URL, missing directory: one line either way
        raise UsageError(f"--storage {shown(url)}: cannot open it: {_root_message(e)}") from None


def _immediate_transactions(engine) -> None:
    """Python's sqlite3 reads outside any transaction and begins one only at the first write, so two
    workers could both read a queued trial as WAITING and both take it (Optuna checks, then writes).
    With BEGIN IMMEDIATE every transaction holds SQLite's write lock from its first statement: a
    storage call's read and write are one step, and the second worker reads RUNNING."""
    from sqlalchemy import event

    event.listen(
        engine, "connect", lambda dbapi_connection, _: setattr(dbapi_connection, "isolation_level", None)
    )
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    engine.dispose()  # the connections Optuna opened while setting the storage up predate the listeners


def open_study(storage, name: str, space, cfg: TrainConfig, pruner: str, min_resource: int) -> optuna.Study:
    """Create the study, or join it when it was made by the same search — the same space, recipe and
    pruning, since workers that prune differently would make one study of two; any other is an error."""
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True
        )
    except Exception as e:
        raise UsageError(f"--study {name}: cannot create or load it: {_root_message(e)}") from None
    mine = {
        **space.to_dict(),
        **json.loads(json.dumps(recipe(cfg))),
        "pruner": pruner,
        "min_resource": min_resource,
    }
    theirs = study.user_attrs.get("ktfast")
    if theirs is not None:
        theirs = {k: v for k, v in theirs.items() if k not in RETIRED or v != RETIRED[k]}
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise UsageError(f"--study {name}: the study was not made by ktfast search; choose another name")
        study.set_user_attr("ktfast", mine)
    elif theirs != mine:
        key = next(k for k in {**theirs, **mine} if theirs.get(k) != mine.get(k))
        unrecorded = space.UNRECORDED_DEFAULTS.get(key)
        raise UsageError(
            f"--study {name}: the study searches with {key}={theirs.get(key, unrecorded)!r}, not "
            f"{mine.get(key, unrecorded)!r}; re-run it as it was started, or choose another --study"
        )
    return study


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    # constant_liar: parallel TPE workers do not all sample around the same running trial
    return (
        optuna.samplers.TPESampler(constant_liar=True) if name == "tpe" else optuna.samplers.RandomSampler()
    )


def make_pruner(name: str, epochs: int, min_resource: int = 1) -> optuna.pruners.BasePruner:
    """The first decision at epoch `min_resource` (docs/ARCHITECTURE.md §6): gates that act late in training
    look bad early, and a pruner that judges at epoch 1 is biased against them."""
    if name == "asha":  # the papers' ASHA: rungs at epochs m, 2m, 4m, …, the top half goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=epochs, reduction_factor=2
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=min_resource - 1)
    return optuna.pruners.NopPruner()


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a dead worker's trial again with the same graph, through Optuna's retry callback. The
    copy trains from epoch 0: it must not inherit the dead run's ASHA rungs, nor its worker.

    Queued once: only the worker that moves the stale trial from RUNNING to FAIL calls this (a row
    lock on PostgreSQL, BEGIN IMMEDIATE on SQLite). The lock guards the trial slots of one worker, the
    look for a retry the workers of a journal file but for a window of milliseconds."""
    with _REQUEUE_LOCK:
        if any(
            t.system_attrs.get("retry_history", [None])[-1] == trial.number
            for t in study.get_trials(deepcopy=False)
        ):
            return
        trial = copy.deepcopy(trial)
        trial.system_attrs = without_asha_rungs(trial.system_attrs)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def find_study(url: str, name: str | None) -> optuna.Study:
    """A study to read (`ktfast export`, `ktfast report`): the storage must exist, since opening a
    missing SQLite or journal file would create it; `name` may be left out when it holds one study."""
    if is_journal(url) or url.startswith("sqlite"):
        path = url.removeprefix("journal:") if is_journal(url) else _sqlite_path(url)
        if path and not Path(path).is_file():
            raise UsageError(f"--storage {shown(url)}: no such file {path}")
    storage = open_storage(url)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as e:
        raise UsageError(f"--storage {shown(url)}: cannot read it: {_root_message(e)}") from None
    if name is None:
        if len(names) != 1:
            raise UsageError(
                f"--study: required, the storage holds {len(names)} studies: {', '.join(names) or '-'}"
            )
        name = names[0]
    if name not in names:
        raise UsageError(f"--study: no study {name!r} in {shown(url)}")
    return optuna.load_study(study_name=name, storage=storage)


def _sqlite_path(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception:
        return None  # a malformed URL: open_storage says so
    return database if database not in (None, "", ":memory:") else None
