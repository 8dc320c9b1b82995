"""The store contract for step commits made at once by many runs (a store may write them
as one batch, a group commit), as pytest tests for any :class:`Store`; imported by
:mod:`fluxrun.testing.store_contract`. Whatever a store batches, each write keeps its own
compare-and-set and fence: one write refused (a stale writer, a run deleted meanwhile, a
step already recorded, a number out of range) fails alone, and the others commit.
"""

from __future__ import annotations

import asyncio

from ..errors import FluxError
from ..storage._base import Applied, Store, Transition
from ._rows import make_run, make_step, must_load, t

RUNS = 12


async def _runs(store: Store) -> None:
    for i in range(RUNS):
        await store.create(make_run(f"g{i}"), lease_owner=None, lease_seconds=0)


def _step(run_id: str, version: int, index: int = 0, **fields: object) -> Transition:
    return t(run_id, version, fence=1, insert_step=make_step(index), current_step=index, **fields)


async def test_many_step_commits_at_once_all_apply(store: Store) -> None:
    await _runs(store)
    for round_ in range(3):
        got = await asyncio.gather(
            *(store.apply(_step(f"g{i}", 1 + round_, round_)) for i in range(RUNS))
        )
        assert got == [Applied(version=2 + round_, fence=1)] * RUNS
    done = await asyncio.gather(
        *(
            store.apply(
                _step(
                    f"g{i}",
                    4,
                    3,
                    status="completed",
                    error=None,
                    completed_at=make_step(3).completed_at,
                    release=True,
                    requested=None,
                )
            )
            for i in range(RUNS)
        )
    )
    assert {a.version for a in done} == {5}
    for i in range(RUNS):
        row = await must_load(store, f"g{i}")
        assert row.status == "completed" and row.version == 5 and row.owner is None
        assert [s.index for s in row.steps] == [0, 1, 2, 3]


async def test_one_refused_write_fails_alone(store: Store) -> None:
    await _runs(store)
    await store.apply(_step("g3", 1))  # g3's step 0 is recorded: a second one is refused
    assert await store.delete("g5")
    writes = [_step(f"g{i}", 1) for i in range(RUNS)]
    writes[1] = _step("g1", 7)  # a stale writer
    writes[3] = _step("g3", 2)  # step 0 again
    writes[8] = t("g8", 1, fence=9, insert_step=make_step(0), current_step=0)  # lost fence
    outcomes = await asyncio.gather(*(store.apply(w) for w in writes), return_exceptions=True)
    refused = {1, 3, 5, 8}
    for i, outcome in enumerate(outcomes):
        if i in refused:
            assert isinstance(outcome, FluxError), (i, outcome)
            assert outcome.workflow_id == f"g{i}"
        else:
            assert outcome == Applied(version=2, fence=1), (i, outcome)
            row = await must_load(store, f"g{i}")
            assert [s.index for s in row.steps] == [0] and row.version == 2
    for i in (1, 8):
        row = await must_load(store, f"g{i}")
        assert row.steps == () and row.version == 1  # untouched
    assert len((await must_load(store, "g3")).steps) == 1


async def test_a_commit_out_of_range_fails_alone(store: Store) -> None:
    await _runs(store)
    writes = [_step(f"g{i}", 1) for i in range(4)]
    writes[2] = _step("g2", 1, 2**31)
    outcomes = await asyncio.gather(*(store.apply(w) for w in writes), return_exceptions=True)
    assert isinstance(outcomes[2], FluxError)
    assert [o for i, o in enumerate(outcomes) if i != 2] == [Applied(version=2, fence=1)] * 3
