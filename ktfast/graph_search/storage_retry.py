"""A search's storage calls outlive a restarted database server and a long-held SQLite lock (docs/ARCHITECTURE.md §6).

Every call of the RDB storage — the workers' trials, Optuna's ask/tell and heartbeats, the launcher's
progress — is retried with exponential backoff while its error is transient (a connection refused,
closed or invalidated; SQLite's "database is locked"), at most RETRIES times, so a worker waits for
the server and carries on with the trial it is running: nothing is lost, nothing runs twice.
SQLAlchemy reconnects by itself: a connection that fails as disconnected invalidates the pool, and
the retry opens a new one.
"""

from __future__ import annotations

import functools
import inspect
import random
import sys
import threading
import time

from optuna.storages import RDBStorage

RETRIES = 10
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0  # with RETRIES = 10: a server may be away about two minutes
_calls = threading.local()


def transient(e: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is one that waiting can cure."""
    from sqlalchemy import exc

    while e is not None:
        # SQLite's "database is locked" is one of SQLAlchemy's OperationalErrors (sqlite3's SQLITE_BUSY)
        if isinstance(e, (exc.OperationalError, exc.InterfaceError)) or getattr(
            e, "connection_invalidated", False
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def retried(fn):
    """fn, called again after a transient error. Only the outermost storage call of a thread
    retries: the calls it makes inside would multiply the waits."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if getattr(_calls, "active", False):
            return fn(*args, **kwargs)
        _calls.active = True
        try:
            for attempt in range(1, RETRIES + 1):
                try:
                    return fn(*args, **kwargs)
                except Exception as e:
                    if not transient(e):
                        raise
                    delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
                    print(
                        f"ktfast: storage: {_root_message(e)}; retry {attempt} of {RETRIES} in {delay:.1f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(delay)
            return fn(*args, **kwargs)  # the last try: its error, if any, is the caller's
        finally:
            _calls.active = False

    return call


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage (SQLite, PostgreSQL) whose every storage call is `retried`."""


# Every method, wrapped one by one: those of RDBStorage and its bases (the storage and heartbeat
# interfaces), and the private ones that Optuna's caching layer calls directly (`_get_trials`, …).
for _name in {
    n
    for cls in RDBStorage.__mro__
    for n, f in vars(cls).items()
    if inspect.isfunction(f) and not n.startswith("__")
}:
    setattr(RetryingRDBStorage, _name, retried(getattr(RDBStorage, _name)))
