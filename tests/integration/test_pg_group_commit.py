"""Group commit on PostgreSQL: step commits made at once by many runs share statements (one
round trip and one commit per batch), and a lone commit is not held back. The contract
suite (``store_contract_group``) checks that a refused write fails alone; this checks that
the writes were in fact batched, and that engines in flight get there."""

from __future__ import annotations

import asyncio

from fluxrun import FluxEngine, PostgresStorage, WorkflowStatus, create_workflow
from fluxrun.storage._base import Applied
from fluxrun.testing._rows import make_run, make_step, t


async def test_commits_made_at_once_are_batched(fresh_pg_dsn: str) -> None:
    store = PostgresStorage(fresh_pg_dsn)
    await store.init()
    try:
        for i in range(60):
            await store.create(make_run(f"r{i}"), lease_owner=None, lease_seconds=0)
        lone = await store.apply(t("r0", 1, fence=1, insert_step=make_step(0), current_step=0))
        assert lone == Applied(version=2, fence=1)
        before = store._group.batches
        got = await asyncio.gather(
            *(
                store.apply(t(f"r{i}", 1, fence=1, insert_step=make_step(0), current_step=0))
                for i in range(1, 60)
            )
        )
        assert got == [Applied(version=2, fence=1)] * 59
        assert store._group.batches - before < 59 and store._group.largest > 1
    finally:
        await store.close()


async def test_runs_in_flight_complete_with_group_commit(fresh_pg_dsn: str) -> None:
    flow = create_workflow("many")
    for i in range(5):
        flow = flow.step(f"s{i}", lambda ctx, i=i: ctx.data.__setitem__(f"k{i}", i))
    async with FluxEngine(storage=PostgresStorage(fresh_pg_dsn)) as engine:
        results = await asyncio.gather(*(engine.execute(flow, {"n": n}) for n in range(100)))
        assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
        assert all(r.data == {f"k{i}": i for i in range(5)} for r in results)
        again = await engine.get(results[0].id)
        assert again is not None and [h.status.value for h in again.history] == ["completed"] * 5
