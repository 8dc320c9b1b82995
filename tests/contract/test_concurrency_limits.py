"""SPEC §7, limits: a workflow's ``.concurrency(limit, key=...)`` holds across every engine
on the store (at most ``limit`` runs per key running at once; runs waiting on a signal do
not count), and every way of making a run go (start, execute, signal, resume, a batch, a
client's start by name) respects it. On every store, with two engines as two workers.

No check depends on timing: steps are held by an event until the limit is reached, then
each engine is made to claim once more (a claim that must take nothing), and the peak of
handlers running at once is counted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sched_support import HANG, Engines, stored_as, until

from fluxrun import (
    DefinitionError,
    FluxClient,
    FluxEngine,
    InvalidInputError,
    WorkflowContext,
    WorkflowStatus,
    create_workflow,
    wait,
)


class Held:
    """Steps that count themselves per group and overall, and wait for ``release``."""

    def __init__(self) -> None:
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total_peak = 0
        self.order: list[str] = []
        self.release = asyncio.Event()

    def step(self) -> Any:
        async def work(ctx: WorkflowContext) -> None:
            group = str(ctx.input.get("customer", ""))
            self.active[group] += 1
            self.order.append(str(ctx.input.get("n")))
            self.peak[group] = max(self.peak[group], self.active[group])
            self.total_peak = max(self.total_peak, sum(self.active.values()))
            try:
                await asyncio.wait_for(self.release.wait(), HANG)
            finally:
                self.active[group] -= 1

        return work

    async def running(self, n: int) -> None:
        await until(lambda: _true(sum(self.active.values()) == n), f"{n} steps running")


async def _true(value: bool) -> bool:
    return value


async def _claims_nothing(*engines: FluxEngine) -> None:
    """Each engine claims once more now: the limit leaves it nothing to take."""
    for engine in engines:
        assert await engine._scheduler.claim_pass() == []


async def _two(engines: Engines, flow: Any) -> tuple[FluxEngine, FluxEngine]:
    first, second = await engines.open(), await engines.open()
    first.register(flow)
    second.register(flow)
    return first, second


async def test_at_most_limit_runs_at_once_across_engines(engines: Engines) -> None:
    held = Held()
    flow = create_workflow("limited").concurrency(2).step("work", held.step())
    first, second = await _two(engines, flow)
    handles = [await (first, second)[i % 2].start(flow, {"n": i}) for i in range(7)]
    await held.running(2)
    await _claims_nothing(first, second)
    held.release.set()
    results = [await h.result(timeout=HANG) for h in handles]
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert held.total_peak == 2


async def test_the_limit_is_per_key(engines: Engines) -> None:
    held = Held()
    flow = (
        create_workflow("per_customer")
        .concurrency(1, key=lambda i: i["customer"])
        .step("work", held.step())
    )
    first, second = await _two(engines, flow)
    inputs = [{"n": n, "customer": c} for n, c in enumerate("aabab")]
    handles = [await first.start(flow, i) for i in inputs]
    await held.running(2)  # one of each customer
    await _claims_nothing(first, second)
    assert held.active == Counter({"a": 1, "b": 1})
    held.release.set()
    for h in handles:
        assert (await h.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    assert held.peak == Counter({"a": 1, "b": 1})
    row = await (await engines.store()).load(handles[0].id)
    assert row is not None and row.concurrency_key == "a"


async def test_a_run_waiting_for_a_signal_holds_no_slot(engines: Engines) -> None:
    def maybe_wait(ctx: WorkflowContext) -> Any:
        return wait("go") if ctx.input["wait"] else None

    flow = (
        create_workflow("one_at_a_time")
        .concurrency(1)
        .step("maybe_wait", maybe_wait)
        .step("done", lambda ctx: None)
    )
    engine = await engines.open()
    engine.register(flow)
    waiting = await engine.execute(flow, {"wait": True})
    assert waiting.status is WorkflowStatus.SUSPENDED
    other = await engine.execute(flow, {"wait": False})  # runs while the first waits
    assert other.status is WorkflowStatus.COMPLETED
    assert await engine.send_signal(waiting.id, "go")
    assert (await engine.handle(waiting.id).result(timeout=HANG)).status is (
        WorkflowStatus.COMPLETED
    )
    signalled = await engine.execute(flow, {"wait": True})
    resumed = await engine.signal(flow, signalled.id, "go")  # signal() waits for the claim
    assert resumed.status is WorkflowStatus.COMPLETED


async def test_resume_of_a_failed_run_goes_through_the_limit(engines: Engines) -> None:
    calls: list[int] = []

    def flaky(ctx: WorkflowContext) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first time fails")
        ctx.data["ok"] = True

    flow = create_workflow("resumable").concurrency(1).step("flaky", flaky, retries=0)
    engine = await engines.open()
    engine.register(flow)
    failed = await engine.execute(flow, {})
    assert failed.status is WorkflowStatus.FAILED
    again = await engine.resume(flow, failed.id)
    assert again is not None and again.status is WorkflowStatus.COMPLETED
    assert again.data == {"ok": True}


async def test_priority_decides_who_gets_the_next_slot(engines: Engines) -> None:
    held = Held()
    flow = create_workflow("ranked").concurrency(1).step("work", held.step())
    engine = await engines.open()
    engine.register(flow)
    first = await engine.start(flow, {"n": "first"})
    await held.running(1)
    low = await engine.start(flow, {"n": "low"})
    high = await engine.start(flow, {"n": "high"}, priority=5)
    await _claims_nothing(engine)
    held.release.set()
    for h in (first, low, high):
        assert (await h.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    assert held.order == ["first", "high", "low"]


async def test_a_batch_keeps_to_the_workflow_limit(engines: Engines) -> None:
    held = Held()
    flow = create_workflow("batched").concurrency(2).step("work", held.step())
    first, second = await _two(engines, flow)
    batch = await first.start_batch(flow, [{"n": i} for i in range(6)], concurrency=5)
    await held.running(2)
    await _claims_nothing(first, second)
    held.release.set()
    result = await batch.results(timeout=HANG)
    assert result.succeeded == 6 and held.total_peak == 2


async def test_a_run_started_by_name_gets_its_key_from_the_worker(engines: Engines) -> None:
    held = Held()
    flow = (
        create_workflow("by_name")
        .concurrency(1, key=lambda i: f"c-{i['customer']}")
        .step("work", held.step())
    )
    worker = await engines.open()
    worker.register(flow)
    client = FluxClient(await engines.store(), poll_interval=0.05)
    await client.init()
    try:
        handles = [
            await client.start("by_name", {"n": n, "customer": c}) for n, c in enumerate("aab")
        ]
        await held.running(2)
        await _claims_nothing(worker)
        held.release.set()
        for h in handles:
            assert (await h.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
        assert held.peak == Counter({"a": 1, "b": 1})
        store = await engines.store()
        keys = [(await store.load(h.id)).concurrency_key for h in handles]  # type: ignore[union-attr]
        assert keys == ["c-a", "c-a", "c-b"]
    finally:
        await client.close()


async def test_a_key_function_that_refuses_the_input_fails_only_that_run(
    engines: Engines,
) -> None:
    flow = (
        create_workflow("strict_key")
        .concurrency(1, key=lambda i: i["customer"])
        .step("s", lambda ctx: None)
    )
    engine = await engines.open()
    engine.register(flow)
    with pytest.raises(InvalidInputError, match="concurrency key function"):
        await engine.start(flow, {"no customer": 1})
    with pytest.raises(InvalidInputError, match="string or an integer"):
        await engine.start(flow, {"customer": [1, 2]})
    assert await engine.list() == []  # nothing was stored
    client = FluxClient(await engines.store(), poll_interval=0.05)
    await client.init()
    try:
        bad = await client.start("strict_key", {"no customer": 1})
        row = await stored_as(engine, bad.id, "failed")
        assert row.error is not None and "concurrency key function" in row.error
        good = await client.start("strict_key", {"customer": 7})
        assert (await good.result(timeout=HANG)).status is WorkflowStatus.COMPLETED
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("limit", "key"),
    [(0, None), (-1, None), (1.5, None), (True, None), ("2", None), (2, "customer")],
)
def test_a_bad_declaration_is_refused(limit: Any, key: Any) -> None:
    with pytest.raises(DefinitionError, match="concurrency"):
        create_workflow("bad").concurrency(limit, key=key)
