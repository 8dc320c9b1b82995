"""SPEC §5, starting runs and the scheduler: ``start`` returns at once and the scheduler
drives the run, ``RunHandle`` / ``handle()`` / ``result(timeout)``, delayed starts (never
early), timers waking the scheduler, ``max_concurrent_runs``, ``recover()``, ``close()``
releasing what it drives, and idempotent ``start``; on every store.

Time is only ever checked as "not before" (by the store's clock); every other wait is for an
eventual outcome, with ``HANG`` seconds as a hang guard. Steps that must be "running" when the
test acts wait on an event the test controls.
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
    Log,
    finished,
    gated,
    load,
    noop,
    stored_as,
    true,
    until,
    utcnow,
)

import fluxrun
from fluxrun import (
    EngineClosedError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidInputError,
    RunHandle,
    StepStatus,
    WorkflowContext,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
    WorkflowStatus,
    create_workflow,
    sleep,
)

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


async def test_result_after_an_action_is_the_outcome_of_that_action(engines: Engines) -> None:
    """A run waiting for a signal that is in its inbox, or with a cancel or pause asked of
    it, does not need anything from outside: result() waits for what it comes to."""
    engine = await engines.open()
    flow = create_workflow("acted-on").step("w", lambda ctx: fluxrun.wait("go")).step("e", noop)
    signalled, cancelled, paused = [await engine.start(flow, n) for n in range(3)]
    for h in (signalled, cancelled, paused):
        assert (await h.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    assert await signalled.send_signal("go", 1) is True
    assert (await signalled.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    assert await cancelled.cancel(reason="stop") is True
    assert (await cancelled.result(timeout=HANG)).status is WorkflowStatus.CANCELLED
    assert await engine.pause(paused.id) is True
    assert (await paused.result(timeout=HANG)).status is WorkflowStatus.PAUSED
    assert await paused.send_signal("go", 2) is True  # kept while paused
    assert (await paused.result(timeout=HANG)).status is WorkflowStatus.PAUSED
    assert await engine.unpause(paused.id) is True
    assert (await paused.result(timeout=HANG)).status is WorkflowStatus.COMPLETED


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
    for bad in (-1, math.nan, math.inf, "1", True, 10**12, dt.timedelta(days=365 * 200)):
        with pytest.raises(InvalidArgumentError):
            await engine.start(flow, delay=bad)  # type: ignore[arg-type]
    assert await engine.list() == []


async def test_timers_wake_the_scheduler_without_polling(engines: Engines) -> None:
    """With a poll interval far longer than the test's hang guard, a delayed start, a sleep
    and a wait's timeout still happen: the scheduler sleeps until the earliest timer."""
    engine = await engines.open(poll_interval=HOUR)
    flow = (
        create_workflow("timers")
        .step("nap", lambda ctx: sleep(0.2))
        .step("w", lambda ctx: fluxrun.wait("never", timeout=0.2), retries=1)
        .step("never", noop)
    )
    handle = await engine.start(flow, delay=0.2)
    first = await handle.result(timeout=HANG)  # through the delay and the sleep
    assert first.status is WorkflowStatus.SUSPENDED
    assert first.history[1].waiting_for == "never"

    async def failed() -> bool:
        return (await load(engine, handle.id)).status == "failed"

    await until(failed, "both attempts of the wait time out")
    state = await handle.state()
    assert state.history[1].status is StepStatus.FAILED and state.history[1].retries == 1


async def test_pause_a_delayed_run_keeps_its_start_time(engines: Engines) -> None:
    engine = await engines.open()
    ran: list[dt.datetime] = []
    flow = create_workflow("pause-delayed").step("a", lambda ctx: ran.append(utcnow()))
    handle = await engine.start(flow, delay=0.3)
    pending = await load(engine, handle.id)
    assert await engine.pause(handle.id) is True
    paused = await stored_as(engine, handle.id, "paused")
    assert paused.run_after == pending.run_after and ran == []
    assert await engine.unpause(handle.id) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert pending.run_after is not None and ran[0] >= pending.run_after


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
    await until(lambda: true(running[0] == 2), "two runs at work")
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
        await until(lambda n=n: true(len(running) == n + 1), f"{n + 1} runs at work")
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
    await until(lambda: true(blocker.id in busy._runtime.active), "the busy engine drives its run")
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


# -- close -----------------------------------------------------------------------------------


async def test_close_lets_a_running_step_finish_and_releases_the_run(engines: Engines) -> None:
    first = await engines.open()
    log, gate = Log(), asyncio.Event()

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("a")
        await gate.wait()

    def flow_with(a: Any) -> Any:
        return create_workflow("closing").step("a", a).step("b", log.step("b"))

    handle = await first.start(flow_with(held))
    await until(lambda: true(log.lines), "the step runs")
    waiting = asyncio.create_task(handle.result(timeout=HANG))
    closing = asyncio.create_task(first.close(timeout=HANG))
    await until(lambda: true(first._closing), "the engine is closing")
    gate.set()
    await closing
    with pytest.raises(EngineClosedError):
        await waiting
    second = await engines.open()
    row = await load(second, handle.id)
    assert row.owner is None  # released: the next engine need not wait for the lease
    assert row.steps[0].status == "completed"
    second.register(flow_with(log.step("a again")))
    assert (await finished(second, handle.id)).status is WorkflowStatus.COMPLETED
    assert log.lines == ["a", "b"]


async def test_close_after_its_timeout_still_releases_a_stuck_run(engines: Engines) -> None:
    first = await engines.open()
    log, began = Log(), asyncio.Event()

    def flow_with(a: Any) -> Any:
        return create_workflow("stuck").step("a", a).step("b", log.step("b"))

    handle = await first.start(flow_with(log.forever("a", began)))
    await asyncio.wait_for(began.wait(), HANG)
    await first.close(timeout=0.1)
    second = await engines.open()
    row = await load(second, handle.id)
    assert row.owner is None
    second.register(flow_with(log.step("a again")))
    assert (await finished(second, handle.id)).status is WorkflowStatus.COMPLETED
    assert log.lines == ["a", "a again", "b"]


# -- idempotent start ------------------------------------------------------------------------


async def test_start_with_the_same_key_gives_the_same_run(engines: Engines) -> None:
    engine = await engines.open()
    calls: list[Any] = []
    flow = create_workflow("once").step("a", lambda ctx: calls.append(ctx.input))
    first = await engine.start(flow, {"order": "A1"}, idempotency_key="order-A1")
    second = await engine.start(flow, {"order": "A1"}, idempotency_key="order-A1")
    assert first.created is True and second.created is False
    assert second.id == first.id
    assert (await second.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    # Key order does not make another input.
    third = await engine.start(flow, {"order": "A1"}, idempotency_key="order-A1")
    assert third.id == first.id and third.created is False
    again = await engine.execute(flow, {"order": "A1"}, idempotency_key="order-A1")
    assert again.id == first.id and again.status is WorkflowStatus.COMPLETED
    assert calls == [{"order": "A1"}]
    assert [s.id for s in await engine.list()] == [first.id]
    with pytest.raises(IdempotencyConflictError):
        await engine.start(flow, {"order": "B2"}, idempotency_key="order-A1")
    with pytest.raises(IdempotencyConflictError):
        await engine.execute(flow, {"order": "B2"}, idempotency_key="order-A1")
    assert [s.id for s in await engine.list()] == [first.id]
    assert calls == [{"order": "A1"}]
    # Another key is another run; so is the same key for another workflow.
    other = await engine.start(flow, {"order": "A1"}, idempotency_key="order-A1-bis")
    assert other.created is True and other.id != first.id
    elsewhere = create_workflow("twice").step("a", noop)
    apart = await engine.start(elsewhere, {"order": "B2"}, idempotency_key="order-A1")
    assert apart.created is True and apart.id not in (first.id, other.id)


async def test_start_with_the_same_id_gives_the_same_run(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("by-id").step("a", noop)
    first = await engine.start(flow, {"k": [1, 2]}, id="run-1")
    assert first.id == "run-1" and first.created is True
    second = await engine.start(flow, {"k": [1, 2]}, id="run-1")
    assert second.id == "run-1" and second.created is False
    with pytest.raises(IdempotencyConflictError):
        await engine.start(flow, {"k": [2, 1]}, id="run-1")
    assert (await first.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    assert [s.id for s in await engine.list()] == ["run-1"]


async def test_concurrent_starts_with_one_key_make_one_run(engines: Engines) -> None:
    engine = await engines.open()
    other = await engines.open()  # another engine on the same store, racing too
    calls: list[Any] = []
    flow = create_workflow("racing").step("a", lambda ctx: calls.append(ctx.input))
    handles = await asyncio.gather(
        *(
            (engine if n % 2 else other).start(flow, {"n": 1}, idempotency_key="one")
            for n in range(10)
        )
    )
    assert len({h.id for h in handles}) == 1
    assert sum(h.created for h in handles) == 1
    result = await handles[0].result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    assert len(await engine.list()) == 1
    assert calls == [{"n": 1}]


async def test_concurrent_starts_with_one_id_make_one_run(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("racing-id").step("a", noop)
    handles = await asyncio.gather(*(engine.start(flow, 5, id="the-run") for _ in range(10)))
    assert {h.id for h in handles} == {"the-run"}
    assert sum(h.created for h in handles) == 1
    assert len(await engine.list()) == 1
    assert (await handles[0].result(timeout=HANG)).status is WorkflowStatus.COMPLETED


async def test_start_refusals_store_nothing(engines: Engines) -> None:
    engine = await engines.open()
    typed = create_workflow("typed").input(lambda value: isinstance(value, int)).step("a", noop)
    with pytest.raises(InvalidInputError):
        await engine.start(typed, "not an int")
    with pytest.raises(InvalidInputError):
        await engine.start(create_workflow("nan").step("a", noop), float("nan"))
    assert await engine.list() == []
    first = await engine.start(typed, 1, id="shared-id")
    with pytest.raises(WorkflowNameMismatchError):
        await engine.start(create_workflow("another").step("a", noop), 1, id="shared-id")
    assert [s.id for s in await engine.list()] == [first.id]
    assert (await first.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
