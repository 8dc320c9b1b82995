"""fluxrun.testing.FakeClock: sleeps, backoffs, wait timeouts and delayed starts elapse when
the test moves the clock, and never before."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

import fluxrun as f
from fluxrun.testing import FakeClock

DAY = dt.timedelta(days=1)


async def _settle() -> None:
    # Let the scheduler and the drives it started run (no wall-clock wait is asserted).
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


@pytest.fixture
async def fake() -> tuple[FakeClock, f.FluxEngine]:
    clock = FakeClock()
    engine = f.FluxEngine(storage=f.MemoryStorage(clock=clock), clock=clock, poll_interval=60)
    await engine.init()
    yield clock, engine  # type: ignore[misc]
    await engine.close()


async def test_a_three_day_sleep_elapses_when_the_clock_moves_and_not_before(
    fake: tuple[FakeClock, f.FluxEngine],
) -> None:
    clock, engine = fake
    ran: list[str] = []
    flow = (
        f.create_workflow("nap")
        .step("a", lambda ctx: ran.append("a"))
        .sleep("wait", 3 * DAY)
        .step("b", lambda ctx: ran.append("b"))
    )
    handle = await engine.start(flow)
    await _settle()
    state = await handle.state()
    assert state.status is f.WorkflowStatus.SUSPENDED
    assert state.wake_at is not None and state.history[1].wake_at == state.wake_at
    await clock.advance(3 * DAY - dt.timedelta(seconds=1))
    await _settle()
    assert ran == ["a"]  # one second early: still asleep
    await clock.advance(dt.timedelta(seconds=1))
    result = await handle.result(timeout=30)
    assert result.status is f.WorkflowStatus.COMPLETED
    assert ran == ["a", "b"]


async def test_a_long_backoff_is_stored_and_keeps_the_attempt_count(
    fake: tuple[FakeClock, f.FluxEngine],
) -> None:
    clock, engine = fake
    attempts: list[int] = []

    def flaky(ctx: f.WorkflowContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError("not yet")
        return ctx.attempt

    policy = f.RetryPolicy(initial_delay=3600, factor=1, jitter=False)
    handle = await engine.start(f.create_workflow("r").step("x", flaky, retries=5, retry=policy))
    await _settle()
    row = await engine.storage.load(handle.id)
    assert row is not None and row.wait_kind == "backoff" and row.owner is None
    assert row.attempt == 1
    for _ in range(2):
        await clock.advance(3600)
        await _settle()
    result = await handle.result(timeout=30)
    assert result.status is f.WorkflowStatus.COMPLETED
    assert attempts == [1, 2, 3]
    logged = [(a.attempt, a.status) for a in await engine.attempts(handle.id)]
    assert logged == [
        (1, f.StepStatus.FAILED),
        (2, f.StepStatus.FAILED),
        (3, f.StepStatus.COMPLETED),
    ]


async def test_a_wait_timeout_fails_the_step_when_the_clock_passes_it(
    fake: tuple[FakeClock, f.FluxEngine],
) -> None:
    clock, engine = fake
    undone: list[str] = []
    flow = (
        f.create_workflow("w")
        .step("book", lambda ctx: None, compensate=lambda ctx: undone.append("book"))
        .step("approve", lambda ctx: f.wait("ok", timeout=DAY))
    )
    handle = await engine.start(flow)
    first = await handle.result(timeout=30)
    assert first.status is f.WorkflowStatus.SUSPENDED  # waiting on a signal: result returns
    await clock.advance(DAY)
    await _settle()
    for _ in range(3000):  # a hang guard of about 30 s, not a timing assumption
        state = await handle.state()
        if state.status is f.WorkflowStatus.ROLLED_BACK:
            break
        await asyncio.sleep(0.01)
    assert state.status is f.WorkflowStatus.ROLLED_BACK
    assert state.history[1].error_type == "fluxrun.WaitTimeoutError"
    assert undone == ["book"]


async def test_a_delayed_start_waits_for_the_clock(fake: tuple[FakeClock, f.FluxEngine]) -> None:
    clock, engine = fake
    ran: list[int] = []
    handle = await engine.start(
        f.create_workflow("later").step("s", lambda ctx: ran.append(1)), delay=DAY
    )
    await _settle()
    assert ran == []
    await clock.advance(DAY)
    assert (await handle.result(timeout=30)).status is f.WorkflowStatus.COMPLETED
    assert ran == [1]


def test_a_naive_start_is_refused() -> None:
    with pytest.raises(f.InvalidArgumentError):
        FakeClock(dt.datetime(2026, 1, 1))
