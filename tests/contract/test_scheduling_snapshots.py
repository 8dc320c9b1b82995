"""SPEC §5, continuing a run costs what it needs: a run that stops to wait keeps a snapshot
of ``ctx.data`` and ``ctx.signals``, and continuing it (a signal, a wake-up, a claim) reads
that and the step rows from the snapshot on, not the whole history. What the steps see is
the same as if the run had been read whole: data, signals, history (read when a step asks
for it), and a rollback compensates the steps before the snapshot too. On every store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sched_support import HANG, Engines, Log, finished, stored_as, until

from fluxrun import (
    FluxEngine,
    StepStatus,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import Store

S = StepStatus


def _seen(ctx: WorkflowContext) -> dict[str, Any]:
    return {
        "data": dict(ctx.data),
        "signals": dict(ctx.signals),
        "history": [(h.name, h.status.value, h.output) for h in ctx.history],
    }


def _flow(name: str, log: Log, look: Callable[[WorkflowContext], Any]) -> Any:
    def first(ctx: WorkflowContext) -> None:
        ctx.data.update(a=1, b=[1, 2], gone="soon")
        log.lines.append("first")

    def wait_one(ctx: WorkflowContext) -> Any:
        ctx.data["c"] = "set before the wait"
        return wait("one")

    def middle(ctx: WorkflowContext) -> Any:
        del ctx.data["gone"]
        ctx.data["d"] = {"n": 4}
        return wait("two")

    return (
        create_workflow(name)
        .step("first", first, compensate=log.undo("first"))
        .step("wait one", wait_one, compensate=log.undo("wait one"))
        .step("middle", middle, compensate=log.undo("middle"))
        .step("look", look)
    )


EXPECTED_DATA = {"a": 1, "b": [1, 2], "c": "set before the wait", "d": {"n": 4}}
EXPECTED_HISTORY = [
    ("first", "completed", None),
    ("wait one", "completed", {"by": "ann"}),
    ("middle", "completed", {"by": "bob"}),
    ("look", "pending", None),  # not recorded while it runs
]


async def _to_second_wait(engine: FluxEngine, flow: Any) -> str:
    """Start the run and take it to its second wait through the inbox; the run is stored
    with a snapshot at that wait."""
    handle = await engine.start(flow, {})
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    await engine.send_signal(handle.id, "one", {"by": "ann"})

    async def at_second() -> bool:
        row = await engine.storage.load(handle.id)
        return row is not None and row.current_step == 2 and row.owner is None

    await until(at_second, "run suspended at its second wait")
    tail = await engine.storage.load_tail(handle.id)
    assert tail is not None and tail.snapshot is not None and tail.steps_from == 2
    return handle.id


async def test_a_continued_run_sees_what_a_whole_read_would_give(engines: Engines) -> None:
    seen: list[dict[str, Any]] = []

    def look(ctx: WorkflowContext) -> None:
        seen.append(_seen(ctx))

    engine = await engines.open()
    flow = _flow("snap-sync", Log(), look)
    run_id = await _to_second_wait(engine, flow)
    await engine.send_signal(run_id, "two", {"by": "bob"})
    result = await finished(engine, run_id)
    assert result.status is WorkflowStatus.COMPLETED
    assert seen == [
        {
            "data": EXPECTED_DATA,
            "signals": {"one": {"by": "ann"}, "two": {"by": "bob"}},
            "history": EXPECTED_HISTORY,
        }
    ]
    assert result.data == EXPECTED_DATA
    assert [h.status for h in result.history] == [S.COMPLETED] * 4


async def test_an_async_step_reads_the_history_of_a_continued_run(engines: Engines) -> None:
    seen: list[dict[str, Any]] = []

    async def look(ctx: WorkflowContext) -> None:
        await asyncio.sleep(0)
        seen.append(_seen(ctx))

    engine = await engines.open()
    flow = _flow("snap-async", Log(), look)
    run_id = await _to_second_wait(engine, flow)
    # signal(): continued here, and its result holds the whole history.
    result = await engine.signal(flow, run_id, "two", {"by": "bob"})
    assert result.status is WorkflowStatus.COMPLETED
    assert seen[0]["history"] == EXPECTED_HISTORY
    assert seen[0]["data"] == EXPECTED_DATA
    assert [(h.name, h.status, h.output) for h in result.history] == [
        ("first", S.COMPLETED, None),
        ("wait one", S.COMPLETED, {"by": "ann"}),
        ("middle", S.COMPLETED, {"by": "bob"}),
        ("look", S.COMPLETED, None),
    ]
    assert result.data == EXPECTED_DATA


async def test_a_failure_after_a_continuation_compensates_the_steps_before_it(
    engines: Engines,
) -> None:
    log = Log()

    def look(ctx: WorkflowContext) -> None:
        raise RuntimeError("no")

    engine = await engines.open()
    flow = _flow("snap-fail", log, look)
    run_id = await _to_second_wait(engine, flow)
    await engine.send_signal(run_id, "two", {"by": "bob"})
    result = await finished(engine, run_id)
    assert result.status is WorkflowStatus.ROLLED_BACK
    assert log.lines == ["first", "undo middle", "undo wait one", "undo first"]
    assert [h.status for h in result.history] == [S.COMPENSATED] * 3 + [S.FAILED]


async def test_cancelling_a_run_waiting_past_its_snapshot_compensates_every_step(
    engines: Engines,
) -> None:
    log = Log()
    engine = await engines.open()
    flow = _flow("snap-cancel", log, lambda ctx: None)
    run_id = await _to_second_wait(engine, flow)
    await engine.cancel(run_id, reason="changed my mind")
    result = await finished(engine, run_id)
    assert result.status is WorkflowStatus.CANCELLED
    assert log.lines == ["first", "undo wait one", "undo first"]


async def test_a_timed_out_wait_throws_away_what_its_attempt_changed(engines: Engines) -> None:
    seen: list[Any] = []

    def waits(ctx: WorkflowContext) -> Any:
        seen.append(sorted(ctx.data))
        ctx.data["half"] = ctx.attempt
        return wait("never", timeout=0.2 if ctx.attempt == 1 else HANG * 10)

    engine = await engines.open()
    flow = create_workflow("snap-timeout").step("a", lambda ctx: ctx.data.update(a=1))
    flow = flow.step("w", waits, retries=1)
    handle = await engine.start(flow, {})

    async def second_attempt() -> bool:
        return len(seen) == 2

    await until(second_attempt, "the wait's second attempt")
    assert seen == [["a"], ["a"]]  # the first attempt's "half" is gone
    await engine.cancel(handle.id)


class _Counting:
    """Counts the step rows the engine reads through a store's read methods."""

    def __init__(self, store: Store) -> None:
        self.rows = 0
        for name in ("load", "load_tail", "load_steps", "list_runs"):
            setattr(store, name, self._wrap(getattr(store, name)))
        blocking = store.read_steps_blocking

        def read_blocking(run_id: str, before: int) -> Any:
            got = blocking(run_id, before)
            self.rows += len(got)
            return got

        store.read_steps_blocking = read_blocking  # type: ignore[method-assign]

    def _wrap(self, method: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            got = await method(*args, **kwargs)
            for row in got if isinstance(got, list) else [got]:
                if row is not None:
                    self.rows += len(row.steps) if hasattr(row, "steps") else len(row)
            return got

        return counted


async def test_continuing_a_long_run_reads_only_its_tail(engines: Engines) -> None:
    done = asyncio.Event()
    flow = create_workflow("snap-long")
    for i in range(60):
        flow = flow.step(f"before {i}", lambda ctx, i=i: ctx.data.update({f"k{i % 3}": i}))
    flow = flow.step("wait", lambda ctx: wait("go"))
    flow = flow.step("end", lambda ctx: done.set())
    store = await engines.store()
    engine = await engines.open(storage=store)
    handle = await engine.start(flow, {})
    await stored_as(engine, handle.id, "suspended", wait_kind="signal")
    counting = _Counting(store)
    await engine.send_signal(handle.id, "go", None)
    await asyncio.wait_for(done.wait(), HANG)
    # The wait's own row (from the snapshot on), not the 60 rows before it.
    assert counting.rows <= 2, counting.rows
    result = await handle.result(timeout=HANG)  # asks for the whole history: reads it
    assert result.status is WorkflowStatus.COMPLETED
    assert len(result.history) == 62 and result.data == {"k0": 57, "k1": 58, "k2": 59}
