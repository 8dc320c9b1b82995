"""The schedule verbs of :class:`~fluxrun.storage.memory.MemoryStorage` (the reference
model of :class:`~fluxrun.storage._schedules.ScheduleVerbs`), under the store's one lock."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import threading
from collections.abc import Sequence
from typing import Any

from ._base import RunRow, Store
from ._limits import row_limit
from ._schedules import (
    Fired,
    FiredSchedules,
    FirePlan,
    ScheduleRow,
    check_schedule_row,
    same_schedule,
)

__all__ = ["MemorySchedules"]


class MemorySchedules(Store):
    """Schedules in a dict, changed under the store's lock."""

    _lock: threading.Lock
    _keys: dict[tuple[str, str], str]
    _runs: dict[str, Any]

    def __init__(self) -> None:
        self._schedules: dict[str, ScheduleRow] = {}

    @abc.abstractmethod
    def _now(self) -> dt.datetime:
        """The store's clock."""

    @abc.abstractmethod
    def _insert(
        self, run: RunRow, owner: str | None, lease_seconds: float, input_hash: str | None
    ) -> None:
        """Insert a run (the lock held, its id and key free)."""

    async def put_schedule(self, row: ScheduleRow) -> ScheduleRow:
        """Insert or replace a schedule (see :meth:`ScheduleVerbs.put_schedule`)."""
        check_schedule_row(row)
        with self._lock:
            now = self._now()
            old = self._schedules.get(row.id)
            if old is None:
                stored = dataclasses.replace(row, created_at=now, updated_at=now)
            elif same_schedule(old, row):
                stored = dataclasses.replace(old, updated_at=now)
            else:
                stored = dataclasses.replace(
                    row, last_tick=old.last_tick, created_at=old.created_at, updated_at=now
                )
            self._schedules[row.id] = stored
            return stored

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule; False if there was none."""
        with self._lock:
            return self._schedules.pop(schedule_id, None) is not None

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every schedule, by id."""
        with self._lock:
            return [self._schedules[k] for k in sorted(self._schedules)]

    async def fire_schedules(
        self, names: Sequence[str], limit: int, plan: FirePlan
    ) -> FiredSchedules:
        """Fire due schedules (see :meth:`ScheduleVerbs.fire_schedules`)."""
        limit = row_limit(limit, "limit")
        wanted = set(names)
        fired: list[Fired] = []
        with self._lock:
            now = self._now()
            due = sorted(
                (
                    s
                    for s in self._schedules.values()
                    if s.enabled and s.name in wanted and s.next_at is not None and s.next_at <= now
                ),
                key=lambda s: (s.next_at, s.id),
            )
            # Every plan first: a plan that raises leaves everything as it was, as the
            # SQL stores' rollback does.
            planned = [(row, plan(row, now)) for row in due[:limit]]
            for row, firing in planned:
                if firing is None:
                    continue
                created = False
                run = firing.run
                if run is not None:
                    key = run.idempotency_key
                    taken = run.id in self._runs or (
                        key is not None and (run.name, key) in self._keys
                    )
                    if not taken:
                        self._insert(run, None, 0.0, firing.input_hash)
                        created = True
                self._schedules[row.id] = dataclasses.replace(
                    row, next_at=firing.next_at, last_tick=firing.tick, updated_at=now
                )
                fired.append(Fired(row, firing, created))
            times = [
                s.next_at
                for s in self._schedules.values()
                if s.enabled and s.name in wanted and s.next_at is not None
            ]
            return FiredSchedules(fired, min(times, default=None))
