"""SPEC §5, durable time: ``sleep`` / ``sleep_until`` (stored, holding nothing, never early,
across a restart) and retry backoff kept in the store (attempt count and retry budget kept
across a restart); on every store.

Time is only ever checked as "not before" (a wake-up at or after its time, by the store's
clock); every other wait is for an eventual outcome, with ``HANG`` seconds as a hang guard.
Where a test must see a run in a state it would leave by itself (asleep, backing off), the
state lasts until the test ends it (an hour-long sleep, a closing engine), never a window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any

import pytest
from sched_support import (
    HANG,
    HOUR,
    Engines,
    Events,
    load,
    noop,
    stored_as,
    true,
    until,
    utcnow,
)

import fluxrun
from fluxrun import (
    DefinitionError,
    FluxEngine,
    InvalidArgumentError,
    RetryPolicy,
    StepStatus,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    sleep,
    sleep_until,
)
from fluxrun.storage._base import RunRow

# -- durable sleep ---------------------------------------------------------------------------


def sleeper(calls: list[str], make: Any) -> Any:
    """A flow: ``nap`` returns what ``make()`` gives (a sleep), then ``after`` runs."""

    def nap(ctx: WorkflowContext) -> Any:
        calls.append("nap")
        ctx.data["napped"] = True
        return make()

    def after(ctx: WorkflowContext) -> None:
        calls.append("after")
        ctx.data["after"] = ctx.data["napped"]

    return create_workflow("sleeper").step("nap", nap).step("after", after)


async def test_a_sleeping_run_is_stored_suspended_and_holds_nothing(engines: Engines) -> None:
    events = Events()
    engine = await engines.open(trace=events)
    calls: list[str] = []
    handle = await engine.start(sleeper(calls, lambda: sleep(HOUR)))
    row = await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    step = row.steps[0]
    assert step.status == "suspended"
    assert step.suspended_at is not None
    assert step.waiting_for is None
    assert row.run_after is not None
    assert row.run_after >= step.suspended_at + dt.timedelta(seconds=HOUR)
    assert row.current_step == 0
    # No lease, no task, nothing in flight.
    assert row.owner is None
    assert row.lease_until is None
    # The drive that stored the sleep ends right after its commit: then nothing is left.
    await until(
        lambda: true(not engine._runtime.active and not engine._scheduler.inflight),
        "the drive that put the run to sleep ended",
    )
    state = await handle.state()
    assert state.status is WorkflowStatus.SUSPENDED
    assert state.history[0].status is StepStatus.SUSPENDED
    assert state.data == {"napped": True}
    suspend = [e for e in events.events if e.type == "step:suspend"]
    assert len(suspend) == 1 and suspend[0].step_name == "nap"
    # result() waits through a sleep.
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.2)
    assert calls == ["nap"]
    assert await engine.cancel(handle.id) is True
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.CANCELLED
    assert calls == ["nap"]


async def test_the_wake_time_is_on_the_records(engines: Engines) -> None:
    engine = await engines.open()
    handle = await engine.start(sleeper([], lambda: sleep(HOUR)))
    row = await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    state = await handle.state()
    assert state.wake_at == row.run_after
    assert state.history[0].wake_at == row.run_after
    await engine.cancel(handle.id)


async def test_a_builder_sleep_step(engines: Engines) -> None:
    engine = await engines.open()
    started = utcnow()
    flow = create_workflow("built").step("a", noop).sleep("pause", 0.2).step("b", noop)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert [h.name for h in result.history] == ["a", "pause", "b"]
    pause = result.history[1]
    assert pause.status is StepStatus.COMPLETED
    assert pause.completed_at is not None
    assert pause.completed_at >= started + dt.timedelta(seconds=0.2)  # never early


@pytest.mark.parametrize("duration", [-1, float("nan"), True, "1s"])
def test_a_builder_sleep_with_a_bad_duration_is_refused(duration: Any) -> None:
    with pytest.raises(DefinitionError):
        create_workflow("bad").sleep("pause", duration)


@pytest.mark.parametrize("how", ["sleep", "timedelta", "sleep_until"])
async def test_a_sleep_wakes_at_its_time_and_the_handler_is_not_called_again(
    engines: Engines, how: str
) -> None:
    engine = await engines.open()
    calls: list[str] = []
    wake: list[dt.datetime] = []

    def make() -> Any:
        if how == "sleep":
            return sleep(0.3)
        if how == "timedelta":
            return sleep(dt.timedelta(milliseconds=300))
        wake.append(utcnow() + dt.timedelta(seconds=0.3))
        return sleep_until(wake[0])

    handle = await engine.start(sleeper(calls, make))
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == ["nap", "after"]
    assert result.data == {"napped": True, "after": True}
    nap, after = result.history
    assert nap.status is StepStatus.COMPLETED
    assert nap.suspended_at is not None and nap.completed_at is not None
    wake_at = wake[0] if wake else nap.suspended_at + dt.timedelta(seconds=0.3)
    assert nap.completed_at >= wake_at
    assert after.started_at is not None and after.started_at >= wake_at
    state = await handle.state()
    assert state.history == result.history
    row = await load(engine, handle.id)
    assert row.owner is None and row.run_after is None and row.wait_kind is None


async def test_execute_waits_through_a_sleep(engines: Engines) -> None:
    engine = await engines.open()
    calls: list[str] = []
    result = await engine.execute(sleeper(calls, lambda: sleep(0.3)))
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == ["nap", "after"]
    nap = result.history[0]
    assert nap.suspended_at is not None and nap.completed_at is not None
    assert nap.completed_at >= nap.suspended_at + dt.timedelta(seconds=0.3)
    assert (await engine.get(result.id)).status is WorkflowStatus.COMPLETED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "make",
    [
        lambda: sleep(0),
        lambda: sleep(dt.timedelta(0)),
        lambda: sleep_until(dt.datetime(2000, 1, 1, tzinfo=dt.UTC)),
        lambda: sleep_until(utcnow()),
    ],
    ids=["sleep0", "timedelta0", "past", "now"],
)
async def test_a_sleep_that_is_over_goes_on_at_once(engines: Engines, make: Any) -> None:
    events = Events()
    engine = await engines.open(trace=events)
    calls: list[str] = []
    result = await engine.execute(sleeper(calls, make))
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == ["nap", "after"]
    assert "step:suspend" not in events.types()
    assert result.history[0].status is StepStatus.COMPLETED


@pytest.mark.parametrize(
    "call",
    [
        lambda: sleep(-1),
        lambda: sleep(-0.001),
        lambda: sleep(math.nan),
        lambda: sleep(math.inf),
        lambda: sleep(True),
        lambda: sleep("1"),
        lambda: sleep(None),
        lambda: sleep(dt.timedelta(seconds=-1)),
        lambda: sleep_until(dt.datetime(2030, 1, 1)),
        lambda: sleep_until("2030-01-01T00:00:00Z"),
        lambda: sleep_until(dt.date(2030, 1, 1)),
        lambda: sleep_until(1_900_000_000),
        lambda: sleep_until(dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))),
        lambda: sleep(10**12),
    ],
    ids=[
        "negative", "tiny-negative", "nan", "inf", "bool", "str", "none", "neg-timedelta",
        "naive", "iso-text", "date", "epoch", "out-of-range", "over-a-century",
    ],
)  # fmt: skip
async def test_wrong_sleep_arguments(engines: Engines, call: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        call()
    # Inside a step, the mistake is that step's error.
    engine = await engines.open()
    calls: list[str] = []
    result = await engine.execute(sleeper(calls, call))
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, InvalidArgumentError)
    assert result.history[0].status is StepStatus.FAILED
    assert calls == ["nap"]


@pytest.mark.parametrize("fn", [sleep, fluxrun.Flux.sleep])
async def test_a_sleep_made_but_not_returned_fails_the_step(engines: Engines, fn: Any) -> None:
    engine = await engines.open()

    def forgetful(ctx: WorkflowContext) -> None:
        fn(5)

    result = await engine.execute(create_workflow("forgot").step("a", forgetful, retries=2))
    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, DefinitionError)
    assert "return sleep(5)" in str(result.error)
    assert result.history[0].retries == 0  # a mistake in the code is not retried
    stored = await engine.get(result.id)
    assert stored is not None and "return sleep(" in (stored.error or "")


async def test_a_sleep_survives_a_restart(engines: Engines) -> None:
    """The engine closes while the step runs; the step then returns its sleep. Another
    engine (another process) wakes the run at its time; the handler is not called again."""
    first = await engines.open()
    calls: list[str] = []
    wake: list[dt.datetime] = []
    gate = asyncio.Event()

    async def nap(ctx: WorkflowContext) -> Any:
        calls.append("nap")
        await gate.wait()
        wake.append(utcnow() + dt.timedelta(seconds=0.3))
        return sleep_until(wake[0])

    def flow_with(step: Any) -> Any:
        return create_workflow("restart-sleep").step("nap", step).step("after", noop)

    handle = await first.start(flow_with(nap))
    await until(lambda: true(calls), "the step started")
    closing = asyncio.create_task(first.close())
    await until(lambda: true(first._closing), "the engine is closing")
    gate.set()
    await closing
    second = await engines.open()

    def never(ctx: WorkflowContext) -> None:
        calls.append("again")

    second.register(flow_with(never))
    row = await stored_as(second, handle.id, "completed")
    assert calls == ["nap"]
    nap_row = row.steps[0]
    assert nap_row.completed_at is not None and nap_row.completed_at >= wake[0]
    assert row.steps[1].started_at is not None and row.steps[1].started_at >= wake[0]


# -- retry backoff kept in the store ---------------------------------------------------------


class Seen:
    """An async trace sink that reads the stored run at each ``step:retry``."""

    def __init__(self) -> None:
        self.engine: FluxEngine | None = None
        self.rows: list[RunRow] = []
        self.active: list[int] = []

    async def emit(self, event: Any) -> None:
        if event.type == "step:retry" and self.engine is not None:
            row = await self.engine.storage.load(event.workflow_id)
            assert row is not None
            self.rows.append(row)


async def test_a_long_retry_backoff_is_kept_in_the_store(engines: Engines) -> None:
    seen = Seen()
    engine = await engines.open(durable_backoff=0.1, trace=seen)
    seen.engine = engine
    attempts: list[tuple[int, dt.datetime]] = []

    def flaky(ctx: WorkflowContext) -> None:
        attempts.append((ctx.attempt, utcnow()))
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        ctx.data["done_at"] = ctx.attempt

    policy = RetryPolicy(initial_delay=0.3, factor=1.0, jitter=False)
    flow = create_workflow("backoff").step("a", noop).step("b", flaky, retries=3, retry=policy)
    handle = await engine.start(flow)
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    assert [a for a, _ in attempts] == [1, 2, 3]
    assert result.data == {"done_at": 3}
    assert result.history[1].retries == 2
    # While it backed off, the run was stored suspended, unowned, with its attempt count.
    assert len(seen.rows) == 2
    for n, row in enumerate(seen.rows, start=1):
        assert row.status == "suspended" and row.wait_kind == "backoff"
        assert row.owner is None
        assert row.attempt == n
        assert row.current_step == 1
        assert row.run_after is not None
        # The next attempt never started before the stored time.
        assert attempts[n][1] >= row.run_after
    logged = await engine.attempts(handle.id)
    b = [(a.attempt, a.status.value) for a in logged if a.step == "b" and a.kind == "step"]
    assert b == [(1, "failed"), (2, "failed"), (3, "completed")]
    assert [a.error for a in logged if a.step == "b" and a.status == "failed"] == [
        "attempt 1 fails",
        "attempt 2 fails",
    ]


async def test_a_short_backoff_stays_in_memory(engines: Engines) -> None:
    seen = Seen()
    engine = await engines.open(durable_backoff=HOUR, trace=seen)
    seen.engine = engine
    calls: list[int] = []

    def flaky(ctx: WorkflowContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("once")

    policy = RetryPolicy(initial_delay=0.05, jitter=False)
    result = await engine.execute(
        create_workflow("short").step("a", flaky, retries=1, retry=policy)
    )
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == [1, 2]
    assert len(seen.rows) == 1
    assert seen.rows[0].status in ("pending", "running")  # not suspended: still owned
    assert seen.rows[0].wait_kind is None and seen.rows[0].run_after is None
    assert seen.rows[0].owner == engine.owner


async def test_execute_waits_through_a_stored_backoff(engines: Engines) -> None:
    engine = await engines.open(durable_backoff=0)
    calls: list[int] = []

    def flaky(ctx: WorkflowContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("once")

    policy = RetryPolicy(initial_delay=0.2, jitter=False)
    flow = create_workflow("exec-backoff").step("a", flaky, retries=1, retry=policy)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == [1, 2]


async def test_a_stored_backoff_survives_a_restart_without_resetting_the_budget(
    engines: Engines,
) -> None:
    """The first attempt fails while its engine closes, so the backoff is stored and that
    engine claims nothing more; a new engine runs the remaining attempts, numbered on, and
    no more than the budget."""
    first = await engines.open(durable_backoff=0)
    calls: list[tuple[str, int]] = []
    gate = asyncio.Event()
    policy = RetryPolicy(initial_delay=0.2, factor=1.0, jitter=False)

    async def attempt_one(ctx: WorkflowContext) -> None:
        calls.append(("first", ctx.attempt))
        await gate.wait()
        raise RuntimeError(f"attempt {ctx.attempt} fails")

    def always_fails(ctx: WorkflowContext) -> None:
        calls.append(("second", ctx.attempt))
        raise RuntimeError(f"attempt {ctx.attempt} fails")

    def flow_with(step: Any) -> Any:
        return (
            create_workflow("restart-backoff")
            .step("a", noop, compensate=lambda ctx: calls.append(("undo-a", 0)))
            .step("b", step, retries=2, retry=policy)
        )

    handle = await first.start(flow_with(attempt_one))
    await until(lambda: true(calls), "the first attempt started")
    closing = asyncio.create_task(first.close())
    await until(lambda: true(first._closing), "the engine is closing")
    gate.set()
    await closing
    second = await engines.open(durable_backoff=0)
    row = await load(second, handle.id)
    assert row.status == "suspended" and row.wait_kind == "backoff"
    assert row.owner is None and row.attempt == 1
    second.register(flow_with(always_fails))
    result = await second.handle(handle.id).result(timeout=HANG)
    assert calls == [("first", 1), ("second", 2), ("second", 3), ("undo-a", 0)]
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert result.history[1].status is StepStatus.FAILED
    assert result.history[1].retries == 2
    logged = await second.attempts(handle.id)
    assert [(a.attempt, a.status.value) for a in logged if a.step == "b"] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    row = await load(second, handle.id)
    assert row.claims <= 1  # a stored backoff is not an executor crash
