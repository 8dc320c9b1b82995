"""The stores' part of child workflows: a transition's :class:`~fluxrun.storage.Wake` (the
child's end, written into its parent's inbox in the child's own transaction) and
:meth:`~fluxrun.storage.Store.list_children` (a parent's runs, by the ``parent_id`` index),
for each backend.

A wake is an ordinary inbox row (no dedupe key), appended only while the parent is not
finished: a parent that ended (or was deleted) meanwhile is simply not written to, and the
child's transition applies all the same. The parent waits on the row's name like on any
signal, so ``claim_due`` makes it due with no rule of its own.
"""

from __future__ import annotations

import abc
import datetime as dt
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import StorageError
from ._base import FINISHED_STATUSES, RunRow, SignalRow, Wake
from ._pg import RUN_SELECT as PG_RUN_SELECT
from ._pg import fetchall
from ._pg import run_row as pg_run_row

if TYPE_CHECKING:
    import psycopg

    from ._memory_run import RunEntry

T = TypeVar("T")

__all__ = ["MemoryChildren", "PgChildren", "SQLiteChildren", "pg_wake", "sqlite_wake"]

_FINISHED = "('" + "', '".join(FINISHED_STATUSES) + "')"

# The parent's row is read under the transition's write lock (SQLite has one writer), so the
# inbox sequence cannot race a send_signal.
_SQLITE_WAKE = (
    "INSERT INTO flux_signals (run_id, seq, name, payload, dedupe_key, created_at) "
    "SELECT id, (SELECT coalesce(max(seq), 0) + 1 FROM flux_signals WHERE run_id = ?), "
    "?, ?, NULL, ? FROM flux_runs WHERE id = ? AND status NOT IN " + _FINISHED
)
# No lock on the parent's row: this transaction holds the child's row, and a lease renewal
# of an engine holding both runs locks both rows in no set order, so waiting for the
# parent's here could deadlock with it. A sequence number that another inbox write took
# meanwhile (send_signal does the same) is a conflict: the statement is tried again.
_PG_WAKE = (
    "WITH p AS (SELECT id FROM flux_runs WHERE id = %s AND NOT (status = ANY(%s::text[]))), "
    "i AS (INSERT INTO flux_signals (run_id, seq, name, payload, dedupe_key, created_at) "
    "SELECT p.id, (SELECT coalesce(max(s.seq), 0) + 1 FROM flux_signals AS s "
    "WHERE s.run_id = p.id), %s, %s::jsonb, NULL, now() FROM p "
    "ON CONFLICT DO NOTHING RETURNING seq) "
    "SELECT (SELECT count(*) FROM p), (SELECT count(*) FROM i)"
)
_PG_WAKE_TRIES = 20
_CHILDREN = " FROM flux_runs WHERE parent_id = {} ORDER BY created_at, {}"


def sqlite_wake(conn: sqlite3.Connection, wake: Wake, now_us: int) -> None:
    """Append ``wake`` to its run's inbox, inside the caller's ``BEGIN IMMEDIATE``."""
    conn.execute(_SQLITE_WAKE, (wake.run_id, wake.name, wake.payload, now_us, wake.run_id))


async def pg_wake(conn: psycopg.AsyncConnection[Any], wake: Wake) -> None:
    """Append ``wake`` to its run's inbox, inside the caller's transaction block."""
    params = (wake.run_id, list(FINISHED_STATUSES), wake.name, wake.payload)
    for _ in range(_PG_WAKE_TRIES):
        [(found, inserted)] = await fetchall(conn, _PG_WAKE, params)
        if not found or inserted:
            return  # written, or the parent is finished or gone
    raise StorageError(
        f"run {wake.run_id!r}: its inbox kept changing while a child's outcome was written",
        workflow_id=wake.run_id,
    )


class MemoryChildren:
    """The child-workflow part of :class:`~fluxrun.storage.memory.MemoryStorage`."""

    _runs: dict[str, RunEntry]
    _lock: threading.Lock
    _now: Callable[[], dt.datetime]

    async def list_children(self, parent_id: str) -> list[RunRow]:
        """The runs started as children of ``parent_id``, oldest first."""
        with self._lock:
            found = [e for e in self._runs.values() if e.col("parent_id") == parent_id]
            found.sort(key=lambda e: (e.col("created_at"), e.seq))
            return [e.row for e in found]

    def _wake(self, wake: Wake | None) -> None:
        """Append ``wake`` (if any) to its run's inbox (the caller holds the lock)."""
        if wake is None:
            return
        entry = self._runs.get(wake.run_id)
        if entry is None or entry.col("status") in FINISHED_STATUSES:
            return
        seq = len(entry.signals) + 1
        entry.signals.append(SignalRow(seq, wake.name, wake.payload, None, self._now()))


class SQLiteChildren:
    """The child-workflow part of :class:`~fluxrun.storage.sqlite.SQLiteStorage`."""

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None = None
    ) -> T:
        raise NotImplementedError

    async def list_children(self, parent_id: str) -> list[RunRow]:
        """The runs started as children of ``parent_id``, oldest first."""
        from ._sqlite_sql import RUN_SELECT, run_row  # it imports this module

        sql = "SELECT " + RUN_SELECT + _CHILDREN.format("?", "rowid")

        def read(conn: sqlite3.Connection) -> list[RunRow]:
            return [run_row(r) for r in conn.execute(sql, (parent_id,)).fetchall()]

        return await self._run(read, "list_children", parent_id)


class PgChildren:
    """The child-workflow part of :class:`~fluxrun.storage.postgres.PostgresStorage`."""

    @abc.abstractmethod
    def _connection(
        self, what: str, run_id: str | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection, bounded by the store's timeout."""

    async def list_children(self, parent_id: str) -> list[RunRow]:
        """The runs started as children of ``parent_id``, oldest first."""
        sql = "SELECT " + PG_RUN_SELECT + _CHILDREN.format("%s", "seq")
        async with self._connection("list_children", parent_id) as conn:
            rows = await fetchall(conn, sql, (parent_id,))
        return [pg_run_row(r) for r in rows]
