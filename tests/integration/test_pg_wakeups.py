"""SPEC §7, worker mode on PostgreSQL: a worker is woken by ``NOTIFY`` when another process
makes a run due (a run started, a signal sent), so it does not wait for its poll; a store made
with ``listen=False`` (for poolers that cannot ``LISTEN``) finds work by polling. Nothing
depends on timing: the worker's poll is an hour where only a wake-up can move it, and
``HANG`` is a hang guard.
"""

from __future__ import annotations

from typing import Any

import pytest

from fluxrun import (
    FluxClient,
    FluxEngine,
    PostgresStorage,
    WorkflowStatus,
    create_workflow,
    wait,
)

pytestmark = pytest.mark.postgres

HANG = 60.0


def _flow() -> Any:
    return (
        create_workflow("woken")
        .step("first", lambda ctx: ctx.data.update(first=True))
        .step("approve", lambda ctx: wait("go"))
        .step("last", lambda ctx: ctx.data.update(by=ctx.signals["go"]))
    )


async def test_a_worker_is_woken_by_notify_not_by_its_poll(fresh_pg_dsn: str) -> None:
    worker = FluxEngine(storage=PostgresStorage(fresh_pg_dsn), poll_interval=3600)
    worker.register(_flow())
    async with worker, FluxClient(PostgresStorage(fresh_pg_dsn), poll_interval=0.05) as client:
        await worker._scheduler.claim_pass()  # the loop is asleep for an hour from here
        handle = await client.start("woken", {})
        waiting = await handle.result(timeout=HANG)  # only a NOTIFY can have woken it
        assert waiting.status is WorkflowStatus.SUSPENDED
        await client.send_signal(handle.id, "go", "ann")
        done = await handle.result(timeout=HANG)
        assert done.status is WorkflowStatus.COMPLETED
        assert done.data == {"first": True, "by": "ann"}


async def test_without_listen_a_worker_polls(fresh_pg_dsn: str) -> None:
    worker = FluxEngine(storage=PostgresStorage(fresh_pg_dsn, listen=False), poll_interval=0.05)
    worker.register(_flow())
    async with worker, FluxClient(PostgresStorage(fresh_pg_dsn), poll_interval=0.05) as client:
        assert await worker.storage.listen(lambda: None) is None
        handle = await client.start("woken", {})
        await handle.result(timeout=HANG)
        await client.send_signal(handle.id, "go", "bob")
        done = await handle.result(timeout=HANG)
        assert done.status is WorkflowStatus.COMPLETED and done.data["by"] == "bob"
