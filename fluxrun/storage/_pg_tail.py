"""Reading a run from its snapshot on (:meth:`Store.load_tail`) in
:mod:`fluxrun.storage.postgres`: the run row with its snapshot and only the step rows from
the snapshot's step on, and the rows before it when something asks for them."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import StorageError
from ._base import RunRow, Snapshot, StepRow
from ._pg import RUN_SELECT, STEP_SELECT, fetchall, run_row, step_row
from ._pg_connect import LeaseRenewer, transaction

if TYPE_CHECKING:
    import psycopg

__all__ = ["STEPS_BEFORE", "load_tail", "read_before", "steps_before"]

STEPS_BEFORE = (
    "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = %s AND idx < %s ORDER BY idx"
)
_RUN = "SELECT " + RUN_SELECT + ", snapshot, snapshot_at FROM flux_runs WHERE id = %s"
_STEPS_FROM = (
    "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = %s AND idx >= %s ORDER BY idx"
)


async def load_tail(conn: psycopg.AsyncConnection[Any], run_id: str) -> RunRow | None:
    """:meth:`Store.load_tail` in one read-only snapshot."""
    async with transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
        found = await fetchall(conn, _RUN, (run_id,))
        if not found:
            return None
        r = found[0]
        text, at = r[-2], r[-1]
        current_step = r[6]
        start = 0 if text is None or at is None or current_step < at else at
        steps = await fetchall(conn, _STEPS_FROM, (run_id, start))
    row = run_row(r, tuple(step_row(s) for s in steps))
    if start == 0:
        return row
    return replace(row, snapshot=Snapshot(text=text, at=at), steps_from=at)


async def steps_before(
    conn: psycopg.AsyncConnection[Any], run_id: str, before: int
) -> tuple[StepRow, ...]:
    """A run's step rows below index ``before``, in index order."""
    return tuple(step_row(s) for s in await fetchall(conn, STEPS_BEFORE, (run_id, before)))


def read_before(
    renewer: LeaseRenewer, settings: tuple[str, dict[str, Any]] | None, run_id: str, before: int
) -> tuple[StepRow, ...]:
    """:func:`steps_before` over the store's synchronous connection (``renewer``'s)."""
    if settings is None:
        raise StorageError("PostgresStorage reads steps this way only after init()")
    return tuple(step_row(r) for r in renewer.fetch(settings, STEPS_BEFORE, (run_id, before)))
