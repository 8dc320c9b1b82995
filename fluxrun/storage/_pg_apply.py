"""A transition's write on PostgreSQL (:meth:`PostgresStorage.apply`): one statement when it
changes at most one step row, else one transaction block; and the precise error of a write
that did not apply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConcurrentModificationError
from ._base import Applied, Transition, transition_error
from ._children import pg_wake
from ._pg import (
    INSERT_ATTEMPTS,
    INSERT_ATTEMPTS_AFTER_UPDATE,
    SET_STEP,
    STEP_TARGET,
    STEP_VALUES,
    attempt_params,
    fetchall,
    rowcount,
    step_params,
    step_values,
)
from ._sched import unconsumable_error

if TYPE_CHECKING:
    import psycopg

__all__ = ["apply_block", "apply_simple", "diagnose", "recorded", "unrecorded"]


async def apply_simple(
    conn: psycopg.AsyncConnection[Any], t: Transition, update: str, params: list[Any]
) -> Applied:
    """One statement: the run's compare-and-set, and the step row and attempts written
    only if it applied (an autocommit statement is atomic: a failing part undoes all)."""
    from psycopg import errors

    ctes: list[str] = []
    if t.insert_step is not None:
        # A row already at that index fails the whole statement with a unique violation.
        ctes.append(
            "i AS (INSERT INTO flux_steps (" + STEP_TARGET + ") SELECT " + STEP_VALUES + " FROM u)"
        )
        params = params + list(step_values(t.run_id, t.insert_step))
    elif t.update_step is not None:
        # The run is updated only if the step row exists, so the row update always hits.
        update += " AND EXISTS (SELECT 1 FROM flux_steps WHERE run_id = %s AND idx = %s)"
        index = t.update_step.index
        ctes.append("s AS (" + SET_STEP + " FROM u WHERE run_id = %s AND idx = %s)")
        params = [*params, t.run_id, index, *step_params(t.update_step), t.run_id, index]
    if t.attempts:
        ctes.append("a AS (" + INSERT_ATTEMPTS_AFTER_UPDATE + ")")
        params = params + attempt_params(t)
    if ctes:
        query = (
            "WITH u AS ("
            + update
            + " RETURNING version, fence), "
            + ", ".join(ctes)
            + " SELECT version, fence FROM u"
        )
    else:
        query = update + " RETURNING version, fence"
    try:
        rows = await fetchall(conn, query, params)
    except errors.UniqueViolation as exc:
        raise recorded(t) from exc
    if not rows:
        raise await diagnose(conn, t)
    return Applied(version=rows[0][0], fence=rows[0][1])


async def apply_block(
    conn: psycopg.AsyncConnection[Any], t: Transition, update: str, params: list[Any]
) -> Applied:
    """The parts in order (run, deletion, insertion, replacement, attempts), as in every
    store; the caller's transaction block undoes them all if one fails."""
    from psycopg import errors

    rows = await fetchall(conn, update + " RETURNING version, fence", params)
    if not rows:
        raise await diagnose(conn, t)
    if t.consume_signal is not None:
        c = t.consume_signal
        hit = await rowcount(
            conn,
            "UPDATE flux_signals SET consumed_by_step = %s, consumed_at = %s "
            "WHERE run_id = %s AND seq = %s AND consumed_by_step IS NULL",
            (c.step, t.updated_at, t.run_id, c.seq),
        )
        if hit != 1:
            raise unconsumable_error(t.run_id, c.seq)
    if t.delete_steps_from is not None:
        await conn.execute(
            "DELETE FROM flux_steps WHERE run_id = %s AND idx >= %s "
            "AND NOT (idx = ANY(%s::integer[]))",
            (t.run_id, t.delete_steps_from, list(t.keep_steps)),
        )
    if t.insert_step is not None:
        try:
            await conn.execute(
                "INSERT INTO flux_steps (" + STEP_TARGET + ") VALUES (" + STEP_VALUES + ")",
                step_values(t.run_id, t.insert_step),
            )
        except errors.UniqueViolation as exc:
            raise recorded(t) from exc
    if t.update_step is not None:
        index = t.update_step.index
        changed = await rowcount(
            conn,
            SET_STEP + " WHERE run_id = %s AND idx = %s",
            (*step_params(t.update_step), t.run_id, index),
        )
        if changed != 1:
            raise unrecorded(t.run_id, index)
    if t.attempts:
        await conn.execute(INSERT_ATTEMPTS, attempt_params(t))
    if t.wake is not None:
        await pg_wake(conn, t.wake)
    return Applied(version=rows[0][0], fence=rows[0][1])


def recorded(t: Transition) -> ConcurrentModificationError:
    index = t.insert_step.index if t.insert_step is not None else -1
    return ConcurrentModificationError(
        f"step {index} of run {t.run_id!r} is already recorded", workflow_id=t.run_id
    )


def unrecorded(run_id: str, index: int) -> ConcurrentModificationError:
    return ConcurrentModificationError(
        f"step {index} of run {run_id!r} has no recorded outcome", workflow_id=run_id
    )


async def diagnose(
    conn: psycopg.AsyncConnection[Any], t: Transition
) -> ConcurrentModificationError:
    """Why a compare-and-set matched no row: the same error the reference model raises."""
    index = None if t.update_step is None else t.update_step.index
    rows = await fetchall(
        conn,
        "SELECT name, version, fence, owner, lease_until, now(), "
        "EXISTS (SELECT 1 FROM flux_steps WHERE run_id = %s AND idx = %s) "
        "FROM flux_runs WHERE id = %s",
        (t.run_id, index, t.run_id),
    )
    if not rows:
        return ConcurrentModificationError(
            f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
        )
    name, version, fence, owner, lease_until, now, step_exists = rows[0]
    error = transition_error(t.run_id, name, version, fence, owner, lease_until, t, now)
    if error is None and index is not None and not step_exists:
        error = unrecorded(t.run_id, index)
    return error or ConcurrentModificationError(
        f"run {t.run_id!r} changed while being written", workflow_id=t.run_id
    )
