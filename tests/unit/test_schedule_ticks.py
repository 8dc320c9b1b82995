"""When schedules fire (``fluxrun._ticks``): cron ticks in a time zone across DST changes,
6-field expressions with seconds, intervals, catching up after downtime, and the checks that
refuse a schedule before anything is stored."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import sys
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxrun import FluxEngine, InvalidArgumentError, StorageError, create_workflow
from fluxrun._ticks import MAX_COUNTED, tick_rule

UTC = dt.UTC
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def ticks(cron: str, zone: str, start: dt.datetime, n: int) -> list[dt.datetime]:
    rule = tick_rule(cron, None, zone)
    found: list[dt.datetime] = []
    at = start
    for _ in range(n):
        nxt = rule.first_after(at)
        assert nxt is not None
        found.append(nxt)
        at = nxt
    return found


def test_a_daily_time_stays_local_across_dst() -> None:
    # Paris goes from UTC+1 to UTC+2 on 2024-03-31 and back on 2024-10-27.
    spring = ticks("0 9 * * *", "Europe/Paris", dt.datetime(2024, 3, 29, 12, tzinfo=UTC), 3)
    assert [t.astimezone(PARIS).hour for t in spring] == [9, 9, 9]
    assert [t.hour for t in spring] == [8, 7, 7]  # stored in UTC: one hour earlier after
    autumn = ticks("0 9 * * *", "Europe/Paris", dt.datetime(2024, 10, 25, 12, tzinfo=UTC), 3)
    assert [t.hour for t in autumn] == [7, 8, 8]
    assert all(t.tzinfo is UTC for t in spring + autumn)


def test_a_time_that_does_not_exist_or_exists_twice_fires_once() -> None:
    # 02:30 does not exist in Paris on 2024-03-31 (02:00 -> 03:00): it fires at 03:00 local.
    spring = ticks("30 2 * * *", "Europe/Paris", dt.datetime(2024, 3, 30, 12, tzinfo=UTC), 2)
    assert [t.astimezone(PARIS).strftime("%d %H:%M") for t in spring] == ["31 03:00", "01 02:30"]
    # 01:30 happens twice in New York on 2024-11-03 (02:00 -> 01:00): it fires once.
    autumn = ticks("30 1 * * *", "America/New_York", dt.datetime(2024, 11, 2, 12, tzinfo=UTC), 2)
    assert [t.astimezone(NEW_YORK).strftime("%d %H:%M") for t in autumn] == [
        "03 01:30",
        "04 01:30",
    ]
    assert autumn[1] - autumn[0] == dt.timedelta(hours=25)


def test_hourly_ticks_across_dst_are_an_hour_apart() -> None:
    start = dt.datetime(2024, 3, 31, 0, 30, tzinfo=UTC)  # 01:30 in Paris, before the change
    found = ticks("0 * * * *", "Europe/Paris", start, 3)
    assert [b - a for a, b in itertools.pairwise(found)] == [dt.timedelta(hours=1)] * 2


def test_six_fields_have_seconds_first() -> None:
    found = ticks("15,45 * * * * *", "UTC", dt.datetime(2024, 1, 1, tzinfo=UTC), 3)
    assert [(t.minute, t.second) for t in found] == [(0, 15), (0, 45), (1, 15)]
    assert ticks("@daily", "UTC", dt.datetime(2024, 1, 1, 5, tzinfo=UTC), 1) == [
        dt.datetime(2024, 1, 2, tzinfo=UTC)
    ]


def test_catch_up_takes_the_latest_tick_and_counts_the_rest() -> None:
    rule = tick_rule("*/5 * * * *", None, "UTC")
    due = dt.datetime(2024, 1, 1, 0, 5, tzinfo=UTC)
    caught = rule.catch_up(due, dt.datetime(2024, 1, 1, 1, 2, tzinfo=UTC))
    assert caught.tick == dt.datetime(2024, 1, 1, 1, 0, tzinfo=UTC)
    assert (caught.skipped, caught.more) == (11, False)
    assert caught.next_at == dt.datetime(2024, 1, 1, 1, 5, tzinfo=UTC)
    on_time = rule.catch_up(due, due)
    assert (on_time.tick, on_time.skipped) == (due, 0)
    # A year of every-second ticks: counted up to MAX_COUNTED, the latest found from now.
    busy = tick_rule("* * * * * *", None, "UTC")
    now = dt.datetime(2025, 1, 1, 0, 0, 7, 500, tzinfo=UTC)
    far = busy.catch_up(dt.datetime(2024, 1, 1, tzinfo=UTC), now)
    assert (far.tick, far.skipped, far.more) == (now.replace(microsecond=0), MAX_COUNTED, True)
    assert far.next_at == dt.datetime(2025, 1, 1, 0, 0, 8, tzinfo=UTC)


def test_refusals() -> None:
    for cron, every, zone in [
        ("60 * * * *", None, "UTC"),
        ("* * * * * * *", None, "UTC"),
        ("@sometimes", None, "UTC"),
        ("* * * * *", None, "Nowhere/Special"),
        ("* * * * *", None, 5),
        (None, None, "UTC"),
        (None, 0.0001, "UTC"),
        (None, float("inf"), "UTC"),
        (None, "10", "UTC"),
        (7, None, "UTC"),
    ]:
        with pytest.raises(InvalidArgumentError):
            tick_rule(cron, every, zone)


def test_cron_without_cronsim_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import cronsim now fails
    with pytest.raises(InvalidArgumentError, match=r"pip install 'fluxrun\[cron\]'"):
        tick_rule("* * * * *", None, "UTC")
    assert tick_rule(None, 60, "UTC").every_us == 60_000_000  # intervals need nothing


def test_import_fluxrun_does_not_import_cronsim() -> None:
    import subprocess

    code = "import sys, fluxrun; print('cronsim' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_store_without_schedules_refuses_clearly() -> None:
    class Whole:
        def __init__(self) -> None:
            self.rows: dict[str, object] = {}

        async def save(self, state: object) -> None:
            self.rows[state.id] = state  # type: ignore[attr-defined]

        async def load(self, run_id: str) -> object:
            return self.rows.get(run_id)

        async def list(self, filter: object = None) -> list[object]:
            return list(self.rows.values())

        async def delete(self, run_id: str) -> None:
            self.rows.pop(run_id, None)

    async def main() -> None:
        engine = FluxEngine(storage=Whole())
        flow = create_workflow("w").step("a", lambda ctx: None).build()
        try:
            with pytest.raises(StorageError, match="does not keep schedules"):
                await engine.schedule("s", flow=flow, every=60)
            assert await engine.list_schedules() == []
            assert await engine.unschedule("s") is False
        finally:
            await engine.close()

    asyncio.run(main())


_FIELD = st.one_of(
    st.just("*"),
    st.integers(0, 59).map(str),
    st.sampled_from(["*/7", "5-20", "1,31,47", "10-50/9"]),
)


@settings(max_examples=60, deadline=None)
@given(
    seconds=_FIELD,
    minutes=_FIELD,
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
    start=st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 1, 1)),
)
def test_next_tick_is_after_the_last_and_matches(
    seconds: str, minutes: str, zone: str, start: dt.datetime
) -> None:
    def allowed(field: str, value: int) -> bool:
        for part in field.split(","):
            base, _, step = part.partition("/")
            if base == "*":
                lo, hi = 0, 59
            elif "-" in base:
                lo, hi = (int(x) for x in base.split("-"))
            else:
                lo = hi = int(base)
            if lo <= value <= hi and (value - lo) % int(step or 1) == 0:
                return True
        return False

    rule = tick_rule(f"{seconds} {minutes} * * * *", None, zone)
    at = start.replace(tzinfo=UTC)
    for _ in range(3):
        nxt = rule.first_after(at)
        assert nxt is not None and nxt > at and nxt.tzinfo is UTC
        local = nxt.astimezone(ZoneInfo(zone))
        assert allowed(seconds, local.second) and allowed(minutes, local.minute)
        assert nxt.microsecond == 0
        at = nxt


@settings(max_examples=100, deadline=None)
@given(
    every_ms=st.integers(1, 10**7),
    behind_us=st.integers(0, 10**12),
)
def test_an_interval_catch_up_is_on_its_grid(every_ms: int, behind_us: int) -> None:
    rule = tick_rule(None, every_ms / 1000, "UTC")
    due = dt.datetime(2024, 1, 1, tzinfo=UTC)
    now = due + dt.timedelta(microseconds=behind_us)
    caught = rule.catch_up(due, now)
    step = dt.timedelta(milliseconds=every_ms)
    assert due <= caught.tick <= now
    assert caught.next_at == caught.tick + step and caught.next_at > now
    assert (caught.tick - due) % step == dt.timedelta()
    n = (caught.tick - due) // step
    assert caught.skipped == min(n, MAX_COUNTED) and caught.more == (n > MAX_COUNTED)
