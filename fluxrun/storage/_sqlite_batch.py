"""The durable-batch verbs of :class:`~fluxrun.storage.sqlite.SQLiteStorage` (see
:mod:`fluxrun.storage._batch`): the SQL as functions over a connection, and the mixin that
runs them with the store's locking. Every write is one ``BEGIN IMMEDIATE`` transaction,
so SQLite's one writer makes the batch's count and claim one consistent step."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import ConcurrentModificationError
from ._base import FINISHED_STATUSES, RunRow
from ._batch import (
    BATCH_CATEGORY_SQL,
    FAILURE_STATUSES,
    GATED_SQL,
    HOLDS_SLOT_SQL,
    BatchRow,
    BatchStore,
    StopKind,
    check_batch_row,
    not_run_error,
)
from ._limits import check_new_run
from ._rows import RUN_COLUMNS
from ._sched import not_found_error
from ._sqlite_limits import Slots
from ._sqlite_sql import (
    RUN_SELECT,
    STEP_SELECT,
    duplicate,
    from_micros,
    run_row,
    run_values,
    step_row,
    to_micros,
)

__all__ = ["SQLiteBatches", "batch_items"]

T = TypeVar("T")

_INSERT = (
    "INSERT INTO flux_runs ("
    + RUN_SELECT
    + ", batch_id, batch_index) VALUES ("
    + ", ".join("?" * (len(RUN_COLUMNS) + 2))
    + ")"
)
_BATCH_SELECT = "id, name, total, concurrency, continue_on_error, status, created_at, updated_at"
_FINISHED = "('" + "', '".join(FINISHED_STATUSES) + "')"
_FAILED = "('" + "', '".join(FAILURE_STATUSES) + "')"


def _run_values(run: RunRow, batch_id: str, index: int) -> tuple[Any, ...]:
    # An unowned new run (no lease, no claim), in RUN_COLUMNS order, then its place.
    return (*run_values(run, None, None), batch_id, index)


def _batch_row(r: Sequence[Any]) -> BatchRow:
    created, updated = from_micros(r[6]), from_micros(r[7])
    assert created is not None and updated is not None
    return BatchRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], created, updated)


def create_batch(conn: sqlite3.Connection, batch: BatchRow, runs: Sequence[RunRow]) -> None:
    """Insert the batch and its runs in one transaction (``executemany``)."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    try:
        conn.execute(
            "INSERT INTO flux_batches (" + _BATCH_SELECT + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                batch.id,
                batch.name,
                batch.total,
                batch.concurrency,
                int(batch.continue_on_error),
                batch.status,
                to_micros(batch.created_at),
                to_micros(batch.updated_at),
            ),
        )
        conn.executemany(_INSERT, (_run_values(r, batch.id, i) for i, r in enumerate(runs)))
    except sqlite3.IntegrityError as exc:
        if not duplicate(exc):
            raise
        conn.execute("ROLLBACK")
        raise ConcurrentModificationError(
            f"batch {batch.id!r} (or one of its runs) already exists"
        ) from exc
    conn.execute("COMMIT")


def stop(conn: sqlite3.Connection, batch_id: str, kind: StopKind, now: int) -> list[str]:
    """:meth:`BatchStore.stop_batch` inside the caller's write transaction."""
    found = conn.execute("SELECT status FROM flux_batches WHERE id = ?", (batch_id,)).fetchone()
    if found is None:
        raise not_found_error(batch_id)
    if found[0] == "cancelled" or (found[0] == "stopped" and kind == "stopped"):
        return []
    conn.execute(
        "UPDATE flux_batches SET status = ?, updated_at = ? WHERE id = ?", (kind, now, batch_id)
    )
    conn.execute(
        "UPDATE flux_runs SET status = 'cancelled', wait_kind = 'not_run', error = ?, "
        "completed_at = ?, updated_at = ?, version = version + 1 WHERE batch_id = ? AND "
        + GATED_SQL,
        (not_run_error(batch_id, kind), now, now, batch_id),
    )
    if kind != "cancelled":
        return []
    rows = conn.execute(
        "SELECT id FROM flux_runs WHERE batch_id = ? AND status NOT IN " + _FINISHED,
        (batch_id,),
    ).fetchall()
    conn.execute(
        "UPDATE flux_runs SET requested = 'cancel', request_reason = ? WHERE batch_id = ? "
        "AND status NOT IN " + _FINISHED + " AND (requested IS NULL OR requested = 'pause')",
        (f"batch {batch_id!r} cancelled", batch_id),
    )
    return [r[0] for r in rows]


def batch_items(
    conn: sqlite3.Connection,
    names: Sequence[str],
    limit: int,
    now: int,
    slots: Slots | None = None,
) -> list[str]:
    """The batch items to claim now, inside the claim's write transaction: of each running
    batch of these workflows with items not started, oldest batch first, its next items by
    index while fewer than its ``concurrency`` runs hold a slot (and ``slots`` has one for
    them: their workflow's concurrency limit). A stop-on-error batch with a failed item is
    stopped here instead."""
    batches = conn.execute(
        "SELECT id, concurrency, continue_on_error, name FROM flux_batches AS b "
        "WHERE status = 'running' AND name IN (SELECT value FROM json_each(?)) AND EXISTS ("
        "SELECT 1 FROM flux_runs WHERE batch_id = b.id AND status = 'pending' AND owner IS NULL)"
        " ORDER BY created_at, rowid",
        (json.dumps(list(names)),),
    ).fetchall()
    picked: list[str] = []
    for batch_id, concurrency, go_on, name in batches:
        if len(picked) >= limit:
            break
        if (
            not go_on
            and conn.execute(
                "SELECT EXISTS (SELECT 1 FROM flux_runs WHERE batch_id = ? AND status IN "
                + _FAILED
                + ")",
                (batch_id,),
            ).fetchone()[0]
        ):
            stop(conn, batch_id, "stopped", now)
            continue
        busy = conn.execute(
            "SELECT count(*) FROM flux_runs WHERE batch_id = ? AND " + HOLDS_SLOT_SQL,
            (batch_id,),
        ).fetchone()[0]
        free = min(concurrency - busy, limit - len(picked))
        if free <= 0:
            continue
        rows = conn.execute(
            "SELECT id, concurrency_key FROM flux_runs WHERE batch_id = ? AND "
            + GATED_SQL
            + " AND (run_after IS NULL OR run_after <= ?) ORDER BY batch_index LIMIT ?",
            (batch_id, now, free),
        ).fetchall()
        picked += [r[0] for r in rows if slots is None or slots.admit(name, r[1])]
    return picked


def _runs(conn: sqlite3.Connection, batch_id: str) -> list[RunRow]:
    conn.execute("BEGIN")
    try:
        runs = conn.execute(
            "SELECT " + RUN_SELECT + " FROM flux_runs WHERE batch_id = ? ORDER BY batch_index",
            (batch_id,),
        ).fetchall()
        steps = conn.execute(
            "SELECT run_id, " + STEP_SELECT + " FROM flux_steps WHERE run_id IN "
            "(SELECT id FROM flux_runs WHERE batch_id = ?) ORDER BY run_id, idx",
            (batch_id,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    by_run: dict[str, list[Any]] = {}
    for s in steps:
        by_run.setdefault(s[0], []).append(step_row(s[1:]))
    return [run_row(r, tuple(by_run.get(r[0], ()))) for r in runs]


class SQLiteBatches(BatchStore):
    """The batch verbs of the SQLite store (a mixin; the store provides ``_run``)."""

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None = None
    ) -> T:
        raise NotImplementedError

    def _wall_us(self) -> int:
        raise NotImplementedError

    async def create_batch(self, batch: BatchRow, runs: Sequence[RunRow]) -> None:
        """Insert the batch and its runs in one transaction."""
        check_batch_row(batch, runs)
        for run in runs:
            check_new_run(run)
        await self._run(lambda c: create_batch(c, batch, runs), "create_batch")

    async def load_batch(self, batch_id: str) -> BatchRow | None:
        """The batch row, or None."""

        def read(conn: sqlite3.Connection) -> BatchRow | None:
            r = conn.execute(
                "SELECT " + _BATCH_SELECT + " FROM flux_batches WHERE id = ?", (batch_id,)
            ).fetchone()
            return None if r is None else _batch_row(r)

        return await self._run(read, "load_batch")

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Runs of the batch by category."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT " + BATCH_CATEGORY_SQL + ", count(*) FROM flux_runs WHERE batch_id = ? "
                "GROUP BY 1",
                (batch_id,),
            ).fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._run(read, "batch_counts")

    async def batch_runs(self, batch_id: str) -> list[RunRow]:
        """The batch's runs with their step rows, by index, read in one snapshot."""
        return await self._run(lambda c: _runs(c, batch_id), "batch_runs")

    async def stop_batch(self, batch_id: str, kind: StopKind) -> list[str]:
        """Stop the batch in one transaction (see :meth:`BatchStore.stop_batch`)."""

        def write(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
            asked = stop(conn, batch_id, kind, self._wall_us())
            conn.execute("COMMIT")
            return asked

        return await self._run(write, "stop_batch")
