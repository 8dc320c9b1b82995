"""SPEC §2 rule 12: hooks and trace sinks, sync or async; their failures are logged, never fatal.

Also the NDJSON trace file (:class:`JsonFileTraceSink`): one line per event, in the shape of
``event.to_dict()``, readable while the run is still going.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fluxrun import (
    FluxEngine,
    FluxResult,
    FluxTraceEvent,
    JsonFileTraceSink,
    MemoryStorage,
    RetryPolicy,
    SQLiteStorage,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
)
from fluxrun.errors import InvalidArgumentError

FAST = RetryPolicy(initial_delay=0, jitter=False)
HOOKS = ("step_start", "step_complete", "step_error", "workflow_complete", "workflow_error")
SUCCESS_HOOKS = ("step_start", "step_complete", "workflow_complete")
FAILURE_HOOKS = ("step_start", "step_error", "workflow_error")


# -- helpers ----------------------------------------------------------------------------------


class RecordingLogger:
    """A logger in @gravito/flux's shape: debug/info/warn/error, no ``warning``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def debug(self, message: str) -> None:
        self.records.append(("debug", message))

    def info(self, message: str) -> None:
        self.records.append(("info", message))

    def warn(self, message: str) -> None:
        self.records.append(("warn", message))

    def error(self, message: str) -> None:
        self.records.append(("error", message))

    def errors(self) -> list[str]:
        return [m for level, m in self.records if level == "error"]


class ListSink:
    """A sync sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[FluxTraceEvent] = []

    def emit(self, event: FluxTraceEvent) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [e.type for e in self.events]


class AsyncListSink(ListSink):
    """An async sink that keeps every event."""

    async def emit(self, event: FluxTraceEvent) -> None:  # type: ignore[override]
        self.events.append(event)


class FailingSink:
    def emit(self, event: FluxTraceEvent) -> None:
        raise ValueError(f"sync sink broke on {event.type}")


class AsyncFailingSink:
    async def emit(self, event: FluxTraceEvent) -> None:
        raise ValueError(f"async sink broke on {event.type}")


class HookBoom(RuntimeError):
    pass


def raising_hook(name: str, is_async: bool) -> Callable[..., Any]:
    if is_async:

        async def ahook(*args: Any) -> None:
            raise HookBoom(f"{name} exploded")

        return ahook

    def hook(*args: Any) -> None:
        raise HookBoom(f"{name} exploded")

    return hook


def ok_step(ctx: WorkflowContext) -> None:
    ctx.data["n"] = ctx.data.get("n", 0) + 1


def bad_step(ctx: WorkflowContext) -> None:
    raise KeyError("card declined")


def success_flow() -> Any:
    return create_workflow("hooks-ok").step("one", ok_step).step("two", ok_step)


def failure_flow() -> Any:
    return (
        create_workflow("hooks-fail")
        .step("one", ok_step, compensate=lambda ctx: None)
        .step("two", bad_step)
    )


@pytest.fixture(params=["memory", "sqlite"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    if request.param == "memory":
        return MemoryStorage
    return lambda: SQLiteStorage(tmp_path / "flux.db", synchronous="NORMAL")


async def run(flow: Any, store: Any = None, **options: Any) -> tuple[FluxResult, Any]:
    async with FluxEngine(storage=store, retry_policy=FAST, **options) as engine:
        result = await engine.execute(flow, {"order": "A1"})
        state = await engine.get(result.id)
    return result, state


def outcome(result: FluxResult, state: Any) -> tuple[Any, ...]:
    """What must not change when a hook or a sink fails."""
    return (
        result.status,
        type(result.error),
        str(result.error) if result.error else None,
        result.data,
        [(h.name, h.status, h.output, h.error, h.retries) for h in result.history],
        state.status,
        state.error,
        state.data,
        [(h.name, h.status, h.output, h.error, h.retries) for h in state.history],
    )


# -- hooks: sync and async are both called -----------------------------------------------------


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_every_hook_is_called_sync_or_async(is_async: bool) -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def make(name: str) -> Callable[..., Any]:
        if is_async:

            async def ahook(*args: Any) -> None:
                calls.append((name, args))

            return ahook

        def hook(*args: Any) -> None:
            calls.append((name, args))

        return hook

    on = {name: make(name) for name in HOOKS}
    ok, _ = await run(success_flow(), on=on)
    assert ok.status is WorkflowStatus.COMPLETED
    assert [c[0] for c in calls] == [
        "step_start",
        "step_complete",
        "step_start",
        "step_complete",
        "workflow_complete",
    ]
    step, ctx = calls[0][1]
    assert step == "one" and isinstance(ctx, WorkflowContext)
    assert calls[1][1][0] == "one" and calls[1][1][2].status == "completed"
    assert isinstance(calls[-1][1][0], WorkflowContext)

    calls.clear()
    bad, _ = await run(failure_flow(), on=on)
    assert bad.status is WorkflowStatus.ROLLED_BACK
    names = [c[0] for c in calls]
    assert names == ["step_start", "step_complete", "step_start", "step_error", "workflow_error"]
    step, ctx, error = calls[3][1]
    assert step == "two" and isinstance(error, KeyError)
    assert calls[4][1][1] is bad.error


def test_hooks_may_be_given_as_an_object_with_attributes() -> None:
    seen: list[str] = []

    class Hooks:
        def step_start(self, step: str, ctx: WorkflowContext) -> None:
            seen.append(step)

    engine = FluxEngine(on=Hooks())
    assert engine.emitter.has_hook("step_start")
    assert not engine.emitter.has_hook("step_error")


# -- hooks that raise -------------------------------------------------------------------------


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("hook", SUCCESS_HOOKS)
async def test_raising_hook_on_success_is_logged_and_changes_nothing(
    hook: str, is_async: bool, store_factory: Callable[[], Any]
) -> None:
    baseline = outcome(*await run(success_flow(), store_factory()))
    logger = RecordingLogger()
    result, state = await run(
        success_flow(), store_factory(), logger=logger, on={hook: raising_hook(hook, is_async)}
    )
    assert result.status is WorkflowStatus.COMPLETED
    assert result.error is None
    assert outcome(result, state) == baseline
    failures = [m for m in logger.errors() if f"hook {hook} failed" in m]
    expected = 2 if hook.startswith("step_") else 1  # once per step / once per run
    assert len(failures) == expected
    assert all(f"{hook} exploded" in m and "HookBoom" in m for m in failures)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("hook", FAILURE_HOOKS)
async def test_raising_hook_on_failure_is_logged_and_changes_nothing(
    hook: str, is_async: bool, store_factory: Callable[[], Any]
) -> None:
    baseline = outcome(*await run(failure_flow(), store_factory()))
    logger = RecordingLogger()
    result, state = await run(
        failure_flow(), store_factory(), logger=logger, on={hook: raising_hook(hook, is_async)}
    )
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert isinstance(result.error, KeyError)  # still the step's own exception
    assert outcome(result, state) == baseline
    assert any(f"hook {hook} failed" in m and f"{hook} exploded" in m for m in logger.errors())


async def test_all_hooks_raising_at_once_still_complete(store_factory: Callable[[], Any]) -> None:
    logger = RecordingLogger()
    on = {name: raising_hook(name, i % 2 == 0) for i, name in enumerate(HOOKS)}
    result, state = await run(success_flow(), store_factory(), logger=logger, on=on)
    assert result.status is WorkflowStatus.COMPLETED
    assert state.status is WorkflowStatus.COMPLETED
    assert result.data == state.data == {"n": 2}
    result, state = await run(failure_flow(), store_factory(), logger=logger, on=on)
    assert result.status is state.status is WorkflowStatus.ROLLED_BACK
    logged = "\n".join(logger.errors())
    for name in HOOKS:
        assert f"hook {name} failed" in logged


async def test_hook_failure_goes_to_the_stdlib_fluxrun_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="fluxrun")
    result, _ = await run(success_flow(), on={"step_complete": raising_hook("step_complete", True)})
    assert result.status is WorkflowStatus.COMPLETED
    records = [r for r in caplog.records if "hook step_complete failed" in r.getMessage()]
    assert len(records) == 2
    for record in records:
        assert record.name == "fluxrun"
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None and isinstance(record.exc_info[1], HookBoom)


async def test_a_broken_logger_does_not_break_the_run_either() -> None:
    class BrokenLogger(RecordingLogger):
        def error(self, message: str) -> None:
            raise OSError("log disk full")

        def warn(self, message: str) -> None:
            raise OSError("log disk full")

    on = {name: raising_hook(name, False) for name in HOOKS}
    result, state = await run(failure_flow(), logger=BrokenLogger(), on=on, trace=FailingSink())
    assert result.status is state.status is WorkflowStatus.ROLLED_BACK


# -- sinks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink_cls", [ListSink, AsyncListSink], ids=["sync", "async"])
async def test_sync_and_async_sinks_receive_every_event(sink_cls: type[ListSink]) -> None:
    sink = sink_cls()
    result, _ = await run(success_flow(), trace=sink)
    assert result.status is WorkflowStatus.COMPLETED
    assert sink.types() == [
        "workflow:start",
        "step:start",
        "step:complete",
        "step:start",
        "step:complete",
        "workflow:complete",
    ]
    assert all(e.workflow_id == result.id for e in sink.events)


@pytest.mark.parametrize("bad", [FailingSink, AsyncFailingSink], ids=["sync", "async"])
@pytest.mark.parametrize("flow", [success_flow, failure_flow], ids=["success", "failure"])
async def test_raising_sink_is_logged_and_changes_nothing(
    bad: type, flow: Callable[[], Any], store_factory: Callable[[], Any]
) -> None:
    reference = ListSink()
    baseline = outcome(*await run(flow(), store_factory(), trace=reference))
    logger = RecordingLogger()
    after = ListSink()
    result, state = await run(flow(), store_factory(), logger=logger, trace=[bad(), after])
    assert outcome(result, state) == baseline
    # The sink after the broken one still got every event.
    assert after.types() == reference.types()
    failures = [m for m in logger.errors() if "trace sink" in m]
    assert len(failures) == len(reference.events)
    assert all("broke on" in m for m in failures)
    assert any("failed on workflow:start" in m for m in failures)


async def test_sink_failure_goes_to_the_stdlib_fluxrun_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="fluxrun")
    result, _ = await run(success_flow(), trace=AsyncFailingSink())
    assert result.status is WorkflowStatus.COMPLETED
    records = [r for r in caplog.records if "trace sink" in r.getMessage()]
    assert len(records) == 6
    assert all(r.name == "fluxrun" and r.levelno == logging.ERROR for r in records)
    assert all(r.exc_info is not None and isinstance(r.exc_info[1], ValueError) for r in records)


async def test_closed_json_sink_is_logged_and_changes_nothing(tmp_path: Path) -> None:
    sink = JsonFileTraceSink(tmp_path / "trace.ndjson")
    sink.close()
    logger = RecordingLogger()
    result, state = await run(success_flow(), logger=logger, trace=sink)
    assert result.status is state.status is WorkflowStatus.COMPLETED
    assert any("is closed" in m for m in logger.errors())


# -- JsonFileTraceSink -------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Path, JsonFileTraceSink, ListSink]]:
    path = tmp_path / "nested" / "dir" / "trace.ndjson"
    sink = JsonFileTraceSink(path)
    yield path, sink, ListSink()
    sink.close()


async def test_json_sink_writes_one_line_per_event_in_to_dict_shape(
    traced: tuple[Path, JsonFileTraceSink, ListSink],
) -> None:
    path, sink, mirror = traced
    result, _ = await run(failure_flow(), trace=[sink, mirror])
    assert result.status is WorkflowStatus.ROLLED_BACK
    lines = read_lines(path)
    assert len(lines) == len(mirror.events) > 5
    for line, event in zip(lines, mirror.events, strict=True):
        assert line == event.to_dict()
    first = lines[0]
    assert first["type"] == "workflow:start"
    assert first["workflowId"] == result.id
    assert first["workflowName"] == "hooks-fail"
    assert first["input"] == {"order": "A1"}
    error = next(line for line in lines if line["type"] == "step:error")
    assert error["stepName"] == "two" and error["stepIndex"] == 1
    assert "card declined" in error["error"]
    assert isinstance(error["duration"], int | float)
    assert not any("step_name" in line or "workflow_id" in line for line in lines)


async def test_json_sink_is_readable_while_the_run_is_going(
    traced: tuple[Path, JsonFileTraceSink, ListSink],
) -> None:
    path, sink, _ = traced
    seen: dict[str, list[tuple[str, str | None]]] = {}

    def snapshot() -> list[tuple[str, str | None]]:
        return [(line["type"], line.get("stepName")) for line in read_lines(path)]

    def first(ctx: WorkflowContext) -> None:
        seen["in first"] = snapshot()

    async def second(ctx: WorkflowContext) -> None:
        seen["in second"] = snapshot()

    def on_step_complete(step: str, ctx: WorkflowContext, result: Any) -> None:
        seen[f"hook {step}"] = snapshot()

    async def on_workflow_complete(ctx: WorkflowContext) -> None:
        seen["hook workflow"] = snapshot()

    flow = create_workflow("live").step("first", first).step("second", second)
    hooks = {"step_complete": on_step_complete, "workflow_complete": on_workflow_complete}
    result, _ = await run(flow, trace=sink, on=hooks)
    assert result.status is WorkflowStatus.COMPLETED
    assert seen["in first"] == [("workflow:start", None), ("step:start", "first")]
    assert seen["hook first"] == seen["in first"]
    assert seen["in second"] == [
        ("workflow:start", None),
        ("step:start", "first"),
        ("step:complete", "first"),
        ("step:start", "second"),
    ]
    assert seen["hook workflow"] == [*seen["in second"], ("step:complete", "second")]
    assert snapshot() == [*seen["hook workflow"], ("workflow:complete", None)]


async def test_json_sink_reset_true_truncates(tmp_path: Path) -> None:
    path = tmp_path / "trace.ndjson"
    path.write_text('{"old": 1}\n{"old": 2}\n', encoding="utf-8")
    sink = JsonFileTraceSink(path, reset=True)
    assert path.read_text(encoding="utf-8") == ""
    await run(success_flow(), trace=sink)
    sink.close()
    lines = read_lines(path)
    assert all("old" not in line for line in lines)
    assert lines[0]["type"] == "workflow:start"


async def test_json_sink_truncates_by_default(tmp_path: Path) -> None:
    path = tmp_path / "trace.ndjson"
    path.write_text("stale\n", encoding="utf-8")
    JsonFileTraceSink(path).close()
    assert path.read_text(encoding="utf-8") == ""


async def test_json_sink_reset_false_appends(tmp_path: Path) -> None:
    path = tmp_path / "trace.ndjson"
    first = JsonFileTraceSink(path)
    one, _ = await run(success_flow(), trace=first)
    first.close()
    count = len(read_lines(path))
    second = JsonFileTraceSink(path, reset=False)
    two, _ = await run(success_flow(), trace=second)
    second.close()
    lines = read_lines(path)
    assert len(lines) == 2 * count
    assert {line["workflowId"] for line in lines[:count]} == {one.id}
    assert {line["workflowId"] for line in lines[count:]} == {two.id}


async def test_json_sink_writes_typed_values_as_json(tmp_path: Path) -> None:
    path = tmp_path / "trace.ndjson"
    sink = JsonFileTraceSink(path)

    def typed(ctx: WorkflowContext) -> None:
        ctx.data["when"] = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
        ctx.data["amount"] = Decimal("9.99")
        ctx.data["pair"] = (1, "x")
        ctx.data["text"] = "naïve ☃ 🚀"

    result, _ = await run(create_workflow("typed").step("typed", typed), trace=sink)
    sink.close()
    assert result.status is WorkflowStatus.COMPLETED
    done = read_lines(path)[-1]
    assert done["type"] == "workflow:complete"
    assert done["data"] == {
        "when": "2024-05-01T12:00:00+00:00",
        "amount": "9.99",
        "pair": [1, "x"],
        "text": "naïve ☃ 🚀",
    }


def test_json_sink_emit_after_close_raises_clear_error(tmp_path: Path) -> None:
    sink = JsonFileTraceSink(tmp_path / "t.ndjson")
    sink.close()
    sink.close()  # idempotent
    event = FluxTraceEvent(type="workflow:start", timestamp=1.0, workflow_id="i", workflow_name="n")
    with pytest.raises(InvalidArgumentError, match="closed"):
        sink.emit(event)
