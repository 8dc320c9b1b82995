"""SPEC §5, the signal inbox: ``send_signal`` (early signals kept, FIFO per name, dedupe,
refusals), waits with a timeout (``WaitTimeoutError``, retries, compensation), and
``signal(flow, ...)`` keeping rule 10; on every store.

A signal is sent "before the wait" by sending it while an earlier step is held on a gate,
and "while waiting" once the run is stored suspended on the wait; nothing depends on how
long anything takes (``HANG`` is a hang guard).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sched_support import (
    HANG,
    HOUR,
    Engines,
    Events,
    finished,
    gated,
    load,
    noop,
    stored_as,
    true,
    until,
)

from fluxrun import (
    InvalidStateError,
    RetryPolicy,
    SignalMismatchError,
    StepStatus,
    WaitTimeoutError,
    WorkflowContext,
    WorkflowNotFoundError,
    WorkflowNotSuspendedError,
    WorkflowStatus,
    create_workflow,
    sleep,
    wait,
)
from fluxrun.storage._base import SignalRow


def waits_for(name: str, *, timeout: float | None = None) -> Any:
    def step(ctx: WorkflowContext) -> Any:
        return wait(name, timeout=timeout)

    return step


def keep_signals(ctx: WorkflowContext) -> None:
    ctx.data["signals"] = dict(ctx.signals)


async def inbox(engine: Any, run_id: str) -> list[SignalRow]:
    rows: list[SignalRow] = await engine.storage.list_signals(run_id)
    return rows


# -- the inbox -------------------------------------------------------------------------------


async def test_a_signal_sent_before_the_wait_is_taken_there(engines: Engines) -> None:
    events = Events()
    engine = await engines.open(trace=events)
    gate = asyncio.Event()
    flow = (
        create_workflow("early")
        .step("hold", gated(gate))
        .step("approve", waits_for("approved"))
        .step("ship", keep_signals)
    )
    handle = await engine.start(flow)
    await until(lambda: _running(engine, handle.id), "the first step runs")
    assert await engine.send_signal(handle.id, "approved", {"by": "ann"}) is True
    gate.set()
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    approve = result.history[1]
    assert approve.status is StepStatus.COMPLETED
    assert approve.output == {"by": "ann"}
    assert approve.waiting_for == "approved"
    assert result.data == {"signals": {"approved": {"by": "ann"}}}
    [sig] = await inbox(engine, handle.id)
    assert sig.consumed_by_step == 1 and sig.consumed_at is not None


async def test_a_signal_sent_while_waiting_continues_the_run(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("late").step("approve", waits_for("approved")).step("ship", keep_signals)
    handle = await engine.start(flow)
    waiting = await handle.result(timeout=HANG)  # returns for a run waiting for a signal
    assert waiting.status is WorkflowStatus.SUSPENDED
    assert waiting.history[0].waiting_for == "approved"
    row = await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert row.wait_name == "approved"
    assert len(engine._runtime.active) == 0
    assert await handle.send_signal("approved", [1, 2]) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == [1, 2]
    assert result.data == {"signals": {"approved": [1, 2]}}


async def test_signals_of_one_name_are_taken_oldest_first_each_by_one_wait(
    engines: Engines,
) -> None:
    engine = await engines.open()
    gate = asyncio.Event()
    flow = (
        create_workflow("fifo")
        .step("hold", gated(gate))
        .step("w1", waits_for("item"))
        .step("w2", waits_for("item"))
        .step("w3", waits_for("item"))
        .step("end", keep_signals)
    )
    handle = await engine.start(flow)
    await until(lambda: _running(engine, handle.id), "the first step runs")
    # Two before the waits, one of another name, then the third while the run waits.
    assert await engine.send_signal(handle.id, "item", "first") is True
    assert await engine.send_signal(handle.id, "other", "not for these waits") is True
    assert await engine.send_signal(handle.id, "item", "second") is True
    gate.set()
    waiting = await handle.result(timeout=HANG)
    assert waiting.status is WorkflowStatus.SUSPENDED
    assert [h.status for h in waiting.history[1:4]] == [
        StepStatus.COMPLETED,
        StepStatus.COMPLETED,
        StepStatus.SUSPENDED,
    ]
    assert await engine.send_signal(handle.id, "item", "third") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert [h.output for h in result.history[1:4]] == ["first", "second", "third"]
    assert result.data == {"signals": {"item": "third"}}
    signals = await inbox(engine, handle.id)
    assert [(s.name, s.payload, s.consumed_by_step) for s in signals] == [
        ("item", '"first"', 1),
        ("other", '"not for these waits"', None),  # another name stays in the inbox
        ("item", '"second"', 2),
        ("item", '"third"', 3),
    ]


async def test_a_dedupe_key_is_taken_once(engines: Engines) -> None:
    engine = await engines.open()
    flow = (
        create_workflow("dedupe")
        .step("w1", waits_for("go"))
        .step("w2", waits_for("go"))
        .step("end", keep_signals)
    )
    handle = await engine.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    # Two sends with one key at once (either may be first): one is kept.
    sent = await asyncio.gather(
        engine.send_signal(handle.id, "go", "one", dedupe_key="k1"),
        engine.send_signal(handle.id, "go", "two", dedupe_key="k1"),
    )
    assert sorted(sent) == [False, True]
    kept = "one" if sent[0] else "two"

    async def at_second_wait() -> bool:
        row = await load(engine, handle.id)
        return row.owner is None and row.current_step == 1 and row.status == "suspended"

    await until(at_second_wait, "the first wait took its signal")
    # After it was consumed, the key is still known; the second wait takes the next one.
    assert await engine.send_signal(handle.id, "go", "again", dedupe_key="k1") is False
    assert await engine.send_signal(handle.id, "go", "three", dedupe_key="k2") is True
    result = await finished(engine, handle.id)
    assert [h.output for h in result.history[:2]] == [kept, "three"]
    signals = await inbox(engine, handle.id)
    assert [(s.payload, s.dedupe_key) for s in signals] == [(f'"{kept}"', "k1"), ('"three"', "k2")]


async def test_a_dedupe_key_before_the_run_waits(engines: Engines) -> None:
    engine = await engines.open()
    gate = asyncio.Event()
    flow = create_workflow("dedupe-early").step("hold", gated(gate)).step("w", waits_for("go"))
    handle = await engine.start(flow)
    for payload in ("a", "b", "c"):
        sent = await engine.send_signal(handle.id, "go", payload, dedupe_key="same")
        assert sent is (payload == "a")
    assert await engine.send_signal(handle.id, "go", "d", dedupe_key="another") is True
    gate.set()
    result = await handle.result(timeout=HANG)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[1].output == "a"
    signals = await inbox(engine, handle.id)
    assert [(s.payload, s.consumed_by_step) for s in signals] == [('"a"', 1), ('"d"', None)]


async def test_send_signal_refusals(engines: Engines) -> None:
    engine = await engines.open()
    with pytest.raises(WorkflowNotFoundError):
        await engine.send_signal("no-such-run", "go")
    done = await engine.execute(create_workflow("done").step("a", noop))
    with pytest.raises(InvalidStateError):
        await engine.send_signal(done.id, "go", 1)
    failed = await engine.execute(create_workflow("failed").step("a", _boom))
    assert failed.status is WorkflowStatus.FAILED
    with pytest.raises(InvalidStateError):
        await engine.send_signal(failed.id, "go")
    assert await inbox(engine, done.id) == []
    assert await inbox(engine, failed.id) == []


def _boom(ctx: WorkflowContext) -> None:
    raise RuntimeError("boom")


async def test_a_sleeping_run_keeps_a_signal_for_its_next_wait(engines: Engines) -> None:
    engine = await engines.open()
    flow = (
        create_workflow("nap-then-wait")
        .step("nap", lambda ctx: sleep(0.2))
        .step("w", waits_for("go"))
        .step("end", keep_signals)
    )
    handle = await engine.start(flow)
    # Whether it still sleeps or already waits, the signal is kept until the wait takes it.
    assert await engine.send_signal(handle.id, "go", "kept") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[1].output == "kept"


async def test_each_signal_is_taken_once_with_two_engines_sending_and_driving(
    engines: Engines,
) -> None:
    one = await engines.open()
    two = await engines.open()
    flow = (
        create_workflow("shared")
        .step("w1", waits_for("item"))
        .step("w2", waits_for("item"))
        .step("w3", waits_for("item"))
    )
    one.register(flow)
    two.register(flow)
    handles = [await (one if n % 2 else two).start(flow, n) for n in range(4)]

    async def feed(n: int, run_id: str) -> None:
        for k in range(3):
            sender = one if (n + k) % 2 else two
            assert await sender.send_signal(run_id, "item", f"{n}.{k}") is True

    await asyncio.gather(*(feed(n, h.id) for n, h in enumerate(handles)))
    for n, h in enumerate(handles):
        result = await finished(one, h.id)
        assert result.status is WorkflowStatus.COMPLETED
        assert [x.output for x in result.history] == [f"{n}.0", f"{n}.1", f"{n}.2"]
        signals = await inbox(one, h.id)
        assert [s.consumed_by_step for s in signals] == [0, 1, 2]


# -- waits with a timeout --------------------------------------------------------------------


async def test_a_wait_that_times_out_fails_its_step_and_compensates(engines: Engines) -> None:
    events = Events()
    engine = await engines.open(trace=events)
    undone: list[str] = []
    flow = (
        create_workflow("timeout")
        .step("reserve", noop, compensate=lambda ctx: undone.append("reserve"))
        .step("approve", waits_for("approved", timeout=0.3))
        .step("ship", noop)
    )
    handle = await engine.start(flow)
    first = await handle.result(timeout=HANG)  # a wait with a timeout is still a wait
    assert first.status is WorkflowStatus.SUSPENDED
    row = await load(engine, handle.id)
    suspended_at = None
    if row.status == "suspended":
        assert row.run_after is not None and row.wait_kind == "signal"
        suspended_at = row.steps[1].suspended_at
        assert suspended_at is not None
        assert row.run_after >= suspended_at + dt.timedelta(seconds=0.3)
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert undone == ["reserve"]
    approve = result.history[1]
    assert approve.status is StepStatus.FAILED
    assert approve.error_type is not None and approve.error_type.endswith(WaitTimeoutError.__name__)
    assert "approved" in (approve.error or "")
    assert approve.completed_at is not None
    if suspended_at is not None:
        assert approve.completed_at >= suspended_at + dt.timedelta(seconds=0.3)
    assert result.history[0].status is StepStatus.COMPENSATED
    assert result.history[2].status is StepStatus.PENDING
    errors = [e for e in events.events if e.type == "step:error"]
    assert [e.step_name for e in errors] == ["approve"]
    # A signal that comes too late is refused: the run is finished.
    with pytest.raises(InvalidStateError):
        await engine.send_signal(handle.id, "approved")


async def test_execute_returns_at_a_wait_with_a_timeout_and_the_run_fails_later(
    engines: Engines,
) -> None:
    engine = await engines.open()
    flow = create_workflow("timeout-error").step("w", waits_for("never", timeout=0.2))
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.SUSPENDED
    final = await finished(engine, result.id)
    assert final.status is WorkflowStatus.FAILED
    state = await engine.get(result.id)
    assert state is not None and state.status is WorkflowStatus.FAILED
    assert state.history[0].error_type == "fluxrun.WaitTimeoutError"
    assert state.error is not None and "never" in state.error


async def test_a_timed_out_wait_is_retried(engines: Engines) -> None:
    engine = await engines.open()
    attempts: list[int] = []

    def approve(ctx: WorkflowContext) -> Any:
        attempts.append(ctx.attempt)
        # The first attempt's wait times out; the second waits for as long as it takes.
        return wait("approved", timeout=0.2 if ctx.attempt == 1 else HOUR)

    flow = (
        create_workflow("timeout-retry")
        .step("approve", approve, retries=2, retry=RetryPolicy(initial_delay=0, jitter=False))
        .step("end", keep_signals)
    )
    handle = await engine.start(flow)
    await until(lambda: true(attempts == [1, 2]), "the second attempt")
    row = await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert row.steps[0].status == "suspended" and row.steps[0].retries == 1
    assert await engine.send_signal(handle.id, "approved", "yes") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert attempts == [1, 2]
    assert result.history[0].output == "yes"
    assert result.history[0].retries == 1
    logged = await engine.attempts(handle.id)
    assert [(a.attempt, a.status.value, a.error_type) for a in logged if a.step == "approve"] == [
        (1, "failed", "fluxrun.WaitTimeoutError"),
        (2, "completed", None),
    ]


async def test_a_timed_out_wait_retried_after_a_stored_backoff(engines: Engines) -> None:
    engine = await engines.open(durable_backoff=0)
    attempts: list[int] = []

    def approve(ctx: WorkflowContext) -> Any:
        attempts.append(ctx.attempt)
        return wait("approved", timeout=0.2 if ctx.attempt == 1 else HOUR)

    policy = RetryPolicy(initial_delay=0.2, jitter=False)
    flow = create_workflow("timeout-backoff").step("approve", approve, retries=1, retry=policy)
    handle = await engine.start(flow)
    await until(lambda: true(attempts == [1, 2]), "the second attempt")
    row = await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert row.steps[0].retries == 1
    assert await engine.send_signal(handle.id, "approved", "ok") is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == "ok" and attempts == [1, 2]
    logged = await engine.attempts(handle.id)
    assert [(a.attempt, a.status.value) for a in logged] == [(1, "failed"), (2, "completed")]


async def test_a_signal_in_time_beats_the_wait_timeout(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("in-time").step("w", waits_for("go", timeout=HOUR)).step("e", noop)
    handle = await engine.start(flow)
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    assert await engine.send_signal(handle.id, "go", 7) is True
    result = await finished(engine, handle.id)
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[0].output == 7
    row = await load(engine, handle.id)
    assert row.run_after is None


# -- signal(flow, ...): rule 10 through the inbox --------------------------------------------


async def test_signal_keeps_rule_10_and_stores_nothing_when_it_refuses(engines: Engines) -> None:
    engine = await engines.open()
    gate = asyncio.Event()
    flow = (
        create_workflow("rule10")
        .step("hold", gated(gate))
        .step("approve", waits_for("approved"))
        .step("end", keep_signals)
    )
    with pytest.raises(WorkflowNotFoundError):
        await engine.signal(flow, "no-such-run", "approved")
    handle = await engine.start(flow)
    await until(lambda: _running(engine, handle.id), "the first step runs")
    with pytest.raises(WorkflowNotSuspendedError):
        await engine.signal(flow, handle.id, "approved", 1)  # running, not waiting
    assert await inbox(engine, handle.id) == []
    gate.set()
    assert (await handle.result(timeout=HANG)).status is WorkflowStatus.SUSPENDED
    with pytest.raises(SignalMismatchError):
        await engine.signal(flow, handle.id, "rejected", 2)
    assert await inbox(engine, handle.id) == []
    result = await engine.signal(flow, handle.id, "approved", {"by": "ann"})
    assert result.status is WorkflowStatus.COMPLETED
    assert result.history[1].output == {"by": "ann"}
    assert result.data == {"signals": {"approved": {"by": "ann"}}}
    [sig] = await inbox(engine, handle.id)
    assert sig.consumed_by_step == 1
    with pytest.raises(WorkflowNotSuspendedError):
        await engine.signal(flow, handle.id, "approved", 3)
    assert len(await inbox(engine, handle.id)) == 1


async def test_signal_refuses_a_sleeping_run(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("sleep-signal").step("nap", lambda ctx: sleep(HOUR))
    handle = await engine.start(flow)
    await stored_as(engine, handle.id, "suspended", wait_kind="sleep")
    with pytest.raises(WorkflowNotSuspendedError):
        await engine.signal(flow, handle.id, "approved")
    assert await inbox(engine, handle.id) == []
    assert await engine.cancel(handle.id) is True


async def test_signal_after_an_early_send_takes_the_oldest(engines: Engines) -> None:
    """``signal`` puts its payload behind a signal already in the inbox: the wait takes the
    oldest (FIFO), and the next wait takes the one ``signal`` sent."""
    engine = await engines.open()
    gate = asyncio.Event()
    flow = (
        create_workflow("rule10-fifo")
        .step("hold", gated(gate))
        .step("w1", waits_for("go"))
        .step("w2", waits_for("go"))
    )
    handle = await engine.start(flow)
    await until(lambda: _running(engine, handle.id), "the first step runs")
    assert await engine.send_signal(handle.id, "go", "early") is True
    gate.set()
    waiting = await handle.result(timeout=HANG)
    assert waiting.history[1].output == "early"
    assert waiting.history[2].status is StepStatus.SUSPENDED
    result = await engine.signal(flow, handle.id, "go", "late")
    assert result.status is WorkflowStatus.COMPLETED
    assert [h.output for h in result.history[1:]] == ["early", "late"]


# -- helpers ---------------------------------------------------------------------------------


async def _running(engine: Any, run_id: str) -> bool:
    row = await engine.storage.load(run_id)
    return row is not None and row.status in ("pending", "running") and row.owner is not None
