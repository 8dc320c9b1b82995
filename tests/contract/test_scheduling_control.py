"""SPEC §5, acting on runs: ``cancel`` (running async and sync steps, suspended, sleeping,
paused, delayed and backing-off runs, compensation and the pivot rule, from another engine)
and ``pause`` / ``unpause`` (and ``resume`` of a paused run); on every store.

Steps that must be "running" when the test acts wait on an event the test controls; nothing
depends on how long anything takes (``HANG`` is a hang guard).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

import pytest
from sched_support import (
    HANG,
    HOUR,
    Engines,
    Log,
    finished,
    load,
    noop,
    stored_as,
    true,
    until,
    utcnow,
)

from fluxrun import (
    RetryPolicy,
    StepStatus,
    WorkflowContext,
    WorkflowNotFoundError,
    WorkflowStatus,
    create_workflow,
    sleep,
    sleep_until,
    wait,
)

# -- cancel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, HOUR], ids=["no-timeout", "with-timeout"])
async def test_cancel_interrupts_a_running_async_step_and_compensates(
    engines: Engines, timeout: float | None
) -> None:
    engine = await engines.open()
    log, began = Log(), asyncio.Event()
    flow = (
        create_workflow("cancel-async")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", log.step("b"), compensate=log.undo("b"))
        .step("c", log.forever("c", began), compensate=log.undo("c"), timeout=timeout)
        .step("d", log.step("d"))
    )
    handle = await engine.start(flow)
    await asyncio.wait_for(began.wait(), HANG)
    assert await engine.cancel(handle.id, reason="customer asked") is True
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "b", "c", "undo b", "undo a"]
    assert [h.status for h in result.history] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]
    state = await handle.state()
    assert state.status is WorkflowStatus.CANCELLED
    assert state.error is not None and "customer asked" in state.error
    assert state.completed_at is not None
    assert result.error is not None and "customer asked" in str(result.error)
    row = await load(engine, handle.id)
    assert row.owner is None and row.requested is None
    assert len(engine._runtime.active) == 0
    # Finished: another cancel is refused with False.
    assert await engine.cancel(handle.id, reason="again") is False
    assert (await handle.state()).error == state.error


async def test_cancel_twice_is_idempotent(engines: Engines) -> None:
    engine = await engines.open()
    log, began = Log(), asyncio.Event()
    flow = (
        create_workflow("cancel-twice")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", log.forever("b", began))
    )
    handle = await engine.start(flow)
    await asyncio.wait_for(began.wait(), HANG)
    first, second = await asyncio.gather(
        engine.cancel(handle.id, reason="first"), handle.cancel(reason="second")
    )
    assert (first, second) == (True, True)
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "b", "undo a"]  # compensated once
    assert await engine.cancel(handle.id) is False


async def test_cancel_of_a_finished_or_unknown_run(engines: Engines) -> None:
    engine = await engines.open()
    done = await engine.execute(create_workflow("done").step("a", noop))
    assert await engine.cancel(done.id) is False
    assert (await engine.get(done.id)).status is WorkflowStatus.COMPLETED  # type: ignore[union-attr]
    with pytest.raises(WorkflowNotFoundError):
        await engine.cancel("no-such-run")


async def test_cancel_a_sync_step_at_its_end(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()
    began, release = threading.Event(), threading.Event()

    def blocking(ctx: WorkflowContext) -> None:
        log.lines.append("b")
        began.set()
        release.wait(HANG)
        log.lines.append("b finished")

    flow = (
        create_workflow("cancel-sync")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", blocking, compensate=log.undo("b"))
        .step("c", log.step("c"))
    )
    handle = await engine.start(flow)
    await until(lambda: true(began.is_set()), "the sync step runs")
    assert await engine.cancel(handle.id, reason="stop") is True
    release.set()
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    # The sync step ran to its end and was recorded, then compensated; c never ran.
    assert log.lines == ["a", "b", "b finished", "undo b", "undo a"]
    assert [h.status for h in result.history] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.PENDING,
    ]


async def test_cancel_a_run_waiting_for_a_signal(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()
    flow = (
        create_workflow("cancel-waiting")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("w", lambda ctx: wait("approved", timeout=HOUR), compensate=log.undo("w"))
        .step("b", log.step("b"))
    )
    handle = await engine.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert await engine.cancel(handle.id, reason="no longer needed") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "undo a"]  # the waiting step did not complete: not undone
    state = await handle.state()
    assert state.error is not None and "no longer needed" in state.error
    row = await load(engine, handle.id)
    assert row.owner is None and row.run_after is None and row.wait_kind is None


async def test_cancel_a_sleeping_run(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()
    flow = (
        create_workflow("cancel-sleeping")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("nap", lambda ctx: sleep(HOUR))
        .step("b", log.step("b"))
    )
    handle = await engine.start(flow)
    await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    assert await engine.cancel(handle.id) is True
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "undo a"]
    row = await load(engine, handle.id)
    assert row.error == "cancelled" and row.run_after is None and row.owner is None


async def test_cancel_a_paused_run(engines: Engines) -> None:
    engine = await engines.open()
    log, gate = Log(), asyncio.Event()

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("a")
        await gate.wait()

    flow = (
        create_workflow("cancel-paused")
        .step("a", held, compensate=log.undo("a"))
        .step("b", log.step("b"))
    )
    handle = await engine.start(flow)
    await until(lambda: true(log.lines), "the first step runs")
    assert await engine.pause(handle.id) is True
    gate.set()
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.PAUSED
    await stored_as(engine, handle.id, "paused")
    assert await engine.cancel(handle.id, reason="dropped") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "undo a"]


async def test_cancel_stops_compensation_at_a_completed_commit_step(engines: Engines) -> None:
    engine = await engines.open()
    log, began = Log(), asyncio.Event()
    flow = (
        create_workflow("cancel-pivot")
        .step("reserve", log.step("reserve"), compensate=log.undo("reserve"))
        .commit("charge", log.step("charge"))
        .step("label", log.step("label"), compensate=log.undo("label"))
        .step("ship", log.forever("ship", began), compensate=log.undo("ship"))
    )
    handle = await engine.start(flow)
    await asyncio.wait_for(began.wait(), HANG)
    assert await engine.cancel(handle.id, reason="late") is True
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    # Only the step after the commit is undone; the ones up to it stand.
    assert log.lines == ["reserve", "charge", "label", "ship", "undo label"]
    assert [h.status for h in result.history] == [
        StepStatus.COMPLETED,
        StepStatus.COMPLETED,
        StepStatus.COMPENSATED,
        StepStatus.PENDING,
    ]
    state = await handle.state()
    assert state.error is not None and "late" in state.error


async def test_cancel_a_delayed_run_before_it_starts(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()
    flow = create_workflow("cancel-delayed").step("a", log.step("a"), compensate=log.undo("a"))
    handle = await engine.start(flow, delay=HOUR)
    assert await engine.cancel(handle.id, reason="never mind") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == []
    assert result.history[0].status is StepStatus.PENDING


async def test_cancel_during_a_retry_backoff_in_memory(engines: Engines) -> None:
    engine = await engines.open(durable_backoff=HOUR)
    log = Log()

    def failing(ctx: WorkflowContext) -> None:
        log.lines.append(f"b{ctx.attempt}")
        raise RuntimeError("down")

    policy = RetryPolicy(initial_delay=HOUR / 2, jitter=False)
    flow = (
        create_workflow("cancel-backoff")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", failing, retries=3, retry=policy)
    )
    handle = await engine.start(flow)
    await until(lambda: true("b1" in log.lines), "the first attempt failed")
    assert await engine.cancel(handle.id) is True  # the backoff is cut short
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "b1", "undo a"]


async def test_cancel_and_pause_during_a_stored_retry_backoff(engines: Engines) -> None:
    engine = await engines.open(durable_backoff=0)
    log = Log()

    def failing(ctx: WorkflowContext) -> None:
        log.lines.append(f"b{ctx.attempt}")
        raise RuntimeError("down")

    policy = RetryPolicy(initial_delay=HOUR, jitter=False)
    flow = (
        create_workflow("cancel-stored-backoff")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", failing, retries=3, retry=policy)
    )
    handle = await engine.start(flow)
    backing_off = await stored_as(engine, handle.id, "suspended", wait_kind="backoff")
    assert await engine.pause(handle.id) is True
    paused = await stored_as(engine, handle.id, "paused")
    assert paused.run_after == backing_off.run_after and paused.attempt == 1
    assert await engine.unpause(handle.id) is True
    again = await stored_as(engine, handle.id, "suspended", wait_kind="backoff")
    assert again.run_after == backing_off.run_after and again.attempt == 1
    assert await engine.cancel(handle.id, reason="give up") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "b1", "undo a"]


async def test_cancel_and_pause_reach_a_run_another_engine_drives(engines: Engines) -> None:
    """The owner learns of a request from its lease renewal (every third of the lease)."""
    owner = await engines.open(lease=3.0)
    other = await engines.open()
    log, began = Log(), asyncio.Event()
    gate = asyncio.Event()

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("p")
        await gate.wait()

    cancelled = (
        create_workflow("remote-cancel")
        .step("a", log.step("a"), compensate=log.undo("a"))
        .step("b", log.forever("b", began))
    )
    paused = create_workflow("remote-pause").step("p", held).step("q", log.step("q"))
    one = await owner.start(cancelled)
    two = await owner.start(paused)
    await asyncio.wait_for(began.wait(), HANG)
    await until(lambda: true("p" in log.lines), "the second run's step runs")
    assert await other.cancel(one.id, reason="from elsewhere") is True
    assert await other.pause(two.id) is True
    result = await one.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert (await other.get(one.id)).error == "cancelled: from elsewhere"  # type: ignore[union-attr]
    await until(lambda: true(owner._runtime.active[two.id].request), "the pause arrives")
    gate.set()
    assert (await other.handle(two.id).result(timeout=HANG)).status is WorkflowStatus.PAUSED
    assert await other.unpause(two.id) is True
    assert (await finished(other, two.id)).status is WorkflowStatus.COMPLETED
    assert sorted(log.lines) == sorted(["a", "b", "p", "undo a", "q"])


async def test_a_signal_sent_through_another_engine_reaches_the_run(engines: Engines) -> None:
    owner = await engines.open()
    other = await engines.open()  # the workflow is not registered there
    flow = create_workflow("remote-signal").step("w", lambda ctx: wait("go")).step("e", noop)
    handle = await owner.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(owner, handle.id, "suspended", wait_kind="signal")
    assert await other.send_signal(handle.id, "go", "hi") is True
    result = await finished(other, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == "hi"


# -- pause / unpause -------------------------------------------------------------------------


async def test_pause_a_running_run_then_unpause(engines: Engines) -> None:
    engine = await engines.open()
    log, gate = Log(), asyncio.Event()

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("a")
        ctx.data["a"] = 1
        await gate.wait()

    flow = create_workflow("pause").step("a", held).step("b", log.step("b"))
    handle = await engine.start(flow)
    await until(lambda: true(log.lines), "the first step runs")
    assert await engine.pause(handle.id) is True
    assert await engine.pause(handle.id) is True  # idempotent
    gate.set()
    paused = await handle.result(timeout=HANG)  # result() returns for a paused run
    assert paused.status is WorkflowStatus.PAUSED
    assert [h.status for h in paused.history] == [StepStatus.COMPLETED, StepStatus.PENDING]
    row = await stored_as(engine, handle.id, "paused")
    assert row.requested is None and row.current_step == 1
    assert log.lines == ["a"]
    assert len(engine._runtime.active) == 0
    assert await engine.pause(handle.id) is True  # still idempotent when paused
    assert (await load(engine, handle.id)).status == "paused"
    assert await engine.unpause(handle.id) is True
    assert await engine.unpause(handle.id) is False  # pending again: not paused
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert log.lines == ["a", "b"]  # a is not run again
    assert result.data == {"a": 1}
    assert await engine.pause(handle.id) is False
    assert await engine.unpause(handle.id) is False


async def test_unpause_of_a_run_that_is_not_paused(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("not-paused").step("w", lambda ctx: wait("go"))
    handle = await engine.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert await engine.unpause(handle.id) is False
    with pytest.raises(WorkflowNotFoundError):
        await engine.unpause("no-such-run")
    with pytest.raises(WorkflowNotFoundError):
        await engine.pause("no-such-run")


async def test_resume_of_a_paused_run_unpauses_it(engines: Engines) -> None:
    engine = await engines.open()
    log, gate = Log(), asyncio.Event()

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("a")
        await gate.wait()

    flow = create_workflow("pause-resume").step("a", held).step("b", log.step("b"))
    handle = await engine.start(flow)
    await until(lambda: true(log.lines), "the first step runs")
    assert await engine.pause(handle.id) is True
    gate.set()
    await stored_as(engine, handle.id, "paused")
    result = await engine.resume(flow, handle.id)
    assert result is not None
    if result.status is not WorkflowStatus.COMPLETED:  # the scheduler may have driven it
        result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert log.lines == ["a", "b"]


async def test_pause_a_sleeping_run_keeps_its_wake_time(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("pause-sleep").step("nap", lambda ctx: sleep(HOUR)).step("b", noop)
    handle = await engine.start(flow)
    asleep = await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    assert await engine.pause(handle.id) is True
    paused = await stored_as(engine, handle.id, "paused")
    assert paused.run_after == asleep.run_after
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.PAUSED
    assert await engine.unpause(handle.id) is True
    again = await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    assert again.run_after == asleep.run_after
    assert again.steps[0].status == "suspended"
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.2)  # sleeping again
    assert await engine.cancel(handle.id) is True
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.CANCELLED


async def test_a_paused_sleep_wakes_at_its_time_after_unpause(engines: Engines) -> None:
    engine = await engines.open()
    gate = asyncio.Event()
    wake: list[dt.datetime] = []
    calls: list[str] = []

    async def nap(ctx: WorkflowContext) -> Any:
        calls.append("nap")
        await gate.wait()
        wake.append(utcnow() + dt.timedelta(seconds=0.3))
        return sleep_until(wake[0])

    def after(ctx: WorkflowContext) -> None:
        calls.append("after")

    flow = create_workflow("pause-nap").step("nap", nap).step("after", after)
    handle = await engine.start(flow)
    await until(lambda: true(calls), "the step runs")
    # Asked while the step runs: the run is paused once it has gone to sleep.
    assert await engine.pause(handle.id) is True
    gate.set()
    row = await stored_as(engine, handle.id, "paused")
    assert row.steps[0].status == "suspended" and row.run_after == wake[0]
    assert calls == ["nap"]
    assert await engine.unpause(handle.id) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == ["nap", "after"]
    completed_at = result.history[0].completed_at
    assert completed_at is not None and completed_at >= wake[0]


async def test_pause_a_waiting_run_keeps_a_signal_sent_meanwhile(engines: Engines) -> None:
    engine = await engines.open()
    log = Log()

    def end(ctx: WorkflowContext) -> None:
        log.lines.append(f"end {ctx.signals['go']}")

    flow = create_workflow("pause-wait").step("w", lambda ctx: wait("go")).step("end", end)
    handle = await engine.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert await engine.pause(handle.id) is True
    await stored_as(engine, handle.id, "paused")
    assert await engine.send_signal(handle.id, "go", "while paused") is True
    await asyncio.sleep(0.3)  # scheduler passes: a paused run takes no signal
    row = await load(engine, handle.id)
    assert row.status == "paused"
    [sig] = await engine.storage.list_signals(handle.id)
    assert sig.consumed_by_step is None
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.PAUSED
    assert await engine.unpause(handle.id) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == "while paused"
    assert log.lines == ["end while paused"]


async def test_a_request_too_late_for_a_run_does_not_outlive_it(engines: Engines) -> None:
    """A pause asked during the step that ends the run (here by failing) is dropped with the
    run's end: a later resume of the run is not paused by it."""
    engine = await engines.open()
    log, gate = Log(), asyncio.Event()
    failing = [True]

    async def held(ctx: WorkflowContext) -> None:
        log.lines.append("b")
        await gate.wait()
        if failing[0]:
            raise RuntimeError("down")

    flow = create_workflow("late-request").step("b", held).step("c", lambda ctx: wait("go"))
    handle = await engine.start(flow)
    await until(lambda: true(log.lines), "the step runs")
    assert await engine.pause(handle.id) is True
    gate.set()
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.FAILED
    row = await load(engine, handle.id)
    assert row.requested is None
    failing[0] = False
    resumed = await engine.resume(flow, handle.id)
    assert resumed is not None and resumed.status is WorkflowStatus.SUSPENDED
    await asyncio.sleep(0.3)  # scheduler passes: nothing makes it due
    row = await load(engine, handle.id)
    assert row.status == "suspended" and row.requested is None
    assert await engine.send_signal(handle.id, "go") is True
    assert (await finished(engine, handle.id)).status is WorkflowStatus.COMPLETED


async def test_cancel_during_a_failures_rollback_ends_it_cancelled(engines: Engines) -> None:
    engine = await engines.open()
    log, gate, began = Log(), asyncio.Event(), asyncio.Event()

    async def slow_undo(ctx: WorkflowContext) -> None:
        log.lines.append("undo a")
        began.set()
        await gate.wait()

    def boom(ctx: WorkflowContext) -> None:
        raise RuntimeError("card declined")

    flow = (
        create_workflow("cancel-in-rollback")
        .step("a", log.step("a"), compensate=slow_undo)
        .step("b", boom)
    )
    handle = await engine.start(flow)
    await asyncio.wait_for(began.wait(), HANG)
    assert await engine.cancel(handle.id, reason="changed mind") is True
    gate.set()  # the compensation is not cut short: it finishes
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["a", "undo a"]
    assert result.history[0].status is StepStatus.COMPENSATED
    row = await load(engine, handle.id)
    assert row.owner is None and row.requested is None
