"""The scheduling verbs of :mod:`fluxrun.storage.postgres`, as functions over a pooled
connection (autocommit; a verb that needs more than one statement opens its own
transaction block). Every value is a bound parameter; times come from the database clock.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StorageError as _StorageError
from ._base import FINISHED_STATUSES, RunRow, SignalRow, SignalSent, Started
from ._batch import GATED_SQL
from ._concurrency import NEEDS_SLOT_SQL
from ._pg import NEW_LEASE, RUN_SELECT, UNOWNED, fetchall, run_row, utc
from ._pg_connect import transaction
from ._rows import RUN_COLUMNS, signal_from
from ._sched import finished_error, not_found_error

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "DUE_WHERE",
    "claim_due",
    "counts",
    "first_signal",
    "insert_run",
    "list_signals",
    "next_due",
    "request",
    "send_signal",
    "start",
]

_SEND_TRIES = 20
_SIGNAL_SELECT = "seq, name, payload::text, dedupe_key, created_at, consumed_by_step, consumed_at"
_INSERT_RUN = (
    "INSERT INTO flux_runs (" + ", ".join(RUN_COLUMNS) + ", input_hash) VALUES (%s, %s, %s, %s, "
    "%s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, {lease}, %s, %s, %s, %s, %s, %s, "
    "%s, %s, %s, %s, %s, %s)"
)
# One statement: pick the due runs in claim order, lock them (skipping rows another claimer
# holds; a row changed since the snapshot is re-checked against the predicate), and claim
# them. The rule is MemoryStorage's RunEntry.due; "expired" keeps "expired leases first" for
# the final order, which the claim itself erases (every claimed run has an owner).
DUE_WHERE = (
    "name = ANY(%(names)s::text[]) AND " + UNOWNED + " "
    "AND NOT (status = ANY(%(finished)s::text[])) AND (requested IS NOT NULL "
    "OR (status IN ('pending', 'running', 'rolling_back') "
    "AND (run_after IS NULL OR run_after <= now())) "
    "OR (status = 'suspended' AND (run_after <= now() OR (wait_kind = 'signal' AND EXISTS ("
    "SELECT 1 FROM flux_signals AS s WHERE s.run_id = flux_runs.id "
    "AND s.name = flux_runs.wait_name AND s.consumed_by_step IS NULL))))) "
    "AND NOT " + GATED_SQL
)
_CLAIM = (
    "WITH c AS (SELECT id AS claim_id, owner IS NOT NULL AS expired FROM flux_runs "
    "WHERE " + DUE_WHERE + " AND NOT (name = ANY(%(limited)s::text[]) AND " + NEEDS_SLOT_SQL + ")"
    " ORDER BY owner IS NULL, priority DESC, coalesce(run_after, created_at), seq "
    "LIMIT %(limit)s::bigint FOR NO KEY UPDATE SKIP LOCKED), "
    "u AS (UPDATE flux_runs SET owner = %(owner)s, "
    "lease_until = " + NEW_LEASE.replace("%s", "%(lease)s") + ", fence = fence + 1, "
    "claims = claims + 1, version = version + 1 FROM c WHERE id = c.claim_id "
    "RETURNING " + RUN_SELECT + ", c.expired, seq) "
    "SELECT " + ", ".join(RUN_COLUMNS) + " FROM u "
    "ORDER BY expired DESC, priority DESC, coalesce(run_after, created_at), seq"
)


def _run_params(run: RunRow, owner: str | None, lease: float | None) -> list[Any]:
    params: list[Any] = [
        run.id,
        run.name,
        run.definition_version,
        run.status,
        run.input,
        json.dumps(list(run.step_names)),
        run.current_step,
        run.error,
        run.created_at,
        run.updated_at,
        run.completed_at,
        run.version,
        run.fence,
        owner,
    ]
    if owner is not None:
        params.append(lease)
    params += [
        1 if owner else 0,
        run.wait_name,
        run.run_after,
        run.wait_kind,
        run.attempt,
        run.requested,
        run.request_reason,
        run.priority,
        run.idempotency_key,
        run.concurrency_key,
        run.parent_id,
    ]
    return params


async def insert_run(
    conn: psycopg.AsyncConnection[Any],
    run: RunRow,
    owner: str | None,
    lease: float | None,
    input_hash: str | None = None,
    *,
    or_nothing: bool = False,
) -> bool:
    """Insert ``run`` (lease from the database clock); with ``or_nothing``, False when its id
    or idempotency key is taken (ON CONFLICT waits for a concurrent inserter to finish)."""
    sql = _INSERT_RUN.format(lease="NULL" if owner is None else NEW_LEASE)
    if or_nothing:
        sql += " ON CONFLICT DO NOTHING RETURNING id"
    params = [*_run_params(run, owner, lease), input_hash]
    if not or_nothing:
        await conn.execute(sql, params)
        return True
    return bool(await fetchall(conn, sql, params))


async def start(
    conn: psycopg.AsyncConnection[Any],
    run: RunRow,
    owner: str | None,
    lease: float | None,
    input_hash: str | None,
) -> Started:
    """Insert-or-observe: insert ``ON CONFLICT DO NOTHING``, else read the run that holds the
    id or key (the key's wins). Retried when that run was deleted in between."""
    for _ in range(3):
        if await insert_run(conn, run, owner, lease, input_hash, or_nothing=True):
            return Started(run.id, True, input_hash)
        found = await fetchall(
            conn,
            "SELECT id, input_hash FROM flux_runs WHERE (name = %s AND idempotency_key = %s) "
            "OR id = %s ORDER BY id = %s LIMIT 1",
            (run.name, run.idempotency_key, run.id, run.id),
        )
        if found:
            return Started(found[0][0], False, found[0][1])
    raise _StorageError(
        f"PostgreSQL start of run {run.id!r} kept meeting runs deleted meanwhile; try again",
        workflow_id=run.id,
    )


async def claim_due(
    conn: psycopg.AsyncConnection[Any],
    owner: str,
    names: Sequence[str],
    limit: int,
    lease: float,
    limited: Sequence[str] = (),
) -> list[RunRow]:
    """Claim due runs in one statement, but not those of ``limited`` workflows that need
    a free slot of their concurrency limit (``_pg_limits.claim_limited`` takes those)."""
    rows = await fetchall(
        conn,
        _CLAIM,
        {
            "names": list(names),
            "finished": list(FINISHED_STATUSES),
            "limit": limit,
            "owner": owner,
            "lease": lease,
            "limited": list(limited),
        },
    )
    return [run_row(r) for r in rows]


async def next_due(conn: psycopg.AsyncConnection[Any], names: Sequence[str]) -> dt.datetime | None:
    rows = await fetchall(
        conn,
        "SELECT min(run_after) FROM flux_runs WHERE name = ANY(%s::text[]) "
        "AND status IN ('pending', 'suspended')",
        (list(names),),
    )
    return utc(rows[0][0])


async def _sent_before(
    conn: psycopg.AsyncConnection[Any], run_id: str, dedupe_key: str | None
) -> SignalSent | None:
    """The signal sent to the run before with this dedupe key, as a repeat; or None."""
    if dedupe_key is None:
        return None
    seen = await fetchall(
        conn,
        "SELECT seq FROM flux_signals WHERE run_id = %s AND dedupe_key = %s",
        (run_id, dedupe_key),
    )
    return SignalSent(seen[0][0], False) if seen else None


async def send_signal(
    conn: psycopg.AsyncConnection[Any],
    run_id: str,
    name: str,
    payload: str,
    dedupe_key: str | None,
) -> SignalSent:
    """Lock the run's row first (the lock a transition's update takes), so a transition that
    checks the inbox before suspending runs entirely before or after this; then append."""
    async with transaction(conn):
        run = await fetchall(
            conn, "SELECT name, status FROM flux_runs WHERE id = %s FOR NO KEY UPDATE", (run_id,)
        )
        if not run:
            raise not_found_error(run_id)
        if run[0][1] in FINISHED_STATUSES:
            # A repeat is answered as such even when the run has finished since (a retry).
            seen = await _sent_before(conn, run_id, dedupe_key)
            if seen is not None:
                return seen
            raise finished_error(run_id, run[0][0], run[0][1])
        # A child's outcome is written without this lock (see _children.pg_wake): a sequence
        # number it took meanwhile is a conflict like a repeated dedupe key; try again.
        for _ in range(_SEND_TRIES):
            inserted = await fetchall(
                conn,
                "INSERT INTO flux_signals (run_id, seq, name, payload, dedupe_key, created_at) "
                "VALUES (%s, (SELECT coalesce(max(seq), 0) + 1 FROM flux_signals "
                "WHERE run_id = %s), %s, %s::jsonb, %s, now()) ON CONFLICT DO NOTHING "
                "RETURNING seq",
                (run_id, run_id, name, payload, dedupe_key),
            )
            if inserted:
                return SignalSent(inserted[0][0], True)
            seen = await _sent_before(conn, run_id, dedupe_key)
            if seen is not None:
                return seen
        raise _StorageError(
            f"PostgreSQL send_signal of run {run_id!r}: its inbox kept changing; try again",
            workflow_id=run_id,
        )


def _signal(r: Sequence[Any]) -> SignalRow:
    return signal_from(r, utc)


async def list_signals(conn: psycopg.AsyncConnection[Any], run_id: str) -> list[SignalRow]:
    rows = await fetchall(
        conn,
        "SELECT " + _SIGNAL_SELECT + " FROM flux_signals WHERE run_id = %s ORDER BY seq",
        (run_id,),
    )
    return [_signal(r) for r in rows]


async def first_signal(
    conn: psycopg.AsyncConnection[Any], run_id: str, name: str
) -> SignalRow | None:
    rows = await fetchall(
        conn,
        "SELECT " + _SIGNAL_SELECT + " FROM flux_signals WHERE run_id = %s AND name = %s "
        "AND consumed_by_step IS NULL ORDER BY seq LIMIT 1",
        (run_id, name),
    )
    return _signal(rows[0]) if rows else None


async def request(
    conn: psycopg.AsyncConnection[Any], run_id: str, kind: str, reason: str | None
) -> bool:
    """Set a request unless the run is finished; a cancel replaces a pause, never the reverse."""
    async with transaction(conn):
        run = await fetchall(
            conn, "SELECT status FROM flux_runs WHERE id = %s FOR NO KEY UPDATE", (run_id,)
        )
        if not run:
            raise not_found_error(run_id)
        if run[0][0] in FINISHED_STATUSES:
            return False
        await conn.execute(
            "UPDATE flux_runs SET requested = %s, request_reason = %s WHERE id = %s "
            "AND (requested IS NULL OR (requested = 'pause' AND %s::text = 'cancel'))",
            (kind, reason, run_id, kind),
        )
        return True


async def counts(conn: psycopg.AsyncConnection[Any], name: str | None) -> dict[str, int]:
    rows = await fetchall(
        conn,
        "SELECT status, count(*) FROM flux_runs WHERE %s::text IS NULL OR name = %s "
        "GROUP BY status",
        (name, name),
    )
    return {r[0]: r[1] for r in rows}
