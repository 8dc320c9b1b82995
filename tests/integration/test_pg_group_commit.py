"""Group commit on PostgreSQL: step commits made at once by many runs share statements (one
round trip and one commit per batch), and a lone commit is not held back. The contract
suite (``store_contract_group``) checks that a refused write fails alone; this checks that
the writes were in fact batched, and that engines in flight get there."""

from __future__ import annotations

import asyncio

from fluxrun import (
    ConcurrentModificationError,
    FluxEngine,
    PostgresStorage,
    WorkflowStatus,
    create_workflow,
)
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


# Values a batched statement must carry as they are: quotes, backslashes, NUL-free unicode
# beyond the BMP, floats at the edges, big integers, empty and nested containers.
ODD = [
    'quote " and \\ backslash, comma, {brace}',
    "émoji 🚀 and 漢字",
    1.7976931348623157e308,
    -0.0,
    2**62,
    {"nested": [[], {}, None, True, "NULL"]},
    None,
]


async def test_runs_in_flight_keep_every_value_with_group_commit(fresh_pg_dsn: str) -> None:
    flow = create_workflow("many")
    for i, value in enumerate(ODD):

        def step(ctx: object, i: int = i, value: object = value) -> object:
            ctx.data[f"k{i}"] = value  # type: ignore[attr-defined]
            return {"i": i, "v": value, "n": ctx.input["n"]}  # type: ignore[attr-defined]

        flow = flow.step(f"s{i}", step)
    async with FluxEngine(storage=PostgresStorage(fresh_pg_dsn)) as engine:
        store = engine._store
        before = store._group.largest  # type: ignore[attr-defined]
        results = await asyncio.gather(*(engine.execute(flow, {"n": n}) for n in range(100)))
        assert store._group.largest > max(before, 1)  # type: ignore[attr-defined]
        assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
        expected = {f"k{i}": v for i, v in enumerate(ODD)}
        for r in results:
            assert r.data == expected
            stored = await engine.get(r.id)
            assert stored is not None and stored.data == expected
            n = stored.input["n"]
            assert [h.output for h in stored.history] == [
                {"i": i, "v": v, "n": n} for i, v in enumerate(ODD)
            ]


async def test_a_pool_of_one_connection_serves_a_batch_and_its_fallback(
    fresh_pg_dsn: str,
) -> None:
    """A batch refused as a whole (one step already recorded) is redone write by write
    after its connection is given back: a pool of one connection does not wait on itself."""
    store = PostgresStorage(fresh_pg_dsn, min_size=1, max_size=1, query_timeout=20)
    await store.init()
    try:
        for i in range(20):
            await store.create(make_run(f"r{i}"), lease_owner=None, lease_seconds=0)
        await store.apply(t("r3", 1, fence=1, insert_step=make_step(0), current_step=0))
        # r3 is at version 2 with step 0 recorded: its compare-and-set hits, its step row
        # is refused, and with it the whole statement of its batch.
        versions = {f"r{i}": 2 if i == 3 else 1 for i in range(20)}
        outcomes = await asyncio.gather(
            *(
                store.apply(t(run_id, v, fence=1, insert_step=make_step(0), current_step=0))
                for run_id, v in versions.items()
            ),
            return_exceptions=True,
        )
        for run_id, outcome in zip(versions, outcomes, strict=True):
            if run_id == "r3":
                assert isinstance(outcome, ConcurrentModificationError)
                assert outcome.workflow_id == "r3"
            else:
                assert outcome == Applied(version=2, fence=1), (run_id, outcome)
    finally:
        await store.close()
