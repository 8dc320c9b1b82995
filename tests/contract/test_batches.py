"""Batches (SPEC §7) on every store: ``execute_batch`` / ``execute_many`` in process, and
durable ``start_batch`` batches shared by engines and surviving restarts.

No check here depends on timing: concurrency is shown by counting handlers running at
once (its maximum may never pass the limit), steps are held by events, and every wait has
a hang guard (``until`` / ``HANG``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sched_support import HANG, Engines, until

from fluxrun import (
    BatchItemNotRunError,
    BatchItemResult,
    InvalidInputError,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)


def _double(ctx: WorkflowContext) -> None:
    if ctx.input.get("fail"):
        raise RuntimeError(f"item {ctx.input['n']} fails")
    ctx.data["v"] = ctx.input["n"] * 2


DOUBLE = create_workflow("double").input(lambda i: isinstance(i, dict)).step("s", _double)


def _inputs(fails: list[bool]) -> list[dict[str, Any]]:
    return [{"n": i, "fail": f} for i, f in enumerate(fails)]


def _check_order(results: tuple[BatchItemResult, ...], fails: list[bool]) -> None:
    assert [r.index for r in results] == list(range(len(fails)))
    for r, fail in zip(results, fails, strict=True):
        assert r.input["n"] == r.index
        assert r.success is (not fail)
        assert r.status == ("failed" if fail else "succeeded")
        assert r.result is not None and r.run_id == r.result.id
        if fail:
            assert r.result.status is WorkflowStatus.FAILED and r.error is not None
            assert f"item {r.index} fails" in str(r.error)
        else:
            assert r.result.data == {"v": r.index * 2} and r.error is None


class Peak:
    """Counts handlers running at once; the first ``wave`` of them wait for each other, so
    the limit is reached (whatever the scheduling), and later ones run through."""

    def __init__(self, wave: int) -> None:
        self.active = 0
        self.peak = 0
        self.ran: Counter[int] = Counter()
        self._wave = wave
        self._full = asyncio.Event()

    def step(self) -> Any:
        async def run(ctx: WorkflowContext) -> None:
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                if self.active >= self._wave:
                    self._full.set()
                await asyncio.wait_for(self._full.wait(), HANG)
                await asyncio.sleep(0)  # let others start if any could (they must not)
            finally:
                self.active -= 1

        return run

    def commit(self) -> Any:
        def run(ctx: WorkflowContext) -> None:
            self.ran[ctx.input["n"]] += 1

        return run


# -- in process: execute_batch / execute_many -------------------------------------------------


async def test_results_come_in_input_order_with_failures_and_progress(engines: Engines) -> None:
    engine = await engines.open()
    fails = [i % 3 == 1 for i in range(12)]
    calls: list[tuple[int, int, int]] = []

    async def on_progress(done: int, total: int, item: BatchItemResult) -> None:
        calls.append((done, total, item.index))
        if done == 2:
            raise RuntimeError("a broken progress callback")

    result = await engine.execute_batch(
        DOUBLE, _inputs(fails), concurrency=4, on_progress=on_progress
    )
    assert (result.total, result.succeeded, result.failed) == (12, 8, 4)
    assert (result.waiting, result.not_run) == (0, 0)
    _check_order(result.results, fails)
    assert [c[0] for c in calls] == list(range(1, 13))  # once per item, done rising to total
    assert {c[1] for c in calls} == {12}
    assert sorted(c[2] for c in calls) == list(range(12))
    assert result.duration_ms >= 0


async def test_stop_on_error_leaves_the_rest_unrun(engines: Engines) -> None:
    engine = await engines.open()
    seen: list[int] = []
    fails = [i == 2 for i in range(8)]
    result = await engine.execute_batch(
        DOUBLE,
        _inputs(fails),
        concurrency=1,
        continue_on_error=False,
        on_progress=lambda done, total, item: seen.append(done),
    )
    assert [r.status for r in result.results] == ["succeeded"] * 2 + ["failed"] + ["not_run"] * 5
    assert (result.succeeded, result.failed, result.not_run) == (2, 1, 5)
    for r in result.results[3:]:
        assert r.result is None and r.run_id is None and not r.success
        assert isinstance(r.error, BatchItemNotRunError)
    assert seen == list(range(1, 9))  # not-run items are reported too
    assert len(await engine.list()) == 3  # no run was created for them


async def test_a_refused_input_fails_only_its_item(engines: Engines) -> None:
    engine = await engines.open()
    result = await engine.execute_batch(DOUBLE, [{"n": 0}, "not a dict", {"n": 2}])
    assert [r.status for r in result.results] == ["succeeded", "failed", "succeeded"]
    bad = result.results[1]
    assert isinstance(bad.error, InvalidInputError) and bad.result is None
    assert bad.input == "not a dict"


async def test_concurrency_is_never_exceeded(engines: Engines) -> None:
    engine = await engines.open()
    peak = Peak(3)
    flow = create_workflow("peak").step("work", peak.step()).commit("note", peak.commit())
    result = await engine.execute_batch(flow, [{"n": i} for i in range(10)], concurrency=3)
    assert result.succeeded == 10
    assert peak.peak == 3
    assert peak.ran == Counter(range(10))


async def test_execute_many_mixes_workflows(engines: Engines) -> None:
    engine = await engines.open()

    def shout(ctx: WorkflowContext) -> None:
        ctx.data["s"] = ctx.input.upper()

    other = create_workflow("shout").step("s", shout)
    engine.register(other)
    items = [(DOUBLE, {"n": 1}), ("shout", "hi"), (DOUBLE, {"n": 2, "fail": True}), (other, "x")]
    result = await engine.execute_many(items, concurrency=2)
    assert [r.status for r in result.results] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert [r.input for r in result.results] == [i[1] for i in items]
    data = [r.result.data if r.result else None for r in result.results]
    assert data[0] == {"v": 2} and data[1] == {"s": "HI"} and data[3] == {"s": "X"}


async def test_an_item_waiting_for_a_signal_is_reported_waiting(engines: Engines) -> None:
    engine = await engines.open()
    flow = create_workflow("waits").step("w", lambda ctx: wait("go") if ctx.input else None)
    result = await engine.execute_batch(
        flow, [False, True, False], continue_on_error=False, concurrency=1
    )
    assert [r.status for r in result.results] == ["succeeded", "waiting", "succeeded"]
    waiting = result.results[1]
    assert waiting.result is not None and waiting.result.status is WorkflowStatus.SUSPENDED
    assert waiting.error is None and not waiting.success
    assert (result.succeeded, result.failed, result.waiting) == (2, 0, 1)


# -- durable batches -----------------------------------------------------------------------------


async def test_durable_batch_results_and_progress(engines: Engines) -> None:
    engine = await engines.open()
    fails = [i % 4 == 3 for i in range(10)]
    handle = await engine.start_batch(DOUBLE, _inputs(fails), concurrency=3)
    result = await handle.results(timeout=HANG)
    _check_order(result.results, fails)
    progress = await handle.progress()
    assert progress.status == "completed" and progress.finished
    assert (progress.total, progress.succeeded, progress.failed) == (10, 8, 2)
    assert (progress.pending, progress.running, progress.not_run, progress.done) == (0, 0, 0, 10)
    again = await engine.batch_handle(handle.id).results(timeout=HANG)
    assert [r.run_id for r in again.results] == [r.run_id for r in result.results]


async def test_durable_batch_stops_on_error(engines: Engines) -> None:
    engine = await engines.open()
    fails = [i == 1 for i in range(6)]
    handle = await engine.start_batch(
        DOUBLE, _inputs(fails), concurrency=1, continue_on_error=False
    )
    result = await handle.results(timeout=HANG)
    assert [r.status for r in result.results] == ["succeeded", "failed"] + ["not_run"] * 4
    for r in result.results[2:]:
        assert isinstance(r.error, BatchItemNotRunError) and r.result is None
        assert r.input == {"n": r.index, "fail": False}
        state = await engine.get(r.run_id or "")
        assert state is not None and state.status is WorkflowStatus.CANCELLED
    progress = await handle.progress()
    assert (progress.status, progress.not_run, progress.failed) == ("stopped", 4, 1)


async def test_durable_concurrency_holds_across_three_engines(engines: Engines) -> None:
    peak = Peak(2)
    flow = create_workflow("shared").step("work", peak.step()).commit("note", peak.commit())
    first = await engines.open()
    for _ in range(2):
        (await engines.open()).register(flow)
    handle = await first.start_batch(flow, [{"n": i} for i in range(12)], concurrency=2)
    result = await handle.results(timeout=HANG)
    assert result.succeeded == 12
    assert peak.peak == 2
    assert peak.ran == Counter(range(12))  # each item's commit step ran exactly once


async def test_durable_batch_survives_a_restart(engines: Engines) -> None:
    started = asyncio.Event()
    ran: Counter[int] = Counter()

    async def hold(ctx: WorkflowContext) -> None:
        started.set()
        await asyncio.Event().wait()  # this engine never gets past it

    def note(ctx: WorkflowContext) -> None:
        ran[ctx.input["n"]] += 1

    before = create_workflow("restart").step("work", hold).commit("note", note)
    engine = await engines.open()
    handle = await engine.start_batch(before, [{"n": i} for i in range(6)], concurrency=2)
    await asyncio.wait_for(started.wait(), HANG)
    await engine.close(timeout=0.1)  # mid-batch: its in-flight items are released

    async def work(ctx: WorkflowContext) -> None:
        pass

    after = create_workflow("restart").step("work", work).commit("note", note)
    again = await engines.open()
    again.register(after)
    result = await again.batch_handle(handle.id).results(timeout=HANG)
    assert result.succeeded == 6
    assert [r.input["n"] for r in result.results] == list(range(6))
    assert ran == Counter(range(6))


async def test_cancel_leaves_the_remaining_items_unrun(engines: Engines) -> None:
    began = asyncio.Event()

    async def hold(ctx: WorkflowContext) -> None:
        began.set()
        await asyncio.Event().wait()  # runs until cancelled

    flow = create_workflow("cancelled").step("work", hold)
    engine = await engines.open()
    handle = await engine.start_batch(flow, list(range(5)), concurrency=1)
    await asyncio.wait_for(began.wait(), HANG)
    assert await handle.cancel() is True
    result = await handle.results(timeout=HANG)
    assert [r.status for r in result.results] == ["failed"] + ["not_run"] * 4
    first = result.results[0]
    assert first.result is not None and first.result.status is WorkflowStatus.CANCELLED
    progress = await handle.progress()
    assert (progress.status, progress.failed, progress.not_run) == ("cancelled", 1, 4)
    assert await handle.cancel() is False


async def test_start_batch_checks_every_input_first(engines: Engines) -> None:
    engine = await engines.open()
    with pytest.raises(InvalidInputError, match="batch item 1"):
        await engine.start_batch(DOUBLE, [{"n": 0}, "bad"])
    assert await engine.list() == []
    empty = await engine.start_batch(DOUBLE, [])
    assert (await empty.results(timeout=HANG)).total == 0


async def test_a_batch_item_can_be_waited_for_like_any_run(engines: Engines) -> None:
    engine = await engines.open()
    handle = await engine.start_batch(DOUBLE, _inputs([False, False]))

    async def both_done() -> bool:
        return (await handle.progress()).done == 2

    await until(both_done, "both items done")
    result = await handle.results(timeout=HANG)
    for item in result.results:
        direct = await engine.handle(item.run_id or "").result(timeout=HANG)
        assert direct.status is WorkflowStatus.COMPLETED
