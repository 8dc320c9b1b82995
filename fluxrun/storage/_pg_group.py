"""Group commit on PostgreSQL (see :mod:`fluxrun.storage._group_commit`): the step commits
of several runs written by one statement, so one round trip and one commit.

The statement takes the writes as arrays (``unnest``): one ``UPDATE flux_runs ... FROM``
them, a compare-and-set on each run's version and fence, and one ``INSERT INTO flux_steps``
of the step rows of the runs it updated. A write whose compare-and-set matches no row leaves
its run and step untouched and is diagnosed alone afterwards, as when sent alone; the
others commit. A statement that fails as a whole (a step already recorded, a value the
database refuses, a lost connection) undoes all of it, and each write is then sent alone,
so that only the one at fault fails.

Only the two commits of the forward path are grouped: a step's outcome (the run stays or
becomes ``running``), and the last step's outcome with the run's completion (``completed``,
its error cleared, let go, any request cleared). Anything else, and anything a future field
of :class:`Transition` adds, takes the single-write path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import StorageError
from ._base import KEEP, Applied, Transition
from ._pg import fetchall, step_values
from ._pg_apply import diagnose

if TYPE_CHECKING:
    import psycopg

__all__ = ["PgWrite", "flush_writes"]

# v: one row per write (fin: the run completes); s: one step row per write.
_GROUP = (
    "WITH v AS (SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], "
    "%b::timestamptz[], %b::integer[], %b::text[], %b::boolean[], %b::timestamptz[]) "
    "AS v(id, expected, fence, at, cur, status, fin, done_at)), "
    "u AS (UPDATE flux_runs AS r SET version = r.version + 1, updated_at = v.at, "
    "current_step = v.cur, status = coalesce(v.status, r.status), "
    "claims = CASE WHEN v.fin THEN 0 ELSE 1 END, "
    "error = CASE WHEN v.fin THEN NULL ELSE r.error END, "
    "completed_at = CASE WHEN v.fin THEN v.done_at ELSE r.completed_at END, "
    "owner = CASE WHEN v.fin THEN NULL ELSE r.owner END, "
    "lease_until = CASE WHEN v.fin THEN NULL ELSE r.lease_until END, "
    "requested = CASE WHEN v.fin THEN NULL ELSE r.requested END, "
    "request_reason = CASE WHEN v.fin THEN NULL ELSE r.request_reason END "
    "FROM v WHERE r.id = v.id AND r.version = v.expected AND r.fence = v.fence "
    "RETURNING r.id, r.version, r.fence), "
    "i AS (INSERT INTO flux_steps (run_id, idx, name, status, started_at, completed_at, "
    "suspended_at, compensated_at, waiting_for, duration_ms, output, error, retries, changes, "
    "compensation_changes, fence, error_type, traceback) SELECT s.run_id, s.idx, s.name, "
    "s.status, s.started_at, s.completed_at, s.suspended_at, s.compensated_at, s.waiting_for, "
    "s.duration_ms, s.output::jsonb, s.error, s.retries, s.changes::jsonb, "
    "s.compensation_changes::jsonb, s.fence, s.error_type, s.traceback FROM unnest("
    "%b::text[], %b::integer[], %b::text[], %b::text[], %b::timestamptz[], %b::timestamptz[], "
    "%b::timestamptz[], %b::timestamptz[], %b::text[], %b::double precision[], %b::text[], "
    "%b::text[], %b::integer[], %b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[]) "
    "AS s(run_id, idx, name, status, started_at, completed_at, suspended_at, compensated_at, "
    "waiting_for, duration_ms, output, error, retries, changes, compensation_changes, fence, "
    "error_type, traceback) JOIN u ON u.id = s.run_id) "
    "SELECT id, version, fence FROM u"
)


class PgWrite(NamedTuple):
    """One write of a batch: the transition, and its single-write ``UPDATE`` (for the path
    it takes alone) with parameters."""

    t: Transition
    update: str
    params: list[Any]


def _params(writes: Sequence[PgWrite]) -> list[Any]:
    runs: list[list[Any]] = [[] for _ in range(8)]
    steps: list[list[Any]] = [[] for _ in range(18)]
    for w in writes:
        t = w.t
        assert t.insert_step is not None
        fin = bool(t.release)
        row = (
            t.run_id,
            t.expected_version,
            t.fence,
            t.updated_at,
            t.current_step,
            None if t.status is KEEP else t.status,
            fin,
            t.completed_at if fin else None,
        )
        for column, value in zip(runs, row, strict=True):
            column.append(value)
        for column, value in zip(steps, step_values(t.run_id, t.insert_step), strict=True):
            column.append(value)
    return [*runs, *steps]


async def flush_writes(
    conn: psycopg.AsyncConnection[Any], writes: Sequence[PgWrite]
) -> list[Applied | BaseException] | None:
    """Write ``writes`` in one statement on ``conn``; the outcome of each, in order, or
    None if the statement failed as a whole (then nothing of it was written: the caller
    makes each write on its own, on a connection of its own)."""
    import psycopg

    try:
        rows = await fetchall(conn, _GROUP, _params(writes))
    except psycopg.Error:
        return None  # one autocommit statement: undone as a whole
    applied = {run_id: Applied(version=v, fence=f) for run_id, v, f in rows}
    result: list[Applied | BaseException] = []
    for w in writes:
        got = applied.get(w.t.run_id)
        if got is not None:
            result.append(got)
            continue
        try:
            result.append(await diagnose(conn, w.t))
        except psycopg.Error as exc:  # the others committed: only this one is in doubt
            result.append(
                StorageError(
                    f"PostgreSQL step commit of run {w.t.run_id!r} was refused, and why "
                    f"could not be read: {exc}",
                    workflow_id=w.t.run_id,
                )
            )
    return result
