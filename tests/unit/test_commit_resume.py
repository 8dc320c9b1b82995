"""SPEC §2 rules 14-16: commit steps, ``resume`` and ``retry_step``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fluxrun import (
    CommittedStepError,
    ConcurrentModificationError,
    FluxEngine,
    FluxTraceEvent,
    InvalidStateError,
    InvalidStepIndexError,
    MemoryStorage,
    RetryPolicy,
    RunBusyError,
    SQLiteStorage,
    StepNotFoundError,
    StepStatus,
    WorkflowContext,
    WorkflowDefinitionChangedError,
    WorkflowNameMismatchError,
    WorkflowStatus,
    create_workflow,
)
from fluxrun.errors import InvalidArgumentError

FAST = RetryPolicy(initial_delay=0, jitter=False)


class ListSink:
    def __init__(self) -> None:
        self.events: list[FluxTraceEvent] = []

    def emit(self, event: FluxTraceEvent) -> None:
        self.events.append(event)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    """A new store object on the same backing data at every call."""
    if request.param == "memory":
        shared = MemoryStorage()
        return lambda: shared
    return lambda: SQLiteStorage(tmp_path / "flux.db", synchronous="NORMAL")


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
async def engine(make_store: Callable[[], Any], sink: ListSink) -> AsyncIterator[FluxEngine]:
    async with FluxEngine(storage=make_store(), retry_policy=FAST, trace=sink) as e:
        yield e


class Switch:
    """Makes a step fail until told otherwise, and counts calls per step."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.calls: dict[str, int] = {}
        self.seen_data: dict[str, list[dict[str, Any]]] = {}

    def step(self, name: str, body: Callable[[WorkflowContext], None] | None = None) -> Any:
        def handler(ctx: WorkflowContext) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.seen_data.setdefault(name, []).append(_copy(ctx.data))
            if body is not None:
                body(ctx)
            if name in self.failing:
                raise RuntimeError(f"{name} failed")
            return f"{name} output"

        return handler


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in data.items()}


def commit_flow(sw: Switch) -> Any:
    """a -> c (commit) -> b."""

    def a(ctx: WorkflowContext) -> None:
        ctx.data["a"] = ctx.data.get("a", 0) + 1

    def c(ctx: WorkflowContext) -> None:
        ctx.data["charged"] = "ch_123"
        ctx.data["log"] = [*ctx.data.get("log", []), "charge"]

    return (
        create_workflow("order")
        .step("a", sw.step("a", a))
        .commit("c", sw.step("c", c))
        .step("b", sw.step("b"))
    )


def history(state: Any) -> list[tuple[str, str]]:
    return [(h.name, h.status.value) for h in state.history]


# -- rule 14: commit steps ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["resume", "retry_step"])
async def test_commit_step_is_passed_over_when_restarting_from_an_earlier_step(
    engine: FluxEngine, sink: ListSink, how: str
) -> None:
    sw = Switch()
    sw.failing.add("b")
    flow = commit_flow(sw)
    first = await engine.execute(flow)
    assert first.status is WorkflowStatus.FAILED
    assert sw.calls == {"a": 1, "c": 1, "b": 1}
    before = await engine.get(first.id)
    assert before is not None
    committed = before.history[1]

    sw.failing.clear()
    sink.events.clear()
    if how == "resume":
        result = await engine.resume(flow, first.id, from_step="a")
    else:
        result = await engine.retry_step(flow, first.id, "a")
    assert result is not None
    assert result.status is WorkflowStatus.COMPLETED
    assert sw.calls == {"a": 2, "c": 1, "b": 2}  # the commit step never ran again

    skipped = [e for e in sink.events if e.type == "step:skipped"]
    assert len(skipped) == 1
    assert skipped[0].step_name == "c"
    assert skipped[0].step_index == 1
    assert skipped[0].meta == {"reason": "committed"}
    assert [e.type for e in sink.events if e.step_name == "c"] == ["step:skipped"]

    # Its data changes are still visible to the later steps, and kept in the run's data.
    assert sw.seen_data["b"][-1] == {"a": 1, "charged": "ch_123", "log": ["charge"]}
    assert result.data == {"a": 1, "charged": "ch_123", "log": ["charge"]}
    after = await engine.get(first.id)
    assert after is not None
    assert after.data == result.data
    # Its history entry is the one recorded when it ran.
    assert after.history[1] == committed
    assert after.history[1].output == "c output"
    assert history(after) == [("a", "completed"), ("c", "completed"), ("b", "completed")]


async def test_retry_step_naming_a_completed_commit_step_raises(engine: FluxEngine) -> None:
    sw = Switch()
    sw.failing.add("b")
    flow = commit_flow(sw)
    first = await engine.execute(flow)
    before = await engine.get(first.id)
    with pytest.raises(CommittedStepError) as info:
        await engine.retry_step(flow, first.id, "c")
    assert "'c'" in str(info.value) and "commit" in str(info.value)
    assert info.value.step == "c"
    assert info.value.workflow_id == first.id
    with pytest.raises(CommittedStepError):
        await engine.resume(flow, first.id, from_step=1)
    assert await engine.get(first.id) == before  # nothing was written
    assert sw.calls == {"a": 1, "c": 1, "b": 1}


async def test_a_commit_step_that_failed_may_run_again(engine: FluxEngine) -> None:
    sw = Switch()
    sw.failing.add("c")
    flow = commit_flow(sw)
    first = await engine.execute(flow)
    assert first.status is WorkflowStatus.FAILED
    sw.failing.clear()
    result = await engine.retry_step(flow, first.id, "c")
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    assert sw.calls == {"a": 1, "c": 2, "b": 1}


async def test_commit_step_passed_over_twice_keeps_its_changes(engine: FluxEngine) -> None:
    sw = Switch()
    sw.failing.add("b")
    flow = commit_flow(sw)
    first = await engine.execute(flow)
    again = await engine.resume(flow, first.id, from_step=0)
    assert again is not None and again.status is WorkflowStatus.FAILED
    sw.failing.clear()
    done = await engine.resume(flow, first.id, from_step="a")
    assert done is not None and done.status is WorkflowStatus.COMPLETED
    assert sw.calls == {"a": 3, "c": 1, "b": 3}
    assert done.data["log"] == ["charge"]


# -- rule 15: resume ---------------------------------------------------------------------------


def three_steps(sw: Switch, name: str = "three") -> Any:
    """s0 -> s1 -> s2, each changing ctx.data (in place too)."""

    def s0(ctx: WorkflowContext) -> None:
        ctx.data["n"] = 0
        ctx.data["log"] = ["s0"]

    def s1(ctx: WorkflowContext) -> None:
        ctx.data["n"] = 1
        ctx.data["log"].append("s1")
        ctx.data["tmp"] = {"from": "s1"}

    def s2(ctx: WorkflowContext) -> None:
        ctx.data["n"] = 2
        ctx.data["log"].append("s2")
        del ctx.data["tmp"]

    return (
        create_workflow(name)
        .step("s0", sw.step("s0", s0))
        .step("s1", sw.step("s1", s1))
        .step("s2", sw.step("s2", s2))
    )


async def failed_run(engine: FluxEngine, sw: Switch, flow: Any) -> str:
    sw.failing.add("s2")
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.FAILED
    sw.failing.clear()
    return result.id


async def test_resume_unknown_id_returns_none(engine: FluxEngine) -> None:
    flow = three_steps(Switch())
    assert await engine.resume(flow, "no-such-run") is None
    assert await engine.retry_step(flow, "no-such-run", "s1") is None
    assert await engine.list() == []


async def test_resume_with_another_workflow_name_raises(engine: FluxEngine) -> None:
    sw = Switch()
    run_id = await failed_run(engine, sw, three_steps(sw))
    before = await engine.get(run_id)
    other = three_steps(Switch(), name="other")
    with pytest.raises(WorkflowNameMismatchError) as info:
        await engine.resume(other, run_id)
    assert "'three'" in str(info.value) and "'other'" in str(info.value)
    with pytest.raises(WorkflowNameMismatchError):
        await engine.retry_step(other, run_id, "s1")
    assert await engine.get(run_id) == before


def _noop(ctx: WorkflowContext) -> None:
    return None


CHANGED_SHAPES = {
    "added": ["s0", "s1", "s2", "s3"],
    "added-in-middle": ["s0", "new", "s1", "s2"],
    "removed": ["s0", "s1"],
    "renamed": ["s0", "s1", "s2b"],
    "reordered": ["s0", "s2", "s1"],
}


@pytest.mark.parametrize("shape", list(CHANGED_SHAPES))
async def test_resume_after_definition_changed_raises(engine: FluxEngine, shape: str) -> None:
    sw = Switch()
    run_id = await failed_run(engine, sw, three_steps(sw))
    before = await engine.get(run_id)
    builder = create_workflow("three")
    for step in CHANGED_SHAPES[shape]:
        builder.step(step, _noop)
    with pytest.raises(WorkflowDefinitionChangedError) as info:
        await engine.resume(builder, run_id)
    assert info.value.workflow_id == run_id
    assert "s0" in str(info.value)  # it shows the step lists
    with pytest.raises(WorkflowDefinitionChangedError):
        await engine.retry_step(builder, run_id, "s0")
    assert await engine.get(run_id) == before


async def test_resume_with_same_step_names_but_new_handlers_is_allowed(
    engine: FluxEngine,
) -> None:
    sw = Switch()
    run_id = await failed_run(engine, sw, three_steps(sw))
    fixed = create_workflow("three").step("s0", _noop).step("s1", _noop).step("s2", _noop)
    result = await engine.resume(fixed, run_id)
    assert result is not None and result.status is WorkflowStatus.COMPLETED


@pytest.mark.parametrize("from_step", [1, "s1"], ids=["index", "name"])
async def test_resume_from_step_by_index_or_name(engine: FluxEngine, from_step: Any) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    result = await engine.resume(flow, run_id, from_step=from_step)
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    assert sw.calls == {"s0": 1, "s1": 2, "s2": 2}
    # ctx.data as it was when s1 first started, not as s1/s2 left it.
    assert sw.seen_data["s1"] == [{"n": 0, "log": ["s0"]}, {"n": 0, "log": ["s0"]}]
    assert result.data == {"n": 2, "log": ["s0", "s1", "s2"]}


async def test_resume_without_from_step_restarts_where_the_run_stopped(
    engine: FluxEngine,
) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    result = await engine.resume(flow, run_id)
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    assert sw.calls == {"s0": 1, "s1": 1, "s2": 2}
    expected = {"n": 1, "log": ["s0", "s1"], "tmp": {"from": "s1"}}
    assert sw.seen_data["s2"] == [expected, expected]  # its failed attempt's changes are gone
    state = await engine.get(run_id)
    assert state is not None and state.data == {"n": 2, "log": ["s0", "s1", "s2"]}


async def test_resume_from_first_step_restores_empty_data(engine: FluxEngine) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    result = await engine.resume(flow, run_id, from_step=0)
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    assert sw.seen_data["s0"] == [{}, {}]


async def test_resume_unknown_step_name_raises(engine: FluxEngine) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    before = await engine.get(run_id)
    with pytest.raises(StepNotFoundError) as info:
        await engine.resume(flow, run_id, from_step="nope")
    assert "nope" in str(info.value) and info.value.step == "nope"
    with pytest.raises(StepNotFoundError):
        await engine.retry_step(flow, run_id, "S1")  # names are case-sensitive
    assert await engine.get(run_id) == before


@pytest.mark.parametrize("index", [3, 4, -1, -3, 10**20])
async def test_resume_index_out_of_range_raises(engine: FluxEngine, index: int) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    before = await engine.get(run_id)
    with pytest.raises(InvalidStepIndexError) as info:
        await engine.resume(flow, run_id, from_step=index)
    assert str(index) in str(info.value)
    assert await engine.get(run_id) == before


@pytest.mark.parametrize("bad", [1.0, True, object(), ["s1"], b"s1"])
async def test_resume_from_step_of_wrong_type_raises(engine: FluxEngine, bad: Any) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    with pytest.raises(InvalidArgumentError, match="from_step"):
        await engine.resume(flow, run_id, from_step=bad)


async def test_resume_resets_entries_from_the_restart_point_to_pending(
    engine: FluxEngine,
) -> None:
    sw = Switch()
    observed: dict[str, Any] = {}

    async def s1(ctx: WorkflowContext) -> None:
        if "stored" not in observed and sw.calls.get("s1x"):
            observed["stored"] = await engine.get(ctx.id)
            observed["ctx"] = ctx.history
        sw.calls["s1x"] = sw.calls.get("s1x", 0) + 1

    def s2(ctx: WorkflowContext) -> None:
        if not observed:
            raise RuntimeError("first time fails")

    flow = (
        create_workflow("reset")
        .step("s0", lambda ctx: "zero")
        .step("s1", s1)
        .step("s2", s2, retries=1)
        .step("s3", _noop)
    )
    first = await engine.execute(flow)
    assert first.status is WorkflowStatus.FAILED
    before = await engine.get(first.id)
    assert before is not None
    assert before.history[2].error is not None and before.history[2].retries == 1

    result = await engine.resume(flow, first.id, from_step="s1")
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    stored = observed["stored"]
    assert stored.history[0] == before.history[0]  # before the restart point: untouched
    for entries in (stored.history, observed["ctx"]):
        for h in entries[1:]:
            assert h.status is StepStatus.PENDING
            assert h.output is None and h.error is None
            assert h.started_at is None and h.completed_at is None
            assert h.suspended_at is None and h.compensated_at is None
            assert h.duration_ms is None and h.retries == 0 and h.waiting_for is None
    assert stored.error is None and stored.completed_at is None
    assert stored.status not in (WorkflowStatus.FAILED, WorkflowStatus.COMPLETED)
    assert stored.created_at == before.created_at


async def test_resume_restores_data_of_the_first_start_after_several_resumes(
    engine: FluxEngine,
) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    sw.failing.add("s2")
    again = await engine.resume(flow, run_id, from_step="s2")
    assert again is not None and again.status is WorkflowStatus.FAILED
    sw.failing.clear()
    result = await engine.resume(flow, run_id, from_step="s2")
    assert result is not None and result.status is WorkflowStatus.COMPLETED
    expected = {"n": 1, "log": ["s0", "s1"], "tmp": {"from": "s1"}}
    assert sw.seen_data["s2"] == [expected] * 3


async def test_resume_of_a_suspended_run_restarts_its_waiting_step(engine: FluxEngine) -> None:
    from fluxrun import wait

    calls: list[str] = []

    def ask(ctx: WorkflowContext) -> Any:
        calls.append("ask")
        ctx.data["asked"] = len(calls)
        return wait("approve")

    flow = create_workflow("approve").step("ask", ask).step("after", _noop)
    first = await engine.execute(flow)
    assert first.status is WorkflowStatus.SUSPENDED
    again = await engine.resume(flow, first.id)
    assert again is not None and again.status is WorkflowStatus.SUSPENDED
    assert calls == ["ask", "ask"]
    assert again.data == {"asked": 2}


# -- rule 15: a run another executor owns now --------------------------------------------------


@pytest.mark.parametrize("who", ["same-engine", "second-engine"])
@pytest.mark.parametrize("how", ["resume", "retry_step"])
async def test_resume_of_a_run_being_executed_is_refused(
    engine: FluxEngine, make_store: Callable[[], Any], who: str, how: str
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()
    calls: list[int] = []

    async def blocked(ctx: WorkflowContext) -> None:
        calls.append(ctx.attempt)
        ctx.data["blocked"] = True
        entered.set()
        await release.wait()

    flow = create_workflow("busy").step("first", _noop).step("blocked", blocked)
    task = asyncio.create_task(engine.execute(flow))
    try:
        await asyncio.wait_for(entered.wait(), 10)
        [running] = await engine.list()
        before = await engine.get(running.id)

        async def attempt(other: FluxEngine) -> Any:
            if how == "resume":
                return await other.resume(flow, running.id, from_step=0)
            return await other.retry_step(flow, running.id, "first")

        if who == "same-engine":
            with pytest.raises(RunBusyError) as info:
                await attempt(engine)
        else:
            async with FluxEngine(storage=make_store(), retry_policy=FAST) as second:
                with pytest.raises(RunBusyError) as info:
                    await attempt(second)
        assert isinstance(info.value, ConcurrentModificationError)
        assert running.id in str(info.value)
        assert await engine.get(running.id) == before  # nothing was written
    finally:
        release.set()
        result = await asyncio.wait_for(task, 10)
    assert result.status is WorkflowStatus.COMPLETED
    assert calls == [1]
    assert result.data == {"blocked": True}


# -- rule 15: rolled back runs -----------------------------------------------------------------


async def test_resume_of_rolled_back_run_after_a_compensated_step_raises(
    engine: FluxEngine,
) -> None:
    undone: list[str] = []

    def pay(ctx: WorkflowContext) -> None:
        ctx.data["paid"] = True

    def refund(ctx: WorkflowContext) -> None:
        undone.append("pay")
        ctx.data["paid"] = False

    def ship(ctx: WorkflowContext) -> None:
        raise RuntimeError("no stock")

    flow = create_workflow("saga").step("pay", pay, compensate=refund).step("ship", ship)
    first = await engine.execute(flow)
    assert first.status is WorkflowStatus.ROLLED_BACK
    before = await engine.get(first.id)
    for from_step in ("ship", 1):
        with pytest.raises(InvalidStateError) as info:
            await engine.resume(flow, first.id, from_step=from_step)
        assert "pay" in str(info.value) and "compensated" in str(info.value)
    with pytest.raises(InvalidStateError):
        await engine.retry_step(flow, first.id, "ship")
    assert await engine.get(first.id) == before
    # From the compensated step itself or earlier the run may start again.
    again = await engine.resume(flow, first.id, from_step="pay")
    assert again is not None and again.status is WorkflowStatus.ROLLED_BACK
    assert undone == ["pay", "pay"]


# -- rule 16: retry_step = resume from that step -----------------------------------------------


async def test_retry_step_is_resume_from_that_step(engine: FluxEngine) -> None:
    results = {}
    for how in ("retry_step", "resume"):
        sw = Switch()
        flow = three_steps(sw, name=f"three-{how}")
        run_id = await failed_run(engine, sw, flow)
        if how == "retry_step":
            result = await engine.retry_step(flow, run_id, "s1")
        else:
            result = await engine.resume(flow, run_id, from_step="s1")
        assert result is not None
        state = await engine.get(run_id)
        assert state is not None
        results[how] = (result.status, result.data, sw.calls, sw.seen_data, history(state))
    assert results["retry_step"] == results["resume"]


@pytest.mark.parametrize("bad", [1, None, 1.5, ["s1"]])
async def test_retry_step_requires_a_step_name(engine: FluxEngine, bad: Any) -> None:
    sw = Switch()
    flow = three_steps(sw)
    run_id = await failed_run(engine, sw, flow)
    with pytest.raises(InvalidArgumentError, match="step name"):
        await engine.retry_step(flow, run_id, bad)
