"""The store contract for stored schedules (:class:`~fluxrun.storage._schedules.ScheduleVerbs`:
``put_schedule``, ``delete_schedule``, ``list_schedules``, ``fire_schedules``), as pytest tests
for any :class:`Store`; imported by :mod:`fluxrun.testing.store_contract`.

A store may keep no schedules (it inherits the defaults): then these tests are skipped. A
store that keeps them must fire a due schedule once however many stores race for it, start
the firing's run and advance the schedule in one transaction, and keep a re-stored identical
schedule's next tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json

import pytest

from ..storage._base import Store
from ..storage._schedules import Firing, ScheduleRow, ScheduleVerbs
from ._rows import make_run

PAST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
LATER = dt.datetime(2000, 1, 2, tzinfo=dt.UTC)
FUTURE = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


def keeps_schedules(store: Store) -> bool:
    """Whether ``store`` overrides the schedule verbs (else it keeps none)."""
    return type(store).fire_schedules is not ScheduleVerbs.fire_schedules


@pytest.fixture
def schedules(store: Store) -> Store:
    """The contract's store, when it keeps schedules (else the test is skipped)."""
    if not keeps_schedules(store):
        pytest.skip(f"{type(store).__name__} keeps no schedules")
    return store


def sched(schedule_id: str = "s1", **fields: object) -> ScheduleRow:
    """A schedule row as the engine builds it (due in the past unless told otherwise)."""
    values: dict[str, object] = {
        "id": schedule_id,
        "name": "wf",
        "cron": "0 * * * *",
        "every_us": None,
        "timezone": "UTC",
        "input": '{"n":1}',
        "enabled": True,
        "next_at": PAST,
    }
    values.update(fields)
    return ScheduleRow(**values)  # type: ignore[arg-type]


class Plan:
    """A plan that fires ``tick = next_at`` and moves ``next_at`` to ``to`` (or a day
    later), with a run whose key names the schedule and the tick; it records its calls."""

    def __init__(self, to: dt.datetime | None = None, *, run: bool = True) -> None:
        self.calls: list[tuple[str, dt.datetime]] = []
        self._to = to
        self._run = run

    def __call__(self, row: ScheduleRow, now: dt.datetime) -> Firing | None:
        assert row.next_at is not None and row.next_at <= now
        self.calls.append((row.id, now))
        tick = row.next_at
        run = make_run(
            f"run-{row.id}-{len(self.calls)}-{id(self)}",
            name=row.name,
            input=row.input,
            idempotency_key=f"schedule:{row.id}:{tick.isoformat()}",
        )
        return Firing(
            run=run if self._run else None,
            input_hash="h",
            tick=tick,
            next_at=self._to or tick + dt.timedelta(days=1),
        )


async def _one(store: Store, schedule_id: str) -> ScheduleRow:
    found = [s for s in await store.list_schedules() if s.id == schedule_id]
    assert len(found) == 1, found
    return found[0]


async def test_put_list_delete(schedules: Store) -> None:
    stored = await schedules.put_schedule(sched("b", input='{"k":[1,"é"]}'))
    await schedules.put_schedule(sched("a", cron=None, every_us=1_500_000, timezone="Europe/Paris"))
    assert stored.created_at is not None and stored.updated_at is not None
    assert stored.next_at == PAST and stored.last_tick is None
    rows = await schedules.list_schedules()
    assert [r.id for r in rows] == ["a", "b"]
    a, b = rows
    assert (a.cron, a.every_us, a.timezone, a.enabled) == (None, 1_500_000, "Europe/Paris", True)
    assert json.loads(b.input) == {"k": [1, "é"]} and b.cron == "0 * * * *"
    assert dataclasses.replace(b, input="", updated_at=None) == dataclasses.replace(
        stored, input="", updated_at=None
    )
    assert await schedules.delete_schedule("a") is True
    assert await schedules.delete_schedule("a") is False
    assert [r.id for r in await schedules.list_schedules()] == ["b"]


async def test_put_same_keeps_next_tick_and_change_takes_new(schedules: Store) -> None:
    first = await schedules.put_schedule(sched(next_at=PAST))
    await schedules.fire_schedules(["wf"], 10, Plan(to=LATER))
    # The same schedule again (an app declaring it at start): its next tick is kept.
    again = await schedules.put_schedule(sched(next_at=FUTURE))
    assert (again.next_at, again.last_tick) == (LATER, PAST)
    assert again.created_at == first.created_at
    # Any change (here: disabled) takes the new next tick; the last tick stays as history.
    changed = await schedules.put_schedule(sched(next_at=FUTURE, enabled=False))
    assert (changed.next_at, changed.last_tick, changed.enabled) == (FUTURE, PAST, False)
    assert changed.created_at == first.created_at
    assert await _one(schedules, "s1") == changed


async def test_fire_starts_the_run_and_advances(schedules: Store) -> None:
    await schedules.put_schedule(sched("s1"))
    await schedules.put_schedule(sched("s2", next_at=FUTURE))
    plan = Plan(to=LATER)
    done = await schedules.fire_schedules(["wf"], 10, plan)
    assert [f.schedule.id for f in done.fired] == ["s1"] and done.fired[0].created
    assert [c[0] for c in plan.calls] == ["s1"]
    now = plan.calls[0][1]
    assert now.tzinfo is not None and now > PAST
    run = done.fired[0].firing.run
    assert run is not None
    stored = await schedules.load(run.id)
    assert stored is not None
    assert (stored.status, stored.owner, json.loads(stored.input)) == ("pending", None, {"n": 1})
    assert stored.idempotency_key == f"schedule:s1:{PAST.isoformat()}"
    s1 = await _one(schedules, "s1")
    assert (s1.next_at, s1.last_tick) == (LATER, PAST)
    assert done.next_at == LATER  # the earliest next tick of the enabled schedules
    # Fired once: LATER (year 2000) is due again, but only by its new tick.
    again = await schedules.fire_schedules(["wf"], 10, Plan(to=FUTURE))
    assert [f.firing.tick for f in again.fired] == [LATER]
    assert again.next_at == FUTURE


async def test_what_is_not_due_does_not_fire(schedules: Store) -> None:
    await schedules.put_schedule(sched("future", next_at=FUTURE))
    await schedules.put_schedule(sched("off", enabled=False))
    await schedules.put_schedule(sched("other", name="another"))
    await schedules.put_schedule(sched("never", next_at=None))
    plan = Plan()
    done = await schedules.fire_schedules(["wf"], 10, plan)
    assert done.fired == [] and plan.calls == []
    assert done.next_at == FUTURE
    assert (await schedules.fire_schedules([], 10, plan)).fired == []
    assert sum((await schedules.counts()).values()) == 0  # no run was started


async def test_fire_respects_the_limit_in_tick_order(schedules: Store) -> None:
    for i in range(5):
        await schedules.put_schedule(sched(f"s{i}", next_at=PAST + dt.timedelta(minutes=5 - i)))
    done = await schedules.fire_schedules(["wf"], 2, Plan(to=FUTURE))
    assert [f.schedule.id for f in done.fired] == ["s4", "s3"]
    rest = await schedules.fire_schedules(["wf"], 10, Plan(to=FUTURE))
    assert sorted(f.schedule.id for f in rest.fired) == ["s0", "s1", "s2"]


async def test_a_tick_whose_run_exists_is_not_started_again(schedules: Store) -> None:
    await schedules.put_schedule(sched())
    key = f"schedule:s1:{PAST.isoformat()}"
    await schedules.start(
        make_run("earlier", idempotency_key=key), lease_owner=None, lease_seconds=0
    )
    done = await schedules.fire_schedules(["wf"], 10, Plan(to=FUTURE))
    assert len(done.fired) == 1 and done.fired[0].created is False
    assert (await _one(schedules, "s1")).next_at == FUTURE
    assert sum((await schedules.counts("wf")).values()) == 1


async def test_a_plan_of_none_leaves_the_schedule_due(schedules: Store) -> None:
    await schedules.put_schedule(sched())
    done = await schedules.fire_schedules(["wf"], 10, lambda row, now: None)
    assert done.fired == []
    assert (await _one(schedules, "s1")).next_at == PAST
    # A firing without a run only advances the schedule.
    done = await schedules.fire_schedules(["wf"], 10, Plan(to=FUTURE, run=False))
    assert len(done.fired) == 1 and not done.fired[0].created
    assert sum((await schedules.counts()).values()) == 0


async def test_a_pass_that_fails_changes_nothing(schedules: Store) -> None:
    # The second schedule's plan fails after the first's run was planned (and, in the SQL
    # stores, inserted): the whole pass is undone, so no tick is half fired.
    await schedules.put_schedule(sched("s1", next_at=PAST))
    await schedules.put_schedule(sched("s2", next_at=LATER))
    good = Plan(to=FUTURE)

    def plan(row: ScheduleRow, now: dt.datetime) -> Firing | None:
        if row.id == "s2":
            raise RuntimeError("plan failed")
        return good(row, now)

    with pytest.raises(RuntimeError, match="plan failed"):
        await schedules.fire_schedules(["wf"], 10, plan)
    assert sum((await schedules.counts()).values()) == 0
    assert [(r.next_at, r.last_tick) for r in await schedules.list_schedules()] == [
        (PAST, None),
        (LATER, None),
    ]


async def test_racing_stores_fire_a_tick_once(schedules: Store, others: list[Store]) -> None:
    for i in range(6):
        await schedules.put_schedule(sched(f"s{i}"))
    stores = [schedules, *others]
    plans = [Plan(to=FUTURE) for _ in stores]
    results = await asyncio.gather(
        *(s.fire_schedules(["wf"], 100, p) for s, p in zip(stores, plans, strict=True))
    )
    fired = [f.schedule.id for r in results for f in r.fired]
    assert sorted(fired) == [f"s{i}" for i in range(6)]  # each once, by whichever store
    assert all(f.created for r in results for f in r.fired)
    assert sum((await schedules.counts("wf")).values()) == 6
    for row in await schedules.list_schedules():
        assert (row.next_at, row.last_tick) == (FUTURE, PAST)
