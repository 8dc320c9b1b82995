"""SPEC §7, worker mode on PostgreSQL: a worker is woken by ``NOTIFY`` when another process
makes a run due (a run started, a signal sent), so it does not wait for its poll; a store made
with ``listen=False`` (for poolers that cannot ``LISTEN``) finds work by polling. Nothing
depends on timing: the worker's poll is an hour where only a wake-up can move it, and
``HANG`` is a hang guard.
"""

from __future__ import annotations

import asyncio
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
from fluxrun.storage._base import Transition, Wake
from fluxrun.testing._rows import LONG_LEASE, at, make_run

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


async def test_a_childs_end_notifies_the_workers(fresh_pg_dsn: str) -> None:
    """A child run's last write (a finished status, so no wake-up of its own) carries its
    parent's wake: other processes hear of it at once, since the parent may be due."""
    writer, listening = PostgresStorage(fresh_pg_dsn), PostgresStorage(fresh_pg_dsn)
    await writer.init()
    heard = asyncio.Event()
    stop = await listening.listen(heard.set)
    assert stop is not None
    try:
        # Owned runs: creating them notifies nobody.
        parent = make_run("p", status="suspended", wait_kind="signal", wait_name="flux:child:c")
        await writer.create(parent, lease_owner="a", lease_seconds=LONG_LEASE)
        child = make_run("c", name="kid", status="running", parent_id="p")
        await writer.create(child, lease_owner="b", lease_seconds=LONG_LEASE)
        await asyncio.wait_for(heard.wait(), HANG)  # the listener is up (it wakes once)
        heard.clear()
        end = Transition(
            run_id="c",
            expected_version=1,
            updated_at=at(1),
            fence=1,
            status="completed",
            release=True,
            wake=Wake("p", "flux:child:c", '{"status": "completed"}'),
        )
        await writer.apply(end)
        await asyncio.wait_for(heard.wait(), HANG)
        [signal] = await writer.list_signals("p")
        assert signal.name == "flux:child:c"
    finally:
        await stop()
        await writer.close()
        await listening.close()
