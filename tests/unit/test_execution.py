"""SPEC §2 rules 3-8: input validation, a run's start and order, ``when``, retries, timeouts
and a step that fails for good. Every test runs on MemoryStorage and SQLiteStorage."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic
import pytest

import fluxrun._driver
from fluxrun import (
    FluxEngine,
    FluxResult,
    FluxTraceEvent,
    InvalidInputError,
    NonRetryableError,
    RetryPolicy,
    StepExecution,
    StepStatus,
    StepTimeoutError,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
)
from fluxrun.storage._base import Store

if TYPE_CHECKING:
    from conftest import EngineFactory, Recorder

FAST = RetryPolicy(initial_delay=0, jitter=False)


class Order(pydantic.BaseModel):
    order_id: str
    qty: int


@dataclass
class Point:
    x: int
    y: int


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


async def _spied(engine_factory: EngineFactory, store: Store, rec: Recorder) -> FluxEngine:
    rec.watch(store)
    return await engine_factory(trace=rec, on=rec.hooks)


# -- rule 3: input validated first; on failure InvalidInputError and nothing stored ----------


async def _assert_rejected_and_nothing_stored(
    engine: FluxEngine, rec: Recorder, flow: Any, raw: Any
) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        await engine.execute(flow, raw)
    assert [e for e in rec.log if e.startswith("save")] == []
    assert rec.events == []
    assert "handler" not in rec.log
    assert await engine.list() == []
    return info.value


def _recording_flow(rec: Recorder, spec: object) -> Any:
    def step(ctx: WorkflowContext) -> None:
        rec.note("handler")
        ctx.data["input_type"] = type(ctx.input).__name__

    return create_workflow("typed").input(spec).step("s", step)


async def test_pydantic_input_failure_raises_with_details_and_stores_nothing(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    engine = await _spied(engine_factory, store, recorder)
    flow = _recording_flow(recorder, Order)
    error = await _assert_rejected_and_nothing_stored(
        engine, recorder, flow, {"order_id": "A1", "qty": "many"}
    )
    assert error.workflow_name == "typed"
    assert isinstance(error.details, list) and error.details
    assert any("qty" in map(str, d["loc"]) for d in error.details)


async def test_dataclass_input_failure_raises_and_stores_nothing(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    engine = await _spied(engine_factory, store, recorder)
    flow = _recording_flow(recorder, Point)
    await _assert_rejected_and_nothing_stored(engine, recorder, flow, {"x": 1})
    await _assert_rejected_and_nothing_stored(engine, recorder, flow, [1, 2])


async def test_predicate_rejecting_raises_and_stores_nothing(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    engine = await _spied(engine_factory, store, recorder)
    flow = _recording_flow(recorder, lambda raw: isinstance(raw, dict) and "id" in raw)
    await _assert_rejected_and_nothing_stored(engine, recorder, flow, {"nope": 1})


async def test_predicate_raising_becomes_invalid_input_and_stores_nothing(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    # SPEC is silent on a validator that raises; the engine reports it as InvalidInputError
    # with the validator's exception as the cause.
    def validator(raw: Any) -> bool:
        raise KeyError("id")

    engine = await _spied(engine_factory, store, recorder)
    error = await _assert_rejected_and_nothing_stored(
        engine, recorder, _recording_flow(recorder, validator), {}
    )
    assert isinstance(error.__cause__, KeyError)


async def test_pydantic_input_is_validated_converted_and_typed(engine: FluxEngine) -> None:
    seen: list[Any] = []

    def step(ctx: WorkflowContext) -> None:
        seen.append(ctx.input)

    flow = create_workflow("typed").input(Order).step("s", step)
    result = await engine.execute(flow, {"order_id": "A1", "qty": "3"})
    assert result.status == WorkflowStatus.COMPLETED
    assert seen == [Order(order_id="A1", qty=3)]
    assert isinstance(seen[0], Order)
    # A model instance is accepted as input too.
    await engine.execute(flow, Order(order_id="B2", qty=1))
    assert seen[1] == Order(order_id="B2", qty=1)
    # Stored as JSON.
    state = await engine.get(result.id)
    assert state is not None
    assert state.input in ({"order_id": "A1", "qty": 3}, Order(order_id="A1", qty=3))


async def test_dataclass_input_is_typed_from_a_mapping_or_an_instance(engine: FluxEngine) -> None:
    seen: list[Any] = []

    async def step(ctx: WorkflowContext) -> None:
        seen.append(ctx.input)

    flow = create_workflow("point").input(Point).step("s", step)
    assert (await engine.execute(flow, {"x": 1, "y": 2})).status == WorkflowStatus.COMPLETED
    assert (await engine.execute(flow, Point(3, 4))).status == WorkflowStatus.COMPLETED
    assert seen == [Point(1, 2), Point(3, 4)]
    assert all(type(p) is Point for p in seen)


async def test_predicate_input_passes_through_unchanged(engine: FluxEngine) -> None:
    seen: list[Any] = []
    flow = (
        create_workflow("pred")
        .input(lambda raw: raw["n"] > 0)
        .step("s", lambda ctx: seen.append(ctx.input))
    )
    result = await engine.execute(flow, {"n": 5, "tags": ["a"]})
    assert result.status == WorkflowStatus.COMPLETED
    assert seen == [{"n": 5, "tags": ["a"]}]
    with pytest.raises(InvalidInputError):
        await engine.execute(flow, {"n": 0})


# -- rule 4: unique id, saved pending first, steps strictly in order, names from the start ----


async def test_every_run_gets_a_unique_id(engine: FluxEngine) -> None:
    flow = create_workflow("ids").step("s", noop)
    ids = [(await engine.execute(flow)).id for _ in range(12)]
    assert len(set(ids)) == 12
    # SPEC asks for uniqueness; the engine's ids are UUID text.
    assert all(uuid.UUID(i).version == 4 for i in ids)
    stored = {s.id for s in await engine.list()}
    assert stored == set(ids)


async def test_new_run_is_saved_pending_before_any_step_runs(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    engine = await _spied(engine_factory, store, recorder)
    states: list[Any] = []

    async def first(ctx: WorkflowContext) -> None:
        recorder.note("handler first")
        states.append(await engine.get(ctx.id))

    flow = create_workflow("p").step("first", first).step("second", noop).step("third", noop)
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert recorder.log[0] == "save pending"
    assert recorder.log.index("save pending") < recorder.log.index("handler first")
    (state,) = states
    assert state.id == result.id
    # Stored before the first step ran (the spy above saw the write say "pending"); what the
    # status reads while that step runs is left to the engine.
    assert state.status in (WorkflowStatus.PENDING, WorkflowStatus.RUNNING)
    assert [h.name for h in state.history] == ["first", "second", "third"]
    assert {h.status for h in state.history} == {StepStatus.PENDING}


async def test_steps_run_strictly_in_order_one_at_a_time(engine: FluxEngine) -> None:
    log: list[str] = []

    def make(name: str, pause: float) -> Any:
        async def handler(ctx: WorkflowContext) -> None:
            log.append(f"start {name}")
            ctx.data.setdefault("seen", []).append(name)
            await asyncio.sleep(pause)
            log.append(f"end {name}")

        return handler

    def sync_step(ctx: WorkflowContext) -> None:
        log.append("start sync")
        ctx.data["seen"].append("sync")
        log.append("end sync")

    flow = (
        create_workflow("order")
        .step("a", make("a", 0.02))
        .step("b", make("b", 0.01))
        .step("sync", sync_step)
        .step("c", make("c", 0))
    )
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert log == [f"{edge} {n}" for n in ("a", "b", "sync", "c") for edge in ("start", "end")]
    assert result.data["seen"] == ["a", "b", "sync", "c"]
    assert [h.name for h in result.history] == ["a", "b", "sync", "c"]
    assert all(h.status == StepStatus.COMPLETED for h in result.history)


async def test_history_names_every_step_from_the_start(engine: FluxEngine) -> None:
    seen: list[tuple[StepExecution, ...]] = []

    def first(ctx: WorkflowContext) -> None:
        seen.append(ctx.history)

    def boom(ctx: WorkflowContext) -> None:
        raise ValueError("boom")

    flow = (
        create_workflow("names")
        .step("first", first)
        .step("second", boom)
        .step("third", noop)
        .step("fourth", noop)
    )
    result = await engine.execute(flow)
    names = ["first", "second", "third", "fourth"]
    assert [h.name for h in seen[0]] == names
    assert [h.status for h in seen[0][1:]] == [StepStatus.PENDING] * 3
    assert [h.name for h in result.history] == names
    assert [h.status for h in result.history] == [
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]
    state = await engine.get(result.id)
    assert state is not None
    assert [h.name for h in state.history] == names
    assert state.history[3] == StepExecution(name="fourth", status=StepStatus.PENDING)


# -- rule 5: when ---------------------------------------------------------------------------


async def test_falsy_when_skips_the_step_without_calling_it(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    engine = await _spied(engine_factory, store, recorder)
    called: list[str] = []
    flow = (
        create_workflow("cond")
        .step("a", lambda ctx: called.append("a"))
        .step("b", lambda ctx: called.append("b"), when=lambda ctx: 0)
        .step("c", lambda ctx: called.append("c"), when=lambda ctx: "yes")
    )
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert called == ["a", "c"]
    skipped = result.history[1]
    assert skipped.status == StepStatus.SKIPPED
    assert skipped.started_at is None
    # The step_complete hook fires for the skipped step, with its skipped entry.
    completes = {args[0]: args for args in recorder.calls("step_complete")}
    assert set(completes) == {"a", "b", "c"}
    _step, ctx, entry = completes["b"]
    assert isinstance(ctx, WorkflowContext) and ctx.step == "b"
    assert isinstance(entry, StepExecution) and entry.status == StepStatus.SKIPPED
    # A step:skipped event, and no start of that step.
    (event,) = recorder.of("step:skipped")
    assert (event.step_name, event.step_index) == ("b", 1)
    assert "event step:start b" not in recorder.log
    assert "hook step_start b" not in recorder.log
    assert [e.step_name for e in recorder.of("step:complete")] == ["a", "c"]
    state = await engine.get(result.id)
    assert state is not None and state.history[1].status == StepStatus.SKIPPED


async def test_when_is_evaluated_just_before_its_step_on_the_live_context(
    engine: FluxEngine,
) -> None:
    calls: list[str] = []

    def decide(ctx: WorkflowContext) -> bool:
        calls.append(f"when {ctx.data.get('go')}")
        return bool(ctx.data.get("go"))

    def first(ctx: WorkflowContext) -> None:
        calls.append("first")
        ctx.data["go"] = ctx.input

    flow = create_workflow("live").step("first", first).step("gated", noop, when=decide)
    ran = await engine.execute(flow, True)
    skipped = await engine.execute(flow, False)
    assert calls == ["first", "when True", "first", "when False"]
    assert ran.history[1].status == StepStatus.COMPLETED
    assert skipped.history[1].status == StepStatus.SKIPPED


async def test_a_skipped_step_is_never_compensated(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    undone: list[str] = []

    def boom(ctx: WorkflowContext) -> None:
        raise RuntimeError("boom")

    flow = (
        create_workflow("skip-comp")
        .step("a", noop, when=lambda ctx: False, compensate=lambda ctx: undone.append("a"))
        .step("b", boom)
    )
    result = await engine.execute(flow)
    assert undone == []
    assert result.status == WorkflowStatus.FAILED
    assert result.history[0].status == StepStatus.SKIPPED
    assert recorder.of("step:compensate") == []


# -- rule 6: retries ------------------------------------------------------------------------


def _flaky(calls: list[int], fail_times: int, exc: type[Exception] = ValueError) -> Any:
    def handler(ctx: WorkflowContext) -> None:
        calls.append(ctx.attempt)
        if len(calls) <= fail_times:
            raise exc(f"fail {len(calls)}")

    return handler


async def test_a_step_gets_retries_plus_one_attempts(engine: FluxEngine) -> None:
    calls: list[int] = []
    flow = create_workflow("r").step("s", _flaky(calls, 99), retries=2)
    result = await engine.execute(flow)
    assert calls == [1, 2, 3]
    assert result.status == WorkflowStatus.FAILED
    assert result.history[0].retries == 2
    assert result.history[0].error == "fail 3"


async def test_default_retries_is_zero(engine: FluxEngine) -> None:
    calls: list[int] = []
    result = await engine.execute(create_workflow("r").step("s", _flaky(calls, 99)))
    assert calls == [1]
    assert result.status == WorkflowStatus.FAILED
    assert result.history[0].retries == 0


async def test_engine_default_retries_apply_unless_the_step_sets_its_own(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(default_retries=2)
    defaulted: list[int] = []
    own: list[int] = []
    flow = (
        create_workflow("r").step("d", _flaky(defaulted, 2)).step("o", _flaky(own, 99), retries=0)
    )
    result = await engine.execute(flow)
    assert defaulted == [1, 2, 3]
    assert own == [1]
    assert [h.retries for h in result.history] == [2, 0]
    assert [h.status for h in result.history] == [StepStatus.COMPLETED, StepStatus.FAILED]


async def test_retry_events_and_retries_used(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    calls: list[int] = []
    flow = create_workflow("r").step("first", noop).commit("s", _flaky(calls, 2), retries=5)
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert calls == [1, 2, 3]
    assert result.history[1].retries == 2
    state = await engine.get(result.id)
    assert state is not None and state.history[1].retries == 2
    retries = recorder.of("step:retry")
    assert [e.retries for e in retries] == [1, 2]
    assert {e.max_retries for e in retries} == {5}
    assert [e.error for e in retries] == ["fail 1", "fail 2"]
    assert {(e.step_name, e.step_index, e.status, e.commit) for e in retries} == {
        ("s", 1, "running", True)
    }
    (complete,) = [e for e in recorder.of("step:complete") if e.step_name == "s"]
    assert complete.retries == 2


async def test_non_retryable_error_skips_the_remaining_attempts(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    calls: list[int] = []
    flow = create_workflow("r").step("s", _flaky(calls, 99, NonRetryableError), retries=5)
    result = await engine.execute(flow)
    assert calls == [1]
    assert result.status == WorkflowStatus.FAILED
    assert isinstance(result.error, NonRetryableError)
    assert result.history[0].retries == 0
    assert recorder.of("step:retry") == []


async def test_never_retry_types_of_the_policy_are_not_retried(engine: FluxEngine) -> None:
    policy = RetryPolicy(initial_delay=0, jitter=False, never_retry=(KeyError,))
    key_calls: list[int] = []
    value_calls: list[int] = []
    flow = (
        create_workflow("r")
        .step("v", _flaky(value_calls, 1), retries=3, retry=policy)
        .step("k", _flaky(key_calls, 99, KeyError), retries=3, retry=policy)
    )
    result = await engine.execute(flow)
    assert value_calls == [1, 2]
    assert key_calls == [1]
    assert isinstance(result.error, KeyError)


async def test_only_retry_on_types_are_retried(engine: FluxEngine) -> None:
    policy = RetryPolicy(initial_delay=0, jitter=False, retry_on=(ConnectionError,))
    conn_calls: list[int] = []
    value_calls: list[int] = []
    flow = (
        create_workflow("r")
        .step("c", _flaky(conn_calls, 2, ConnectionError), retries=3, retry=policy)
        .step("v", _flaky(value_calls, 99), retries=3, retry=policy)
    )
    result = await engine.execute(flow)
    assert conn_calls == [1, 2, 3]
    assert value_calls == [1]
    assert [h.status for h in result.history] == [StepStatus.COMPLETED, StepStatus.FAILED]


async def test_the_engine_policy_applies_to_steps_without_their_own(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(
        retry_policy=RetryPolicy(initial_delay=0, jitter=False, never_retry=(KeyError,))
    )
    calls: list[int] = []
    await engine.execute(create_workflow("r").step("k", _flaky(calls, 99, KeyError), retries=3))
    assert calls == [1]


async def test_attempts_are_spaced_by_the_policy_delay(engine: FluxEngine) -> None:
    stamps: list[float] = []

    def handler(ctx: WorkflowContext) -> None:
        stamps.append(time.monotonic())
        if len(stamps) < 3:
            raise ValueError("again")

    policy = RetryPolicy(initial_delay=0.02, factor=2, jitter=False)
    result = await engine.execute(create_workflow("r").step("s", handler, retries=2, retry=policy))
    assert result.status == WorkflowStatus.COMPLETED
    # Timers never fire early (a little slack for the clock's resolution).
    assert stamps[1] - stamps[0] >= 0.02 - 0.002
    assert stamps[2] - stamps[1] >= 0.04 - 0.002


async def test_default_policy_waits_exponentially_from_one_second_with_jitter(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every wait in memory here (the ones over durable_backoff are kept in the store).
    engine = await engine_factory(retry_policy=None, durable_backoff=60)
    waits: list[float] = []

    async def no_wait(delay: float, result: Any = None) -> Any:
        waits.append(delay)
        return result

    monkeypatch.setattr(fluxrun._driver.asyncio, "sleep", no_wait)
    calls: list[int] = []
    result = await engine.execute(create_workflow("r").step("s", _flaky(calls, 99), retries=3))
    monkeypatch.undo()
    assert calls == [1, 2, 3, 4]
    assert result.status == WorkflowStatus.FAILED
    # One wait between attempts, none after the last; jitter draws within [base/2, base].
    assert len(waits) == 3
    for wait_s, base in zip(waits, (1.0, 2.0, 4.0), strict=True):
        assert base / 2 <= wait_s <= base


def test_retry_policy_defaults_and_delays() -> None:
    policy = RetryPolicy()
    assert (policy.initial_delay, policy.factor, policy.max_delay, policy.jitter) == (
        1.0,
        2.0,
        10.0,
        True,
    )
    assert policy.retry_on == (Exception,)
    assert policy.never_retry == (NonRetryableError,)
    plain = RetryPolicy(jitter=False)
    assert [plain.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert RetryPolicy(initial_delay=0, jitter=False).delay(5) == 0


# -- rule 7: timeouts -----------------------------------------------------------------------


async def test_timeout_cancels_an_async_handler(engine: FluxEngine) -> None:
    log: list[str] = []

    async def slow(ctx: WorkflowContext) -> None:
        log.append("started")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        log.append("finished")  # pragma: no cover - must never happen

    result = await engine.execute(create_workflow("t").step("s", slow, timeout=0.05))
    assert log == ["started", "cancelled"]
    assert result.status == WorkflowStatus.FAILED
    assert isinstance(result.error, StepTimeoutError)
    assert isinstance(result.error, TimeoutError)
    assert result.error.step == "s"
    assert result.history[0].status == StepStatus.FAILED
    assert result.history[0].error == str(result.error)
    # Nothing keeps running in the background.
    await asyncio.sleep(0)
    assert "finished" not in log


async def test_a_timed_out_attempt_is_retried_like_any_error(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    log: list[str] = []

    async def slow_once(ctx: WorkflowContext) -> None:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                log.append("cancelled 1")
                raise
        ctx.data["attempt"] = ctx.attempt

    flow = create_workflow("t").step("s", slow_once, timeout=0.05, retries=1)
    result = await engine.execute(flow)
    assert log == ["cancelled 1"]
    assert result.status == WorkflowStatus.COMPLETED
    assert result.data == {"attempt": 2}
    assert result.history[0].retries == 1
    (retry,) = recorder.of("step:retry")
    assert retry.error is not None and "timed out" in retry.error


async def test_engine_default_timeout_and_timedelta_timeouts(engine_factory: EngineFactory) -> None:
    import datetime as dt

    engine = await engine_factory(default_timeout=0.05)

    async def hang(ctx: WorkflowContext) -> None:
        await asyncio.sleep(10)

    by_default = await engine.execute(create_workflow("t").step("s", hang))
    assert isinstance(by_default.error, StepTimeoutError)
    flow = create_workflow("t2").step("s", hang, timeout=dt.timedelta(milliseconds=50))
    by_timedelta = await engine.execute(flow)
    assert isinstance(by_timedelta.error, StepTimeoutError)


async def test_a_sync_handler_late_result_is_discarded(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step timeouts run on the event loop's clock. Here it stands still but for one jump
    # past the timeout once the first attempt runs: that attempt times out, the second
    # never does, however long a busy machine takes to run it in a thread.
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])

    def jump() -> None:  # on the loop, so after the attempt's timeout was armed
        now[0] += 1.0

    release = threading.Event()
    finished = threading.Event()

    class ReleaseOnRetry:
        """Lets the first attempt's thread return once its timeout was reported."""

        def emit(self, event: FluxTraceEvent) -> None:
            if event.type == "step:retry":
                release.set()

    engine = await engine_factory(trace=ReleaseOnRetry())

    def blocking(ctx: WorkflowContext) -> str:
        if ctx.attempt == 1:
            loop.call_soon_threadsafe(jump)
            release.wait(60)
            ctx.data["late"] = True
            ctx.data["n"] = 1
            finished.set()
            return "late"
        ctx.data["n"] = 2
        return "on time"

    flow = create_workflow("t").step("s", blocking, timeout=0.05, retries=1).step("next", noop)
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert result.history[0].retries == 1
    assert result.data == {"n": 2}
    # The first attempt ran to its end, too late: its writes and result landed nowhere.
    assert await asyncio.to_thread(finished.wait, 60)
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.COMPLETED
    assert state.data == {"n": 2}
    assert [h.status for h in state.history] == [StepStatus.COMPLETED] * 2


async def test_a_sync_handler_that_times_out_fails_the_step(engine: FluxEngine) -> None:
    release = threading.Event()
    finished = threading.Event()

    def blocking(ctx: WorkflowContext) -> None:
        release.wait(5)
        ctx.data["late"] = True
        finished.set()

    result = await engine.execute(create_workflow("t").step("s", blocking, timeout=0.05))
    assert result.status == WorkflowStatus.FAILED
    assert isinstance(result.error, StepTimeoutError)
    release.set()
    assert await asyncio.to_thread(finished.wait, 5)
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.FAILED
    assert state.data == {}


# -- rule 8: a step that exhausts its attempts ------------------------------------------------


async def test_exhausted_step_fails_the_run_and_execute_returns(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    raised: list[Exception] = []

    def boom(ctx: WorkflowContext) -> None:
        exc = ValueError(f"boom {ctx.attempt}")
        raised.append(exc)
        raise exc

    flow = create_workflow("f").step("ok", noop).step("bad", boom, retries=1).step("never", noop)
    result = await engine.execute(flow)  # returns, does not raise
    assert isinstance(result, FluxResult)
    assert result.status == WorkflowStatus.FAILED
    assert result.error is raised[-1]
    bad = result.history[1]
    assert (bad.name, bad.status, bad.error, bad.retries) == ("bad", StepStatus.FAILED, "boom 2", 1)
    assert bad.completed_at is not None
    assert result.history[2].status == StepStatus.PENDING
    # Hooks.
    ((step, ctx, error),) = recorder.calls("step_error")
    assert (step, error) == ("bad", raised[-1])
    assert isinstance(ctx, WorkflowContext)
    ((wctx, werror),) = recorder.calls("workflow_error")
    assert werror is raised[-1]
    assert isinstance(wctx, WorkflowContext) and wctx.id == result.id
    assert recorder.calls("workflow_complete") == []
    # Events.
    (step_error,) = recorder.of("step:error")
    assert (step_error.step_name, step_error.step_index) == ("bad", 1)
    assert (step_error.error, step_error.status, step_error.retries) == ("boom 2", "failed", 1)
    (wf_error,) = recorder.of("workflow:error")
    assert (wf_error.status, wf_error.error) == ("failed", "boom 2")
    assert recorder.of("workflow:complete") == []
    assert recorder.of("workflow:rollback_complete") == []
    # Stored the same way.
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.FAILED
    assert state.error == "boom 2"
    assert state.completed_at is not None
    assert state.history == result.history


async def test_exhausted_step_with_a_compensation_run_ends_rolled_back(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    boom = LookupError("gone")

    def fail(ctx: WorkflowContext) -> None:
        raise boom

    flow = create_workflow("f").step("a", noop, compensate=noop).step("b", fail)
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert result.error is boom
    (wf_error,) = recorder.of("workflow:error")
    assert wf_error.status == "rolled_back"
    assert [args[1] for args in recorder.calls("workflow_error")] == [boom]
    state = await engine.get(result.id)
    assert state is not None and state.status == WorkflowStatus.ROLLED_BACK
    assert state.error == "gone"


async def test_an_error_without_a_message_is_recorded_by_its_type(engine: FluxEngine) -> None:
    # SPEC is silent; the engine records the exception's type name instead of "".
    def fail(ctx: WorkflowContext) -> None:
        raise RuntimeError

    result = await engine.execute(create_workflow("f").step("s", fail))
    assert result.history[0].error == "RuntimeError"
    assert isinstance(result.error, RuntimeError)
