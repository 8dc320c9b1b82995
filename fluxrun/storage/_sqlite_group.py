"""Group commit on SQLite (see :mod:`fluxrun.storage._group_commit`): the step commits of
several runs in one ``BEGIN IMMEDIATE`` transaction, all at once when they all apply, one
savepoint each when one of them is refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import FluxError
from ._base import Applied, Transition
from ._sqlite_lease import LeaseClock
from ._sqlite_sql import INSERT_STEP, step_values, update_statement, write

__all__ = ["apply_many"]


def apply_many(
    conn: sqlite3.Connection,
    ts: Sequence[Transition],
    clock: LeaseClock,
    failed: Callable[[Transition, Exception], Exception],
) -> list[Applied | Exception]:
    """Apply several step commits (:func:`~fluxrun.storage._group_commit.groupable`
    transitions) in one ``BEGIN IMMEDIATE`` transaction (a group commit).

    First all at once: one ``executemany`` per shape of the run's ``UPDATE`` and one of the
    step rows. If every compare-and-set hit and nothing was refused, that is the outcome.
    Otherwise that attempt is undone and each transition is applied inside a savepoint of
    its own: one that is refused is undone alone (its error, made by ``failed`` from what
    was raised, is its outcome) and the others commit."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    if _all_at_once(conn, ts, clock):
        conn.execute("COMMIT")
        return [Applied(version=t.expected_version + 1, fence=t.fence or 0) for t in ts]
    outcomes: list[Applied | Exception] = []
    for t in ts:
        conn.execute("SAVEPOINT flux_write")
        try:
            outcomes.append(write(conn, t, clock))
        except (FluxError, sqlite3.Error, OverflowError) as exc:
            conn.execute("ROLLBACK TO flux_write")
            outcomes.append(failed(t, exc))
        conn.execute("RELEASE flux_write")
    conn.execute("COMMIT")
    return outcomes


def _all_at_once(conn: sqlite3.Connection, ts: Sequence[Transition], clock: LeaseClock) -> bool:
    """Apply fenced step commits with one ``executemany`` per ``UPDATE`` shape and one for
    the step rows, inside a savepoint; True if all applied, else nothing did."""
    shapes: dict[str, list[list[Any]]] = {}
    steps: list[tuple[Any, ...]] = []
    for t in ts:
        s = t.insert_step
        if s is None or t.fence is None or t.claim is not None or t.renew_lease is not None:
            return False
        update, params = update_statement(t, clock, None)
        shapes.setdefault(update, []).append(params)
        steps.append((t.run_id, s.index, *step_values(s)))
    conn.execute("SAVEPOINT flux_batch")
    try:
        # executemany sums the rows changed: every compare-and-set hit, or one did not.
        hits = sum(conn.executemany(sql, rows).rowcount for sql, rows in shapes.items())
        if hits == len(ts):
            conn.executemany(INSERT_STEP, steps)
            conn.execute("RELEASE flux_batch")
            return True
    except (sqlite3.Error, OverflowError):
        pass  # a step already recorded, a value refused: sorted out one by one
    conn.execute("ROLLBACK TO flux_batch")
    conn.execute("RELEASE flux_batch")
    return False
