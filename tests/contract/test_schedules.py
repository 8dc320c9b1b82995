"""SPEC §7, stored schedules, on every store: cron and interval schedules fire one run per
tick however many engines share the store, after downtime only the latest missed tick
fires (the skipped ones are logged), a disabled or unscheduled schedule does not fire, and
an invalid schedule is refused with nothing stored.

MemoryStorage and SQLite run on a :class:`~fluxrun.testing.FakeClock` shared by the store and
the engines, so every tick is reached by moving the clock. PostgreSQL judges time by the
database clock: its tests use short real intervals, wait (with hang guards) for what must
happen, and check only "not before" and "exactly once".
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sched_support import Engines, until

from fluxrun import (
    FluxEngine,
    InvalidArgumentError,
    InvalidInputError,
    MemoryStorage,
    SQLiteStorage,
    create_workflow,
)
from fluxrun._schedules import tick_key
from fluxrun.storage._base import ListQuery, RunRow
from fluxrun.testing import FakeClock

T0 = dt.datetime(2024, 1, 1, 0, 0, 30, tzinfo=dt.UTC)
FLOW = create_workflow("tick").step("a", lambda ctx: None).build()


class Lines:
    """A logger keeping its warning lines."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def debug(self, message: str, *args: Any) -> None:
        pass

    def info(self, message: str, *args: Any) -> None:
        pass

    def warning(self, message: str, *args: Any) -> None:
        self.warnings.append(message)

    def error(self, message: str, *args: Any) -> None:
        self.warnings.append(message)

    def skipped(self) -> list[str]:
        return [w for w in self.warnings if "missed tick" in w]


async def clocked(engines: Engines, n: int, clock: FakeClock, **options: Any) -> list[FluxEngine]:
    """``n`` engines on one store of the test's backend, all on ``clock`` (not PostgreSQL);
    every call of one test gets the same store (one MemoryStorage, or one SQLite file)."""
    shared = None
    if engines.kind == "memory":
        shared = getattr(engines, "fake_clock_memory", None)
        if shared is None:
            shared = MemoryStorage(clock=clock)
            engines.fake_clock_memory = shared  # type: ignore[attr-defined]
    made = []
    for _ in range(n):
        store: Any = shared
        if store is None:
            assert engines.location is not None
            store = SQLiteStorage(engines.location, clock=clock)
        engine = await engines.open(storage=store, clock=clock, **options)
        engine.register(FLOW)
        made.append(engine)
    return made


async def runs(engine: FluxEngine) -> list[RunRow]:
    return await engine.storage.list_runs(ListQuery(name="tick"))


def ticks_of(rows: list[RunRow], schedule_id: str) -> list[dt.datetime]:
    """The ticks the schedule's runs were started for (from their idempotency keys)."""
    prefix = f"schedule:{schedule_id}:"
    found = [
        dt.datetime.fromisoformat(r.idempotency_key[len(prefix) :])
        for r in rows
        if r.idempotency_key is not None and r.idempotency_key.startswith(prefix)
    ]
    return sorted(found)


async def count_finished(engine: FluxEngine, n: int) -> list[RunRow]:
    async def check() -> list[RunRow] | None:
        found = await runs(engine)
        if len(found) >= n and all(r.status == "completed" for r in found):
            return found
        return None

    got: list[RunRow] = await until(check, f"{n} scheduled runs completed")
    return got


def fake_clock_only(engines: Engines) -> None:
    if engines.kind == "postgres":
        pytest.skip("PostgreSQL judges ticks by the database clock (see the *_real tests)")


def real_clock_only(engines: Engines) -> None:
    if engines.kind != "postgres":
        pytest.skip("the stores with a clock of their own are tested on a FakeClock")


# -- firing ----------------------------------------------------------------------------------


async def test_cron_fires_once_per_tick_across_engines(engines: Engines) -> None:
    fake_clock_only(engines)
    clock = FakeClock(T0)
    first, *_ = await clocked(engines, 3, clock)
    assert await first.schedule("minutely", "* * * * *", FLOW, {"n": 1}) == "minutely"
    for k in range(1, 6):
        await clock.advance(60)
        await count_finished(first, k)
    rows = await runs(first)
    expected = [dt.datetime(2024, 1, 1, 0, m, tzinfo=dt.UTC) for m in range(1, 6)]
    assert ticks_of(rows, "minutely") == expected  # each tick once, none twice
    assert all(r.input.replace(" ", "") == '{"n":1}' for r in rows)
    [info] = await first.list_schedules()
    assert info.last_tick == expected[-1]
    assert info.next_at == expected[-1] + dt.timedelta(minutes=1)


async def test_interval_fires_every_period(engines: Engines) -> None:
    fake_clock_only(engines)
    clock = FakeClock(T0)
    first, _ = await clocked(engines, 2, clock)
    await first.schedule("half", flow=FLOW, every=dt.timedelta(seconds=30))
    await first.schedule("sixty", flow="tick", every=60)
    for k in (1, 3, 4, 6):  # after 30 s, 60 s (both), 90 s, 120 s (both)
        await clock.advance(30)
        await count_finished(first, k)
    rows = await runs(first)
    assert ticks_of(rows, "half") == [T0 + dt.timedelta(seconds=30 * i) for i in range(1, 5)]
    assert ticks_of(rows, "sixty") == [T0 + dt.timedelta(seconds=60 * i) for i in (1, 2)]
    half = next(s for s in await first.list_schedules() if s.id == "half")
    assert half.every == dt.timedelta(seconds=30) and half.cron is None


async def test_six_field_cron_fires_on_seconds(engines: Engines) -> None:
    fake_clock_only(engines)
    clock = FakeClock(T0)
    [engine] = await clocked(engines, 1, clock)
    await engine.schedule("tens", "*/10 * * * * *", FLOW)
    for k in range(1, 4):
        await clock.advance(10)
        await count_finished(engine, k)
    assert ticks_of(await runs(engine), "tens") == [
        T0 + dt.timedelta(seconds=10 * i) for i in (1, 2, 3)
    ]


async def test_catch_up_fires_only_the_latest_missed_tick(engines: Engines) -> None:
    fake_clock_only(engines)
    clock = FakeClock(T0)
    [before] = await clocked(engines, 1, clock)
    await before.schedule("five", "*/5 * * * *", FLOW, {"n": 2})
    await before.close()
    await clock.advance(dt.timedelta(hours=1))  # down from 00:00:30 to 01:00:30
    lines = Lines()
    [after] = await clocked(engines, 1, clock, logger=lines)
    # The app declares its schedule again at start: the same schedule keeps its next tick.
    await after.schedule("five", "*/5 * * * *", FLOW, {"n": 2})
    await count_finished(after, 1)
    await asyncio.sleep(0.2)  # a second firing, were there one, would have come by now
    latest = dt.datetime(2024, 1, 1, 1, 0, tzinfo=dt.UTC)
    assert ticks_of(await runs(after), "five") == [latest]
    [line] = lines.skipped()
    assert "'five'" in line and "skipped 11 missed tick(s)" in line and latest.isoformat() in line
    [info] = await after.list_schedules()
    assert (info.last_tick, info.next_at) == (latest, latest + dt.timedelta(minutes=5))


async def test_disabled_and_unscheduled_never_fire(engines: Engines) -> None:
    fake_clock_only(engines)
    clock = FakeClock(T0)
    engine, _ = await clocked(engines, 2, clock)
    await engine.schedule("off", "* * * * *", FLOW, enabled=False)
    await engine.schedule("gone", flow=FLOW, every=30)
    await engine.schedule("on", flow=FLOW, every=30)
    assert await engine.unschedule("gone") is True
    assert await engine.unschedule("gone") is False
    for k in range(1, 4):
        await clock.advance(60)
        await count_finished(engine, k)
    rows = await runs(engine)
    assert ticks_of(rows, "off") == [] and ticks_of(rows, "gone") == []
    assert len(ticks_of(rows, "on")) == 3
    assert [(s.id, s.enabled) for s in await engine.list_schedules()] == [
        ("off", False),
        ("on", True),
    ]
    # Enabled again: its ticks count from now, the minutes it was off are not caught up.
    await engine.schedule("off", "* * * * *", FLOW)
    await clock.advance(60)
    await count_finished(engine, 5)
    assert len(ticks_of(await runs(engine), "off")) == 1


async def test_firing_in_real_time_is_once_per_tick_and_never_early(engines: Engines) -> None:
    real_clock_only(engines)
    made = [await engines.open() for _ in range(3)]
    for engine in made:
        engine.register(FLOW)
    await made[0].schedule("secs", "* * * * * *", FLOW)
    await made[1].schedule("fast", flow=FLOW, every=0.3)
    await count_finished(made[0], 8)
    for engine in made:
        await engine.unschedule("secs")
        await engine.unschedule("fast")
    rows = await runs(made[0])
    keys = [r.idempotency_key for r in rows]
    assert len(keys) == len(set(keys))  # one run per tick
    for r in rows:
        assert r.idempotency_key is not None
        tick = dt.datetime.fromisoformat(r.idempotency_key.split(":", 2)[2])
        assert r.created_at >= tick  # never before its tick
    secs = ticks_of(rows, "secs")
    assert secs and all(t.microsecond == 0 for t in secs)
    fast = ticks_of(rows, "fast")
    assert fast and all((t - fast[0]) % dt.timedelta(seconds=0.3) == dt.timedelta() for t in fast)


async def test_catch_up_in_real_time(engines: Engines) -> None:
    real_clock_only(engines)
    before = await engines.open()
    await before.schedule("fast", flow=FLOW, every=0.2)
    await before.close()
    closed = dt.datetime.now(dt.UTC)
    await asyncio.sleep(1.5)
    reopened = dt.datetime.now(dt.UTC)
    lines = Lines()
    after = await engines.open(logger=lines)
    await after.schedule("fast", flow=FLOW, every=0.2)  # the same: keeps its next tick
    await count_finished(after, 2)
    await after.unschedule("fast")
    ticks = ticks_of(await runs(after), "fast")
    assert len([t for t in ticks if closed < t <= reopened]) <= 1
    assert any("'fast': skipped" in line for line in lines.skipped())


async def test_disabled_and_unscheduled_in_real_time(engines: Engines) -> None:
    real_clock_only(engines)
    engine = await engines.open()
    await engine.schedule("off", flow=FLOW, every=0.1, enabled=False)
    await engine.schedule("on", flow=FLOW, every=0.1)
    await count_finished(engine, 2)
    await engine.unschedule("on")
    stopped = len(await runs(engine))
    await asyncio.sleep(0.5)
    rows = await runs(engine)
    assert len(rows) == stopped and ticks_of(rows, "off") == []


# -- refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "says"),
    [
        (("s", "61 * * * *", FLOW), {}, "invalid cron expression"),
        (("s", "* * *", FLOW), {}, "expected 5 fields"),
        (("s", "0 0 30 2 *", FLOW), {}, "invalid cron expression"),
        (("s", "* * * * *", FLOW), {"timezone": "Mars/Olympus"}, "unknown time zone"),
        (("s", "* * * * *", FLOW), {"timezone": ""}, "timezone"),
        (("s", None, FLOW), {}, "exactly one of cron"),
        (("s", "* * * * *", FLOW), {"every": 5}, "exactly one of cron"),
        (("s", None, FLOW), {"every": 0}, "every must be a duration > 0"),
        (("s", None, FLOW), {"every": dt.timedelta(seconds=-1)}, "every must be"),
        (("s", None, FLOW), {"every": True}, "every must be"),
        (("", "* * * * *", FLOW), {}, "schedule id"),
        (("s", "* * * * *"), {}, "needs a workflow"),
        (("s", "* * * * *", 42), {}, "expected a workflow"),
        (("s", "* * * * *", FLOW), {"enabled": "yes"}, "enabled"),
    ],
)
async def test_invalid_schedules_are_refused_and_nothing_is_stored(
    engines: Engines, args: tuple[Any, ...], options: dict[str, Any], says: str
) -> None:
    engine = await engines.open()
    with pytest.raises(InvalidArgumentError, match=says):
        await engine.schedule(*args, **options)
    assert await engine.list_schedules() == []


async def test_invalid_input_is_refused(engines: Engines) -> None:
    engine = await engines.open()
    with pytest.raises(InvalidInputError):
        await engine.schedule("s", "* * * * *", FLOW, {"bad": float("nan")})
    assert await engine.list_schedules() == []


async def test_tick_keys_name_schedule_and_tick() -> None:
    tick = dt.datetime(2024, 3, 31, 1, 0, tzinfo=dt.UTC)
    paris = tick.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert tick_key("s", tick) == tick_key("s", paris) == "schedule:s:2024-03-31T01:00:00+00:00"
