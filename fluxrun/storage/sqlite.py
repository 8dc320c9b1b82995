"""Embedded durable store on one SQLite file (WAL), the default for a single machine."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from ..errors import ConcurrentModificationError, InvalidArgumentError, SchemaVersionError, with_run
from ..errors import StorageError as _StorageError
from ._base import (
    KEEP,
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    ListQuery,
    RunRow,
    StepRow,
    Store,
    Transition,
    delete_busy_error,
    transition_error,
)
from ._limits import (
    check_new_run,
    check_transition_numbers,
    lease_seconds,
    page,
    row_limit,
    usable_fences,
)
from ._migrations import migrations
from ._rows import (
    ATTEMPT_COLUMNS,
    RUN_COLUMNS,
    STEP_COLUMNS,
    attempt_fields,
    attempt_from,
    run_from,
    step_fields,
    step_from,
)

__all__ = ["SQLiteStorage"]

T = TypeVar("T")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)

_SYNCHRONOUS = {"FULL": "PRAGMA synchronous = FULL", "NORMAL": "PRAGMA synchronous = NORMAL"}
_RUN_COLUMNS = ", ".join(RUN_COLUMNS)
_STEP_COLUMNS = ", ".join(STEP_COLUMNS)
_INSERT_STEP = (
    "INSERT INTO flux_steps (run_id, " + _STEP_COLUMNS + ") "
    "VALUES (?, " + ", ".join("?" * len(STEP_COLUMNS)) + ")"
)
_UPDATE_STEP = (
    "UPDATE flux_steps SET "
    + ", ".join(c + " = ?" for c in STEP_COLUMNS[1:])
    + " WHERE run_id = ? AND idx = ?"
)
_ATTEMPT_COLUMNS = ", ".join(ATTEMPT_COLUMNS)
# seq is the next number within the run; the transition holds the write lock, so no race.
_INSERT_ATTEMPT = (
    "INSERT INTO flux_attempts (run_id, " + _ATTEMPT_COLUMNS + ") VALUES (?, "
    "(SELECT coalesce(max(seq), 0) + 1 FROM flux_attempts WHERE run_id = ?), "
    + ", ".join("?" * (len(ATTEMPT_COLUMNS) - 1))
    + ")"
)
#: Microseconds of the latest time a datetime can hold: a lease expiry never goes past it.
_MAX_MICROS = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // _MICRO


def to_micros(value: dt.datetime | None) -> int | None:
    """A UTC datetime as integer microseconds since the epoch (exact, unlike a float)."""
    return None if value is None else (value - _EPOCH) // _MICRO


def from_micros(value: int | None) -> dt.datetime | None:
    """Inverse of :func:`to_micros`."""
    return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


def _step_values(s: StepRow) -> tuple[Any, ...]:
    return step_fields(s, to_micros)


def _step_row(r: tuple[Any, ...]) -> StepRow:
    return step_from(r, from_micros)


def _run_row(r: tuple[Any, ...], steps: tuple[StepRow, ...] = ()) -> RunRow:
    return run_from(r, from_micros, steps)


def _duplicate(exc: sqlite3.IntegrityError) -> bool:
    """Whether a constraint failure is a duplicate key (not, say, a CHECK on JSON text)."""
    return getattr(exc, "sqlite_errorcode", None) in (
        1555,  # SQLITE_CONSTRAINT_PRIMARYKEY
        2067,  # SQLITE_CONSTRAINT_UNIQUE
    )


def _about(run_id: str | None) -> str:
    return "" if run_id is None else f" of run {run_id!r}"


class SQLiteStorage(Store):
    """Durable store in one SQLite file, in WAL mode; several processes may share the file.

    Each step commit is one short ``BEGIN IMMEDIATE`` transaction whose update is a
    compare-and-set on the run's version and fence. A call runs on the event loop when the
    database is free (a commit costs less than a hand-off to a thread); when another process
    holds the write lock it waits on the store's own thread instead, so the event loop never
    waits for a lock.

    Args:
        path: The database file (created if missing, in a directory that must exist), or
            ``":memory:"``.
        synchronous: ``"FULL"`` (default) makes every commit durable on power loss;
            ``"NORMAL"`` is faster and may lose the last commits on power loss (never on a
            process crash) and is still consistent.
        busy_timeout: Seconds to wait for another process's write lock.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidArgumentError(
                f"SQLiteStorage path must be a str or path, got {type(path).__name__}"
            )
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidArgumentError(
                f"SQLiteStorage synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}"
            )
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, int | float)
            or not math.isfinite(busy_timeout)
            or busy_timeout < 0
        ):
            raise InvalidArgumentError(
                f"SQLiteStorage busy_timeout must be a finite number of seconds >= 0, "
                f"got {busy_timeout!r}"
            )
        if not callable(clock):
            raise InvalidArgumentError(f"SQLiteStorage clock must be callable, got {clock!r}")
        self.path = os.fspath(path)
        if "\x00" in str(self.path):
            raise InvalidArgumentError(
                f"SQLiteStorage path may not contain a NUL character, got {self.path!r}"
            )
        self._synchronous = synchronous
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._fast: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _lease_until(self, now_us: int, seconds: float) -> int:
        """The expiry of a lease of ``seconds`` from ``now_us``, clamped to a datetime."""
        return min(now_us + int(lease_seconds(seconds) * 1_000_000), _MAX_MICROS)

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
                f"SQLite {what}{_about(run_id)} failed on {self.path!r}: {exc}",
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
                    f"SQLite cannot open {self.path!r} for {what}{_about(run_id)}: {exc}",
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

    # -- lifecycle --------------------------------------------------------------------------

    async def init(self) -> None:
        """Create the file and apply any missing migration (safe across processes)."""
        await self._run(self._migrate, "migration")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS flux_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM flux_schema").fetchone()
        current = row[0] or 0
        known = migrations("sqlite")
        if current > len(known):
            conn.execute("ROLLBACK")
            raise SchemaVersionError(
                f"{self.path!r} has schema version {current}; this fluxrun knows up to "
                f"{len(known)}. Upgrade fluxrun."
            )
        for m in known[current:]:
            for statement in m.statements:
                conn.execute(statement)
            conn.execute("DELETE FROM flux_schema")
            conn.execute("INSERT INTO flux_schema (version) VALUES (?)", (m.version,))
        conn.execute("COMMIT")

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

    # -- writes -----------------------------------------------------------------------------

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run."""
        check_new_run(run)

        def insert(conn: sqlite3.Connection) -> None:
            lease = None
            if lease_owner is not None:
                lease = self._lease_until(self._now_us(), lease_seconds)
            try:
                conn.execute(
                    "INSERT INTO flux_runs (" + _RUN_COLUMNS + ") "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run.id,
                        run.name,
                        run.definition_version,
                        run.status,
                        run.input,
                        json.dumps(list(run.step_names)),
                        run.current_step,
                        run.error,
                        to_micros(run.created_at),
                        to_micros(run.updated_at),
                        to_micros(run.completed_at),
                        run.version,
                        run.fence,
                        lease_owner,
                        lease,
                        1 if lease_owner else 0,
                        run.wait_name,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if not _duplicate(exc):
                    raise  # a CHECK (JSON) failure: a StorageError naming the run
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} already exists", workflow_id=run.id
                ) from exc

        await self._run(insert, "create", run.id)

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition in one ``BEGIN IMMEDIATE`` transaction."""
        check_transition_numbers(t)
        return await self._run(lambda conn: self._apply(conn, t), "step commit", t.run_id)

    def _apply(self, conn: sqlite3.Connection, t: Transition) -> Applied:
        now = self._now_us()
        sets = ["version = version + 1", "updated_at = ?"]
        params: list[Any] = [to_micros(t.updated_at)]
        where = ["id = ?", "version = ?"]
        wparams: list[Any] = [t.run_id, t.expected_version]
        if t.fence is not None:
            where.append("fence = ?")
            wparams.append(t.fence)
        else:
            where.append("(owner IS NULL OR lease_until IS NULL OR lease_until <= ?)")
            wparams.append(now)
        if t.claim is not None:
            sets += ["fence = fence + 1", "owner = ?", "lease_until = ?", "claims = claims + 1"]
            params += [t.claim.owner, self._lease_until(now, t.claim.lease_seconds)]
        elif t.renew_lease is not None:
            sets.append("lease_until = ?")
            params.append(self._lease_until(now, t.renew_lease))
        if t.release:
            sets += ["owner = NULL", "lease_until = NULL", "claims = 0"]
        elif t.claim is None and (t.insert_step is not None or t.update_step is not None):
            sets.append("claims = 1")  # progress: only the current claim counts now
        for column in ("status", "current_step", "error", "wait_name"):
            value = getattr(t, column)
            if value is not KEEP:
                sets.append(f"{column} = ?")
                params.append(value)
        if t.completed_at is not KEEP:
            sets.append("completed_at = ?")
            params.append(to_micros(t.completed_at))  # type: ignore[arg-type]
        update = "UPDATE flux_runs SET " + ", ".join(sets) + " WHERE " + " AND ".join(where)
        conn.execute("BEGIN IMMEDIATE")
        row: tuple[int, int] | None
        if t.fence is not None and t.claim is None:
            # The usual step commit: the new version and fence are known, and SQLite's
            # RETURNING (which goes through a temporary table) would cost a fifth of it.
            applied = conn.execute(update, params + wparams).rowcount == 1
            row = (t.expected_version + 1, t.fence) if applied else None
        else:
            row = conn.execute(update + " RETURNING version, fence", params + wparams).fetchone()
        if row is None:
            error = self._diagnose(conn, t, now)
            conn.execute("ROLLBACK")
            raise error
        if t.delete_steps_from is not None:
            keep = ",".join("?" * len(t.keep_steps))
            conn.execute(
                "DELETE FROM flux_steps WHERE run_id = ? AND idx >= ?"
                + (f" AND idx NOT IN ({keep})" if keep else ""),
                (t.run_id, t.delete_steps_from, *t.keep_steps),
            )
        if t.insert_step is not None:
            s = t.insert_step
            try:
                conn.execute(_INSERT_STEP, (t.run_id, s.index, *_step_values(s)))
            except sqlite3.IntegrityError as exc:
                if not _duplicate(exc):
                    raise
                conn.execute("ROLLBACK")
                raise ConcurrentModificationError(
                    f"step {s.index} of run {t.run_id!r} is already recorded",
                    workflow_id=t.run_id,
                ) from exc
        if t.update_step is not None:
            s = t.update_step
            cur = conn.execute(_UPDATE_STEP, (*_step_values(s), t.run_id, s.index))
            if cur.rowcount != 1:
                conn.execute("ROLLBACK")
                raise ConcurrentModificationError(
                    f"step {s.index} of run {t.run_id!r} has no recorded outcome",
                    workflow_id=t.run_id,
                )
        if t.attempts:
            conn.executemany(
                _INSERT_ATTEMPT,
                [(t.run_id, t.run_id, *attempt_fields(a, to_micros)) for a in t.attempts],
            )
        conn.execute("COMMIT")
        return Applied(version=row[0], fence=row[1])

    def _diagnose(
        self, conn: sqlite3.Connection, t: Transition, now: int
    ) -> ConcurrentModificationError:
        found = conn.execute(
            "SELECT name, version, fence, owner, lease_until FROM flux_runs WHERE id = ?",
            (t.run_id,),
        ).fetchone()
        if found is None:
            return ConcurrentModificationError(
                f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
            )
        error = transition_error(
            t.run_id,
            found[0],
            found[1],
            found[2],
            found[3],
            from_micros(found[4]),
            t,
            from_micros(now),  # type: ignore[arg-type]
        )
        return error or ConcurrentModificationError(
            f"run {t.run_id!r} changed while being written", workflow_id=t.run_id
        )

    async def delete(self, run_id: str) -> bool:
        """Delete a run with its step and attempt rows, unless a live lease owns it.

        Raises:
            RunBusyError: a live lease (by the store's clock) owns the run.
        """

        def remove(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(
                "DELETE FROM flux_runs WHERE id = ? AND "
                "(owner IS NULL OR lease_until IS NULL OR lease_until <= ?)",
                (run_id, self._now_us()),
            )
            if cur.rowcount == 0:
                # Nothing deleted: either no such run, or a live lease protects it.
                found = conn.execute(
                    "SELECT name, owner FROM flux_runs WHERE id = ?", (run_id,)
                ).fetchone()
                conn.execute("ROLLBACK")
                if found is None:
                    return False
                raise delete_busy_error(run_id, found[0], found[1])
            # The foreign keys cascade; deleting explicitly does not depend on that pragma.
            conn.execute("DELETE FROM flux_steps WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM flux_attempts WHERE run_id = ?", (run_id,))
            conn.execute("COMMIT")
            return True

        return await self._run(remove, "delete", run_id)

    # -- reads ------------------------------------------------------------------------------

    def _steps(self, conn: sqlite3.Connection, run_id: str) -> tuple[StepRow, ...]:
        rows = conn.execute(
            "SELECT " + _STEP_COLUMNS + " FROM flux_steps WHERE run_id = ? ORDER BY idx",
            (run_id,),
        ).fetchall()
        return tuple(_step_row(r) for r in rows)

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, read in one snapshot."""

        def read(conn: sqlite3.Connection) -> RunRow | None:
            conn.execute("BEGIN")
            try:
                r = conn.execute(
                    "SELECT " + _RUN_COLUMNS + " FROM flux_runs WHERE id = ?", (run_id,)
                ).fetchone()
                return None if r is None else _run_row(r, self._steps(conn, run_id))
            finally:
                conn.execute("COMMIT")

        return await self._run(read, "load", run_id)

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The run's attempt log, oldest first."""

        def read(conn: sqlite3.Connection) -> list[AttemptRow]:
            rows = conn.execute(
                "SELECT " + _ATTEMPT_COLUMNS + " FROM flux_attempts WHERE run_id = ? ORDER BY seq",
                (run_id,),
            ).fetchall()
            return [attempt_from(r, from_micros) for r in rows]

        return await self._run(read, "list_attempts", run_id)

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs matching ``query``, newest first; filter values are always bound."""
        limit, offset = page(query)

        def read(conn: sqlite3.Connection) -> list[RunRow]:
            where: list[str] = []
            params: list[Any] = []
            if query.name is not None:
                where.append("name = ?")
                params.append(query.name)
            if query.statuses is not None:
                if not query.statuses:
                    return []
                where.append("status IN (" + ",".join("?" * len(query.statuses)) + ")")
                params += [s.value for s in query.statuses]
            sql = "SELECT " + _RUN_COLUMNS + " FROM flux_runs"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
            conn.execute("BEGIN")
            try:
                rows = conn.execute(sql, params).fetchall()
                return [_run_row(r, self._steps(conn, r[0])) for r in rows]
            finally:
                conn.execute("COMMIT")

        return await self._run(read, "list")

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease protects."""
        limit = row_limit(limit, "limit")

        def read(conn: sqlite3.Connection) -> list[RunRow]:
            if not names:
                return []
            sql = (
                "SELECT " + _RUN_COLUMNS + " FROM flux_runs WHERE "
                "name IN (" + ",".join("?" * len(names)) + ") AND "
                "status IN (" + ",".join("?" * len(RECOVERABLE_STATUSES)) + ") AND "
                "(owner IS NULL OR lease_until IS NULL OR lease_until <= ?) "
                "ORDER BY created_at, rowid LIMIT ?"
            )
            rows = conn.execute(
                sql, (*names, *RECOVERABLE_STATUSES, self._now_us(), limit)
            ).fetchall()
            return [_run_row(r) for r in rows]

        return await self._run(read, "find_recoverable")

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> set[str]:
        """Extend ``owner``'s leases in one transaction; return the runs it lost."""

        usable, lost = usable_fences(fences)

        def renew(conn: sqlite3.Connection) -> set[str]:
            until = self._lease_until(self._now_us(), lease_seconds)
            conn.execute("BEGIN IMMEDIATE")
            for run_id, fence in usable.items():
                cur = conn.execute(
                    "UPDATE flux_runs SET lease_until = ? WHERE id = ? AND fence = ? AND owner = ?",
                    (until, run_id, fence, owner),
                )
                if cur.rowcount != 1:
                    lost.add(run_id)
            conn.execute("COMMIT")
            return lost

        if not usable:
            return lost
        return self._locked(renew, "lease renewal")

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check`` and return its answer (``"ok"`` when healthy)."""
        return self._locked(
            lambda conn: str(conn.execute("PRAGMA integrity_check").fetchone()[0]),
            "integrity check",
        )

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"
