"""A user's own @gravito/flux-style whole-state storage (a ``WorkflowStorage``:
save/load/list/delete, optionally init/close) runs workflows, in one process, and keeps them
across engines; the adapter keeps the attempt log in process and refuses to delete a run it
is executing."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from fluxrun import (
    FluxEngine,
    RetryPolicy,
    RunBusyError,
    StorageError,
    WorkflowContext,
    WorkflowFilter,
    WorkflowState,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun._whole_state_storage import WholeStateStorageAdapter, is_whole_state_storage
from fluxrun.storage._base import AttemptRow, RunRow, StepRow, Transition

FAST = RetryPolicy(initial_delay=0, jitter=False)


class DictStorage:
    """What a user might write: whole states in a dict, with async methods."""

    def __init__(self) -> None:
        self.states: dict[str, WorkflowState] = {}
        self.saves = 0
        self.calls: list[str] = []

    async def init(self) -> None:
        self.calls.append("init")

    async def close(self) -> None:
        self.calls.append("close")

    async def save(self, state: WorkflowState) -> None:
        assert isinstance(state, WorkflowState)
        self.saves += 1
        self.states[state.id] = state

    async def load(self, id: str) -> WorkflowState | None:
        return self.states.get(id)

    async def list(self, filter: WorkflowFilter | None = None) -> list[WorkflowState]:
        f = filter or WorkflowFilter()
        found = [
            s
            for s in self.states.values()
            if (f.name is None or s.name == f.name)
            and (f.statuses is None or s.status in f.statuses)
        ]
        found.sort(key=lambda s: s.created_at, reverse=True)
        end = None if f.limit is None else f.offset + f.limit
        return found[f.offset : end]

    async def delete(self, id: str) -> None:
        self.states.pop(id, None)


class SyncDictStorage:
    """The same with plain methods and no init/close: both are accepted."""

    def __init__(self) -> None:
        self.states: dict[str, WorkflowState] = {}

    def save(self, state: WorkflowState) -> None:
        self.states[state.id] = state

    def load(self, id: str) -> WorkflowState | None:
        return self.states.get(id)

    def list(self, filter: WorkflowFilter | None = None) -> list[WorkflowState]:
        return sorted(self.states.values(), key=lambda s: s.created_at, reverse=True)

    def delete(self, id: str) -> None:
        self.states.pop(id, None)


def reserve(ctx: WorkflowContext) -> None:
    ctx.data["reserved"] = ctx.input["items"]


def release(ctx: WorkflowContext) -> None:
    ctx.data["reserved"] = []


async def approve(ctx: WorkflowContext) -> Any:
    return wait("approved")


async def ship(ctx: WorkflowContext) -> None:
    if ctx.input.get("fail"):
        raise RuntimeError("no carrier")
    ctx.data["shipped_by"] = ctx.signals["approved"]["by"]


order = (
    create_workflow("order")
    .step("reserve", reserve, compensate=release)
    .step("approve", approve)
    .step("ship", ship)
)


@pytest.mark.parametrize("kind", [DictStorage, SyncDictStorage])
async def test_a_users_storage_runs_workflows(kind: type[Any]) -> None:
    storage = kind()
    async with FluxEngine(storage=storage, retry_policy=FAST) as engine:
        run = await engine.execute(order, {"items": ["book"]})
        assert run.status == WorkflowStatus.SUSPENDED
        saved = storage.states[run.id]
        assert saved.status == WorkflowStatus.SUSPENDED
        assert saved.data == {"reserved": ["book"]}
        assert saved.history[1].waiting_for == "approved"

        done = await engine.signal(order, run.id, "approved", {"by": "ann"})
        assert done.status == WorkflowStatus.COMPLETED
        assert storage.states[run.id].status == WorkflowStatus.COMPLETED
        assert (
            storage.states[run.id].data
            == done.data
            == {
                "reserved": ["book"],
                "shipped_by": "ann",
            }
        )
        state = await engine.get(run.id)
        assert state is not None and state.completed_at is not None

        failed = await engine.execute(order, {"items": ["pen"], "fail": True})
        failed = await engine.signal(order, failed.id, "approved", {"by": "bob"})
        assert failed.status == WorkflowStatus.ROLLED_BACK
        stored = storage.states[failed.id]
        assert [h.status.value for h in stored.history] == ["compensated", "completed", "failed"]
        assert stored.data == {"reserved": []}

        listed = await engine.list()
        assert {s.id for s in listed} == {run.id, failed.id}
        assert await engine.delete(run.id) is True
        assert run.id not in storage.states


async def test_init_close_and_one_save_per_transition() -> None:
    storage = DictStorage()
    async with FluxEngine(storage=storage) as engine:
        run = await engine.execute(order, {"items": ["book"]})
        state = await engine.get(run.id)
        assert state is not None
        # create + reserve + approve (suspended): one save of the whole state each.
        assert storage.saves == state.version == 3
    assert storage.calls == ["init", "close"]


async def test_a_new_engine_continues_a_run_from_the_users_storage() -> None:
    storage = DictStorage()
    async with FluxEngine(storage=storage) as first:
        run = await first.execute(order, {"items": ["book"]})
        assert run.status == WorkflowStatus.SUSPENDED
    # A fresh engine (fresh in-process cache) reads the run back from the user's storage.
    async with FluxEngine(storage=storage) as second:
        state = await second.get(run.id)
        assert state is not None and state.status == WorkflowStatus.SUSPENDED
        assert state.data == {"reserved": ["book"]}
        done = await second.signal(order, run.id, "approved", {"by": "cy"})
        assert done.status == WorkflowStatus.COMPLETED
        assert done.data == {"reserved": ["book"], "shipped_by": "cy"}
        again = await second.resume(order, run.id, from_step="ship")
        assert again is not None and again.status == WorkflowStatus.COMPLETED
    # After another restart, a resume from a later step starts from the saved data.
    async with FluxEngine(storage=storage) as third:
        again = await third.resume(order, run.id, from_step="approve")
        assert again is not None and again.status == WorkflowStatus.SUSPENDED
        assert again.data == {"reserved": ["book"], "shipped_by": "cy"}


async def test_a_failing_user_storage_is_a_storage_error() -> None:
    class Broken(DictStorage):
        async def save(self, state: WorkflowState) -> None:
            raise OSError("disk gone")

    broken = Broken()
    async with FluxEngine(storage=broken) as engine:
        with pytest.raises(StorageError, match="disk gone"):
            await engine.execute(order, {"items": ["book"]})
        # Nothing half-written: the user's storage is the truth, and it holds nothing.
        assert await engine.list() == []
        assert broken.states == {}


T0 = dt.datetime(2024, 5, 17, 8, 30, tzinfo=dt.UTC)


def _run(run_id: str) -> RunRow:
    return RunRow(
        id=run_id,
        name="order",
        status="running",
        input="{}",
        step_names=("reserve", "approve", "ship"),
        current_step=0,
        created_at=T0,
        updated_at=T0,
        version=1,
        fence=1,
    )


def test_a_users_storage_is_recognised_by_its_methods() -> None:
    assert is_whole_state_storage(DictStorage()) and is_whole_state_storage(SyncDictStorage())
    assert not is_whole_state_storage(object())


async def test_attempts_are_kept_in_process_and_go_with_the_run() -> None:
    storage = DictStorage()
    adapter = WholeStateStorageAdapter(storage)
    await adapter.create(_run("r1"), lease_owner=None, lease_seconds=0)
    failed = AttemptRow(
        index=0,
        name="reserve",
        attempt=1,
        kind="step",
        status="failed",
        started_at=T0,
        finished_at=T0,
        duration_ms=1.5,
        error_type="builtins.OSError",
        error="disk",
        traceback="Traceback ...",
    )
    step = StepRow(index=0, name="reserve", status="completed", started_at=T0, changes=None)
    await adapter.apply(Transition("r1", 1, T0, insert_step=step, attempts=(failed, failed)))
    got = await adapter.list_attempts("r1")
    assert [(a.seq, a.error_type, a.traceback) for a in got] == [
        (1, "builtins.OSError", "Traceback ..."),
        (2, "builtins.OSError", "Traceback ..."),
    ]
    # The user's storage holds the whole state, not the attempt log.
    assert storage.states["r1"].version == 2
    assert await adapter.delete("r1") is True
    assert await adapter.list_attempts("r1") == []
    assert "r1" not in storage.states


async def test_a_run_being_executed_is_not_deleted() -> None:
    storage = DictStorage()
    adapter = WholeStateStorageAdapter(storage)
    await adapter.create(_run("r1"), lease_owner="engine-1", lease_seconds=3600)
    with pytest.raises(RunBusyError) as info:
        await adapter.delete("r1")
    assert info.value.workflow_id == "r1"
    assert "r1" in storage.states and await adapter.load("r1") is not None
    await adapter.apply(Transition("r1", 1, T0, fence=1, release=True))
    assert await adapter.delete("r1") is True
    assert storage.states == {}


async def test_errors_of_the_users_storage_name_the_run() -> None:
    class Broken(DictStorage):
        async def load(self, id: str) -> WorkflowState | None:
            raise OSError("gone")

    adapter = WholeStateStorageAdapter(Broken())
    with pytest.raises(StorageError) as info:
        await adapter.load("r9")
    assert info.value.workflow_id == "r9" and "'r9'" in str(info.value)


async def test_batches_in_process_work_but_durable_ones_are_refused() -> None:
    flow = create_workflow("wsb").step("a", lambda ctx: None)
    async with FluxEngine(storage=DictStorage()) as engine:
        result = await engine.execute_batch(flow, [1, 2, 3], concurrency=2)
        assert [r.status for r in result.results] == ["succeeded"] * 3
        with pytest.raises(StorageError, match="durable batches"):
            await engine.start_batch(flow, [1])


async def test_child_workflows_run_on_a_whole_state_storage() -> None:
    """The child and its parent both live in the user's storage; the child's end reaches
    the parent through the adapter's in-process inbox, and cancel reaches the child."""
    storage = DictStorage()
    kid = create_workflow("ws-kid").step("d", lambda ctx: ctx.data.update(v=ctx.input * 2))
    parent = create_workflow("ws-parent").child("call", kid, input=lambda ctx: ctx.input)
    waiting = create_workflow("ws-waiting").child(
        "call", create_workflow("ws-held").step("h", lambda ctx: wait("never"))
    )
    async with FluxEngine(storage=storage, retry_policy=FAST, poll_interval=0.05) as engine:
        result = await engine.execute(parent, 21)
        assert result.status is WorkflowStatus.COMPLETED, result.error
        assert result.history[0].output == {"v": 42}
        child_id = f"{result.id}:call"
        assert storage.states[child_id].parent_id == result.id
        assert storage.states[result.id].history[0].child_id == child_id
        assert [r.id for r in await engine.storage.list_children(result.id)] == [child_id]

        handle = await engine.start(waiting)
        held = f"{handle.id}:call"

        async def stored(status: str) -> None:
            async with asyncio.timeout(30):  # a hang guard, not a timing check
                while held not in storage.states or storage.states[held].status != status:
                    await asyncio.sleep(0.01)

        await stored("suspended")
        assert await engine.cancel(handle.id) is True
        assert (await handle.result(timeout=30)).status is WorkflowStatus.CANCELLED
        await stored("cancelled")
