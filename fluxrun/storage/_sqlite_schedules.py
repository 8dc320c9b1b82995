"""The schedule verbs of :class:`~fluxrun.storage.sqlite.SQLiteStorage` (see
:class:`~fluxrun.storage._schedules.ScheduleVerbs`). A firing pass is one ``BEGIN
IMMEDIATE`` transaction: SQLite has one writer, so while it holds the lock no other process
can fire, or even read as due, a schedule this pass advances."""

from __future__ import annotations

import abc
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._base import Store
from ._limits import row_limit
from ._schedules import (
    Fired,
    FiredSchedules,
    FirePlan,
    ScheduleRow,
    check_schedule_row,
    schedule_from,
)
from ._sqlite_lease import LeaseClock
from ._sqlite_sql import from_micros, insert_run, to_micros

__all__ = ["SQLiteSchedules"]

T = TypeVar("T")

_COLUMNS = (
    "id, name, cron, every_us, timezone, input, enabled, next_at, last_tick, created_at, updated_at"
)
# One statement: insert, or replace the row with this id; the same schedule keeps its next
# tick and last tick (see ScheduleVerbs.put_schedule), any change takes the new next tick.
_SAME = (
    "flux_schedules.name = excluded.name AND flux_schedules.cron IS excluded.cron AND "
    "flux_schedules.every_us IS excluded.every_us AND flux_schedules.timezone = "
    "excluded.timezone AND flux_schedules.input = excluded.input AND "
    "flux_schedules.enabled = excluded.enabled"
)
_PUT = (
    "INSERT INTO flux_schedules (" + _COLUMNS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, cron = excluded.cron, "
    "every_us = excluded.every_us, timezone = excluded.timezone, input = excluded.input, "
    "enabled = excluded.enabled, next_at = CASE WHEN " + _SAME + " THEN flux_schedules.next_at "
    "ELSE excluded.next_at END, updated_at = excluded.updated_at RETURNING " + _COLUMNS
)
_DUE = (
    "SELECT " + _COLUMNS + " FROM flux_schedules WHERE enabled = 1 AND next_at <= ? "
    "AND name IN (SELECT value FROM json_each(?)) ORDER BY next_at, id LIMIT ?"
)
_NEXT = (
    "SELECT min(next_at) FROM flux_schedules WHERE enabled = 1 "
    "AND name IN (SELECT value FROM json_each(?))"
)


def _row(r: Sequence[Any]) -> ScheduleRow:
    return schedule_from(r, from_micros)


class SQLiteSchedules(Store):
    """Schedules in the ``flux_schedules`` table (schema 6)."""

    _clock: LeaseClock

    @abc.abstractmethod
    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], what: str, run_id: str | None = None
    ) -> T:
        """Run ``fn`` with the store's connection and locking."""

    async def put_schedule(self, row: ScheduleRow) -> ScheduleRow:
        """Insert or replace a schedule in one statement."""
        check_schedule_row(row)

        def put(conn: sqlite3.Connection) -> ScheduleRow:
            now = self._clock.wall_us()
            found = conn.execute(
                _PUT,
                (
                    row.id,
                    row.name,
                    row.cron,
                    row.every_us,
                    row.timezone,
                    row.input,
                    int(row.enabled),
                    to_micros(row.next_at),
                    now,
                    now,
                ),
            ).fetchone()
            return _row(found)

        return await self._run(put, "put_schedule")

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule; False if there was none."""

        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM flux_schedules WHERE id = ?", (schedule_id,))
            return cur.rowcount == 1

        return await self._run(delete, "delete_schedule")

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule, by id."""

        def read(conn: sqlite3.Connection) -> list[ScheduleRow]:
            rows = conn.execute("SELECT " + _COLUMNS + " FROM flux_schedules ORDER BY id")
            return [_row(r) for r in rows.fetchall()]

        return await self._run(read, "list_schedules")

    async def fire_schedules(
        self, names: Sequence[str], limit: int, plan: FirePlan
    ) -> FiredSchedules:
        """Fire due schedules in one ``BEGIN IMMEDIATE`` transaction."""
        limit = row_limit(limit, "limit")
        wanted = json.dumps(list(names))

        def fire(conn: sqlite3.Connection) -> FiredSchedules:
            if not names:
                return FiredSchedules()
            conn.execute("BEGIN IMMEDIATE")  # the store's guard rolls back on an error
            now_us = self._clock.wall_us()  # read with the write lock held
            now = dt.datetime.fromtimestamp(now_us / 1e6, dt.UTC)
            fired: list[Fired] = []
            for r in conn.execute(_DUE, (now_us, wanted, limit)).fetchall():
                row = _row(r)
                firing = plan(row, now)
                if firing is None:
                    continue
                created = False
                if firing.run is not None:
                    created = insert_run(
                        conn, firing.run, None, None, input_hash=firing.input_hash, or_nothing=True
                    )
                conn.execute(
                    "UPDATE flux_schedules SET next_at = ?, last_tick = ?, updated_at = ? "
                    "WHERE id = ?",
                    (to_micros(firing.next_at), to_micros(firing.tick), now_us, row.id),
                )
                fired.append(Fired(row, firing, created))
            found = conn.execute(_NEXT, (wanted,)).fetchone()
            conn.execute("COMMIT")
            return FiredSchedules(fired, from_micros(found[0]))

        return await self._run(fire, "fire_schedules")
