"""SPEC §5, runs that move on their own (time): ``start`` and ``RunHandle``, delayed starts,
durable ``sleep`` / ``sleep_until``, retry backoff kept in the store (across a restart),
``max_concurrent_runs`` and ``recover``, on every store.

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
from sched_support import HANG, Engines, Events, load, stored_as, until

import fluxrun
from fluxrun import (
    DefinitionError,
    FluxEngine,
    InvalidArgumentError,
    RetryPolicy,
    RunHandle,
    StepStatus,
    WorkflowContext,
    WorkflowNotFoundError,
    WorkflowStatus,
    create_workflow,
    sleep,
    sleep_until,
)
from fluxrun.storage._base import RunRow

HOUR = 3600.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


def gated(gate: asyncio.Event, started: asyncio.Event | None = None) -> Any:
    """An async step that waits for ``gate`` (telling ``started`` it began)."""

    async def step(ctx: WorkflowContext) -> None:
        if started is not None:
            started.set()
        await gate.wait()

    return step


# -- start, handles, results -----------------------------------------------------------------


async def test_start_returns_at_once_and_the_scheduler_drives_the_run(engines: Engines) -> None:
    engine = await engines.open()
    gate, began = asyncio.Event(), asyncio.Event()
    flow = create_workflow("started").step("a", gated(gate, began)).step("b", noop)
    handle = await engine.start(flow, {"n": 1})
    # start() returned while the first step cannot have finished (its gate is closed).
    assert isinstance(handle, RunHandle)
    assert handle.created is True
    state = await handle.state()
    assert state.status in (WorkflowStatus.PENDING, WorkflowStatus.RUNNING)
    assert state.input == {"n": 1}
    await asyncio.wait_for(began.wait(), HANG)  # nobody but the scheduler drives it
    gate.set()
    result = await handle.result(timeout=HANG)
    assert result.id == handle.id
    assert result.status is WorkflowStatus.COMPLETED
    assert [h.status for h in result.history] == [StepStatus.COMPLETED] * 2
    row = await load(engine, handle.id)
    assert row.status == "completed" and row.owner is None
    assert len(engine._runtime.active) == 0


async def test_handle_on_an_existing_id_from_this_and_another_engine(engines: Engines) -> None:
    engine = await engines.open()
    onlooker = await engines.open()  # drives nothing of this workflow (not registered)
    gate = asyncio.Event()
    flow = create_workflow("handled").step("a", gated(gate))
    started = await engine.start(flow)
    here = engine.handle(started.id)
    there = onlooker.handle(started.id)
    assert here.id == there.id == started.id
    waiting = [asyncio.create_task(h.result(timeout=HANG)) for h in (started, here, there)]
    gate.set()
    results = await asyncio.gather(*waiting)
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert {r.id for r in results} == {started.id}
    assert (await there.state()).status is WorkflowStatus.COMPLETED
    with pytest.raises(WorkflowNotFoundError):
        await engine.handle("no-such-run").result(timeout=HANG)
    with pytest.raises(WorkflowNotFoundError):
        await engine.handle("no-such-run").state()


async def test_result_timeout_raises_and_the_run_goes_on(engines: Engines) -> None:
    engine = await engines.open()
    gate = asyncio.Event()
    flow = create_workflow("slow").step("a", gated(gate)).step("b", noop)
    handle = await engine.start(flow)
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.1)
    with pytest.raises(TimeoutError):
        await handle.result(timeout=dt.timedelta(milliseconds=50))
    with pytest.raises(InvalidArgumentError):
        await handle.result(timeout=-1)
    gate.set()
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED


@pytest.mark.parametrize("delay", [0.3, dt.timedelta(milliseconds=300)])
async def test_a_delayed_start_never_runs_before_its_time(
    engines: Engines, delay: float | dt.timedelta
) -> None:
    engine = await engines.open()
    ran: list[dt.datetime] = []

    def first(ctx: WorkflowContext) -> None:
        ran.append(utcnow())

    flow = create_workflow("delayed").step("a", first)
    handle = await engine.start(flow, delay=delay)
    row = await load(engine, handle.id)
    assert row.status == "pending"
    assert row.run_after is not None
    assert row.run_after >= row.created_at + dt.timedelta(seconds=0.3)
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    started_at = result.history[0].started_at
    assert started_at is not None
    assert started_at >= row.run_after
    assert ran[0] >= row.run_after
    assert len(ran) == 1


async def test_bad_delays_are_refused(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("delayed").step("a", noop)
    for bad in (-1, math.nan, math.inf, "1", True):
        with pytest.raises(InvalidArgumentError):
            await engine.start(flow, delay=bad)  # type: ignore[arg-type]
    assert await engine.list() == []


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
    assert len(engine._runtime.active) == 0
    assert len(engine._scheduler.inflight) == 0
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


@pytest.mark.xfail(
    strict=True, reason="SPEC §5: StepExecution.wake_at / WorkflowState.wake_at are not built"
)
async def test_the_wake_time_is_on_the_records(engines: Engines) -> None:
    engine = await engines.open()
    handle = await engine.start(sleeper([], lambda: sleep(HOUR)))
    row = await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    state = await handle.state()
    assert getattr(state, "wake_at", None) == row.run_after
    assert getattr(state.history[0], "wake_at", None) == row.run_after
    await engine.cancel(handle.id)


@pytest.mark.xfail(strict=True, reason="SPEC §5: the builder has no .sleep(name, duration)")
async def test_a_builder_sleep_step(engines: Engines) -> None:
    engine = await engines.open()
    builder: Any = create_workflow("built").step("a", noop)
    flow = builder.sleep("pause", 0.2).step("b", noop)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert [h.name for h in result.history] == ["a", "pause", "b"]


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
    ],
    ids=[
        "negative", "tiny-negative", "nan", "inf", "bool", "str", "none", "neg-timedelta",
        "naive", "iso-text", "date", "epoch",
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
    await until(lambda: _true(calls), "the step started")
    closing = asyncio.create_task(first.close())
    await until(lambda: _true(first._closing), "the engine is closing")
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


async def _true(value: Any) -> bool:
    return bool(value)


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
    await until(lambda: _true(calls), "the first attempt started")
    closing = asyncio.create_task(first.close())
    await until(lambda: _true(first._closing), "the engine is closing")
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


# -- the scheduler's limit -------------------------------------------------------------------


async def test_max_concurrent_runs_is_never_exceeded(engines: Engines) -> None:
    engine = await engines.open(max_concurrent_runs=2)
    gate = asyncio.Event()
    running = [0]
    most = [0]

    async def busy(ctx: WorkflowContext) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            await gate.wait()
        finally:
            running[0] -= 1

    flow = create_workflow("limited").step("a", busy).step("b", busy)
    handles = [await engine.start(flow, {"n": n}) for n in range(6)]
    await until(lambda: _true(running[0] == 2), "two runs at work")
    await asyncio.sleep(0.3)  # several scheduler passes, with four runs due
    assert most[0] == 2
    rows = [await load(engine, h.id) for h in handles]
    assert sum(r.owner is not None for r in rows) == 2
    gate.set()
    results = [await h.result(timeout=HANG) for h in handles]
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert most[0] == 2


async def test_max_concurrent_runs_are_all_used(engines: Engines) -> None:
    """Runs started one after another while the earlier ones still run: each of the
    ``max_concurrent_runs`` slots is taken, not only the first pass's."""
    engine = await engines.open(max_concurrent_runs=3)
    gate = asyncio.Event()
    running: set[str] = set()

    async def busy(ctx: WorkflowContext) -> None:
        running.add(ctx.id)
        await gate.wait()

    flow = create_workflow("slots").step("a", busy)
    handles = []
    for n in range(3):
        handles.append(await engine.start(flow, n))
        await until(lambda: _true(len(running) == n + 1), f"{n + 1} runs at work at once")
    extra = await engine.start(flow, 3)
    await asyncio.sleep(0.3)  # several scheduler passes: the fourth must wait for a slot
    assert extra.id not in running
    gate.set()
    for h in (*handles, extra):
        assert (await h.result(timeout=HANG)).status is WorkflowStatus.COMPLETED


# -- recover ---------------------------------------------------------------------------------


async def test_recover_returns_the_outcomes_of_due_runs_of_registered_workflows(
    engines: Engines,
) -> None:
    # A busy engine (its one slot taken) leaves the runs it starts due for others.
    busy = await engines.open(max_concurrent_runs=1)
    gate = asyncio.Event()
    mine = create_workflow("mine").step("a", noop).step("b", noop)
    other = create_workflow("other").step("a", noop)
    blocker = await busy.start(create_workflow("blocker").step("a", gated(gate)))
    await until(lambda: _true(blocker.id in busy._runtime.active), "the busy engine drives its run")
    due = [await busy.start(mine, {"n": n}) for n in range(3)]
    left = await busy.start(other)
    # The recovering engine's scheduler looks only every minute: recover() does the work.
    recovering = await engines.open(poll_interval=60.0)
    recovering.register(mine)
    results = await recovering.recover()
    assert sorted(r.id for r in results) == sorted(h.id for h in due)
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    row = await load(recovering, left.id)
    assert row.status == "pending" and row.owner is None  # not registered there: not claimed
    assert await recovering.recover() == []
    gate.set()
    assert (await left.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
