"""Crash recovery of rollbacks: a rollback that makes progress between crashes is never
given up as a crash loop (recorded compensations reset the crash counter), and each
compensation still runs to its recorded end exactly once more than the crashes inside it.

Uses the child program and flows of ``test_recovery.py``: children are killed for real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_recovery import (
    Paths,
    counts,
    crash_once,
    make_engine,
    only_run,
    run_child,
    saga_input,
    statuses,
    until_recoverable,
)

from fluxrun import WorkflowStatus


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(db=str(tmp_path / "runs.db"), fx=str(tmp_path / "effects.log"), tmp=tmp_path)


async def test_a_rollback_that_progresses_between_crashes_is_finished(paths: Paths) -> None:
    max_recoveries = 2
    # The executor dies inside each new compensation once: three crashes in all, more than
    # max_recoveries, but every recovery records a compensation before the next crash.
    crashes = [crash_once(paths, key, "kill") for key in ("undo_c", "undo_b", "undo_a")]
    first = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(paths, fail=True, crash=crashes),
        max_recoveries=max_recoveries,
    )
    assert first.returncode == -9, first.stderr
    async with make_engine(paths.db) as engine:
        run = await only_run(engine)
        assert run.status is WorkflowStatus.ROLLING_BACK
        outputs = []
        for _ in range(6):  # bounded: three crashes, then the run ends
            await until_recoverable(engine, run.id)
            child = run_child(paths, action="recover", max_recoveries=max_recoveries)
            if child.returncode == 0:
                outputs.append(json.loads(child.stdout))
                break
            assert child.returncode == -9, child.stderr
        assert outputs == [{"statuses": ["rolled_back"]}]
        state = await engine.get(run.id)
        assert state is not None and state.status is WorkflowStatus.ROLLED_BACK
        assert statuses(state) == {
            "a": "compensated",
            "b": "compensated",
            "c": "compensated",
            "d": "failed",
        }
        assert counts(paths, run.id) == {
            "a": 1,
            "b": 1,
            "c": 1,
            "d": 1,
            "undo_c": 2,
            "undo_b": 2,
            "undo_a": 2,
        }


async def test_the_runs_of_a_killed_process_are_recovered_without_waiting_for_the_lease(
    paths: Paths,
) -> None:
    """On SQLite every process is on one host: a dead owner is recognised by its process."""
    long_lease = 3600.0
    child = run_child(
        paths,
        action="execute",
        flow="saga",
        input=saga_input(paths, crash=crash_once(paths, "c", "kill")),
        lease=long_lease,
    )
    assert child.returncode == -9, child.stderr
    async with make_engine(paths.db) as engine:
        run = await only_run(engine)
        row = await engine.storage.load(run.id)
        assert row is not None and row.owner is not None and row.lease_until is not None
        assert (row.lease_until - row.updated_at).total_seconds() > long_lease / 2  # not expired
        results = await engine.recover()
        assert [(r.id, r.status) for r in results] == [(run.id, WorkflowStatus.COMPLETED)]
        assert counts(paths, run.id) == {"a": 1, "b": 1, "c": 2, "d": 1}


async def test_a_live_process_keeps_its_runs(paths: Paths) -> None:
    """The other side: an owner that is alive (this process) is never judged dead."""
    from fluxrun import FluxEngine, SQLiteStorage, create_workflow

    started = asyncio.Event()
    release = asyncio.Event()

    async def hold(ctx: object) -> None:
        started.set()
        await release.wait()

    flow = create_workflow("held").step("hold", hold)
    async with (
        FluxEngine(storage=SQLiteStorage(paths.db), lease=3600) as owner,
        FluxEngine(storage=SQLiteStorage(paths.db), lease=3600) as other,
    ):
        other.register(flow)
        task = asyncio.ensure_future(owner.execute(flow))
        await started.wait()
        assert await other.recover() == []
        release.set()
        assert (await task).status is WorkflowStatus.COMPLETED
