"""SPEC §5, durable time: a sleep's duration, a wait's timeout and a stored retry backoff are
measured by the store's clock, not by the clock of the process that wrote them, so a process
whose clock is off never makes a timer fire early (or late) by the store's. On every store:
the engine's clock is set an hour behind the store's (a fake clock for the engine on
PostgreSQL, whose clock is the database's; a store clock an hour ahead on the others).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from sched_support import Engines, stored_as

from fluxrun import RetryPolicy, WorkflowContext, create_workflow, sleep, wait
from fluxrun.storage.memory import MemoryStorage
from fluxrun.storage.sqlite import SQLiteStorage
from fluxrun.testing import FakeClock

HOUR = 3600.0
DELAY = 600.0
#: How far apart two readings of "now" around a write may be (a hang guard, not a timing).
SLACK = 60.0
#: One retry, DELAY later.
SLOW = RetryPolicy(initial_delay=DELAY, max_delay=DELAY, jitter=False)


async def _engine(engines: Engines) -> tuple[Any, float]:
    """An engine whose clock is an hour behind its store's; and the store's offset from the
    system clock (the store's now is ``time.time() + offset``)."""
    if engines.kind == "postgres":
        clock = FakeClock(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=HOUR))
        return await engines.open(clock=clock), 0.0
    ahead = lambda: time.time() + HOUR  # noqa: E731
    if engines.kind == "memory":
        store: Any = MemoryStorage(clock=ahead)
    else:
        assert engines.location is not None
        store = SQLiteStorage(engines.location, clock=ahead)
    return await engines.open(storage=store), HOUR


def _fails_once(ctx: WorkflowContext) -> None:
    if ctx.attempt == 1:
        raise RuntimeError("try again later")


@pytest.mark.parametrize(
    ("kind", "step", "options"),
    [
        ("sleep", lambda ctx: sleep(DELAY), {}),
        ("signal", lambda ctx: wait("go", timeout=DELAY), {}),
        (
            "backoff",
            _fails_once,
            {
                "retries": 1,
                "retry": RetryPolicy(initial_delay=DELAY, max_delay=DELAY, jitter=False),
            },
        ),
    ],
)
async def test_a_delay_is_measured_by_the_store_clock(
    engines: Engines, kind: str, step: Any, options: dict[str, Any]
) -> None:
    engine, offset = await _engine(engines)
    flow = create_workflow(f"store-clock-{kind}").step("s", step, **options)
    before = time.time() + offset
    handle = await engine.start(flow, {})
    row = await stored_as(engine, handle.id, "suspended", wait_kind=kind)
    after = time.time() + offset
    assert row.run_after is not None
    wake = row.run_after.timestamp()
    # Due DELAY after the store's now when it was written: never before (an early timer),
    # and not an hour off (the writer's clock).
    assert before + DELAY - 1 <= wake <= after + DELAY + SLACK, (before, wake, after)
    # Nothing is due: a claim pass leaves it asleep.
    await engine.recover()
    again = await stored_as(engine, handle.id, "suspended", wait_kind=kind)
    assert again.run_after == row.run_after and again.attempt == row.attempt
