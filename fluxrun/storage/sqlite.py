"""Embedded durable store on one SQLite file (WAL), the default for a single machine."""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal

from ..errors import (
    ConcurrentModificationError,
    FluxError,
    InvalidArgumentError,
    SchemaVersionError,
)
from ..errors import StorageError as _StorageError
from . import _sqlite_sql as _q
from ._base import (
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    ListQuery,
    Renewed,
    RequestKind,
    RunRow,
    SignalRow,
    SignalSent,
    Started,
    StepRow,
    Store,
    Transition,
    check_request_kind,
    delete_busy_error,
)
from ._children import SQLiteChildren
from ._concurrency import check_limits
from ._group_commit import GroupCommitter, groupable
from ._limits import (
    check_new_run,
    check_transition_numbers,
    on_store_clock,
    page,
    row_limit,
    usable_fences,
)
from ._migrations import migrations
from ._rows import ATTEMPT_COLUMNS, attempt_from
from ._sched import check_signal
from ._sqlite_batch import SQLiteBatches, batch_items
from ._sqlite_conn import SQLiteConnections, about
from ._sqlite_group import apply_many
from ._sqlite_lease import (
    RENEW_LEASE,
    BootClock,
    LeaseClock,
    expire_dead_owners,
    system_boot_clock,
)
from ._sqlite_schedules import SQLiteSchedules
from ._sqlite_sql import (
    RUN_SELECT,
    STEP_SELECT,
    duplicate,
    from_micros,
    insert_run,
    run_row,
    step_row,
    to_micros,
)
from ._workers import SQLiteWorkers

__all__ = ["BootClock", "SQLiteStorage", "from_micros", "to_micros"]


class SQLiteStorage(
    SQLiteConnections, SQLiteSchedules, SQLiteBatches, SQLiteWorkers, SQLiteChildren, Store
):
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
        clock: The wall clock (seconds since the epoch) for timestamps and timers, and the
            shown ``lease_until``.
        boot_clock: What judges leases. ``"system"`` (default): Linux's ``CLOCK_BOOTTIME``
            with the boot id, so a step of the wall clock neither ends a live lease nor
            keeps a dead one, and a lease of an earlier boot is over; where either is
            missing (not Linux) leases are judged by ``clock``, as are leases written
            without a boot clock. A :class:`BootClock` (tests); None: by ``clock``.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        boot_clock: BootClock | Literal["system"] | None = "system",
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
        if boot_clock == "system":
            boot_clock = system_boot_clock()
        elif boot_clock is not None and not isinstance(boot_clock, BootClock):
            raise InvalidArgumentError(
                f"SQLiteStorage boot_clock must be 'system', a BootClock or None, "
                f"got {boot_clock!r}"
            )
        self.path = os.fspath(path)
        if "\x00" in str(self.path):
            raise InvalidArgumentError(
                f"SQLiteStorage path may not contain a NUL character, got {self.path!r}"
            )
        self._synchronous = synchronous
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = LeaseClock(clock, boot_clock)
        self._conn: sqlite3.Connection | None = None
        self._fast: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        # The transitions of runs in flight at once share one transaction (a group commit).
        # A write made on the loop lets nothing else run: the writer task takes what the
        # runs ready in this turn of the loop queued (see _group_commit).
        self._group: GroupCommitter[Transition, Applied] = GroupCommitter(
            self._flush, write_alone_at_once=False
        )

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

    # -- writes -----------------------------------------------------------------------------

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run."""
        check_new_run(run)

        def insert(conn: sqlite3.Connection) -> None:
            lease = None
            if lease_owner is not None:
                lease = self._clock.lease(self._clock.now(), lease_seconds)
            try:
                insert_run(conn, run, lease_owner, lease)
            except sqlite3.IntegrityError as exc:
                if not duplicate(exc):
                    raise  # a CHECK (JSON) failure: a StorageError naming the run
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} (or its idempotency key) already exists",
                    workflow_id=run.id,
                ) from exc

        await self._run(insert, "create", run.id)

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition in one ``BEGIN IMMEDIATE`` transaction."""
        check_transition_numbers(t)
        if t.run_after_from is not None:
            t = on_store_clock(t, dt.datetime.fromtimestamp(self._clock.wall_us() / 1e6, dt.UTC))
        if groupable(t):  # a step commit: with those of the other runs ready now
            return await self._group.submit(t)
        return await self._run(lambda conn: _q.apply(conn, t, self._clock), "step commit", t.run_id)

    async def _flush(self, ts: Sequence[Transition]) -> list[Applied | Exception]:
        """Write the transitions submitted at once: one alone as before, several in one
        transaction, each in a savepoint of its own (see :func:`_sqlite_sql.apply_many`)."""
        if len(ts) == 1:
            t = ts[0]
            try:
                return [
                    await self._run(lambda c: _q.apply(c, t, self._clock), "step commit", t.run_id)
                ]
            except Exception as exc:
                return [exc]

        def failed(t: Transition, exc: Exception) -> Exception:
            if isinstance(exc, FluxError):
                return exc
            error = _StorageError(
                f"SQLite step commit{about(t.run_id)} failed on {self.path!r}: {exc}",
                workflow_id=t.run_id,
            )
            error.__cause__ = exc
            return error

        return await self._run(
            lambda conn: apply_many(conn, ts, self._clock, failed), "group commit"
        )

    async def delete(self, run_id: str) -> bool:
        """Delete a run with its step and attempt rows, unless a live lease owns it.

        Raises:
            RunBusyError: a live lease owns the run (by the boot clock; see ``boot_clock``).
        """

        def remove(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            expired, params = self._clock.expired(self._clock.now())
            cur = conn.execute(
                "DELETE FROM flux_runs WHERE id = ? AND " + expired, (run_id, *params)
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
            "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = ? ORDER BY idx",
            (run_id,),
        ).fetchall()
        return tuple(step_row(r) for r in rows)

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, read in one snapshot."""

        def read(conn: sqlite3.Connection) -> RunRow | None:
            conn.execute("BEGIN")
            try:
                r = conn.execute(
                    "SELECT " + RUN_SELECT + " FROM flux_runs WHERE id = ?", (run_id,)
                ).fetchone()
                return None if r is None else run_row(r, self._steps(conn, run_id))
            finally:
                conn.execute("COMMIT")

        return await self._run(read, "load", run_id)

    async def load_tail(self, run_id: str) -> RunRow | None:
        """The run with its snapshot and the step rows from the snapshot on (see
        :meth:`Store.load_tail`), read in one snapshot."""
        return await self._run(lambda c: _q.load_tail(c, run_id), "load", run_id)

    async def load_steps(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """The run's step rows below index ``before``."""
        return await self._run(lambda c: _q.steps_before(c, run_id, before), "load", run_id)

    def read_steps_blocking(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """:meth:`load_steps` on the calling thread."""
        return self._locked(lambda c: _q.steps_before(c, run_id, before), "load", run_id)

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The run's attempt log, oldest first."""

        def read(conn: sqlite3.Connection) -> list[AttemptRow]:
            rows = conn.execute(
                "SELECT "
                + ", ".join(ATTEMPT_COLUMNS)
                + " FROM flux_attempts WHERE run_id = ? ORDER BY seq",
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
            sql = "SELECT " + RUN_SELECT + " FROM flux_runs"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
            conn.execute("BEGIN")
            try:
                rows = conn.execute(sql, params).fetchall()
                return [run_row(r, self._steps(conn, r[0])) for r in rows]
            finally:
                conn.execute("COMMIT")

        return await self._run(read, "list")

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease protects."""
        limit = row_limit(limit, "limit")

        def read(conn: sqlite3.Connection) -> list[RunRow]:
            if not names:
                return []
            expire_dead_owners(conn, self._clock)
            expired, params = self._clock.expired(self._clock.now())
            names_in = ",".join("?" * len(names))
            statuses_in = ",".join("?" * len(RECOVERABLE_STATUSES))
            sql = (
                f"SELECT {RUN_SELECT} FROM flux_runs WHERE name IN ({names_in}) AND "
                f"status IN ({statuses_in}) AND {expired} ORDER BY created_at, rowid LIMIT ?"
            )
            rows = conn.execute(sql, (*names, *RECOVERABLE_STATUSES, *params, limit)).fetchall()
            return [run_row(r) for r in rows]

        return await self._run(read, "find_recoverable")

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        """Extend ``owner``'s leases in one transaction; report the runs it lost and the
        pending requests of the rest."""

        usable, lost = usable_fences(fences)
        requested: dict[str, str] = {}

        def renew(conn: sqlite3.Connection) -> Renewed:
            conn.execute("BEGIN IMMEDIATE")
            lease = self._clock.lease(self._clock.now(), lease_seconds)  # under the lock
            for run_id, fence in usable.items():
                found = conn.execute(
                    "UPDATE flux_runs SET " + RENEW_LEASE + " WHERE id = ? AND fence = ? "
                    "AND owner = ? RETURNING requested",
                    (*lease, run_id, fence, owner),
                ).fetchone()
                if found is None:
                    lost.add(run_id)
                elif found[0] is not None:
                    requested[run_id] = found[0]
            conn.execute("COMMIT")
            return Renewed(lost, requested)

        if not usable:
            return Renewed(lost, requested)
        return self._locked(renew, "lease renewal")

    # -- scheduling (see Store; the SQL is in _sqlite_sql) ------------------------------------

    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        """Insert-or-observe a run in one ``BEGIN IMMEDIATE`` transaction."""
        check_new_run(run)
        if idempotency_key is not None:
            run = replace(run, idempotency_key=idempotency_key)

        def insert(conn: sqlite3.Connection) -> Started:
            return _q.start(conn, run, lease_owner, lease_seconds, self._clock, input_hash)

        return await self._run(insert, "start", run.id)

    async def claim_due(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease_seconds: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[RunRow]:
        """Claim due runs: ``BEGIN IMMEDIATE``, select in claim order, update, commit."""
        limit = row_limit(limit, "limit")
        checked = check_limits(limits)

        def claim(conn: sqlite3.Connection) -> list[RunRow]:
            if not names or not limit:
                return []
            expire_dead_owners(conn, self._clock)
            return _q.claim_due(
                conn, owner, names, limit, self._clock, lease_seconds, batch_items, checked
            )

        return await self._run(claim, "claim")

    async def external_changes(self) -> int | None:
        """SQLite's ``PRAGMA data_version`` of this store's connection: it moves when
        another connection (another process) commits, not for this store's own writes."""
        return await self._run(_data_version, "data_version")

    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        """The earliest ``run_after`` among pending and suspended runs of these workflows."""
        return await self._run(lambda conn: _q.next_due(conn, names), "next_due")

    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        """Append a signal to an unfinished run's inbox under the write lock."""
        check_signal(run_id, name, payload, dedupe_key)
        return await self._run(
            lambda conn: _q.send_signal(
                conn, run_id, name, payload, dedupe_key, self._clock.wall_us()
            ),
            "send_signal",
            run_id,
        )

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """Every inbox row of the run, by ``seq``."""
        return await self._run(lambda conn: _q.list_signals(conn, run_id), "list_signals", run_id)

    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        """The oldest unconsumed inbox row of the run with this name, or None."""
        return await self._run(
            lambda conn: _q.first_signal(conn, run_id, name), "first_signal", run_id
        )

    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        """Record a cancel or pause request (see :meth:`Store.request`)."""
        check_request_kind(kind)
        return await self._run(
            lambda conn: _q.request(conn, run_id, kind, reason), "request", run_id
        )

    async def counts(self, name: str | None = None) -> dict[str, int]:
        """Runs by status (of workflow ``name``, or all)."""
        return await self._run(lambda conn: _q.counts(conn, name), "counts")

    def _wall_us(self) -> int:
        return self._clock.wall_us()

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check`` and return its answer (``"ok"`` when healthy)."""
        return self._locked(
            lambda conn: str(conn.execute("PRAGMA integrity_check").fetchone()[0]),
            "integrity check",
        )

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
