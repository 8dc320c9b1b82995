"""SPEC §2 rules 9-10: ``wait(...)`` suspends a run; ``signal(...)`` checks the run, completes
the waiting step with the payload and continues. Every test runs on MemoryStorage and
SQLiteStorage."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pydantic
import pytest

from fluxrun import (
    Flux,
    FluxEngine,
    FluxError,
    SignalMismatchError,
    StepStatus,
    WorkflowContext,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
    WorkflowNotSuspendedError,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import Store

if TYPE_CHECKING:
    from conftest import EngineFactory, Recorder


class Order(pydantic.BaseModel):
    order_id: str
    qty: int


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


def approval_flow(log: list[str]) -> Any:
    """prepare -> approve (waits for "approved") -> ship."""

    def prepare(ctx: WorkflowContext) -> None:
        log.append("prepare")
        ctx.data["prepared"] = True

    async def approve(ctx: WorkflowContext) -> Any:
        log.append("approve")
        return wait("approved")

    def ship(ctx: WorkflowContext) -> None:
        log.append("ship")
        ctx.data["shipped_by"] = ctx.signals["approved"]["by"]
        ctx.data["saw"] = dict(ctx.signals)
        ctx.data["output_seen"] = ctx.history[1].output

    return (
        create_workflow("approval")
        .step("prepare", prepare)
        .step("approve", approve)
        .step("ship", ship)
    )


# -- rule 9: wait suspends --------------------------------------------------------------------


async def test_wait_suspends_the_step_and_the_run(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    log: list[str] = []
    result = await engine.execute(approval_flow(log), {})
    assert result.status == WorkflowStatus.SUSPENDED
    assert log == ["prepare", "approve"]
    step = result.history[1]
    assert (step.name, step.status, step.waiting_for) == (
        "approve",
        StepStatus.SUSPENDED,
        "approved",
    )
    assert step.suspended_at is not None and step.suspended_at.tzinfo is not None
    assert result.history[2].status == StepStatus.PENDING
    assert result.data == {"prepared": True}
    (event,) = recorder.of("step:suspend")
    assert (event.step_name, event.step_index) == ("approve", 1)
    assert dict(event.meta or {}) == {"signal": "approved"}
    # A suspension is neither a step completion nor a run completion.
    assert [args[0] for args in recorder.calls("step_complete")] == ["prepare"]
    assert recorder.calls("workflow_complete") == []
    assert recorder.calls("workflow_error") == []
    assert "workflow:complete" not in recorder.types()
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.SUSPENDED
    assert state.history == result.history
    assert state.data == {"prepared": True}


@pytest.mark.parametrize("marker", [wait, Flux.wait], ids=["wait", "Flux.wait"])
async def test_sync_handler_returning_a_wait_marker_suspends(
    engine: FluxEngine, marker: Any
) -> None:
    flow = create_workflow("w").step("hold", lambda ctx: marker("go")).step("after", noop)
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.SUSPENDED
    assert result.history[0].waiting_for == "go"


# -- rule 10: signal errors -------------------------------------------------------------------


async def test_signal_to_an_unknown_run_raises_workflow_not_found(engine: FluxEngine) -> None:
    flow = approval_flow([])
    with pytest.raises(WorkflowNotFoundError) as info:
        await engine.signal(flow, "no-such-run", "approved", {"by": "ann"})
    assert isinstance(info.value, FluxError)
    assert info.value.workflow_id == "no-such-run"


async def test_signal_to_a_completed_run_raises_not_suspended(engine: FluxEngine) -> None:
    flow = create_workflow("plain").step("a", noop)
    result = await engine.execute(flow)
    with pytest.raises(WorkflowNotSuspendedError) as info:
        await engine.signal(flow, result.id, "approved")
    assert info.value.workflow_id == result.id
    assert "completed" in str(info.value)


async def test_signal_to_a_failed_run_raises_not_suspended(engine: FluxEngine) -> None:
    def boom(ctx: WorkflowContext) -> None:
        raise ValueError("boom")

    flow = create_workflow("bad").step("a", boom)
    result = await engine.execute(flow)
    before = await engine.get(result.id)
    with pytest.raises(WorkflowNotSuspendedError):
        await engine.signal(flow, result.id, "approved")
    assert await engine.get(result.id) == before


async def test_a_signal_is_consumed_once(engine: FluxEngine) -> None:
    flow = approval_flow([])
    first = await engine.execute(flow, {})
    await engine.signal(flow, first.id, "approved", {"by": "ann"})
    with pytest.raises(WorkflowNotSuspendedError):
        await engine.signal(flow, first.id, "approved", {"by": "bob"})
    state = await engine.get(first.id)
    assert state is not None and state.data["shipped_by"] == "ann"


async def test_signal_with_another_name_raises_mismatch_and_changes_nothing(
    engine: FluxEngine,
) -> None:
    log: list[str] = []
    flow = approval_flow(log)
    result = await engine.execute(flow, {})
    before = await engine.get(result.id)
    with pytest.raises(SignalMismatchError) as info:
        await engine.signal(flow, result.id, "rejected", {"by": "eve"})
    assert info.value.workflow_id == result.id
    assert info.value.step == "approve"
    assert "approved" in str(info.value) and "rejected" in str(info.value)
    assert await engine.get(result.id) == before
    assert log == ["prepare", "approve"]
    # The run still waits for the right signal.
    done = await engine.signal(flow, result.id, "approved", {"by": "ann"})
    assert done.status == WorkflowStatus.COMPLETED


async def test_signal_with_another_workflow_is_refused(engine: FluxEngine) -> None:
    # SPEC is silent; the engine checks that the run belongs to the workflow given.
    result = await engine.execute(approval_flow([]), {})
    other = create_workflow("other").step("a", noop).step("b", noop).step("c", noop)
    with pytest.raises(WorkflowNameMismatchError):
        await engine.signal(other, result.id, "approved")


# -- rule 10: a matching signal completes the step and continues -------------------------------


async def test_signal_completes_the_waiting_step_and_continues(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    log: list[str] = []
    flow = approval_flow(log)
    suspended = await engine.execute(flow, {})
    payload = {"by": "ann", "note": ["ok", 1]}
    result = await engine.signal(flow, suspended.id, "approved", payload)
    # The waiting step's handler did not run again; the next step ran.
    assert log == ["prepare", "approve", "ship"]
    assert result.id == suspended.id
    assert result.status == WorkflowStatus.COMPLETED
    waited = result.history[1]
    assert waited.status == StepStatus.COMPLETED
    assert waited.output == payload
    assert waited.completed_at is not None
    assert result.data == {
        "prepared": True,
        "shipped_by": "ann",
        "saw": {"approved": payload},
        "output_seen": payload,
    }
    (received,) = recorder.of("signal:received")
    assert received.input == payload
    assert recorder.types().count("workflow:start") == 1
    assert recorder.calls("workflow_complete") != []
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.COMPLETED
    assert state.history == result.history
    assert state.data == result.data


async def test_signal_without_payload_records_none(engine: FluxEngine) -> None:
    seen: list[Any] = []
    flow = (
        create_workflow("w")
        .step("hold", lambda ctx: wait("go"))
        .step("after", lambda ctx: seen.append(dict(ctx.signals)))
    )
    suspended = await engine.execute(flow)
    result = await engine.signal(flow, suspended.id, "go")
    assert result.status == WorkflowStatus.COMPLETED
    assert seen == [{"go": None}]
    assert result.history[0].output is None


async def test_each_suspension_needs_its_own_signal(engine: FluxEngine) -> None:
    seen: list[dict[str, Any]] = []

    def finish(ctx: WorkflowContext) -> None:
        seen.append(dict(ctx.signals))

    flow = (
        create_workflow("two")
        .step("first", lambda ctx: wait("one"))
        .step("second", lambda ctx: wait("two"))
        .step("finish", finish)
    )
    run = await engine.execute(flow)
    assert run.status == WorkflowStatus.SUSPENDED
    with pytest.raises(SignalMismatchError):
        await engine.signal(flow, run.id, "two", 2)
    mid = await engine.signal(flow, run.id, "one", 1)
    assert mid.status == WorkflowStatus.SUSPENDED
    assert [h.status for h in mid.history] == [
        StepStatus.COMPLETED,
        StepStatus.SUSPENDED,
        StepStatus.PENDING,
    ]
    assert mid.history[1].waiting_for == "two"
    end = await engine.signal(flow, run.id, "two", 2)
    assert end.status == WorkflowStatus.COMPLETED
    assert seen == [{"one": 1, "two": 2}]
    assert [h.output for h in end.history] == [1, 2, None]


async def test_signal_continues_on_another_engine_with_typed_input_and_data(
    engine_factory: EngineFactory, store: Store
) -> None:
    seen: list[Any] = []

    def first(ctx: WorkflowContext) -> Any:
        ctx.data["reserved"] = ctx.input.qty
        return wait("paid")

    def second(ctx: WorkflowContext) -> None:
        seen.append((ctx.input, dict(ctx.data), ctx.signals["paid"]))

    flow = create_workflow("typed").input(Order).step("first", first).step("second", second)
    starter = await engine_factory()
    run = await starter.execute(flow, {"order_id": "A1", "qty": "2"})
    assert run.status == WorkflowStatus.SUSPENDED
    # A second engine on the same store picks the run up from what was saved.
    other = await engine_factory(storage=store)
    result = await other.signal(flow, run.id, "paid", {"amount": 10})
    assert result.status == WorkflowStatus.COMPLETED
    ((typed_input, data, payload),) = seen
    assert typed_input == Order(order_id="A1", qty=2)
    assert isinstance(typed_input, Order)
    assert data == {"reserved": 2}
    assert payload == {"amount": 10}


async def test_signal_that_leads_to_a_failure_returns_the_failed_result(
    engine: FluxEngine,
) -> None:
    def boom(ctx: WorkflowContext) -> None:
        raise ValueError(f"rejected by {ctx.signals['go']}")

    flow = create_workflow("w").step("hold", lambda ctx: wait("go")).step("check", boom)
    run = await engine.execute(flow)
    result = await engine.signal(flow, run.id, "go", "ann")
    assert result.status == WorkflowStatus.FAILED
    assert isinstance(result.error, ValueError)
    assert result.history[1].error == "rejected by ann"


async def test_two_concurrent_signals_continue_the_run_once(engine: FluxEngine) -> None:
    log: list[str] = []
    flow = approval_flow(log)
    first = await engine.execute(flow, {})
    outcomes = await asyncio.gather(
        engine.signal(flow, first.id, "approved", {"by": "ann"}),
        engine.signal(flow, first.id, "approved", {"by": "bob"}),
        return_exceptions=True,
    )
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(done) == 1 and done[0].status == WorkflowStatus.COMPLETED
    assert len(refused) == 1 and isinstance(refused[0], WorkflowNotSuspendedError)
    assert log.count("ship") == 1
    state = await engine.get(first.id)
    assert state is not None and state.data == done[0].data
