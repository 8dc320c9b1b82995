"""SPEC §2 rule 13: the exact order of hooks, trace events, user code and saves, and
@gravito/flux's JSON shape of an event (``to_dict``). Every run test uses MemoryStorage and
SQLiteStorage.

The log entries come from the ``recorder`` fixture (tests/unit/conftest.py): ``hook <name>
<step>``, ``event <type> <step>``, ``save <run status> <step>:<step status>`` (the run status
after the write) and the handlers' own ``run <step>`` / ``undo <step>`` notes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import Store

if TYPE_CHECKING:
    from conftest import EngineFactory, Recorder


@pytest.fixture
async def spied(engine_factory: EngineFactory, store: Store, recorder: Recorder) -> FluxEngine:
    """An engine whose hooks, trace events and store writes all go to ``recorder``."""
    recorder.watch(store)
    return await engine_factory(trace=recorder, on=recorder.hooks)


def runs(rec: Recorder, name: str, *, fail: int = 0, result: Any = None) -> Any:
    """A step handler noting ``run <name>`` and raising on its first ``fail`` attempts."""

    async def handler(ctx: WorkflowContext) -> Any:
        rec.note(f"run {name}")
        if ctx.attempt <= fail:
            raise RuntimeError(f"{name} failed")
        return result

    return handler


def undoes(rec: Recorder, name: str) -> Any:
    def compensate(ctx: WorkflowContext) -> None:
        rec.note(f"undo {name}")

    return compensate


def step_success(name: str) -> list[str]:
    return [
        f"hook step_start {name}",
        f"event step:start {name}",
        f"run {name}",
        f"hook step_complete {name}",
        f"event step:complete {name}",
        f"save running {name}:completed",
    ]


def last_step_success(name: str) -> list[str]:
    """The last step: its outcome and the run's completion are saved together."""
    return [*step_success(name)[:-1], f"save completed {name}:completed"]


RUN_START = ["save pending", "event workflow:start"]
RUN_END = ["hook workflow_complete", "event workflow:complete"]


async def test_success_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = (
        create_workflow("ok")
        .step("a", runs(recorder, "a"))
        .step("b", runs(recorder, "b"))
        .step("c", runs(recorder, "c"))
    )
    result = await spied.execute(flow, {"x": 1})
    assert result.status == WorkflowStatus.COMPLETED
    assert recorder.log == [
        *RUN_START,
        *step_success("a"),
        *step_success("b"),
        *last_step_success("c"),
        *RUN_END,
    ]


async def test_retry_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = create_workflow("retry").step("a", runs(recorder, "a", fail=2), retries=2)
    result = await spied.execute(flow)
    assert result.status == WorkflowStatus.COMPLETED
    assert recorder.log == [
        *RUN_START,
        "hook step_start a",
        "event step:start a",
        "run a",
        "save pending attempt step a#1:failed",
        "event step:retry a",
        "run a",
        "save pending attempt step a#2:failed",
        "event step:retry a",
        "run a",
        "hook step_complete a",
        "event step:complete a",
        "save completed a:completed",
        *RUN_END,
    ]
    assert [e.retries for e in recorder.of("step:retry")] == [1, 2]


async def test_skip_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = (
        create_workflow("skip")
        .step("a", runs(recorder, "a"), when=lambda ctx: False)
        .step("b", runs(recorder, "b"))
    )
    await spied.execute(flow)
    assert recorder.log == [
        *RUN_START,
        "hook step_complete a",
        "event step:skipped a",
        "save running a:skipped",
        *last_step_success("b"),
        *RUN_END,
    ]


async def test_failure_with_rollback_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = (
        create_workflow("saga")
        .step("a", runs(recorder, "a"), compensate=undoes(recorder, "a"))
        .step("b", runs(recorder, "b"), compensate=undoes(recorder, "b"))
        .step("c", runs(recorder, "c", fail=1))
    )
    result = await spied.execute(flow)
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert recorder.log == [
        *RUN_START,
        *step_success("a"),
        *step_success("b"),
        "hook step_start c",
        "event step:start c",
        "run c",
        "hook step_error c",
        "event step:error c",
        "save rolling_back c:failed",
        "event workflow:rollback_start",
        "save rolling_back b:compensating",
        "undo b",
        "event step:compensate b",
        "save rolling_back b:compensated attempt compensation b#1:compensated",
        "save rolling_back a:compensating",
        "undo a",
        "event step:compensate a",
        "save rolling_back a:compensated attempt compensation a#1:compensated",
        "save rolled_back",
        "event workflow:rollback_complete",
        "hook workflow_error",
        "event workflow:error",
    ]


async def test_failure_without_compensation_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = create_workflow("fail").step("a", runs(recorder, "a", fail=1))
    result = await spied.execute(flow)
    assert result.status == WorkflowStatus.FAILED
    assert recorder.log == [
        *RUN_START,
        "hook step_start a",
        "event step:start a",
        "run a",
        "hook step_error a",
        "event step:error a",
        "save rolling_back a:failed",
        "event workflow:rollback_start",
        "save failed",
        "hook workflow_error",
        "event workflow:error",
    ]


async def test_suspension_and_signal_order(spied: FluxEngine, recorder: Recorder) -> None:
    flow = (
        create_workflow("wait")
        .step("a", runs(recorder, "a"))
        .step("hold", runs(recorder, "hold", result=wait("go")))
        .step("b", runs(recorder, "b"))
    )
    run = await spied.execute(flow)
    assert run.status == WorkflowStatus.SUSPENDED
    assert recorder.log == [
        *RUN_START,
        *step_success("a"),
        "hook step_start hold",
        "event step:start hold",
        "run hold",
        "event step:suspend hold",
        "save suspended hold:suspended",
    ]
    recorder.log.clear()
    result = await spied.signal(flow, run.id, "go", {"ok": True})
    assert result.status == WorkflowStatus.COMPLETED
    # No workflow:start on a signal; the run is claimed, the waiting step's completion (it
    # takes the signal from the inbox) is saved, then announced.
    assert recorder.log == [
        "save suspended",
        "save running hold:completed",
        "event signal:received hold",
        *last_step_success("b"),
        *RUN_END,
    ]


# -- event fields ---------------------------------------------------------------------------


async def test_event_fields_of_a_run(engine_factory: EngineFactory, recorder: Recorder) -> None:
    engine = await engine_factory(trace=recorder)

    def collect(ctx: WorkflowContext) -> None:
        ctx.data["n"] = 1

    flow = (
        create_workflow("fields")
        .step("a", collect)
        .commit("b", runs(recorder, "b", fail=1), retries=3)
        .step("hold", lambda ctx: wait("go"))
    )
    run = await engine.execute(flow, {"in": 1})
    await engine.signal(flow, run.id, "go", {"p": 2})
    by_type = {e.type: e for e in recorder.events}
    assert {e.workflow_id for e in recorder.events} == {run.id}
    assert {e.workflow_name for e in recorder.events} == {"fields"}
    assert all(isinstance(e.timestamp, float) and e.timestamp > 1e12 for e in recorder.events)
    stamps = [e.timestamp for e in recorder.events]
    assert stamps == sorted(stamps)

    start = by_type["workflow:start"]
    assert (start.status, start.input) == ("running", {"in": 1})
    step_start = recorder.of("step:start")[1]
    assert (step_start.step_name, step_start.step_index, step_start.commit) == ("b", 1, True)
    assert step_start.status == "running"
    retry = by_type["step:retry"]
    assert (retry.step_name, retry.step_index, retry.retries, retry.max_retries) == ("b", 1, 1, 3)
    assert (retry.error, retry.status, retry.commit) == ("b failed", "running", True)
    complete = recorder.of("step:complete")[1]
    assert (complete.step_name, complete.status, complete.retries) == ("b", "completed", 1)
    assert complete.duration_ms is not None and complete.duration_ms >= 0
    suspend = by_type["step:suspend"]
    assert (suspend.step_name, suspend.step_index) == ("hold", 2)
    assert dict(suspend.meta or {}) == {"signal": "go"}
    received = by_type["signal:received"]
    assert received.input == {"p": 2}
    done = by_type["workflow:complete"]
    assert (done.status, done.data) == ("completed", {"n": 1})
    assert done.duration_ms is not None and done.duration_ms >= 0


async def test_event_fields_of_a_failure(engine_factory: EngineFactory, recorder: Recorder) -> None:
    engine = await engine_factory(trace=recorder)
    flow = (
        create_workflow("bad")
        .step("a", runs(recorder, "a"), compensate=undoes(recorder, "a"))
        .step("b", runs(recorder, "b", fail=9), retries=1)
    )
    await engine.execute(flow)
    by_type = {e.type: e for e in recorder.events}
    error = by_type["step:error"]
    assert (error.step_name, error.step_index, error.status) == ("b", 1, "failed")
    assert (error.error, error.retries) == ("b failed", 1)
    assert error.duration_ms is not None
    rollback_start = by_type["workflow:rollback_start"]
    assert (rollback_start.status, rollback_start.error) == ("rolling_back", "b failed")
    compensate = by_type["step:compensate"]
    assert (compensate.step_name, compensate.step_index, compensate.status) == (
        "a",
        0,
        "compensated",
    )
    assert compensate.retries == 0
    assert compensate.duration_ms is not None and compensate.duration_ms >= 0
    assert by_type["workflow:rollback_complete"].status == "rolled_back"
    wf_error = by_type["workflow:error"]
    assert (wf_error.status, wf_error.error) == ("rolled_back", "b failed")
    assert wf_error.duration_ms is not None


# -- to_dict: @gravito/flux's JSON shape -----------------------------------------------------------


def test_to_dict_uses_the_gravito_flux_camel_case_keys() -> None:
    event = FluxTraceEvent(
        type="step:retry",
        timestamp=1700000000000.0,
        workflow_id="run-1",
        workflow_name="order",
        step_name="charge",
        step_index=2,
        commit=True,
        retries=1,
        max_retries=3,
        duration_ms=12.5,
        error="card declined",
        status="running",
        input={"order": "A1"},
        data={"n": 1},
        meta={"signal": "go"},
    )
    assert event.to_dict() == {
        "type": "step:retry",
        "timestamp": 1700000000000.0,
        "workflowId": "run-1",
        "workflowName": "order",
        "stepName": "charge",
        "stepIndex": 2,
        "commit": True,
        "retries": 1,
        "maxRetries": 3,
        "duration": 12.5,
        "error": "card declined",
        "status": "running",
        "input": {"order": "A1"},
        "data": {"n": 1},
        "meta": {"signal": "go"},
    }


def test_to_dict_leaves_absent_fields_out() -> None:
    event = FluxTraceEvent(
        type="workflow:start", timestamp=1.0, workflow_id="r", workflow_name="w", status="running"
    )
    assert event.to_dict() == {
        "type": "workflow:start",
        "timestamp": 1.0,
        "workflowId": "r",
        "workflowName": "w",
        "status": "running",
    }


def test_to_dict_keeps_false_and_zero_values() -> None:
    event = FluxTraceEvent(
        type="step:start",
        timestamp=1.0,
        workflow_id="r",
        workflow_name="w",
        step_name="a",
        step_index=0,
        commit=False,
        retries=0,
    )
    out = event.to_dict()
    assert (out["stepIndex"], out["commit"], out["retries"]) == (0, False, 0)


async def test_events_of_a_run_serialize_to_the_gravito_flux_shape(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    flow = create_workflow("shape").step("a", runs(recorder, "a", fail=1), retries=1)
    await engine.execute(flow, {"k": "v"})
    allowed = {
        "type",
        "timestamp",
        "workflowId",
        "workflowName",
        "stepName",
        "stepIndex",
        "commit",
        "retries",
        "maxRetries",
        "duration",
        "error",
        "status",
        "input",
        "data",
        "meta",
    }
    for event in recorder.events:
        out = event.to_dict()
        assert set(out) <= allowed, out
        assert not any("_" in key for key in out)
        json.dumps(out)  # plain JSON
    by_type = {e.type: e.to_dict() for e in recorder.events}
    assert by_type["workflow:start"]["input"] == {"k": "v"}
    assert by_type["step:start"]["stepName"] == "a"
    assert by_type["step:start"]["stepIndex"] == 0
    assert by_type["step:retry"]["maxRetries"] == 1
    assert by_type["step:retry"]["retries"] == 1
    assert isinstance(by_type["step:complete"]["duration"], float)
    assert isinstance(by_type["workflow:complete"]["duration"], float)
