"""A database made by an older fluxrun (schema 1 only, or schemas 1 and 2, holding runs and
steps) is migrated forward by the current stores: the old rows read back unchanged and the
new features (error types, tracebacks, the attempt log; the scheduling columns, the signal
inbox, idempotent start, claims and requests) work on them. Both SQL dialects. Schema 4
(leases judged by the boot clock) is SQLite's alone: a schema-3 file with leased runs keeps
its leases as they were and gains the boot-clock columns. The snapshot schema (SQLite 5,
PostgreSQL 4): a run suspended before it is continued by reading it whole, and its next wait
keeps a snapshot."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from fluxrun.errors import InvalidStateError, RunBusyError
from fluxrun.storage._base import AttemptRow, Claim, Store, Transition
from fluxrun.storage._migrations import migrations
from fluxrun.storage.sqlite import BootClock, SQLiteStorage, to_micros

T0 = dt.datetime(2024, 5, 17, 8, 30, 0, 123456, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(seconds=1, microseconds=1)

# (id, name, status, input, step_names, current_step, error, created, updated, completed,
#  version, fence, claims, wait_name)
RUNS = [
    ("old-1", "order", "failed", '{"n": 1}', '["a", "b"]', 1, "boom", T0, T1, T1, 3, 1, 0, None),
    ("old-2", "order", "suspended", "{}", '["a"]', 0, None, T1, T1, None, 2, 4, 0, "approval"),
]
# (run_id, idx, name, status, started, completed, suspended, waiting_for, duration, output,
#  error, retries, changes, fence)
STEPS = [
    ("old-1", 0, "a", "completed", T0, T1, None, None, 1000.5, '{"ok": true}', None, 0,
     '{"set": {"x": 1}, "del": []}', 1),
    ("old-1", 1, "b", "failed", T1, T1, None, None, 0.25, None, "boom", 2, None, 1),
    ("old-2", 0, "a", "suspended", T1, None, T1, "approval", None, None, None, 0, None, 4),
]  # fmt: skip


def _sqlite_v1(path: str, upto: int = 1) -> None:
    """What SQLiteStorage made before schema ``upto + 1``: migrations 1..upto, bookkeeping."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE flux_schema (version INTEGER NOT NULL)")
        for m in migrations("sqlite")[:upto]:
            for statement in m.statements:
                conn.execute(statement)
        conn.execute("INSERT INTO flux_schema (version) VALUES (?)", (upto,))
        for r in RUNS:
            conn.execute(
                "INSERT INTO flux_runs (id, name, status, input, step_names, current_step, "
                "error, created_at, updated_at, completed_at, version, fence, claims, "
                "wait_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*r[:7], to_micros(r[7]), to_micros(r[8]), to_micros(r[9]), *r[10:]),
            )
        for s in STEPS:
            conn.execute(
                "INSERT INTO flux_steps (run_id, idx, name, status, started_at, completed_at, "
                "suspended_at, waiting_for, duration_ms, output, error, retries, changes, "
                "fence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*s[:4], *(to_micros(v) for v in s[4:7]), *s[7:]),
            )
    conn.close()


def _before_snapshots(dialect: str) -> int:
    """The last schema version before the snapshot columns (later schemas follow it)."""
    return next(m.version for m in migrations(dialect) if m.name.endswith("_snapshots.sql")) - 1


def _sqlite_version(path: str) -> int:
    with sqlite3.connect(path) as conn:
        version: int = conn.execute("SELECT version FROM flux_schema").fetchone()[0]
    conn.close()
    return version


def _postgres_v1(dsn: str, upto: int = 1) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("CREATE TABLE flux_schema (version INTEGER NOT NULL)")
        for m in migrations("postgres")[:upto]:
            for statement in m.statements:
                conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("INSERT INTO flux_schema (version) VALUES (%s)", (upto,))
        for r in RUNS:
            conn.execute(
                "INSERT INTO flux_runs (id, name, status, input, step_names, current_step, "
                "error, created_at, updated_at, completed_at, version, fence, claims, "
                "wait_name) VALUES (%s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s, "
                "%s, %s, %s)",
                r,
            )
        for s in STEPS:
            conn.execute(
                "INSERT INTO flux_steps (run_id, idx, name, status, started_at, completed_at, "
                "suspended_at, waiting_for, duration_ms, output, error, retries, changes, "
                "fence) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, "
                "%s::jsonb, %s)",
                s,
            )


def _postgres_version(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT version FROM flux_schema").fetchone()
    assert row is not None
    version: int = row[0]
    return version


Setup = tuple[Callable[[], Store], Callable[[], int]]


def _latest(store: Store) -> int:
    """The schema version today's ``store`` migrates to (numbered per dialect)."""
    return len(migrations("sqlite" if isinstance(store, SQLiteStorage) else "postgres"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def old_database(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    """A schema-1 database with data, and how to open it with today's store / read its
    schema version from outside."""
    if request.param == "sqlite":
        path = str(tmp_path / "old.db")
        _sqlite_v1(path)
        return (lambda: SQLiteStorage(path)), (lambda: _sqlite_version(path))
    dsn: str = request.getfixturevalue("fresh_pg_dsn")
    _postgres_v1(dsn)
    from fluxrun.storage.postgres import PostgresStorage

    return (lambda: PostgresStorage(dsn)), (lambda: _postgres_version(dsn))


async def test_an_old_database_is_migrated_and_keeps_its_runs(old_database: Setup) -> None:
    open_store, schema_version = old_database
    assert schema_version() == 1
    store = open_store()
    try:
        await store.init()
        assert schema_version() == _latest(store)
        old = await store.load("old-1")
        assert old is not None
        assert (old.name, old.status, old.error, old.version, old.fence) == (
            "order",
            "failed",
            "boom",
            3,
            1,
        )
        assert (old.created_at, old.updated_at, old.completed_at) == (T0, T1, T1)
        assert old.step_names == ("a", "b")
        assert [(s.index, s.status, s.retries, s.error) for s in old.steps] == [
            (0, "completed", 0, None),
            (1, "failed", 2, "boom"),
        ]
        assert old.steps[0].started_at == T0 and old.steps[0].duration_ms == 1000.5
        # Rows written before schema 2 have no error type or traceback, and no attempts.
        assert all(s.error_type is None and s.traceback is None for s in old.steps)
        assert await store.list_attempts("old-1") == []
        waiting = await store.load("old-2")
        assert waiting is not None and waiting.wait_name == "approval"
        assert waiting.steps[0].waiting_for == "approval"

        # The new columns and the attempt log work on the old runs.
        tried = AttemptRow(
            index=1,
            name="b",
            attempt=1,
            kind="step",
            status="failed",
            started_at=T0,
            finished_at=T1,
            duration_ms=2.5,
            error_type="builtins.ValueError",
            error="first try",
            traceback="Traceback (most recent call last): ...",
        )
        retried = replace(
            old.steps[1],
            status="failed",
            error="second try",
            error_type="builtins.ValueError",
            traceback="Traceback ...",
        )
        await store.apply(
            Transition("old-1", 3, T1, fence=1, update_step=retried, attempts=(tried,))
        )
        again = await store.load("old-1")
        assert again is not None and again.version == 4 and again.claims == 1
        assert (again.steps[1].error_type, again.steps[1].traceback) == (
            "builtins.ValueError",
            "Traceback ...",
        )
        assert await store.list_attempts("old-1") == [replace(tried, seq=1)]
        assert await store.delete("old-1") is True
        assert await store.list_attempts("old-1") == []
        # Opening it again is a no-op.
        await store.init()
        assert schema_version() == _latest(store)
    finally:
        await store.close()


# A schema-2 attempt of old-1's step 1 (timestamps as SQLite stores them).
ATTEMPT_SQL = (
    "INSERT INTO flux_attempts (run_id, seq, idx, name, attempt, kind, status, started_at, "
    "finished_at, duration_ms, error_type, error, traceback) "
    "VALUES (%s, %s, %s, %s, %s, 'step', 'failed', %s, %s, %s, %s, %s, %s)"
)
ATTEMPT = ("old-1", 1, 1, "b", 1, to_micros(T0), to_micros(T1), 2.5, "builtins.KeyError", "k", "tb")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def v2_database(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    """A schema-2 database (before the scheduling columns) with data."""
    if request.param == "sqlite":
        path = str(tmp_path / "v2.db")
        _sqlite_v1(path, upto=2)
        with sqlite3.connect(path) as conn:
            conn.execute(ATTEMPT_SQL.replace("%s", "?"), ATTEMPT)
        conn.close()
        return (lambda: SQLiteStorage(path)), (lambda: _sqlite_version(path))
    dsn: str = request.getfixturevalue("fresh_pg_dsn")
    _postgres_v1(dsn, upto=2)
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute(ATTEMPT_SQL, (*ATTEMPT[:5], T0, T1, *ATTEMPT[7:]))
    from fluxrun.storage.postgres import PostgresStorage

    return (lambda: PostgresStorage(dsn)), (lambda: _postgres_version(dsn))


async def test_a_schema_2_database_gets_the_scheduling_schema(v2_database: Setup) -> None:
    open_store, schema_version = v2_database
    assert schema_version() == 2
    store = open_store()
    try:
        await store.init()
        assert schema_version() == _latest(store)
        old = await store.load("old-2")
        assert old is not None
        # The new columns have their defaults on the old rows.
        assert (old.run_after, old.wait_kind, old.attempt, old.requested, old.priority) == (
            None,
            None,
            0,
            None,
            0,
        )
        assert old.idempotency_key is None and old.request_reason is None
        assert [s.waiting_for for s in old.steps] == ["approval"]
        attempts = await store.list_attempts("old-1")
        assert [(a.seq, a.index, a.error_type, a.started_at) for a in attempts] == [
            (1, 1, "builtins.KeyError", T0)
        ]
        # A suspended old run becomes a signal wait; a signal makes it due.
        await store.apply(Transition("old-2", 2, T1, wait_kind="signal"))
        assert await store.claim_due("me", ["order"], 10, 60) == []
        sent = await store.send_signal("old-2", "approval", '{"ok": true}', dedupe_key="d")
        assert (sent.seq, sent.created) == (1, True)
        with pytest.raises(InvalidStateError):
            await store.send_signal("old-1", "approval", "1")  # failed: finished
        claimed = await store.claim_due("me", ["order"], 10, 60)
        assert [(r.id, r.fence, r.version) for r in claimed] == [("old-2", 5, 4)]
        assert await store.request("old-2", "cancel", "no longer needed") is True
        assert await store.request("old-1", "cancel") is False
        assert await store.counts("order") == {"failed": 1, "suspended": 1}
        # Idempotent start works next to the old runs (which have no key).
        new = replace(old, id="new-1", status="pending", steps=(), idempotency_key=None)
        first = await store.start(
            new, lease_owner=None, lease_seconds=0, idempotency_key="k", input_hash="h"
        )
        again = await store.start(
            replace(new, id="new-2"), lease_owner=None, lease_seconds=0, idempotency_key="k"
        )
        assert (first.created, again.created, again.run_id, again.input_hash) == (
            True,
            False,
            "new-1",
            "h",
        )
        # Opening it again is a no-op.
        await store.init()
        assert schema_version() == _latest(store)
    finally:
        await store.close()


# -- schema 4 (SQLite only): leases judged by the boot clock ------------------------------------

#: The fake clocks of the schema-4 test: wall clock (seconds since the epoch), boot clock.
WALL = 1_900_000_000.0
BOOT = 5_000.0


def _sqlite_v3(path: str) -> None:
    """A schema-3 file with leases as schema 3 wrote them (``lease_until`` by the wall clock):
    old-2 leased far past ``WALL``, old-3 leased until 10 s before it."""
    _sqlite_v1(path, upto=3)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE flux_runs SET owner = 'old-worker', lease_until = ?, claims = 1, "
            "status = 'running', wait_name = NULL WHERE id = 'old-2'",
            (int((WALL + 86400) * 1_000_000),),
        )
        conn.execute(
            "INSERT INTO flux_runs (id, name, status, input, step_names, current_step, "
            "created_at, updated_at, version, fence, owner, lease_until, claims, priority) "
            "VALUES ('old-3', 'order', 'running', '{}', '[\"a\"]', 0, ?, ?, 1, 2, "
            "'old-worker', ?, 1, 0)",
            (to_micros(T0), to_micros(T1), int((WALL - 10) * 1_000_000)),
        )
    conn.close()


async def test_a_schema_3_sqlite_file_keeps_its_leases_and_gains_the_boot_clock(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "v3.db")
    _sqlite_v3(path)
    assert _sqlite_version(path) == 3
    boot = [BOOT]
    store = SQLiteStorage(path, clock=lambda: WALL, boot_clock=BootClock("b1", lambda: boot[0]))
    try:
        await store.init()
        assert _sqlite_version(path) == len(migrations("sqlite"))
        with sqlite3.connect(path) as conn:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(flux_runs)")}
            leases = conn.execute(
                "SELECT id, lease_boot, lease_boot_until, lease_boot_fence FROM flux_runs "
                "ORDER BY id"
            ).fetchall()
        conn.close()
        assert {"lease_boot", "lease_boot_until", "lease_boot_fence"} <= columns
        assert leases == [(i, None, None, None) for i in ("old-1", "old-2", "old-3")]
        old = await store.load("old-2")
        assert old is not None and (old.owner, old.claims, old.version, old.fence) == (
            "old-worker",
            1,
            2,
            4,
        )
        # A lease written before schema 4 is judged by its lease_until: old-2's is live (and
        # stays live however far the boot clock moves), old-3's is over.
        boot[0] += 10 * 86400
        assert [r.id for r in await store.find_recoverable(["order"], 10)] == ["old-3"]
        with pytest.raises(RunBusyError):
            await store.delete("old-2")
        with pytest.raises(RunBusyError):
            await store.apply(Transition("old-2", 2, T1, claim=Claim("me", 30)))
        claimed = await store.claim_due("me", ["order"], 10, 30)
        assert [(r.id, r.owner, r.fence) for r in claimed] == [("old-3", "me", 3)]
        # Two days later by the wall clock: old-2's lease (schema 3's) is over, the new claim
        # of old-3 is judged by the boot clock, which did not move, so it stays.
        other = SQLiteStorage(
            path, clock=lambda: WALL + 86400 * 2, boot_clock=BootClock("b1", lambda: boot[0])
        )
        try:
            assert [r.id for r in await other.find_recoverable(["order"], 10)] == ["old-2"]
            boot[0] += 30
            found = await other.find_recoverable(["order"], 10)
            assert [r.id for r in found] == ["old-3", "old-2"]  # by created_at
        finally:
            await other.close()
        await store.init()  # again: a no-op
        assert _sqlite_version(path) == len(migrations("sqlite"))
    finally:
        await store.close()


# -- snapshots (SQLite schema 5, PostgreSQL schema 4) -------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def before_snapshots(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    """A database at the schema before snapshots, holding old-4: a run of three steps whose
    first completed (``x = 1``) and whose second waits for "approval"."""
    run = (
        "INSERT INTO flux_runs (id, name, status, input, step_names, current_step, created_at, "
        "updated_at, version, fence, claims, wait_name, wait_kind) VALUES ('old-4', 'three', "
        "'suspended', '{}', '[\"a\", \"b\", \"c\"]', 1, %s, %s, 3, 1, 0, 'approval', 'signal')"
    )
    steps = (
        "INSERT INTO flux_steps (run_id, idx, name, status, started_at, completed_at, "
        "suspended_at, waiting_for, retries, changes, fence) VALUES "
        "('old-4', 0, 'a', 'completed', %s, %s, NULL, NULL, 0, '{\"set\": {\"x\": 1}, "
        "\"del\": []}', 1), ('old-4', 1, 'b', 'suspended', %s, NULL, %s, 'approval', 0, "
        '\'{"set": {"y": 2}, "del": []}\', 1)'
    )
    if request.param == "sqlite":
        path = str(tmp_path / "v4.db")
        upto = _before_snapshots("sqlite")
        _sqlite_v1(path, upto=upto)
        with sqlite3.connect(path) as conn:
            conn.execute(run.replace("%s", "?"), (to_micros(T0), to_micros(T1)))
            conn.execute(steps.replace("%s", "?"), tuple(to_micros(v) for v in (T0, T1, T1, T1)))
        conn.close()
        assert _sqlite_version(path) == upto
        return (lambda: SQLiteStorage(path)), (lambda: _sqlite_version(path))
    dsn: str = request.getfixturevalue("fresh_pg_dsn")
    upto = _before_snapshots("postgres")
    _postgres_v1(dsn, upto=upto)
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute(run, (T0, T1))
        conn.execute(steps, (T0, T1, T1, T1))
    from fluxrun.storage.postgres import PostgresStorage

    return (lambda: PostgresStorage(dsn)), (lambda: _postgres_version(dsn))


async def test_a_run_suspended_before_snapshots_continues_and_gains_one(
    before_snapshots: Setup,
) -> None:
    from fluxrun import FluxEngine, WorkflowContext, create_workflow, wait

    open_store, schema_version = before_snapshots
    seen: list[dict[str, object]] = []

    def c(ctx: WorkflowContext) -> object:
        seen.append(dict(ctx.data))
        return wait("again")

    flow = (
        create_workflow("three")
        .step("a", lambda ctx: None)
        .step("b", lambda ctx: wait("approval"))
        .step("c", c)
    )
    store = open_store()
    async with FluxEngine(storage=store, poll_interval=0.05) as engine:
        assert schema_version() == _latest(store)
        tail = await store.load_tail("old-4")
        assert tail is not None and tail.snapshot is None and tail.steps_from == 0
        result = await engine.signal(flow, "old-4", "approval", {"ok": True})
        assert result.status.value == "suspended" and seen == [{"x": 1, "y": 2}]
        tail = await store.load_tail("old-4")
        assert tail is not None and tail.snapshot is not None
        assert (tail.snapshot.at, tail.steps_from, [r.index for r in tail.steps]) == (2, 2, [2])
        done = await engine.signal(flow, "old-4", "again", None)
        assert done.status.value == "completed" and done.data == {"x": 1, "y": 2}
        assert seen == [{"x": 1, "y": 2}]
        assert [h.status.value for h in done.history] == ["completed"] * 3
