"""Stored schedules: the rows, and the store verbs that keep and fire them.

A schedule is one row (:class:`ScheduleRow`): the workflow it starts, when (a cron
expression in a time zone, or an interval), the input of every run it starts, and
``next_at``, the next tick not yet fired (UTC, by the store's clock). Firing is one
transaction per pass (:meth:`ScheduleVerbs.fire_schedules`): the store locks the due rows
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), asks the caller's
``plan`` what each firing is (the run to start and the next tick), inserts that run unless a
run of its workflow has its idempotency key (which names the schedule and the tick), and
advances ``next_at``, all in the same commit. So a tick's run is started and the schedule
moved past it together or not at all: a crash between them cannot lose a tick, and two
processes never both fire one (the second sees the moved ``next_at``, or the key).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, StorageError

if TYPE_CHECKING:
    from ._base import RunRow  # _base mixes ScheduleVerbs into Store

__all__ = [
    "FirePlan",
    "Fired",
    "FiredSchedules",
    "Firing",
    "ScheduleRow",
    "ScheduleVerbs",
    "check_schedule_row",
    "same_schedule",
    "schedule_from",
]


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A stored schedule. Exactly one of ``cron`` (an expression, in ``timezone``) and
    ``every_us`` (an interval in microseconds) is set. ``input`` is encoded JSON text.
    ``next_at`` is the next tick not yet fired (None: it never fires again); ``last_tick``
    the last tick fired. ``created_at``/``updated_at`` are set by the store."""

    id: str
    name: str
    cron: str | None
    every_us: int | None
    timezone: str
    input: str
    enabled: bool
    next_at: dt.datetime | None
    last_tick: dt.datetime | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Firing:
    """What firing one due schedule writes: ``run`` (a new pending run whose
    ``idempotency_key`` names the schedule and ``tick``; None: start nothing), its input
    hash, and the schedule's new ``next_at``. ``skipped``/``more`` count the earlier ticks
    that were missed and are not fired (for the caller's log; nothing stores them)."""

    run: RunRow | None
    input_hash: str | None
    tick: dt.datetime
    next_at: dt.datetime | None
    skipped: int = 0
    more: bool = False


FirePlan = Callable[[ScheduleRow, dt.datetime], Firing | None]
"""Given a due schedule and the store's now, what firing it is; None leaves the schedule
untouched (still due). Called inside the store's transaction: no I/O, no awaiting."""


@dataclass(frozen=True, slots=True)
class Fired:
    """One schedule fired: the schedule as it was, the firing, and whether its run was
    created by this firing (False: a run of that workflow had the key already)."""

    schedule: ScheduleRow
    firing: Firing
    created: bool


@dataclass(frozen=True, slots=True)
class FiredSchedules:
    """What one :meth:`ScheduleVerbs.fire_schedules` did, and the earliest ``next_at`` of
    the enabled schedules of those workflows afterwards (when to look again; None: none)."""

    fired: list[Fired] = field(default_factory=list)
    next_at: dt.datetime | None = None


def check_schedule_row(row: ScheduleRow) -> None:
    """Refuse a row no store can keep the same way (the engine never builds one)."""
    if not isinstance(row, ScheduleRow):
        raise InvalidArgumentError(f"expected a ScheduleRow, got {type(row).__name__}")
    if not row.id or not row.name or (row.cron is None) == (row.every_us is None):
        raise InvalidArgumentError(
            f"schedule {row.id!r}: needs an id, a workflow name and one of cron and every"
        )
    if row.every_us is not None and not 0 < row.every_us < 2**63:
        raise InvalidArgumentError(f"schedule {row.id!r}: every_us out of range")
    for value in (row.next_at, row.last_tick):
        if value is not None and value.tzinfo is None:
            raise InvalidArgumentError(f"schedule {row.id!r}: times must be timezone-aware")


def same_schedule(a: ScheduleRow, b: ScheduleRow) -> bool:
    """Whether ``b`` stores the same schedule as ``a`` (then putting it keeps ``next_at``)."""
    return (a.name, a.cron, a.every_us, a.timezone, a.input, a.enabled) == (
        b.name,
        b.cron,
        b.every_us,
        b.timezone,
        b.input,
        b.enabled,
    )


class ScheduleVerbs:
    """The store verbs of schedules, mixed into :class:`~fluxrun.storage.Store`.

    The defaults are those of a store that keeps no schedules (a user's store written
    before schedules existed): it lists none, fires none, and refuses to store one. The
    stores fluxrun ships override all four.
    """

    async def put_schedule(self, row: ScheduleRow) -> ScheduleRow:
        """Insert the schedule, or replace the one with its id; return it as stored.

        Replacing it with the same schedule (:func:`same_schedule`) keeps its ``next_at``
        and ``last_tick`` (declaring a schedule at every start of an app must not move its
        next tick or lose a tick missed while the app was down); any change takes
        ``row.next_at``. ``created_at`` is kept; ``updated_at`` is the store's now.
        """
        raise StorageError(f"{type(self).__name__} does not keep schedules")

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete a schedule (its runs stay); False if there was none with this id."""
        return False

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every stored schedule, by id."""
        return []

    async def fire_schedules(
        self, names: Sequence[str], limit: int, plan: FirePlan
    ) -> FiredSchedules:
        """Fire up to ``limit`` due schedules of these workflows in one transaction.

        Due: enabled, with ``next_at`` at or before the store's now. For each, in
        ``next_at`` order, ``plan(row, now)`` says what firing it is; the store inserts the
        firing's run (nothing if its workflow has a run with the run's idempotency key) and
        sets ``next_at`` and ``last_tick = tick``, in the same transaction. Rows another
        transaction is firing are skipped, never waited for or fired twice. If ``plan``
        raises, nothing of the pass is written and the error propagates.
        """
        return FiredSchedules()


def schedule_from(r: Sequence[Any], when: Callable[[Any], Any]) -> ScheduleRow:
    """A schedule row from values selected in the stores' column order (``when`` turns the
    dialect's time value into a datetime)."""
    return ScheduleRow(
        id=r[0],
        name=r[1],
        cron=r[2],
        every_us=r[3],
        timezone=r[4],
        input=r[5],
        enabled=bool(r[6]),
        next_at=when(r[7]),
        last_tick=when(r[8]),
        created_at=when(r[9]),
        updated_at=when(r[10]),
    )
