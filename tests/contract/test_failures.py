"""Failures that tell the truth, on every backend: the pivot rule (rule 11), resume's guard
rails and skip_compensation (rule 15), stored error types and tracebacks, and the attempt
log (SPEC §6).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    RetryPolicy,
    StepStatus,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
)
from fluxrun.errors import CommittedStepError, InvalidStateError, StepNotFoundError
from fluxrun.storage._base import Store

FAST = RetryPolicy(initial_delay=0, jitter=False)


class Sink:
    def __init__(self) -> None:
        self.events: list[FluxTraceEvent] = []

    def emit(self, event: FluxTraceEvent) -> None:
        self.events.append(event)


@pytest.fixture
async def sink() -> Sink:
    return Sink()


@pytest.fixture
async def engine(store: Store, sink: Sink) -> AsyncIterator[FluxEngine]:
    engine = FluxEngine(storage=store, retry_policy=FAST, trace=sink)
    await engine.init()
    yield engine


class Calls:
    """Counts how often each step and compensation really ran; steps can be told to fail."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.failing: dict[str, int] = {}  # name -> how many more calls fail

    def step(self, name: str, key: str | None = None) -> Callable[[WorkflowContext], Any]:
        def handler(ctx: WorkflowContext) -> None:
            self.count[name] = self.count.get(name, 0) + 1
            if self.failing.get(name, 0) > 0:
                self.failing[name] -= 1
                raise KeyError(f"{name} broke")
            if key is not None:
                ctx.data[key] = f"{name}-{self.count[name]}"

        handler.__name__ = name
        return handler


def order(calls: Calls) -> Any:
    """The saga shape: reversible steps, the commit (charge), then steps after it."""
    return (
        create_workflow("order")
        .step("reserve", calls.step("reserve", "reserved"), compensate=calls.step("release"))
        .commit("charge", calls.step("charge", "charge_id"))
        .step("pack", calls.step("pack", "packed"), compensate=calls.step("unpack"))
        .step("ship", calls.step("ship", "shipped"), compensate=calls.step("unship"))
    )


# -- the pivot rule -------------------------------------------------------------------------------


async def test_failure_after_the_commit_compensates_only_the_steps_after_it(
    engine: FluxEngine,
) -> None:
    calls = Calls()
    calls.failing["ship"] = 1
    flow = order(calls)
    result = await engine.execute(flow)

    assert result.status is WorkflowStatus.FAILED
    assert isinstance(result.error, KeyError)  # rule 8: the failing step's own exception
    assert calls.count == {"reserve": 1, "charge": 1, "pack": 1, "ship": 1, "unpack": 1}
    state = await engine.get(result.id)
    assert state is not None and state.status is WorkflowStatus.FAILED
    assert [h.status for h in state.history] == [
        StepStatus.COMPLETED,
        StepStatus.COMPLETED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
    ]
    assert state.data["charge_id"] == "charge-1"
    assert state.data["reserved"] == "reserve-1"
    assert state.error is not None
    assert "'charge'" in state.error and "resume" in state.error and "forward" in state.error

    # Finishing it forward: pack runs again, ship succeeds, charge never runs again.
    done = await engine.resume(flow, result.id)
    assert done is not None and done.status is WorkflowStatus.COMPLETED
    assert calls.count["charge"] == 1
    assert calls.count["pack"] == 2 and calls.count["ship"] == 2
    final = await engine.get(result.id)
    assert final is not None and final.error is None
    assert all(h.status is StepStatus.COMPLETED for h in final.history)


async def test_retry_step_of_the_failed_step_after_a_commit_completes_the_run(
    engine: FluxEngine,
) -> None:
    calls = Calls()
    calls.failing["ship"] = 1
    flow = (
        create_workflow("pay")
        .step("reserve", calls.step("reserve"), compensate=calls.step("release"))
        .commit("charge", calls.step("charge", "charge_id"))
        .step("ship", calls.step("ship"))
    )
    failed = await engine.execute(flow)
    assert failed.status is WorkflowStatus.FAILED
    assert "release" not in calls.count
    done = await engine.retry_step(flow, failed.id, "ship")
    assert done is not None and done.status is WorkflowStatus.COMPLETED
    assert calls.count == {"reserve": 1, "charge": 1, "ship": 2}
    with pytest.raises(CommittedStepError):
        await engine.retry_step(flow, failed.id, "charge")


async def test_failure_before_the_commit_rolls_back_everything(engine: FluxEngine) -> None:
    calls = Calls()
    calls.failing["reserve"] = 0
    flow = (
        create_workflow("early")
        .step("reserve", calls.step("reserve"), compensate=calls.step("release"))
        .step("check", calls.step("check"))
        .commit("charge", calls.step("charge"))
    )
    calls.failing["check"] = 1
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert calls.count == {"reserve": 1, "check": 1, "release": 1}


async def test_runs_without_a_commit_step_roll_back_as_before(engine: FluxEngine) -> None:
    calls = Calls()
    calls.failing["c"] = 1
    flow = (
        create_workflow("plain")
        .step("a", calls.step("a"), compensate=calls.step("undo_a"))
        .step("b", calls.step("b"), compensate=calls.step("undo_b"))
        .step("c", calls.step("c"))
    )
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert calls.count["undo_a"] == 1 and calls.count["undo_b"] == 1
    state = await engine.get(result.id)
    assert state is not None and state.error == "'c broke'"


# -- resume guard rails ---------------------------------------------------------------------------


async def test_resume_of_a_completed_run_needs_an_explicit_step(engine: FluxEngine) -> None:
    calls = Calls()
    flow = (
        create_workflow("mail")
        .step("prepare", calls.step("prepare"))
        .step("send", calls.step("send"))
    )
    run = await engine.execute(flow)
    with pytest.raises(InvalidStateError) as info:
        await engine.resume(flow, run.id)
    assert info.value.workflow_id == run.id
    assert calls.count == {"prepare": 1, "send": 1}  # the email was not sent twice
    again = await engine.resume(flow, run.id, from_step="send")
    assert again is not None and again.status is WorkflowStatus.COMPLETED
    assert calls.count == {"prepare": 1, "send": 2}


def stuck_saga(calls: Calls) -> Any:
    return (
        create_workflow("stuck")
        .step("a", calls.step("a"), compensate=calls.step("undo_a"))
        .step("b", calls.step("b"), compensate=calls.step("undo_b"))
        .step("c", calls.step("c"))
    )


async def test_resume_of_compensation_failed_finishes_the_rollback(engine: FluxEngine) -> None:
    calls = Calls()
    calls.failing.update(c=1, undo_b=1)
    flow = stuck_saga(calls)
    stuck = await engine.execute(flow)
    assert stuck.status is WorkflowStatus.COMPENSATION_FAILED
    state = await engine.get(stuck.id)
    assert state is not None
    b = state.history[1]
    assert b.status is StepStatus.COMPENSATING
    assert b.error_type == "builtins.KeyError" and b.traceback and "undo_b broke" in b.traceback
    # Only the compensation's own error: not chained to the step failure it was handling.
    assert "During handling" not in b.traceback and "c broke" not in b.traceback

    with pytest.raises(InvalidStateError):
        await engine.resume(flow, stuck.id, from_step="a")
    done = await engine.resume(flow, stuck.id)
    assert done is not None and done.status is WorkflowStatus.ROLLED_BACK
    # Forward steps never ran again; the failed compensation was retried, then a's ran.
    assert calls.count == {"a": 1, "b": 1, "c": 1, "undo_b": 2, "undo_a": 1}
    final = await engine.get(stuck.id)
    assert final is not None
    assert [h.status for h in final.history] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
    ]
    assert final.history[1].error is None
    attempts = await engine.attempts(stuck.id)
    undo_b = [(a.attempt, a.status) for a in attempts if a.kind == "compensation" and a.step == "b"]
    assert undo_b == [(1, StepStatus.FAILED), (1, StepStatus.COMPENSATED)]


async def test_skip_compensation_records_it_and_continues_the_rollback(engine: FluxEngine) -> None:
    calls = Calls()
    calls.failing.update(c=1, undo_b=1)
    flow = stuck_saga(calls)
    stuck = await engine.execute(flow)
    with pytest.raises(StepNotFoundError):
        await engine.skip_compensation(flow, stuck.id, "zz", note="x")
    with pytest.raises(InvalidStateError):
        await engine.skip_compensation(flow, stuck.id, "a", note="a did not fail")

    done = await engine.skip_compensation(flow, stuck.id, "b", note="refunded by hand (ann)")
    assert done.status is WorkflowStatus.ROLLED_BACK
    assert calls.count == {"a": 1, "b": 1, "c": 1, "undo_b": 1, "undo_a": 1}
    attempts = await engine.attempts(stuck.id)
    skipped = [a for a in attempts if a.status is StepStatus.SKIPPED]
    assert [(a.step, a.kind, a.note) for a in skipped] == [
        ("b", "compensation", "refunded by hand (ann)")
    ]
    with pytest.raises(InvalidStateError):
        await engine.skip_compensation(flow, stuck.id, "b", note="again")


# -- errors that explain themselves; the attempt log -------------------------------------------


async def test_failed_step_keeps_type_traceback_in_state_event_and_log(
    engine: FluxEngine, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    def lookup(ctx: WorkflowContext) -> None:
        {"A": 1}["B"]

    flow = create_workflow("why").step("lookup", lookup)
    with caplog.at_level(logging.WARNING, logger="fluxrun"):
        result = await engine.execute(flow)
    state = await engine.get(result.id)
    assert state is not None
    entry = state.history[0]
    assert entry.error == "'B'"
    assert entry.error_type == "builtins.KeyError"
    assert entry.traceback is not None
    assert "in lookup" in entry.traceback and "KeyError: 'B'" in entry.traceback
    (event,) = [e for e in sink.events if e.type == "step:error"]
    assert event.meta is not None and event.meta["errorType"] == "builtins.KeyError"
    assert "KeyError: 'B'" in event.meta["traceback"]
    assert set(event.to_dict()) >= {"type", "workflowId", "error", "meta"}
    logged = [r for r in caplog.records if "lookup" in r.getMessage()]
    assert logged and "builtins.KeyError" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # the traceback goes to the log too
    assert not logged[0].getMessage().startswith("fluxrun")


async def test_stored_tracebacks_are_bounded(engine: FluxEngine) -> None:
    def huge(ctx: WorkflowContext) -> None:
        raise RuntimeError("x" * 100_000)

    result = await engine.execute(create_workflow("huge").step("huge", huge))
    state = await engine.get(result.id)
    assert state is not None
    tb = state.history[0].traceback
    assert tb is not None and len(tb) <= 16 * 1024 and tb.startswith("... (traceback truncated)")


async def test_every_attempt_is_kept_through_retries_and_resume(engine: FluxEngine) -> None:
    calls = Calls()
    calls.failing["flaky"] = 2
    flow = (
        create_workflow("tries")
        .step("first", calls.step("first"))
        .step("flaky", calls.step("flaky"), retries=1)
    )
    failed = await engine.execute(flow)
    assert failed.status is WorkflowStatus.FAILED
    done = await engine.retry_step(flow, failed.id, "flaky")
    assert done is not None and done.status is WorkflowStatus.COMPLETED

    attempts = await engine.attempts(failed.id)
    seen = [(a.step, a.kind, a.attempt, a.status.value, a.error_type) for a in attempts]
    assert seen == [
        ("first", "step", 1, "completed", None),
        ("flaky", "step", 1, "failed", "builtins.KeyError"),
        ("flaky", "step", 2, "failed", "builtins.KeyError"),
        ("flaky", "step", 1, "completed", None),
    ]
    assert all(a.started_at is not None and a.finished_at is not None for a in attempts)
    assert attempts[1].traceback is not None and "flaky broke" in attempts[1].traceback
    state = await engine.get(failed.id)
    assert state is not None and state.history[1].status is StepStatus.COMPLETED
    # The history shows the current outcome; the earlier failure stays in the attempts.
    assert state.history[1].error is None


async def test_attempts_of_an_unknown_run_is_an_error(engine: FluxEngine) -> None:
    from fluxrun.errors import WorkflowNotFoundError

    with pytest.raises(WorkflowNotFoundError):
        await engine.attempts("no-such-run")
