"""PostgresStorage on a real PostgreSQL server: workflows end to end, and the store's
compare-and-set, fencing, listing and migration behaviour (MemoryStorage is the oracle)."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from fluxrun import (
    ConcurrentModificationError,
    FluxEngine,
    InvalidArgumentError,
    LeaseLostError,
    MemoryStorage,
    PostgresStorage,
    RetryPolicy,
    RunBusyError,
    SchemaVersionError,
    StepStatus,
    StorageError,
    WorkflowContext,
    WorkflowFilter,
    WorkflowStatus,
    create_workflow,
    wait,
)
from fluxrun.storage._base import Claim, ListQuery, RunRow, StepRow, Store, Transition
from fluxrun.storage._migrations import migrations

FAST = RetryPolicy(initial_delay=0, jitter=False)
T0 = dt.datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=dt.UTC)
HOSTILE = [
    "'; DROP TABLE flux_runs;--",
    "%",
    "_",
    "a%b_c",
    'it\'s "quoted"',
    "back\\slash",
    "$1 %s %(x)s {lease}",
    "ünïcødé ✓",
]


@pytest.fixture
async def store(fresh_pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    s = PostgresStorage(fresh_pg_dsn)
    await s.init()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def engine(store: PostgresStorage) -> AsyncIterator[FluxEngine]:
    async with FluxEngine(storage=store, retry_policy=FAST) as e:
        yield e


def _run(
    run_id: str,
    *,
    name: str = "wf",
    status: str = "pending",
    created_at: dt.datetime = T0,
    version: int = 1,
    fence: int = 1,
) -> RunRow:
    return RunRow(
        id=run_id,
        name=name,
        status=status,
        input='{"n": 1}',
        step_names=("a", "b", "c"),
        current_step=0,
        created_at=created_at,
        updated_at=created_at,
        version=version,
        fence=fence,
    )


def _step(index: int, *, status: str = "completed", fence: int = 1) -> StepRow:
    return StepRow(
        index=index,
        name="abc"[index],
        status=status,
        started_at=T0,
        completed_at=T0 + dt.timedelta(microseconds=7),
        duration_ms=0.25,
        output='{"i": ' + str(index) + "}",
        # In the layout jsonb gives back (keys by length, then bytes), so rows compare equal.
        changes='{"del": [], "set": {"k": ' + str(index) + "}}",
        fence=fence,
    )


# -- workflows end to end --------------------------------------------------------------------


async def test_success_carries_data_across_steps(engine: FluxEngine) -> None:
    async def a(ctx: WorkflowContext) -> Any:
        ctx.data["items"] = list(ctx.input["items"])
        ctx.data["when"] = T0
        return {"n": 1.5e-7, "big": 10**20}

    async def b(ctx: WorkflowContext) -> Any:
        ctx.data["count"] = len(ctx.data["items"])
        ctx.data["ratio"] = 0.1

    async def c(ctx: WorkflowContext) -> Any:
        ctx.data["total"] = ctx.data["count"] * ctx.data["ratio"]
        del ctx.data["ratio"]

    flow = create_workflow("carry").step("a", a).step("b", b).step("c", c).build()
    result = await engine.execute(flow, {"items": ["x", "y", "z"]})
    assert result.status == WorkflowStatus.COMPLETED
    expected = {"items": ["x", "y", "z"], "when": T0, "count": 3, "total": 3 * 0.1}
    assert result.data == expected
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.COMPLETED
    assert state.data == expected
    assert state.input == {"items": ["x", "y", "z"]}
    assert [h.status for h in state.history] == [StepStatus.COMPLETED] * 3
    assert state.history[0].output == {"n": 1.5e-7, "big": 10**20}
    assert state.history == result.history


async def test_suspension_and_signal(engine: FluxEngine) -> None:
    async def ask(ctx: WorkflowContext) -> Any:
        ctx.data["asked"] = True
        return wait("approved")

    async def finish(ctx: WorkflowContext) -> Any:
        ctx.data["by"] = ctx.signals["approved"]["by"]

    flow = create_workflow("approval").step("ask", ask).step("finish", finish).build()
    first = await engine.execute(flow, None)
    assert first.status == WorkflowStatus.SUSPENDED
    stored = await engine.get(first.id)
    assert stored is not None and stored.status == WorkflowStatus.SUSPENDED
    assert stored.history[0].waiting_for == "approved"

    done = await engine.signal(flow, first.id, "approved", {"by": "ann"})
    assert done.status == WorkflowStatus.COMPLETED
    assert done.data == {"asked": True, "by": "ann"}
    state = await engine.get(first.id)
    assert state is not None
    assert state.status == WorkflowStatus.COMPLETED
    assert state.history[0].output == {"by": "ann"}


async def test_failure_runs_compensations_and_rolls_back(engine: FluxEngine) -> None:
    undone: list[str] = []

    async def reserve(ctx: WorkflowContext) -> Any:
        ctx.data["reserved"] = True

    async def release(ctx: WorkflowContext) -> Any:
        undone.append("reserve")
        ctx.data["reserved"] = False

    async def charge(ctx: WorkflowContext) -> Any:
        raise RuntimeError("card declined")

    flow = (
        create_workflow("saga")
        .step("reserve", reserve, compensate=release)
        .step("charge", charge)
        .build()
    )
    result = await engine.execute(flow, None)
    assert result.status == WorkflowStatus.ROLLED_BACK
    assert undone == ["reserve"]
    state = await engine.get(result.id)
    assert state is not None
    assert state.status == WorkflowStatus.ROLLED_BACK
    assert [h.status for h in state.history] == [StepStatus.COMPENSATED, StepStatus.FAILED]
    assert state.history[1].error == "card declined"
    assert state.error == "card declined"


async def test_resume_restores_data_as_the_step_first_saw_it(engine: FluxEngine) -> None:
    seen: list[dict[str, Any]] = []

    async def a(ctx: WorkflowContext) -> Any:
        ctx.data["x"] = 1

    async def b(ctx: WorkflowContext) -> Any:
        seen.append(dict(ctx.data))
        ctx.data["x"] += 10
        ctx.data["b"] = "done"

    async def c(ctx: WorkflowContext) -> Any:
        seen.append(dict(ctx.data))
        if ctx.input["fail"] and len(seen) < 3:
            raise RuntimeError("c failed")
        ctx.data["c"] = True

    flow = create_workflow("resumable").step("a", a).step("b", b).step("c", c).build()
    first = await engine.execute(flow, {"fail": True})
    assert first.status == WorkflowStatus.FAILED
    again = await engine.resume(flow, first.id, from_step="b")
    assert again is not None and again.status == WorkflowStatus.COMPLETED
    assert seen[0] == {"x": 1}
    assert seen[2] == {"x": 1}, "resume must restore ctx.data as it was when 'b' started"
    assert again.data == {"x": 11, "b": "done", "c": True}
    state = await engine.get(first.id)
    assert state is not None and state.data == again.data
    assert [h.status for h in state.history] == [StepStatus.COMPLETED] * 3


async def test_error_text_databases_refuse_is_stored_escaped(engine: FluxEngine) -> None:
    async def bad(ctx: WorkflowContext) -> Any:
        raise ValueError("nul \x00 and lone \ud800 surrogate")

    flow = create_workflow("bad-text").step("bad", bad).build()
    result = await engine.execute(flow, None)
    assert result.status == WorkflowStatus.FAILED
    state = await engine.get(result.id)
    assert state is not None
    assert state.error == state.history[0].error == "nul \\x00 and lone \\ud800 surrogate"
    async with FluxEngine(storage=MemoryStorage(), retry_policy=FAST) as reference:
        expected = await reference.execute(flow, None)
        again = await reference.get(expected.id)
    assert again is not None and again.error == state.error


# -- compare-and-set and fencing --------------------------------------------------------------


async def test_stale_version_is_rejected(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    applied = await store.apply(Transition("r1", expected_version=1, updated_at=T0, status="x"))
    assert applied.version == 2
    with pytest.raises(ConcurrentModificationError) as info:
        await store.apply(Transition("r1", expected_version=1, updated_at=T0, status="y"))
    assert type(info.value) is ConcurrentModificationError
    row = await store.load("r1")
    assert row is not None and row.status == "x" and row.version == 2


async def test_concurrent_applies_on_one_version_exactly_one_wins(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    attempts = [
        Transition(
            "r1",
            expected_version=1,
            updated_at=T0,
            fence=1,
            current_step=1,
            insert_step=_step(0),
            status=f"writer-{i}",
        )
        for i in range(6)
    ]
    outcomes = await asyncio.gather(*(store.apply(t) for t in attempts), return_exceptions=True)
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(won) == 1 and won[0].version == 2
    assert all(isinstance(e, ConcurrentModificationError) for e in lost)
    row = await store.load("r1")
    assert row is not None and row.version == 2 and len(row.steps) == 1


async def test_concurrent_claims_exactly_one_wins(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    claims = [
        Transition("r1", expected_version=1, updated_at=T0, claim=Claim(f"w{i}", 30))
        for i in range(2)
    ]
    outcomes = await asyncio.gather(*(store.apply(t) for t in claims), return_exceptions=True)
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(won) == 1 and won[0].fence == 2
    assert sum(isinstance(o, ConcurrentModificationError) for o in outcomes) == 1


async def test_a_stale_fence_loses_the_lease(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    # A claims with a lease that expires at once (by the database clock), then B claims.
    a = await store.apply(Transition("r1", 1, T0, claim=Claim("A", 0)))
    b = await store.apply(Transition("r1", a.version, T0, claim=Claim("B", 30)))
    assert (a.fence, b.fence) == (2, 3)
    with pytest.raises(LeaseLostError):
        await store.apply(
            Transition("r1", b.version, T0, fence=a.fence, insert_step=_step(0, fence=a.fence))
        )
    # B's live lease keeps everyone else out; B itself writes on.
    with pytest.raises(RunBusyError):
        await store.apply(Transition("r1", b.version, T0, claim=Claim("C", 30)))
    with pytest.raises(RunBusyError):
        await store.apply(Transition("r1", b.version, T0, status="edited"))
    done = await store.apply(Transition("r1", b.version, T0, fence=b.fence, release=True))
    row = await store.load("r1")
    assert row is not None
    assert (row.version, row.fence, row.owner, row.lease_until, row.claims) == (
        done.version,
        3,
        None,
        None,
        0,
    )
    assert row.steps == ()


async def test_a_step_is_recorded_once(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    await store.apply(Transition("r1", 1, T0, fence=1, insert_step=_step(0)))
    with pytest.raises(ConcurrentModificationError, match="already recorded"):
        await store.apply(Transition("r1", 2, T0, fence=1, status="x", insert_step=_step(0)))
    with pytest.raises(ConcurrentModificationError, match="no recorded outcome"):
        await store.apply(Transition("r1", 2, T0, fence=1, status="x", update_step=_step(1)))
    row = await store.load("r1")
    assert row is not None and row.version == 2 and row.status == "pending"  # nothing applied
    assert row.steps == (_step(0),)


async def test_transitions_match_the_reference_model(store: PostgresStorage) -> None:
    memory = MemoryStorage()
    both: list[Store] = [memory, store]
    script = [
        Transition("r1", 1, T0, fence=1, current_step=1, insert_step=_step(0)),
        Transition("r1", 2, T0, fence=1, current_step=2, insert_step=_step(1)),
        Transition("r1", 3, T0, fence=1, insert_step=_step(2, status="failed"), error="boom"),
        Transition(
            "r1", 4, T0, fence=1, update_step=_step(1, status="compensated"), status="rolling"
        ),
        # Resume from 1 keeping 2: step 1 is deleted, then written again as an update.
        Transition("r1", 5, T0, fence=1, delete_steps_from=1, keep_steps=(2,), current_step=1),
        Transition("r1", 6, T0, fence=1, insert_step=_step(1, fence=1), completed_at=T0),
        Transition(
            "r1",
            7,
            T0,
            fence=1,
            delete_steps_from=0,
            insert_step=_step(0, status="redo"),
            update_step=_step(2, status="kept"),
            error=None,
            completed_at=None,
            wait_name="sig",
        ),
        # The same, replacing the row it inserts: applies.
        Transition(
            "r1",
            7,
            T0,
            fence=1,
            delete_steps_from=0,
            insert_step=_step(0, status="redo"),
            update_step=_step(0, status="replaced"),
        ),
        Transition("r1", 8, T0, fence=1, update_step=_step(1, status="missing")),
        Transition("r1", 7, T0, fence=1, update_step=_step(0, status="stale")),
        Transition("r1", 8, T0, fence=2, update_step=_step(0, status="fenced")),
        Transition("r1", 8, T0, fence=1, update_step=_step(0, status="ok"), release=True),
        # A claim and a release in one transition: the fence moves, no owner is left.
        Transition("r1", 9, T0, claim=Claim("x", 30), release=True, status="claimed"),
        Transition("r1", 10, T0, claim=Claim("y", 30), renew_lease=5, current_step=0),
    ]
    for s in both:
        await s.create(_run("r1"), lease_owner=None, lease_seconds=30)
    for t in script:
        results = []
        for s in both:
            try:
                results.append(await s.apply(t))
            except ConcurrentModificationError as exc:
                results.append(f"{type(exc).__name__}: {exc}")
        assert results[0] == results[1], t
        mine, theirs = await store.load("r1"), await memory.load("r1")
        assert mine is not None and theirs is not None
        assert _comparable(mine) == _comparable(theirs), t


def _comparable(row: RunRow) -> tuple[Any, ...]:
    # Lease expiries come from each store's own clock; JSON text may differ in layout.
    return (
        row.status,
        row.version,
        row.fence,
        row.owner,
        row.current_step,
        row.error,
        row.completed_at,
        row.wait_name,
        row.created_at,
        row.updated_at,
        tuple((s.index, s.status, s.fence, s.started_at, s.completed_at) for s in row.steps),
    )


async def test_datetimes_come_back_exact_and_in_utc(store: PostgresStorage) -> None:
    async with store._connection("test") as conn:
        await conn.execute("SET TimeZone = 'Asia/Kathmandu'")  # +05:45, to be noticed
    odd = dt.datetime(2001, 2, 3, 4, 5, 6, 999999, tzinfo=dt.timezone(dt.timedelta(hours=-7)))
    await store.create(_run("r1", created_at=odd), lease_owner="me", lease_seconds=30)
    row = await store.load("r1")
    assert row is not None
    assert row.created_at == odd and row.created_at.utcoffset() == dt.timedelta(0)
    assert row.lease_until is not None and row.lease_until.tzinfo == dt.UTC
    assert row.owner == "me" and row.claims == 1
    assert row.input == '{"n": 1}' and row.step_names == ("a", "b", "c")


async def test_find_recoverable_and_lease_renewal(store: PostgresStorage) -> None:
    await store.create(_run("live"), lease_owner="me", lease_seconds=60)
    await store.create(
        _run("gone", created_at=T0 + dt.timedelta(seconds=1)), lease_owner=None, lease_seconds=0
    )
    await store.create(_run("other", name="elsewhere"), lease_owner=None, lease_seconds=0)
    await store.create(_run("done", status="completed"), lease_owner=None, lease_seconds=0)
    found = await store.find_recoverable(["wf"], limit=10)
    assert [r.id for r in found] == ["gone"]
    assert await store.find_recoverable([], limit=10) == []

    renewed = await asyncio.to_thread(
        store.renew_leases, "me", {"live": 1, "gone": 1, "missing": 1}, 0
    )
    assert renewed.lost == {"gone", "missing"}
    # Renewed with a zero-length lease: it expired by the database clock, so it is recoverable.
    found = await store.find_recoverable(["wf", "elsewhere"], limit=10)
    assert [r.id for r in found] == ["live", "other", "gone"]
    assert (await asyncio.to_thread(store.renew_leases, "me", {"live": 2}, 30)).lost == {"live"}
    assert (await asyncio.to_thread(store.renew_leases, "me", {}, 30)).lost == set()


async def test_lease_renewal_reconnects_after_its_connection_dies(
    store: PostgresStorage, fresh_pg_dsn: str
) -> None:
    await store.create(_run("r1"), lease_owner="me", lease_seconds=30)
    assert (await asyncio.to_thread(store.renew_leases, "me", {"r1": 1}, 30)).lost == set()
    renewal = store._renewer.conn
    assert renewal is not None
    with psycopg.connect(fresh_pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (renewal.info.backend_pid,))
    assert (await asyncio.to_thread(store.renew_leases, "me", {"r1": 1}, 30)).lost == set()
    assert store._renewer.conn is not None and store._renewer.conn is not renewal
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        store.renew_leases("me", {"r1": 1}, 30)


async def test_delete_removes_the_run_and_its_steps(store: PostgresStorage) -> None:
    await store.create(_run("r1"), lease_owner=None, lease_seconds=30)
    await store.apply(Transition("r1", 1, T0, fence=1, insert_step=_step(0)))
    assert await store.delete("r1") is True
    assert await store.delete("r1") is False
    assert await store.load("r1") is None
    async with store._connection("test") as conn:
        cur = await conn.execute("SELECT count(*) FROM flux_steps")
        assert await cur.fetchone() == (0,)
    with pytest.raises(ConcurrentModificationError, match="no longer exists"):
        await store.apply(Transition("r1", 1, T0, status="x"))
    await store.create(_run("r2"), lease_owner=None, lease_seconds=30)
    with pytest.raises(ConcurrentModificationError, match="already exists"):
        await store.create(_run("r2"), lease_owner=None, lease_seconds=30)


# -- listing ---------------------------------------------------------------------------------


async def test_list_order_filters_and_paging_match_memory(store: PostgresStorage) -> None:
    memory = MemoryStorage()
    plan = [
        ("r1", "a", "completed", 0),
        ("r2", "b", "failed", 1),
        ("r3", "a", "pending", 1),  # same created_at as r2: insertion order breaks the tie
        ("r4", "a", "completed", 1),
        ("r5", "b", "completed", -5),
        ("r6", "a", "failed", 3),
    ]
    for s in (memory, store):
        for run_id, name, status, offset in plan:
            row = _run(run_id, name=name, status=status, created_at=T0 + dt.timedelta(offset))
            await s.create(row, lease_owner=None, lease_seconds=30)
    await store.apply(Transition("r4", 1, T0, fence=1, insert_step=_step(0)))
    await memory.apply(Transition("r4", 1, T0, fence=1, insert_step=_step(0)))
    C, F, P = WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.PENDING
    queries = [
        ListQuery(),
        ListQuery(name="a"),
        ListQuery(name="zzz"),
        ListQuery(statuses=(C,)),
        ListQuery(statuses=(C, F)),
        ListQuery(statuses=()),
        ListQuery(name="a", statuses=(C, P)),
        ListQuery(limit=2),
        ListQuery(limit=2, offset=2),
        ListQuery(limit=0),
        ListQuery(offset=4),
        ListQuery(offset=100),
        ListQuery(name="b", limit=1, offset=1),
    ]
    for q in queries:
        mine = await store.list_runs(q)
        theirs = await memory.list_runs(q)
        assert [r.id for r in mine] == [r.id for r in theirs], q
        assert [len(r.steps) for r in mine] == [len(r.steps) for r in theirs], q
    everything = [r.id for r in await store.list_runs(ListQuery())]
    assert everything == ["r6", "r4", "r3", "r2", "r1", "r5"]


async def test_hostile_strings_are_stored_and_filtered_exactly(
    engine: FluxEngine, store: PostgresStorage
) -> None:
    ids: dict[str, str] = {}
    for name in HOSTILE:

        async def step(ctx: WorkflowContext, name: str = name) -> Any:
            ctx.data[name] = name
            return wait(name)

        flow = create_workflow(name).step(name, step).build()
        result = await engine.execute(flow, {name: name})
        assert result.status == WorkflowStatus.SUSPENDED
        ids[name] = result.id
    for name in HOSTILE:
        found = await engine.list(WorkflowFilter(name=name))
        assert [s.id for s in found] == [ids[name]], name
        state = found[0]
        assert state.name == name and state.input == {name: name} and state.data == {name: name}
        assert state.history[0].name == name and state.history[0].waiting_for == name
    assert len(await engine.list()) == len(HOSTILE)
    assert await engine.list(WorkflowFilter(name="%%")) == []
    assert await store.list_runs(ListQuery(name="'; DROP TABLE flux_runs;--")) != []
    async with store._connection("test") as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "ORDER BY 1"
        )
        assert await cur.fetchall() == [
            ("flux_attempts",),
            ("flux_batches",),
            ("flux_runs",),
            ("flux_schedules",),
            ("flux_schema",),
            ("flux_signals",),
            ("flux_steps",),
            ("flux_workers",),
        ]


# -- lifecycle -------------------------------------------------------------------------------


async def test_two_concurrent_inits_migrate_once(fresh_pg_dsn: str) -> None:
    first, second = PostgresStorage(fresh_pg_dsn), PostgresStorage(fresh_pg_dsn)
    try:
        await asyncio.gather(first.init(), second.init())
        await first.init()  # idempotent
    finally:
        await first.close()
        await second.close()
    with psycopg.connect(fresh_pg_dsn) as conn:
        latest = len(migrations("postgres"))
        assert conn.execute("SELECT version FROM flux_schema").fetchall() == [(latest,)]


async def test_a_newer_schema_is_refused(fresh_pg_dsn: str) -> None:
    s = PostgresStorage(fresh_pg_dsn)
    await s.init()
    await s.close()
    with psycopg.connect(fresh_pg_dsn) as conn:
        conn.execute("UPDATE flux_schema SET version = 99")
    newer = PostgresStorage(fresh_pg_dsn)
    try:
        with pytest.raises(SchemaVersionError, match="99"):
            await newer.init()
    finally:
        await newer.close()


async def test_a_pool_passed_in_is_used_and_never_closed(fresh_pg_dsn: str) -> None:
    # Connections that are not autocommit and return dicts: the store must cope and restore.
    pool = AsyncConnectionPool(
        fresh_pg_dsn, min_size=1, max_size=4, kwargs={"row_factory": dict_row}, open=False
    )
    await pool.open(wait=True)
    try:
        store = PostgresStorage(pool=pool)
        async with FluxEngine(storage=store, retry_policy=FAST) as engine:

            async def a(ctx: WorkflowContext) -> Any:
                ctx.data["a"] = 1

            flow = create_workflow("pooled").step("a", a).build()
            result = await engine.execute(flow, None)
            assert result.status == WorkflowStatus.COMPLETED
            assert len(await engine.list()) == 1
            # The renewal connection is built from the pool's settings.
            assert (await asyncio.to_thread(store.renew_leases, "x", {result.id: 1}, 5)).lost == {
                result.id
            }
        assert pool.closed is False
        async with pool.connection() as conn:
            assert conn.autocommit is False
            cur = await conn.execute("SELECT count(*) AS n FROM flux_runs")
            assert await cur.fetchone() == {"n": 1}
        with pytest.raises(StorageError, match="closed"):
            await store.load(result.id)
    finally:
        await pool.close()


async def test_store_errors_are_typed(fresh_pg_dsn: str, store: PostgresStorage) -> None:
    bad = PostgresStorage(fresh_pg_dsn + "_no_such_database")
    with pytest.raises(StorageError, match="no_such_database"):
        await bad.init()
    await bad.close()
    # A value the database refuses becomes a StorageError naming the operation.
    with pytest.raises(StorageError, match="create"):
        await store.create(
            RunRow(
                id="r1",
                name="wf",
                status="pending",
                input="not json",
                step_names=(),
                current_step=0,
                created_at=T0,
                updated_at=T0,
                version=1,
                fence=1,
            ),
            lease_owner=None,
            lease_seconds=30,
        )
    assert await store.load("r1") is None


def test_constructor_arguments_are_validated() -> None:
    dsn = "postgresql://nobody@127.0.0.1:1/none"  # never connected to: nothing opens before init
    for kwargs in (
        {},
        {"dsn": dsn, "pool": object()},
        {"dsn": ""},
        {"dsn": 5},
        {"pool": object()},
        {"dsn": dsn, "min_size": -1},
        {"dsn": dsn, "min_size": 5, "max_size": 2},
        {"dsn": dsn, "max_size": True},
        {"dsn": dsn, "query_timeout": 0},
        {"dsn": dsn, "query_timeout": -1},
        {"dsn": dsn, "query_timeout": float("inf")},
        {"dsn": dsn, "query_timeout": float("nan")},
        {"dsn": dsn, "query_timeout": True},
        {"dsn": dsn, "query_timeout": "30"},
    ):
        with pytest.raises(InvalidArgumentError):
            PostgresStorage(**kwargs)  # type: ignore[arg-type]
    assert "PostgresStorage(" in repr(PostgresStorage("postgresql://u:secret@h/db"))
    assert "secret" not in repr(PostgresStorage("postgresql://u:secret@h/db"))


def test_importable_without_psycopg() -> None:
    program = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None
        sys.modules["psycopg_pool"] = None
        import fluxrun
        from fluxrun import PostgresStorage, StorageError
        try:
            PostgresStorage("postgresql://localhost/x")
        except StorageError as exc:
            print("refused:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "fluxrun[postgres]" in done.stdout
