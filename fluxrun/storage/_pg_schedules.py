"""The schedule verbs of :class:`~fluxrun.storage.postgres.PostgresStorage` (see
:class:`~fluxrun.storage._schedules.ScheduleVerbs`). A firing pass is one transaction that
locks the due rows ``FOR UPDATE SKIP LOCKED``: workers fire different schedules side by
side, and a row another worker is firing is neither waited for nor fired twice (when it
commits, its ``next_at`` is past the tick). Times are the database's (``now()``)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from ._base import Store
from ._limits import row_limit
from ._pg import fetchall, utc
from ._pg_connect import transaction
from ._pg_sched import insert_run
from ._schedules import (
    Fired,
    FiredSchedules,
    FirePlan,
    ScheduleRow,
    check_schedule_row,
    schedule_from,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresSchedules"]

_COLUMNS = (
    "id, name, cron, every_us, timezone, input::text, enabled, next_at, last_tick, "
    "created_at, updated_at"
)
# One statement: insert, or replace the row with this id; the same schedule keeps its next
# tick and last tick (see ScheduleVerbs.put_schedule), any change takes the new next tick.
_SAME = (
    "flux_schedules.name = excluded.name AND flux_schedules.cron IS NOT DISTINCT FROM "
    "excluded.cron AND flux_schedules.every_us IS NOT DISTINCT FROM excluded.every_us AND "
    "flux_schedules.timezone = excluded.timezone AND flux_schedules.input = excluded.input "
    "AND flux_schedules.enabled = excluded.enabled"
)
_PUT = (
    "INSERT INTO flux_schedules (id, name, cron, every_us, timezone, input, enabled, next_at, "
    "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, now(), now()) "
    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, cron = excluded.cron, "
    "every_us = excluded.every_us, timezone = excluded.timezone, input = excluded.input, "
    "enabled = excluded.enabled, next_at = CASE WHEN " + _SAME + " THEN flux_schedules.next_at "
    "ELSE excluded.next_at END, updated_at = excluded.updated_at RETURNING " + _COLUMNS
)
_DUE = (
    "SELECT " + _COLUMNS + ", now() FROM flux_schedules WHERE enabled AND next_at <= now() "
    "AND name = ANY(%s::text[]) ORDER BY next_at, id LIMIT %s::bigint FOR UPDATE SKIP LOCKED"
)


def _row(r: Sequence[Any]) -> ScheduleRow:
    return schedule_from(r, utc)


class PostgresSchedules(Store):
    """Schedules in the ``flux_schedules`` table (schema 5)."""

    @abc.abstractmethod
    def _connection(
        self, what: str, run_id: str | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection, bounded by the store's timeout."""

    async def put_schedule(self, row: ScheduleRow) -> ScheduleRow:
        """Insert or replace a schedule in one statement."""
        check_schedule_row(row)
        params = (
            row.id,
            row.name,
            row.cron,
            row.every_us,
            row.timezone,
            row.input,
            row.enabled,
            row.next_at,
        )
        async with self._connection("put_schedule") as conn:
            return _row((await fetchall(conn, _PUT, params))[0])

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule; False if there was none."""
        async with self._connection("delete_schedule") as conn:
            found = await fetchall(
                conn, "DELETE FROM flux_schedules WHERE id = %s RETURNING id", (schedule_id,)
            )
            return bool(found)

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule, by id."""
        async with self._connection("list_schedules") as conn:
            rows = await fetchall(conn, "SELECT " + _COLUMNS + " FROM flux_schedules ORDER BY id")
            return [_row(r) for r in rows]

    async def fire_schedules(
        self, names: Sequence[str], limit: int, plan: FirePlan
    ) -> FiredSchedules:
        """Fire due schedules in one transaction (``FOR UPDATE SKIP LOCKED``)."""
        limit = row_limit(limit, "limit")
        if not names or not limit:
            return FiredSchedules()
        wanted = list(names)
        fired: list[Fired] = []
        async with self._connection("fire_schedules") as conn, transaction(conn):
            for r in await fetchall(conn, _DUE, (wanted, limit)):
                row, now = _row(r), utc(r[11])
                assert now is not None
                firing = plan(row, now)
                if firing is None:
                    continue
                created = False
                if firing.run is not None:
                    created = await insert_run(
                        conn, firing.run, None, None, firing.input_hash, or_nothing=True
                    )
                await conn.execute(
                    "UPDATE flux_schedules SET next_at = %s, last_tick = %s, updated_at = now() "
                    "WHERE id = %s",
                    (firing.next_at, firing.tick, row.id),
                )
                fired.append(Fired(row, firing, created))
            found = await fetchall(
                conn,
                "SELECT min(next_at) FROM flux_schedules WHERE enabled AND name = ANY(%s::text[])",
                (wanted,),
            )
        return FiredSchedules(fired, utc(found[0][0]))
