"""The durable-batch verbs of :class:`~fluxrun.storage.postgres.PostgresStorage` (see
:mod:`fluxrun.storage._batch`): the SQL as functions over a pooled connection, and the
mixin that runs them.

A batch's items are inserted by one ``INSERT ... SELECT FROM unnest(...)`` (one statement,
one round trip, whatever the size). Its limit holds across workers because a claimer
takes a batch's items only while it holds the batch's row lock (``FOR NO KEY UPDATE SKIP
LOCKED``: a claimer busy with a batch is skipped, never waited for), and counts its running
runs in a statement that starts after it got that lock, so it sees every earlier claim.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

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
from ._pg import NEW_LEASE, RUN_SELECT, STEP_SELECT, fetchall, run_row, step_row, utc
from ._pg_connect import transaction
from ._pg_limits import admit_items
from ._sched import not_found_error

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgBatches"]

_BATCH_SELECT = "id, name, total, concurrency, continue_on_error, status, created_at, updated_at"
# The columns a new run of a batch sets (the others keep their defaults: no owner, no
# claim, no wait, attempt 0); one array per column, unnested into rows in order.
_INSERT_RUNS = (
    "INSERT INTO flux_runs (id, name, definition_version, status, input, step_names, "
    "current_step, created_at, updated_at, version, fence, run_after, priority, "
    "idempotency_key, concurrency_key, batch_id, batch_index) "
    "SELECT x.id, %s, x.dv, x.status, x.input::jsonb, x.steps::jsonb, x.cur, x.created, "
    "x.updated, x.version, x.fence, x.run_after, x.priority, x.ikey, x.ckey, %s, x.ord - 1 "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::integer[], "
    "%s::timestamptz[], %s::timestamptz[], %s::bigint[], %s::bigint[], %s::timestamptz[], "
    "%s::integer[], %s::text[], %s::text[]) WITH ORDINALITY AS x(id, dv, status, input, steps, "
    "cur, created, updated, version, fence, run_after, priority, ikey, ckey, ord)"
)
_FINISHED = "('" + "', '".join(FINISHED_STATUSES) + "')"
_FAILED = "('" + "', '".join(FAILURE_STATUSES) + "')"
_CLAIM_IDS = (
    "UPDATE flux_runs SET owner = %s, lease_until = " + NEW_LEASE + ", fence = fence + 1, "
    "claims = claims + 1, version = version + 1 WHERE id = ANY(%s::text[]) "
    "RETURNING " + RUN_SELECT
)


def _batch_row(r: Sequence[Any]) -> BatchRow:
    created, updated = utc(r[6]), utc(r[7])
    assert created is not None and updated is not None
    return BatchRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], created, updated)


async def create_batch(
    conn: psycopg.AsyncConnection[Any], batch: BatchRow, runs: Sequence[RunRow]
) -> None:
    """The batch row and one multi-row insert of its runs, in one transaction."""
    from psycopg import errors

    columns: list[list[Any]] = [[] for _ in range(14)]
    for r in runs:
        values = (
            r.id,
            r.definition_version,
            r.status,
            r.input,
            json.dumps(list(r.step_names)),
            r.current_step,
            r.created_at,
            r.updated_at,
            r.version,
            r.fence,
            r.run_after,
            r.priority,
            r.idempotency_key,
            r.concurrency_key,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    try:
        async with transaction(conn):
            await conn.execute(
                "INSERT INTO flux_batches (" + _BATCH_SELECT + ") VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    batch.id,
                    batch.name,
                    batch.total,
                    batch.concurrency,
                    batch.continue_on_error,
                    batch.status,
                    batch.created_at,
                    batch.updated_at,
                ),
            )
            if runs:
                await conn.execute(_INSERT_RUNS, (batch.name, batch.id, *columns))
    except errors.UniqueViolation as exc:
        raise ConcurrentModificationError(
            f"batch {batch.id!r} (or one of its runs) already exists"
        ) from exc


async def stop(conn: psycopg.AsyncConnection[Any], batch_id: str, kind: StopKind) -> list[str]:
    """:meth:`BatchStore.stop_batch` inside the caller's transaction block."""
    found = await fetchall(
        conn, "SELECT status FROM flux_batches WHERE id = %s FOR UPDATE", (batch_id,)
    )
    if not found:
        raise not_found_error(batch_id)
    if found[0][0] == "cancelled" or (found[0][0] == "stopped" and kind == "stopped"):
        return []
    await conn.execute(
        "UPDATE flux_batches SET status = %s, updated_at = now() WHERE id = %s", (kind, batch_id)
    )
    await conn.execute(
        "UPDATE flux_runs SET status = 'cancelled', wait_kind = 'not_run', error = %s, "
        "completed_at = now(), updated_at = now(), version = version + 1 "
        "WHERE batch_id = %s AND " + GATED_SQL,
        (not_run_error(batch_id, kind), batch_id),
    )
    if kind != "cancelled":
        return []
    rows = await fetchall(
        conn,
        "SELECT id FROM flux_runs WHERE batch_id = %s AND status NOT IN " + _FINISHED,
        (batch_id,),
    )
    await conn.execute(
        "UPDATE flux_runs SET requested = 'cancel', request_reason = %s WHERE batch_id = %s "
        "AND status NOT IN " + _FINISHED + " AND (requested IS NULL OR requested = 'pause')",
        (f"batch {batch_id!r} cancelled", batch_id),
    )
    return [r[0] for r in rows]


async def claim_items(
    conn: psycopg.AsyncConnection[Any],
    owner: str,
    names: Sequence[str],
    limit: int,
    lease: float,
    limits: Mapping[str, int] | None = None,
) -> list[RunRow]:
    """Claim batch items not started, within their batches' limits (see the module docs)
    and their workflows' concurrency ``limits``. One cheap read when no batch of these
    workflows is running."""
    running = await fetchall(
        conn,
        "SELECT EXISTS (SELECT 1 FROM flux_batches WHERE status = 'running' "
        "AND name = ANY(%s::text[]))",
        (list(names),),
    )
    if not running[0][0]:
        return []
    picked: list[str] = []
    free: dict[tuple[str, str], int] = {}
    async with transaction(conn):
        batches = await fetchall(
            conn,
            "SELECT id, concurrency, continue_on_error, name FROM flux_batches AS b "
            "WHERE status = 'running' AND name = ANY(%s::text[]) AND EXISTS (SELECT 1 FROM "
            "flux_runs WHERE batch_id = b.id AND status = 'pending' AND owner IS NULL) "
            "ORDER BY created_at, id FOR NO KEY UPDATE SKIP LOCKED",
            (list(names),),
        )
        for batch_id, concurrency, go_on, name in batches:
            if len(picked) >= limit:
                break
            # Count first, then look for a failure: each statement sees the commits made
            # before it starts, so a run that no longer holds a slot in the count has its
            # failure (if it failed) seen by the check that follows.
            busy = await fetchall(
                conn,
                "SELECT count(*) FROM flux_runs WHERE batch_id = %s AND " + HOLDS_SLOT_SQL,
                (batch_id,),
            )
            if not go_on:
                failed = await fetchall(
                    conn,
                    "SELECT EXISTS (SELECT 1 FROM flux_runs WHERE batch_id = %s AND status IN "
                    + _FAILED
                    + ")",
                    (batch_id,),
                )
                if failed[0][0]:
                    await stop(conn, batch_id, "stopped")
                    continue
            room = min(concurrency - busy[0][0], limit - len(picked))
            if room <= 0:
                continue
            rows = await fetchall(
                conn,
                "SELECT id, concurrency_key FROM flux_runs WHERE batch_id = %s AND "
                + GATED_SQL
                + " AND (run_after IS NULL OR run_after <= now()) ORDER BY batch_index "
                "LIMIT %s FOR NO KEY UPDATE SKIP LOCKED",
                (batch_id, room),
            )
            if limits and name in limits:
                picked += await admit_items(conn, name, limits[name], rows, free)
            else:
                picked += [r[0] for r in rows]
        if not picked:
            return []
        claimed = await fetchall(conn, _CLAIM_IDS, (owner, lease, picked))
    by_id = {r[0]: run_row(r) for r in claimed}
    return [by_id[i] for i in picked if i in by_id]


class PgBatches(BatchStore):
    """The batch verbs of the PostgreSQL store (a mixin; the store provides connections)."""

    def _connection(
        self, what: str, run_id: str | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        raise NotImplementedError

    async def create_batch(self, batch: BatchRow, runs: Sequence[RunRow]) -> None:
        """Insert the batch and its runs in one transaction (one multi-row insert)."""
        check_batch_row(batch, runs)
        for run in runs:
            check_new_run(run)
        async with self._connection("create_batch") as conn:
            await create_batch(conn, batch, runs)

    async def load_batch(self, batch_id: str) -> BatchRow | None:
        """The batch row, or None."""
        async with self._connection("load_batch") as conn:
            rows = await fetchall(
                conn, "SELECT " + _BATCH_SELECT + " FROM flux_batches WHERE id = %s", (batch_id,)
            )
        return _batch_row(rows[0]) if rows else None

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Runs of the batch by category."""
        async with self._connection("batch_counts") as conn:
            rows = await fetchall(
                conn,
                "SELECT " + BATCH_CATEGORY_SQL + ", count(*) FROM flux_runs "
                "WHERE batch_id = %s GROUP BY 1",
                (batch_id,),
            )
        return {r[0]: r[1] for r in rows}

    async def batch_runs(self, batch_id: str) -> list[RunRow]:
        """The batch's runs with their step rows, by index, from one snapshot."""
        async with (
            self._connection("batch_runs") as conn,
            transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ):
            runs = await fetchall(
                conn,
                "SELECT " + RUN_SELECT + " FROM flux_runs WHERE batch_id = %s ORDER BY batch_index",
                (batch_id,),
            )
            steps = await fetchall(
                conn,
                "SELECT run_id, " + STEP_SELECT + " FROM flux_steps WHERE run_id IN "
                "(SELECT id FROM flux_runs WHERE batch_id = %s) ORDER BY run_id, idx",
                (batch_id,),
            )
        by_run: dict[str, list[Any]] = {}
        for s in steps:
            by_run.setdefault(s[0], []).append(step_row(s[1:]))
        return [run_row(r, tuple(by_run.get(r[0], ()))) for r in runs]

    async def stop_batch(self, batch_id: str, kind: StopKind) -> list[str]:
        """Stop the batch in one transaction (see :meth:`BatchStore.stop_batch`)."""
        async with self._connection("stop_batch") as conn, transaction(conn):
            return await stop(conn, batch_id, kind)
