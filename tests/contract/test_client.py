"""SPEC §7, the client: ``FluxClient(storage)`` starts runs by workflow name, steers them
(signal, cancel, pause, unpause) and reads them (get, list, counts, attempts, handles and
results) without workflow code, while an engine that has the workflow (a worker) drives
them. On every store; the client and the worker have stores of their own on one database.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sched_support import HANG, Engines, Log, stored_as

from fluxrun import (
    FluxClient,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidInputError,
    StepStatus,
    WorkflowContext,
    WorkflowFilter,
    WorkflowStatus,
    create_workflow,
    wait,
)


def _order(log: Log) -> Any:
    def reserve(ctx: WorkflowContext) -> None:
        log.lines.append(f"reserve {ctx.input['sku']}")
        ctx.data["reserved"] = ctx.input["sku"]

    def approve(ctx: WorkflowContext) -> Any:
        return wait("approved")

    def ship(ctx: WorkflowContext) -> None:
        ctx.data["shipped_by"] = ctx.signals["approved"]["by"]

    return (
        create_workflow("order")
        .input(lambda raw: isinstance(raw, dict) and "sku" in raw)
        .step("reserve", reserve, compensate=log.undo("reserve"))
        .step("approve", approve)
        .step("ship", ship)
    )


async def _client(engines: Engines) -> FluxClient:
    client = FluxClient(await engines.store(), poll_interval=0.05)
    await client.init()
    return client


async def test_a_client_starts_by_name_and_a_worker_drives_it(engines: Engines) -> None:
    log = Log()
    worker = await engines.open()
    worker.register(_order(log))
    client = await _client(engines)
    try:
        handle = await client.start("order", {"sku": "bike"})
        assert handle.created
        waiting = await handle.result(timeout=HANG)  # suspended on the approval
        assert waiting.status is WorkflowStatus.SUSPENDED
        assert [h.name for h in waiting.history] == ["reserve", "approve", "ship"]
        assert await client.send_signal(handle.id, "approved", {"by": "ann"})
        done = await client.handle(handle.id).result(timeout=HANG)
        assert done.status is WorkflowStatus.COMPLETED
        assert done.data == {"reserved": "bike", "shipped_by": "ann"}
        assert [h.status for h in done.history] == [StepStatus.COMPLETED] * 3
        state = await client.get(handle.id)
        assert state is not None and state.input == {"sku": "bike"}
        assert [s.id for s in await client.list(WorkflowFilter(name="order"))] == [handle.id]
        assert await client.counts("order") == {"completed": 1}
        attempts = await client.attempts(handle.id)
        assert [(a.step, a.status) for a in attempts] == [
            ("reserve", StepStatus.COMPLETED),
            ("approve", StepStatus.COMPLETED),
            ("ship", StepStatus.COMPLETED),
        ]
        assert log.lines == ["reserve bike"]
    finally:
        await client.close()


async def test_a_client_alone_never_drives_a_run(engines: Engines) -> None:
    client = await _client(engines)
    handle = await client.start("order", {"sku": "car"})
    await client.close()
    row = await (await engines.store()).load(handle.id)
    assert row is not None
    assert (row.status, row.owner, row.step_names, row.steps) == ("pending", None, (), ())
    # A worker that has the workflow takes it on later.
    worker = await engines.open()
    worker.register(_order(Log()))
    await stored_as(worker, handle.id, "suspended", wait_kind="signal")
    taken = await worker.storage.load(handle.id)
    assert taken is not None and taken.step_names == ("reserve", "approve", "ship")


async def test_cancel_pause_and_unpause_from_a_client(engines: Engines) -> None:
    log = Log()
    worker = await engines.open()
    worker.register(_order(log))
    client = await _client(engines)
    try:
        paused = await client.start("order", {"sku": "pram"})
        await paused.result(timeout=HANG)
        assert await client.pause(paused.id)
        await stored_as(worker, paused.id, "paused")
        assert await client.unpause(paused.id)
        await stored_as(worker, paused.id, "suspended", wait_kind="signal")
        assert await client.cancel(paused.id, reason="out of stock")
        result = await client.handle(paused.id).result(timeout=HANG)
        assert result.status is WorkflowStatus.CANCELLED
        assert log.lines == ["reserve pram", "undo reserve"]
        assert await client.cancel(paused.id) is False  # finished
    finally:
        await client.close()


async def test_an_input_the_workflow_refuses_fails_the_run_before_any_step(
    engines: Engines,
) -> None:
    log = Log()
    worker = await engines.open()
    worker.register(_order(log))
    client = await _client(engines)
    try:
        handle = await client.start("order", {"colour": "red"})  # no "sku"
        result = await handle.result(timeout=HANG)
        assert result.status is WorkflowStatus.FAILED
        state = await client.get(handle.id)
        assert state is not None and state.error is not None
        assert "input was refused" in state.error
        assert log.lines == []
        # With the workflow object, the client checks the input itself: nothing is stored.
        with pytest.raises(InvalidInputError):
            await client.start(_order(log), {"colour": "red"}, id="checked")
        assert await client.get("checked") is None
    finally:
        await client.close()


async def test_a_start_by_name_is_idempotent(engines: Engines) -> None:
    client = await _client(engines)
    try:
        first, again = await asyncio.gather(
            client.start("order", {"sku": "a"}, idempotency_key="k1"),
            client.start("order", {"sku": "a"}, idempotency_key="k1"),
        )
        assert first.id == again.id and sorted([first.created, again.created]) == [False, True]
        with pytest.raises(IdempotencyConflictError):
            await client.start("order", {"sku": "b"}, idempotency_key="k1")
        assert await client.counts() == {"pending": 1}
    finally:
        await client.close()


async def test_a_client_refuses_bad_arguments(engines: Engines) -> None:
    with pytest.raises(InvalidArgumentError):
        FluxClient("not a store")  # type: ignore[arg-type]
    client = await _client(engines)
    try:
        for call in (
            client.start("", {}),
            client.start("order", {}, delay=-1),
            client.start("order", {}, id=""),
            client.counts(""),
        ):
            with pytest.raises(InvalidArgumentError):
                await call
        assert await client.counts() == {}
    finally:
        await client.close()


async def test_due_runs_are_claimed_by_priority(engines: Engines) -> None:
    order: list[str] = []
    flow = create_workflow("ranked").step("note", lambda ctx: order.append(ctx.input["tag"]))
    client = await _client(engines)
    try:
        # Started before any worker runs, in an order that is not the priority order.
        for tag, priority in (("low", -5), ("plain", 0), ("urgent", 100), ("high", 10)):
            await client.start("ranked", {"tag": tag}, priority=priority)
        with pytest.raises(InvalidArgumentError):
            await client.start("ranked", {"tag": "x"}, priority=2**31)
        with pytest.raises(InvalidArgumentError):
            await client.start("ranked", {"tag": "x"}, priority=True)  # type: ignore[arg-type]
        worker = await engines.open(max_concurrent_runs=1)
        worker.register(flow)
        await _until_counts(client, {"completed": 4})
        assert order == ["urgent", "high", "plain", "low"]
    finally:
        await client.close()


async def _until_counts(client: FluxClient, expected: dict[str, int]) -> None:
    from sched_support import until

    async def check() -> bool:
        return await client.counts() == expected

    await until(check, f"counts {expected}")


async def test_a_client_schedules_by_name_and_workers_fire_it(engines: Engines) -> None:
    from datetime import timedelta

    client = await _client(engines)
    try:
        await client.schedule("tick", workflow="order", input={"sku": "gum"}, every=0.2)
        await client.schedule("bad", workflow="order", input={"nope": 1}, every=0.2)
        [_bad, tick] = await client.list_schedules()
        assert (tick.id, tick.workflow, tick.every) == ("tick", "order", timedelta(seconds=0.2))
        log = Log()
        worker = await engines.open()
        worker.register(_order(log))
        # A tick's run reserves, then waits for its approval; a refused input fails its run.
        await _until_counts_at_least(client, {"suspended": 1, "failed": 1})
        assert "reserve gum" in log.lines
        assert await client.unschedule("tick") and await client.unschedule("bad")
        assert await client.list_schedules() == []
    finally:
        await client.close()


async def _until_counts_at_least(client: FluxClient, least: dict[str, int]) -> None:
    from sched_support import until

    async def check() -> bool:
        counts = await client.counts()
        return all(counts.get(k, 0) >= n for k, n in least.items())

    await until(check, f"counts at least {least}")
