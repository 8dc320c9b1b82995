"""The connection plumbing of :class:`~fluxrun.storage.sqlite.SQLiteStorage`: opening its
two connections, running a call on the event loop when the file is free or on the store's
own thread when another process holds the write lock, turning driver errors into
:class:`~fluxrun.errors.StorageError`, and closing it all.

It is apart from the store's verbs so that how a call reaches the database (locks,
threads, retries on a busy file) is read in one place, and the verbs in
:mod:`fluxrun.storage.sqlite` are read as SQL only.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from ..errors import StorageError as _StorageError
from ..errors import with_run

__all__ = ["SQLiteConnections", "about"]

T = TypeVar("T")

_SYNCHRONOUS = {"FULL": "PRAGMA synchronous = FULL", "NORMAL": "PRAGMA synchronous = NORMAL"}


def about(run_id: str | None) -> str:
    """The words naming ``run_id`` in an error message (none without a run)."""
    return "" if run_id is None else f" of run {run_id!r}"


class SQLiteConnections:
    """How :class:`~fluxrun.storage.sqlite.SQLiteStorage` reaches its file (a base class;
    the store's ``__init__`` sets the attributes below).

    Two connections to a file: ``_conn`` (the store's thread and the blocking calls) waits
    up to ``busy_timeout`` for another process's write lock; ``_fast`` (the event loop's)
    never waits, so a call on the loop that finds the file busy goes to the thread instead.
    ``_lock`` lets one call at a time use them within the process.
    """

    path: str
    _synchronous: Literal["FULL", "NORMAL"]
    _busy_ms: int
    _conn: sqlite3.Connection | None
    _fast: sqlite3.Connection | None
    _lock: threading.Lock
    _executor: ThreadPoolExecutor | None
    _closed: bool

    def _open(self, busy_ms: int) -> sqlite3.Connection:
        if self.path not in (":memory:", ""):
            # Never create directories: a path in a missing one is most likely a mistake
            # (a typo, an unmounted volume), and silently creating it would hide the runs.
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                raise _StorageError(
                    f"SQLiteStorage cannot open {self.path!r}: the directory {parent!r} "
                    "does not exist (fluxrun creates no directories; create it first)"
                )
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        # PRAGMA takes no bound parameters: both values come from checked settings.
        conn.execute("PRAGMA busy_timeout = " + str(int(busy_ms)))
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(_SYNCHRONOUS[self._synchronous])
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        return conn

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise _StorageError(f"SQLiteStorage({self.path!r}) is closed")
        if self._conn is None:
            self._conn = self._open(self._busy_ms)
        return self._conn

    def _connect_fast(self) -> sqlite3.Connection:
        # The event loop's own connection never waits for a lock (busy_timeout 0); an
        # in-memory database has only the one connection.
        if self.path == ":memory:":
            return self._connect()
        if self._closed:
            raise _StorageError(f"SQLiteStorage({self.path!r}) is closed")
        if self._fast is None:
            self._fast = self._open(0)
        return self._fast

    def _guarded(
        self,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], T],
        what: str,
        run_id: str | None = None,
    ) -> T:
        try:
            return fn(conn)
        except (sqlite3.Error, OverflowError) as exc:
            # OverflowError: a number the driver cannot bind; the stores check the numbers
            # they know of, this keeps any other from escaping as a bare driver error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _StorageError(
                f"SQLite {what}{about(run_id)} failed on {self.path!r}: {exc}",
                workflow_id=run_id,
            ) from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _locked(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None = None
    ) -> T:
        with self._lock:
            try:
                conn = self._connect()
            except (sqlite3.Error, OSError) as exc:
                raise _StorageError(
                    f"SQLite cannot open {self.path!r} for {what}{about(run_id)}: {exc}",
                    workflow_id=run_id,
                ) from exc
            return self._guarded(conn, fn, what, run_id)

    def _try_on_loop(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None
    ) -> tuple[bool, T | None]:
        """Run ``fn`` right here if nothing has to be waited for; (False, None) if it must wait."""
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            try:
                conn = self._connect_fast()
            except (sqlite3.Error, OSError):
                return False, None  # the thread path reports the error with the full wait
            try:
                return True, self._guarded(conn, fn, what, run_id)
            except _StorageError as exc:
                cause = exc.__cause__
                if isinstance(cause, sqlite3.OperationalError) and (
                    getattr(cause, "sqlite_errorcode", 0) & 0xFF in (5, 6)  # BUSY, LOCKED
                ):
                    return False, None  # another process holds the lock: wait on the thread
                raise
        finally:
            self._lock.release()

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None = None
    ) -> T:
        # A commit here costs ~0.1-0.2 ms, less than handing it to a thread, so it runs on
        # the event loop when the database is free; when another process holds the write
        # lock it is retried on the store's thread, so the loop never waits for a lock.
        try:
            done, result = self._try_on_loop(fn, what, run_id)
            if done:
                return result  # type: ignore[return-value]
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="fluxrun-sqlite")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._locked, fn, what, run_id)
        except _StorageError as exc:
            if run_id is not None:
                with_run(exc, run_id)  # e.g. "closed" or a missing directory: name the run
            raise

    async def close(self) -> None:
        """Close the connections and the store's thread."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            self._closed = True
            for conn in (self._fast, self._conn):
                if conn is not None:
                    conn.close()
            self._fast = self._conn = None
