"""A database made by an older fluxrun (schema 1 only, or schemas 1 and 2, holding runs and
steps) is migrated forward by the current stores: the old rows read back unchanged and the
new features (error types, tracebacks, the attempt log; the scheduling columns, the signal
inbox, idempotent start, claims and requests) work on them. Both SQL dialects."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from fluxrun.errors import InvalidStateError
from fluxrun.storage._base import AttemptRow, Store, Transition
from fluxrun.storage._migrations import migrations
from fluxrun.storage.sqlite import SQLiteStorage, to_micros

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
        assert schema_version() == len(migrations("sqlite")) == len(migrations("postgres"))
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
        assert schema_version() == len(migrations("sqlite"))
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
        assert schema_version() == 3
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
        assert schema_version() == 3
    finally:
        await store.close()
