"""Several engines on one SQLite file: a signal sent by one reaches the run another one
waits to drive, through SQLite's data_version (a cheap read), not through the poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fluxrun import FluxEngine, SQLiteStorage, WorkflowStatus, create_workflow, wait

HANG = 30.0  # a hang guard; the poll below is two orders of magnitude longer


async def _until_status(engine: FluxEngine, run_id: str, status: WorkflowStatus) -> None:
    async def check() -> None:
        while True:
            state = await engine.get(run_id)
            if state is not None and state.status is status:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(check(), HANG)


async def _idle(engine: FluxEngine) -> None:
    while not (engine._scheduler.idle and not engine._scheduler._wake.is_set()):
        await asyncio.sleep(0.01)


async def test_a_signal_from_another_engine_wakes_the_driver_without_its_poll(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    flow = (
        create_workflow("approval")
        .step("ask", lambda ctx: wait("ok"))
        .step("done", lambda ctx: ctx.data.update(done=True))
    )
    driver = FluxEngine(storage=SQLiteStorage(db), poll_interval=3600)
    driver.register(flow)
    sender = FluxEngine(storage=SQLiteStorage(db), poll_interval=3600)  # drives nothing
    async with driver, sender:
        run = await driver.execute(flow)
        assert run.status is WorkflowStatus.SUSPENDED
        # The driver's loop has looked and found nothing due: it sleeps for the hour now.
        await asyncio.wait_for(_idle(driver), HANG)
        assert await sender.send_signal(run.id, "ok", {"by": "ann"}) is True
        await _until_status(driver, run.id, WorkflowStatus.COMPLETED)
        state = await driver.get(run.id)
        assert state is not None and state.data == {"done": True}
        assert state.history[0].output == {"by": "ann"}


async def test_the_stores_own_writes_do_not_move_its_data_version(tmp_path: Path) -> None:
    store = SQLiteStorage(tmp_path / "own.db")
    async with FluxEngine(storage=store) as engine:
        before = await store.external_changes()
        await engine.execute(create_workflow("w").step("s", lambda ctx: None))
        assert await store.external_changes() == before
        other = SQLiteStorage(tmp_path / "own.db")
        async with FluxEngine(storage=other) as second:
            await second.execute(create_workflow("w2").step("s", lambda ctx: None))
        assert await store.external_changes() != before
