"""SPEC §2 rules 17 and 19: what is stored agrees with what was returned; listing is exact."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fluxrun import (
    ConcurrentModificationError,
    FluxEngine,
    FluxResult,
    InvalidArgumentError,
    MemoryStorage,
    RetryPolicy,
    SQLiteStorage,
    WorkflowContext,
    WorkflowFilter,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import (
    Applied,
    AttemptRow,
    ListQuery,
    Renewed,
    RequestKind,
    RunRow,
    SignalRow,
    SignalSent,
    Started,
    StepRow,
    Store,
    Transition,
)

FAST = RetryPolicy(initial_delay=0, jitter=False)
TERMINAL = {
    WorkflowStatus.COMPLETED,
    WorkflowStatus.FAILED,
    WorkflowStatus.ROLLED_BACK,
    WorkflowStatus.COMPENSATION_FAILED,
    WorkflowStatus.CANCELLED,
}


class CountingStore(Store):
    """Wraps a store and counts, per run, the transitions it applied."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.shared = inner.shared
        self.applied: Counter[str] = Counter()

    async def init(self) -> None:
        await self.inner.init()

    async def close(self) -> None:
        await self.inner.close()

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        await self.inner.create(run, lease_owner=lease_owner, lease_seconds=lease_seconds)

    async def apply(self, t: Transition) -> Applied:
        applied = await self.inner.apply(t)
        self.applied[t.run_id] += 1
        return applied

    async def load(self, run_id: str) -> RunRow | None:
        return await self.inner.load(run_id)

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        return await self.inner.list_runs(query)

    async def delete(self, run_id: str) -> bool:
        return await self.inner.delete(run_id)

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        return await self.inner.list_attempts(run_id)

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        return await self.inner.find_recoverable(names, limit)

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        return self.inner.renew_leases(owner, fences, lease_seconds)

    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        return await self.inner.start(
            run,
            lease_owner=lease_owner,
            lease_seconds=lease_seconds,
            idempotency_key=idempotency_key,
            input_hash=input_hash,
        )

    async def claim_due(
        self, owner: str, names: Sequence[str], limit: int, lease_seconds: float
    ) -> list[RunRow]:
        return await self.inner.claim_due(owner, names, limit, lease_seconds)

    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        return await self.inner.next_due(names)

    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        return await self.inner.send_signal(run_id, name, payload, dedupe_key)

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        return await self.inner.list_signals(run_id)

    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        return await self.inner.first_signal(run_id, name)

    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        return await self.inner.request(run_id, kind, reason)

    async def counts(self, name: str | None = None) -> dict[str, int]:
        return await self.inner.counts(name)


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "flux.db"


@pytest.fixture
def store(backend: str, db_path: Path) -> CountingStore:
    inner: Store = MemoryStorage() if backend == "memory" else SQLiteStorage(db_path)
    return CountingStore(inner)


@pytest.fixture
async def engine(store: CountingStore) -> AsyncIterator[FluxEngine]:
    async with FluxEngine(storage=store, retry_policy=FAST) as e:
        yield e


class Checker:
    """Checks rule 17 after every returned result, remembering each run's created_at."""

    def __init__(self, engine: FluxEngine, store: CountingStore) -> None:
        self.engine = engine
        self.store = store
        self.created: dict[str, Any] = {}
        self.versions: dict[str, int] = {}

    async def __call__(self, result: FluxResult | None) -> Any:
        assert result is not None
        state = await self.engine.get(result.id)
        assert state is not None
        assert state.id == result.id
        assert state.status is result.status
        if result.error is None:
            assert state.error is None
        else:
            assert state.error == str(result.error)
        if result.status in TERMINAL:
            assert state.completed_at is not None
            assert state.completed_at.tzinfo is not None
            assert state.completed_at >= state.created_at
        else:
            assert state.completed_at is None
        assert state.data == result.data
        assert state.history == result.history
        # created_at never changes; version = 1 (create) + one per applied transition.
        assert self.created.setdefault(result.id, state.created_at) == state.created_at
        assert state.created_at.tzinfo is not None and state.updated_at.tzinfo is not None
        assert state.version == 1 + self.store.applied[result.id]
        assert state.version > self.versions.get(result.id, 0)
        self.versions[result.id] = state.version
        return state


@pytest.fixture
def check(engine: FluxEngine, store: CountingStore) -> Checker:
    return Checker(engine, store)


def _set(key: str, value: Any) -> Any:
    def handler(ctx: WorkflowContext) -> Any:
        ctx.data[key] = value
        return {"set": key}

    return handler


def _fail(ctx: WorkflowContext) -> None:
    raise RuntimeError(f"step {ctx.step} failed")


# -- rule 17 -----------------------------------------------------------------------------------


async def test_completed_run_agrees_with_get(engine: FluxEngine, check: Checker) -> None:
    flow = create_workflow("ok").step("a", _set("a", 1)).step("b", _set("b", [1, 2]))
    result = await engine.execute(flow, {"x": 1})
    assert result.status is WorkflowStatus.COMPLETED
    state = await check(result)
    assert state.data == {"a": 1, "b": [1, 2]}
    assert state.input == {"x": 1}


async def test_failed_run_agrees_with_get(engine: FluxEngine, check: Checker) -> None:
    flow = create_workflow("bad").step("a", _set("a", 1)).step("b", _fail, retries=2)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.FAILED
    state = await check(result)
    assert state.error == "step b failed"
    assert state.history[1].retries == 2


async def test_rolled_back_run_agrees_with_get(engine: FluxEngine, check: Checker) -> None:
    def undo(ctx: WorkflowContext) -> None:
        ctx.data["a"] = "undone"

    flow = create_workflow("saga").step("a", _set("a", 1), compensate=undo).step("b", _fail)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.ROLLED_BACK
    state = await check(result)
    assert state.data == {"a": "undone"}


async def test_compensation_failed_run_agrees_with_get(engine: FluxEngine, check: Checker) -> None:
    flow = create_workflow("saga2").step("a", _set("a", 1), compensate=_fail).step("b", _fail)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPENSATION_FAILED
    state = await check(result)
    assert state.error is not None and "'a'" in state.error


async def test_suspend_signal_and_resume_agree_with_get(engine: FluxEngine, check: Checker) -> None:
    attempts = {"n": 0}

    def flaky(ctx: WorkflowContext) -> None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("flaky")
        ctx.data["done"] = ctx.signals["go"]

    flow = (
        create_workflow("wait")
        .step("a", _set("a", 1))
        .step("w", lambda ctx: wait("go"))
        .step("c", flaky)
    )
    suspended = await engine.execute(flow)
    assert suspended.status is WorkflowStatus.SUSPENDED
    await check(suspended)
    failed = await engine.signal(flow, suspended.id, "go", {"by": "ann"})
    assert failed.status is WorkflowStatus.FAILED
    await check(failed)
    resumed = await engine.resume(flow, suspended.id)
    assert resumed is not None and resumed.status is WorkflowStatus.COMPLETED
    state = await check(resumed)
    assert state.data == {"a": 1, "done": {"by": "ann"}}
    assert state.history[1].output == {"by": "ann"}
    again = await engine.retry_step(flow, suspended.id, "a")
    assert again is not None and again.status is WorkflowStatus.SUSPENDED
    await check(again)


async def test_each_step_is_saved_before_the_next_starts(engine: FluxEngine) -> None:
    seen: list[tuple[int, list[str], dict[str, Any]]] = []

    async def probe(ctx: WorkflowContext) -> None:
        state = await engine.get(ctx.id)
        assert state is not None
        seen.append((state.version, [h.status.value for h in state.history], state.data))
        ctx.data[ctx.step] = ctx.current_step

    flow = create_workflow("probe").step("s0", probe).step("s1", probe).step("s2", probe)
    result = await engine.execute(flow)
    assert result.status is WorkflowStatus.COMPLETED
    assert [s[1] for s in seen] == [
        ["pending", "pending", "pending"],
        ["completed", "pending", "pending"],
        ["completed", "completed", "pending"],
    ]
    assert [s[2] for s in seen] == [{}, {"s0": 0}, {"s0": 0, "s1": 1}]
    versions = [s[0] for s in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert versions[1] - versions[0] == versions[2] - versions[1] == 1


async def test_version_rises_by_one_per_save(
    engine: FluxEngine, store: CountingStore, check: Checker
) -> None:
    flow = create_workflow("count").step("a", _set("a", 1)).step("b", _set("b", 2))
    result = await engine.execute(flow)
    state = await check(result)
    assert store.applied[result.id] >= 2  # at least: a, then b with the run's completion
    assert state.version == 1 + store.applied[result.id]


async def test_stale_version_write_is_rejected_and_changes_nothing(
    engine: FluxEngine, store: CountingStore
) -> None:
    flow = create_workflow("stale").step("a", _set("a", 1)).step("b", _set("b", 2))
    result = await engine.execute(flow)
    inner = store.inner
    row = await inner.load(result.id)
    assert row is not None and row.version > 2
    state = await engine.get(result.id)
    step = row.steps[0]
    stale_transitions = [
        Transition(
            run_id=result.id,
            expected_version=row.version - 1,
            updated_at=row.updated_at,
            status=WorkflowStatus.FAILED.value,
            error="overwritten",
        ),
        Transition(
            run_id=result.id,
            expected_version=1,
            updated_at=row.updated_at,
            update_step=replace(step, status="failed", error="overwritten"),
        ),
        Transition(
            run_id=result.id,
            expected_version=row.version + 1,
            updated_at=row.updated_at,
            delete_steps_from=0,
            current_step=0,
        ),
        Transition(
            run_id=result.id,
            expected_version=row.version - 1,
            updated_at=row.updated_at,
            fence=row.fence,
            insert_step=StepRow(index=5, name="x", status="completed", fence=row.fence),
        ),
    ]
    for t in stale_transitions:
        with pytest.raises(ConcurrentModificationError) as info:
            await inner.apply(t)
        assert result.id in str(info.value)
        assert await inner.load(result.id) == row
    assert await engine.get(result.id) == state


async def test_stale_write_during_a_run_is_rejected(engine: FluxEngine) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def blocked(ctx: WorkflowContext) -> None:
        entered.set()
        await release.wait()

    flow = create_workflow("busy").step("a", _set("a", 1)).step("b", blocked)
    task = asyncio.create_task(engine.execute(flow))
    try:
        await asyncio.wait_for(entered.wait(), 10)
        [state] = await engine.list()
        row = await engine.storage.load(state.id)
        assert row is not None
        with pytest.raises(ConcurrentModificationError):
            await engine.storage.apply(
                Transition(
                    run_id=row.id,
                    expected_version=row.version - 1,
                    updated_at=row.updated_at,
                    fence=row.fence,
                    status=WorkflowStatus.CANCELLED.value,
                )
            )
        assert await engine.storage.load(row.id) == row
    finally:
        release.set()
        result = await asyncio.wait_for(task, 10)
    assert result.status is WorkflowStatus.COMPLETED


async def test_created_at_survives_restart_and_reload(
    backend: str, db_path: Path, store: CountingStore
) -> None:
    flow = create_workflow("reload").step("a", lambda ctx: wait("go")).step("b", _set("b", 1))
    async with FluxEngine(storage=store, retry_policy=FAST) as engine:
        result = await engine.execute(flow)
        before = await engine.get(result.id)
    assert before is not None
    again: Store = store.inner if backend == "memory" else SQLiteStorage(db_path)
    async with FluxEngine(storage=again, retry_policy=FAST) as engine:
        reloaded = await engine.get(result.id)
        assert reloaded == before
        done = await engine.signal(flow, result.id, "go")
        after = await engine.get(result.id)
    assert after is not None and after.status is done.status is WorkflowStatus.COMPLETED
    assert after.created_at == before.created_at
    assert after.updated_at >= before.updated_at
    assert after.version > before.version


# -- rule 19: list -----------------------------------------------------------------------------


async def _make_runs(engine: FluxEngine) -> list[tuple[str, str, WorkflowStatus]]:
    """Runs of three workflows with different outcomes, oldest first."""
    ok = create_workflow("alpha").step("a", _set("a", 1))
    bad = create_workflow("beta").step("b", _fail)
    waiting = create_workflow("gamma").step("g", lambda ctx: wait("go"))
    made = []
    for flow in (ok, bad, waiting, ok, bad, ok, waiting, ok):
        result = await engine.execute(flow)
        made.append((result.id, flow.name, result.status))
    return made


def ids(states: list[Any]) -> list[str]:
    return [s.id for s in states]


async def test_list_all_newest_first(engine: FluxEngine) -> None:
    made = await _make_runs(engine)
    everything = await engine.list()
    assert ids(everything) == [m[0] for m in reversed(made)]
    created = [s.created_at for s in everything]
    assert created == sorted(created, reverse=True)
    assert ids(await engine.list(WorkflowFilter())) == ids(everything)


async def test_list_by_name(engine: FluxEngine) -> None:
    made = await _make_runs(engine)
    for name in ("alpha", "beta", "gamma"):
        found = await engine.list(WorkflowFilter(name=name))
        assert ids(found) == [m[0] for m in reversed(made) if m[1] == name]
        assert all(s.name == name for s in found)
    assert await engine.list(WorkflowFilter(name="delta")) == []
    assert await engine.list(WorkflowFilter(name="ALPHA")) == []
    assert await engine.list(WorkflowFilter(name="alph")) == []


@pytest.mark.parametrize(
    "status",
    [
        "completed",
        WorkflowStatus.FAILED,
        ["suspended"],
        ["completed", "failed"],
        (WorkflowStatus.SUSPENDED, "failed"),
        ["running"],
        [],
    ],
)
async def test_list_by_one_or_many_statuses(engine: FluxEngine, status: Any) -> None:
    made = await _make_runs(engine)
    wanted = {status} if isinstance(status, str) else set(status)
    found = await engine.list(WorkflowFilter(status=status))
    assert ids(found) == [m[0] for m in reversed(made) if m[2] in wanted]


async def test_list_by_name_and_status(engine: FluxEngine) -> None:
    made = await _make_runs(engine)
    found = await engine.list(WorkflowFilter(name="beta", status=["failed", "completed"]))
    assert ids(found) == [m[0] for m in reversed(made) if m[1] == "beta"]
    assert await engine.list(WorkflowFilter(name="alpha", status="failed")) == []


async def test_list_limit_and_offset_page_through_newest_first(engine: FluxEngine) -> None:
    made = await _make_runs(engine)
    newest_first = [m[0] for m in reversed(made)]
    assert ids(await engine.list(WorkflowFilter(limit=3))) == newest_first[:3]
    assert ids(await engine.list(WorkflowFilter(limit=3, offset=2))) == newest_first[2:5]
    assert ids(await engine.list(WorkflowFilter(offset=6))) == newest_first[6:]
    assert await engine.list(WorkflowFilter(limit=0)) == []
    assert await engine.list(WorkflowFilter(offset=100)) == []
    assert await engine.list(WorkflowFilter(limit=10**12, offset=0)) == await engine.list()
    pages: list[str] = []
    for offset in range(0, len(made), 3):
        pages += ids(await engine.list(WorkflowFilter(limit=3, offset=offset)))
    assert pages == newest_first
    alpha = [m[0] for m in reversed(made) if m[1] == "alpha"]
    found = await engine.list(WorkflowFilter(name="alpha", status="completed", limit=2, offset=1))
    assert ids(found) == alpha[1:3]


async def test_list_returns_full_states(engine: FluxEngine) -> None:
    made = await _make_runs(engine)
    for state in await engine.list():
        assert state == await engine.get(state.id)
    assert len(made) == len(await engine.list())


HOSTILE_NAMES = [
    "'; DROP TABLE flux_runs;--",
    '"; DROP TABLE flux_steps;--',
    "%",
    "_",
    "a_c",
    "a%c",
    "it's",
    'say "hi"',
    "\\",
    "x' OR '1'='1",
    "*",
    "[a-z]",
    "Ω≈ç√ 🚀",
]


def _schema(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        conn.close()


async def test_hostile_filter_values_give_exact_results(
    engine: FluxEngine, backend: str, db_path: Path
) -> None:
    made: dict[str, list[str]] = {}
    for name in [*HOSTILE_NAMES, "abc", "a", "plain"]:
        flow = create_workflow(name).step("s", _set("s", name))
        result = await engine.execute(flow)
        made.setdefault(name, []).append(result.id)
    total = len(await engine.list())
    schema = _schema(db_path) if backend == "sqlite" else None

    queries = [*HOSTILE_NAMES, "x" * 10_000, "", "a%", "%c", "a_", "abc%", "' OR 1=1 --"]
    for value in queries:
        found = await engine.list(WorkflowFilter(name=value))
        assert set(ids(found)) == set(made.get(value, [])), value
        assert all(s.name == value for s in found)
        paged = await engine.list(WorkflowFilter(name=value, status=["completed"], limit=5))
        assert set(ids(paged)) == set(made.get(value, []))

    assert len(await engine.list()) == total
    if backend == "sqlite":
        assert _schema(db_path) == schema
        assert any(row[1] == "flux_runs" for row in _schema(db_path))


@pytest.mark.parametrize(
    "status",
    ["'; DROP TABLE flux_runs;--", "completed' OR '1'='1", "%", "COMPLETED ", ["completed", "_"]],
)
def test_hostile_status_values_are_rejected(status: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown status"):
        WorkflowFilter(status=status)
