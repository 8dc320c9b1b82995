"""The crash counter (``claims``) counts claims since the run last moved forward.

A run whose executor keeps dying at the same step is given up after ``max_recoveries``; a
healthy run that merely happened to be in flight during several unrelated crashes is not,
because every recorded step resets the counter.
"""

from __future__ import annotations

import datetime as dt

from fluxrun import FluxEngine, create_workflow
from fluxrun.storage._base import Claim, RunRow, StepRow, Store, Transition

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _run(run_id: str) -> RunRow:
    return RunRow(
        id=run_id,
        name="wf",
        status="pending",
        input="null",
        step_names=("a", "b", "c"),
        current_step=0,
        created_at=NOW,
        updated_at=NOW,
        version=1,
        fence=1,
    )


async def _claim(store: Store, run_id: str, owner: str) -> None:
    row = await store.load(run_id)
    assert row is not None
    await store.apply(
        Transition(
            run_id=run_id,
            expected_version=row.version,
            updated_at=NOW,
            claim=Claim(owner=owner, lease_seconds=0.0),
        )
    )


async def test_claims_count_up_and_a_recorded_step_resets_them_to_one(store: Store) -> None:
    await store.init()
    await store.create(_run("r1"), lease_owner="a", lease_seconds=0.0)
    await _claim(store, "r1", "b")
    await _claim(store, "r1", "c")
    row = await store.load("r1")
    assert row is not None and row.claims == 3
    await store.apply(
        Transition(
            run_id="r1",
            expected_version=row.version,
            updated_at=NOW,
            fence=row.fence,
            insert_step=StepRow(index=0, name="a", status="completed", fence=row.fence),
        )
    )
    row = await store.load("r1")
    assert row is not None and row.claims == 1  # the claim that made progress
    await _claim(store, "r1", "d")
    row = await store.load("r1")
    assert row is not None and row.claims == 2
    await store.close()


async def test_a_run_that_progresses_between_crashes_is_not_given_up(store: Store) -> None:
    """Six crashes, each after one more step: more than max_recoveries, yet it finishes."""
    calls: list[str] = []
    flow = create_workflow("wf")
    for name in "abcdefg":
        flow.step(name, lambda ctx, name=name: calls.append(name))
    engine = FluxEngine(storage=store, lease=0.05, max_recoveries=2)
    engine.register(flow)
    # The engine starts (and its scheduler claims) only after the crashes are simulated:
    # otherwise it may take the run between a simulated executor's read and its write.
    await store.init()
    definition = flow.build()
    await store.create(
        RunRow(
            id="r1",
            name="wf",
            status="running",
            input="null",
            step_names=definition.step_names,
            current_step=0,
            created_at=NOW,
            updated_at=NOW,
            version=1,
            fence=1,
        ),
        lease_owner="dead",
        lease_seconds=0.0,
    )
    # Simulate crashes: each "executor" records one step, then dies (claims once more).
    for index, name in enumerate("abcde"):
        await _claim(store, "r1", f"crashed-{index}")
        row = await store.load("r1")
        assert row is not None
        await store.apply(
            Transition(
                run_id="r1",
                expected_version=row.version,
                updated_at=NOW,
                fence=row.fence,
                current_step=index,
                insert_step=StepRow(index=index, name=name, status="completed", fence=row.fence),
            )
        )
    await engine.init()
    results = await engine.recover()
    assert [r.status.value for r in results] == ["completed"]
    assert calls == ["f", "g"]
    await engine.close()
