"""Stored schedules (SPEC §7): ``schedule``, ``unschedule``, ``list_schedules`` and the
firing pass the scheduler loop runs.

A schedule is a row in the store (:mod:`fluxrun.storage._schedules`), so it outlives the
process that made it and every engine with its workflow registered fires it. A tick fires
exactly once: its run is started with the idempotency key ``schedule:<id>:<tick>`` in the
same store transaction that moves the schedule's ``next_at`` past the tick. After downtime
only the latest missed tick fires; the skipped ones are logged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._codec import encode, input_hash
from ._driver import utcnow
from ._options import text_arg
from ._records import WorkflowStatus
from ._registry import FlowLike, Registry
from ._runtime import Runtime
from ._state import revive_input
from ._ticks import tick_rule
from .errors import InvalidArgumentError
from .storage._base import RunRow, Store
from .storage._schedules import FiredSchedules, Firing, ScheduleRow

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = ["FIRE_LIMIT", "ScheduleControl", "ScheduleInfo", "fire_due", "tick_key"]

#: Schedules one firing pass takes at most (the rest are due on the next pass, at once).
FIRE_LIMIT = 100


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A stored schedule, as :meth:`FluxEngine.list_schedules` shows it.

    Attributes:
        id: The schedule's id.
        workflow: The name of the workflow it starts.
        cron: Its cron expression (None for an interval).
        every: Its interval (None for a cron schedule).
        timezone: The IANA time zone its cron expression is read in.
        enabled: Whether it fires.
        next_at: The next tick not yet fired (UTC); None: it never fires again.
        last_tick: The last tick fired (UTC), or None.
        input: The input of every run it starts.
        created_at: When it was first stored (store clock).
        updated_at: When it was last stored or fired (store clock).
    """

    id: str
    workflow: str
    cron: str | None
    every: dt.timedelta | None
    timezone: str
    enabled: bool
    next_at: dt.datetime | None
    last_tick: dt.datetime | None
    input: Any
    created_at: dt.datetime | None
    updated_at: dt.datetime | None


def tick_key(schedule_id: str, tick: dt.datetime) -> str:
    """The idempotency key of a schedule's run for ``tick``: one run per tick, anywhere."""
    return f"schedule:{schedule_id}:{tick.astimezone(dt.UTC).isoformat()}"


def _info(row: ScheduleRow, registry: Registry) -> ScheduleInfo:
    return ScheduleInfo(
        id=row.id,
        workflow=row.name,
        cron=row.cron,
        every=None if row.every_us is None else dt.timedelta(microseconds=row.every_us),
        timezone=row.timezone,
        enabled=row.enabled,
        next_at=row.next_at,
        last_tick=row.last_tick,
        input=revive_input(row.input, registry.input_spec(row.name)),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class _Planner:
    """Says what firing each due schedule is (called inside the store's transaction)."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.failed: list[tuple[str, Exception]] = []

    def __call__(self, row: ScheduleRow, now: dt.datetime) -> Firing | None:
        try:
            return self._plan(row, now)
        except Exception as exc:
            # This schedule stays due (nothing is written for it); the others still fire.
            self.failed.append((row.id, exc))
            return None

    def _plan(self, row: ScheduleRow, now: dt.datetime) -> Firing:
        assert row.next_at is not None  # due rows have one
        every = None if row.every_us is None else row.every_us / 1e6
        caught = tick_rule(row.cron, every, row.timezone).catch_up(row.next_at, now)
        definition = self._rt.registry[row.name]
        made = utcnow()
        # A workflow with an input type checks a schedule's input when its run is taken (a
        # schedule stored by name alone was not checked): the run starts without step names,
        # like a client's start by name, and an input refused fails that run only.
        checked = definition.input_spec is None
        run = RunRow(
            id=str(uuid.uuid4()),
            name=definition.name,
            status=WorkflowStatus.PENDING.value,
            input=row.input,
            step_names=definition.step_names if checked else (),
            current_step=0,
            created_at=made,
            updated_at=made,
            version=1,
            fence=1,
            definition_version=definition.version if checked else None,
            idempotency_key=tick_key(row.id, caught.tick),
        )
        return Firing(
            run=run,
            input_hash=input_hash(row.input),
            tick=caught.tick,
            next_at=caught.next_at,
            skipped=caught.skipped,
            more=caught.more,
        )


async def fire_due(
    rt: Runtime, names: Sequence[str], warned: set[str]
) -> tuple[FiredSchedules, bool]:
    """Fire the due schedules of ``names`` (one store transaction) and log what happened;
    also whether a schedule could not fire here (it stays due). ``warned`` holds the ids of
    schedules whose failure to fire was logged already (each is logged once)."""
    planner = _Planner(rt)
    done = await rt.store.fire_schedules(names, FIRE_LIMIT, planner)
    log = rt.emitter.log
    for schedule_id, exc in planner.failed:
        if schedule_id not in warned:
            warned.add(schedule_id)
            log.warning(f"schedule {schedule_id!r} cannot fire here and stays due: {exc}", exc)
    for fired in done.fired:
        warned.discard(fired.schedule.id)
        f = fired.firing
        if f.skipped:
            since = fired.schedule.next_at
            log.warning(
                f"schedule {fired.schedule.id!r}: skipped {'more than ' if f.more else ''}"
                f"{f.skipped} missed tick(s) since {since.isoformat() if since else '?'}; "
                f"fired only the latest, {f.tick.isoformat()}"
            )
        if f.next_at is None:
            log.warning(f"schedule {fired.schedule.id!r} has no tick after {f.tick.isoformat()}")
        if fired.created and f.run is not None:
            log.debug(f"schedule {fired.schedule.id!r} started run {f.run.id} for {f.tick}")
    return done, bool(planner.failed)


class ScheduleControl:
    """The engine's schedule calls: they only write schedule rows; the scheduler loop of
    every engine with the workflow registered fires them."""

    _runtime: Runtime
    _registry: Registry
    _scheduler: Scheduler
    _store: Store

    async def _ensure_ready(self) -> None:
        raise NotImplementedError

    async def schedule(
        self,
        id: str,
        cron: str | None = None,
        flow: FlowLike | None = None,
        input: Any = None,
        *,
        every: dt.timedelta | float | None = None,
        timezone: str = "UTC",
        enabled: bool = True,
    ) -> str:
        """Store a schedule that starts a run of ``flow`` with ``input`` at every tick, and
        return its id.

        Give exactly one of ``cron`` — 5 fields (minute hour day month weekday), 6 with
        seconds first, or ``@hourly``/``@daily``/``@weekly``/``@monthly``/``@yearly``, read
        in ``timezone`` (an IANA name; needs ``pip install 'fluxrun[cron]'``) — and
        ``every``, an interval (timedelta or seconds) whose first tick is ``every`` from now.
        Each tick starts one run, whichever engines and processes are up (its idempotency
        key is ``schedule:<id>:<tick>``); after downtime only the latest missed tick fires.
        The workflow must be registered with every engine that should fire it (``flow`` is
        registered with this one).

        Storing a schedule under an existing id replaces it; storing the very same schedule
        again (as an app does at every start) keeps its next tick, so a tick missed while
        the app was down still fires. A disabled schedule (``enabled=False``) never fires;
        enabling it again counts its ticks from then on.

        Raises:
            InvalidArgumentError: an empty id, both or neither of cron and every, an
                invalid expression or one that never fires, an unknown time zone, an
                interval that is not a positive duration, or cronsim missing. Nothing is
                stored.
            InvalidInputError: the input failed the workflow's validation.
        """
        schedule_id = text_arg(id, "schedule id")
        if flow is None:
            raise InvalidArgumentError("schedule needs a workflow (flow=...)")
        if not isinstance(enabled, bool):
            raise InvalidArgumentError(f"enabled must be True or False, got {enabled!r}")
        rule = tick_rule(cron, every, timezone)
        limit = self._runtime.settings.max_value_size
        if isinstance(flow, str) and flow not in self._registry:
            # By name alone (a FluxClient, or a workflow only workers have): the input is
            # stored as given; the engine that starts a tick's run checks it.
            name = text_arg(flow, "workflow name")
            text = encode(input, what="schedule input", max_size=limit)
        else:
            definition = self._registry.adopt(flow)
            name = definition.name
            spec = definition.input_spec
            typed = input if spec is None else spec.validate(input, definition.name)
            plain = typed if spec is None else spec.to_plain(typed)
            text = encode(plain, what="schedule input", max_size=limit)
        await self._ensure_ready()
        first = rule.first_after(self._runtime.settings.clock.now())
        row = ScheduleRow(
            id=schedule_id,
            name=name,
            cron=rule.cron,
            every_us=rule.every_us,
            timezone=timezone,
            input=text,
            enabled=enabled,
            next_at=first,
        )
        await self._store.put_schedule(row)
        self._scheduler.schedules_changed()
        return schedule_id

    async def unschedule(self, id: str) -> bool:
        """Delete a schedule: it fires no more (runs it started go on). False if there was
        none with this id."""
        schedule_id = text_arg(id, "schedule id")
        await self._ensure_ready()
        return await self._store.delete_schedule(schedule_id)

    async def list_schedules(self) -> list[ScheduleInfo]:
        """Every stored schedule, by id."""
        await self._ensure_ready()
        return [_info(row, self._registry) for row in await self._store.list_schedules()]
