"""SPEC §2 rule 11: compensation (the saga rollback) after a step fails for good. Every test
runs on MemoryStorage and SQLiteStorage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxrun import (
    CompensationError,
    FluxEngine,
    StepStatus,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import Store

if TYPE_CHECKING:
    from conftest import EngineFactory, Recorder


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


def failing(message: str) -> Any:
    def handler(ctx: WorkflowContext) -> None:
        raise RuntimeError(message)

    return handler


def doing(log: list[str], name: str) -> Any:
    def handler(ctx: WorkflowContext) -> None:
        log.append(name)
        ctx.data[name] = True

    return handler


def undoing(log: list[str], name: str) -> Any:
    async def compensate(ctx: WorkflowContext) -> None:
        log.append(f"undo {name}")
        ctx.data[f"undone_{name}"] = True

    return compensate


def saga(log: list[str], fail_at: str = "d") -> Any:
    """a, b, c with compensations, then d; the step named ``fail_at`` raises."""
    builder = create_workflow("saga")
    for name in ("a", "b", "c", "d"):
        handler = failing(f"{name} broke") if name == fail_at else doing(log, name)
        compensate = undoing(log, name) if name != "d" else None
        builder.step(name, handler, compensate=compensate)
    return builder


async def test_compensations_run_in_reverse_order(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    log: list[str] = []
    result = await engine.execute(saga(log))
    assert log == ["a", "b", "c", "undo c", "undo b", "undo a"]
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert [h.status for h in result.history] == [StepStatus.COMPENSATED] * 3 + [StepStatus.FAILED]
    assert all(h.compensated_at is not None for h in result.history[:3])
    assert [(e.step_name, e.step_index, e.status) for e in recorder.of("step:compensate")] == [
        ("c", 2, "compensated"),
        ("b", 1, "compensated"),
        ("a", 0, "compensated"),
    ]
    (start,) = recorder.of("workflow:rollback_start")
    assert (start.status, start.error) == ("rolling_back", "d broke")
    (complete,) = recorder.of("workflow:rollback_complete")
    assert complete.status == "rolled_back"
    types = recorder.types()
    assert (
        types.index("step:error")
        < types.index("workflow:rollback_start")
        < types.index("step:compensate")
        < types.index("workflow:rollback_complete")
        < types.index("workflow:error")
    )
    # What the compensations did to ctx.data is kept and stored.
    expected_data = {"a": True, "b": True, "c": True} | {f"undone_{n}": True for n in "abc"}
    assert result.data == expected_data
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.ROLLED_BACK
    assert state.error == "d broke"
    assert state.history == result.history
    assert state.data == expected_data


async def test_each_compensation_is_saved_compensating_then_compensated(
    engine_factory: EngineFactory, store: Store, recorder: Recorder
) -> None:
    recorder.watch(store)
    engine = await engine_factory()
    seen: list[tuple[str, Any, Any]] = []

    def undo(name: str) -> Any:
        async def compensate(ctx: WorkflowContext) -> None:
            recorder.note(f"undo {name}")
            state = await engine.get(ctx.id)
            assert state is not None
            seen.append((name, state.status, state.history[ctx.current_step].status))

        return compensate

    flow = (
        create_workflow("saved")
        .step("a", noop, compensate=undo("a"))
        .step("b", noop, compensate=undo("b"))
        .step("c", failing("c broke"))
    )
    result = await engine.execute(flow)
    assert result.status == WorkflowStatus.ROLLED_BACK
    rollback = recorder.log[recorder.log.index("save rolling_back c:failed") :]
    assert rollback == [
        "save rolling_back c:failed",
        "save rolling_back b:compensating",
        "undo b",
        "save rolling_back b:compensated attempt compensation b#1:compensated",
        "save rolling_back a:compensating",
        "undo a",
        "save rolling_back a:compensated attempt compensation a#1:compensated",
        "save rolled_back",
    ]
    # While a compensation runs, the store already says the run rolls back and the step
    # is compensating.
    assert seen == [
        ("b", WorkflowStatus.ROLLING_BACK, StepStatus.COMPENSATING),
        ("a", WorkflowStatus.ROLLING_BACK, StepStatus.COMPENSATING),
    ]


async def test_only_completed_steps_with_a_compensation_are_compensated(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder)
    log: list[str] = []
    flow = (
        create_workflow("mixed")
        .step("a", doing(log, "a"), compensate=undoing(log, "a"))
        .step("plain", doing(log, "plain"))
        .step(
            "skipped", doing(log, "skipped"), when=lambda ctx: False, compensate=undoing(log, "s")
        )
        .step("bad", failing("bad broke"), compensate=undoing(log, "bad"))
        .step("later", doing(log, "later"), compensate=undoing(log, "later"))
    )
    result = await engine.execute(flow)
    # The failed step itself, the skipped one and those never reached are not compensated.
    assert log == ["a", "plain", "undo a"]
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert [h.status for h in result.history] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPLETED,
        StepStatus.SKIPPED,
        StepStatus.FAILED,
        StepStatus.PENDING,
    ]
    assert [e.step_name for e in recorder.of("step:compensate")] == ["a"]


async def test_without_any_compensation_run_the_run_ends_failed(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    log: list[str] = []
    flow = (
        create_workflow("no-comp")
        .step("a", doing(log, "a"))
        .step("b", failing("b broke"), compensate=undoing(log, "b"))
    )
    result = await engine.execute(flow)
    assert log == ["a"]
    assert result.status == WorkflowStatus.FAILED
    # The rollback starts, finds nothing to undo, and never reports completing.
    assert recorder.of("workflow:rollback_complete") == []
    assert recorder.of("step:compensate") == []
    assert len(recorder.of("workflow:rollback_start")) == 1
    (error,) = recorder.of("workflow:error")
    assert error.status == "failed"
    state = await engine.get(result.id)
    assert state is not None and state.status == WorkflowStatus.FAILED


async def test_failure_of_the_first_step_ends_failed(engine: FluxEngine) -> None:
    log: list[str] = []
    result = await engine.execute(saga(log, fail_at="a"))
    assert log == []
    assert result.status == WorkflowStatus.FAILED
    assert result.history[0].status == StepStatus.FAILED


async def test_a_signalled_wait_step_is_compensated(engine: FluxEngine) -> None:
    log: list[str] = []
    flow = (
        create_workflow("wait-comp")
        .step("hold", lambda ctx: wait("go"), compensate=undoing(log, "hold"))
        .step("bad", failing("bad broke"))
    )
    run = await engine.execute(flow)
    result = await engine.signal(flow, run.id, "go", {"ok": 1})
    assert log == ["undo hold"]
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert result.history[0].status == StepStatus.COMPENSATED
    assert result.history[0].output == {"ok": 1}


async def test_compensation_sees_the_committed_data(engine: FluxEngine) -> None:
    # SPEC is silent: the engine throws away what the failed step's attempts wrote, so the
    # compensations see ctx.data as the completed steps left it.
    seen: list[dict[str, Any]] = []

    def half_done(ctx: WorkflowContext) -> None:
        ctx.data["partial"] = True
        raise RuntimeError("half done")

    flow = (
        create_workflow("data")
        .step(
            "a",
            lambda ctx: ctx.data.update(reserved=3),
            compensate=lambda c: seen.append(dict(c.data)),
        )
        .step("b", half_done)
    )
    result = await engine.execute(flow)
    assert seen == [{"reserved": 3}]
    assert result.data == {"reserved": 3}


async def test_a_compensation_is_retried_with_the_step_retries(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    # SPEC says "after its retries": a compensation gets the retries of its step.
    engine = await engine_factory(trace=recorder)
    attempts: list[int] = []

    def shaky_undo(ctx: WorkflowContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")

    flow = (
        create_workflow("retry-comp")
        .step("a", noop, retries=2, compensate=shaky_undo)
        .step("b", failing("b broke"))
    )
    result = await engine.execute(flow)
    assert attempts == [1, 2, 3]
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert result.history[0].status == StepStatus.COMPENSATED


async def test_compensation_failing_after_its_retries_stops_the_rollback(
    engine_factory: EngineFactory, recorder: Recorder
) -> None:
    engine = await engine_factory(trace=recorder, on=recorder.hooks)
    log: list[str] = []
    causes: list[Exception] = []

    def broken_undo(ctx: WorkflowContext) -> None:
        log.append(f"undo b attempt {ctx.attempt}")
        exc = OSError(f"refund service down ({ctx.attempt})")
        causes.append(exc)
        raise exc

    flow = (
        create_workflow("comp-fail")
        .step("a", doing(log, "a"), compensate=undoing(log, "a"))
        .step("b", doing(log, "b"), retries=1, compensate=broken_undo)
        .step("c", doing(log, "c"), compensate=undoing(log, "c"))
        .step("d", failing("d broke"))
    )
    result = await engine.execute(flow)
    # c undone, b tried 1 + retries times, a never undone.
    assert log == ["a", "b", "c", "undo c", "undo b attempt 1", "undo b attempt 2"]
    assert result.status == WorkflowStatus.COMPENSATION_FAILED
    assert [h.status for h in result.history] == [
        StepStatus.COMPLETED,
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
    ]
    error = result.error
    assert isinstance(error, CompensationError)
    assert error.step == "b"
    assert error.workflow_id == result.id
    assert "'b'" in str(error) or '"b"' in str(error)
    assert error.__cause__ is causes[-1]
    assert error.original_error == "d broke"
    # Hooks and events.
    assert [e.step_name for e in recorder.of("step:compensate")] == ["c"]
    assert recorder.of("workflow:rollback_complete") == []
    (wf_error,) = recorder.of("workflow:error")
    assert wf_error.status == "compensation_failed"
    assert wf_error.error == str(error)
    assert [args[1] for args in recorder.calls("workflow_error")] == [error]
    # Stored the same way.
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.COMPENSATION_FAILED
    assert state.error == str(error)
    assert state.completed_at is not None
    assert state.history == result.history
