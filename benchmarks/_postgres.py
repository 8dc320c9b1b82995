"""Section 4: the PostgreSQL store beside raw autocommit inserts on the same server."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxrun import FluxEngine

from ._common import (
    COMMITS_PER_RUN,
    STEPS,
    Report,
    Sizes,
    best_time,
    fmt_rate,
    noop_workflow,
    report_engine_rates,
    run_in_flight,
    run_sequential,
    timed,
    timed_async,
)

__all__ = ["DSN_ENV", "run_postgres", "scratch_database", "throwaway_server", "unavailable"]

DSN_ENV = "FLUXRUN_BENCH_PG_DSN"
_WARMUP = 10
_PAYLOAD = '{"set":{},"del":[]}'
_TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


@contextlib.contextmanager
def throwaway_server(report: Report) -> Iterator[str | None]:
    """Start tests/_pgserver.py's throwaway server; yield its DSN (None if it cannot start)."""
    sys.path.insert(0, str(_TESTS_DIR))
    try:
        from _pgserver import PostgresServer, PostgresServerError
    except ImportError as exc:
        report.line(f"  --pg-start: cannot import tests/_pgserver.py: {exc}")
        sys.path.remove(str(_TESTS_DIR))
        yield None
        return
    sys.path.remove(str(_TESTS_DIR))
    try:
        server = PostgresServer.start()
    except PostgresServerError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.line(f"  --pg-start: the throwaway PostgreSQL server did not start: {first}")
        yield None
        return
    report.line(f"  --pg-start: throwaway server {server.dsn}, up in {server.startup_seconds:.1f}s")
    try:
        yield server.dsn
    finally:
        server.stop()


def unavailable() -> str | None:
    """Why the PostgreSQL section cannot run in this checkout, or None if it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'fluxrun[postgres]')"
    from fluxrun import PostgresStorage
    from fluxrun.storage import Store

    if not (isinstance(PostgresStorage, type) and issubclass(PostgresStorage, Store)):
        return "fluxrun.PostgresStorage is not implemented yet (still a placeholder)"
    return None


@contextlib.contextmanager
def scratch_database(dsn: str) -> Iterator[tuple[str, str]]:
    """A new database on the server for the runs, dropped afterwards; or, without the
    privilege to create one, the given database itself. Yields (dsn, description)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"fluxrun_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.InsufficientPrivilege:
        given = conninfo_to_dict(dsn).get("dbname", "?")
        yield dsn, f"database {given!r} as given (no privilege to create a scratch one)"
        return
    try:
        yield make_conninfo(dsn, dbname=name), f"scratch database {name!r}"
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _insert_sql(table: str) -> str:
    return f"INSERT INTO {table} (run_id, idx, payload) VALUES (%s, %s, %s)"


def _floor_batch(conn: Any, table: str, batch: str, inserts: int) -> None:
    """One autocommit ``INSERT`` per step: one durable commit, one round trip."""
    sql = _insert_sql(table)
    for i in range(inserts):
        conn.execute(sql, (batch, i, _PAYLOAD))


async def _async_floor_batch(conn: Any, table: str, batch: str, inserts: int) -> None:
    """The same inserts on an asyncio connection, as the store makes them."""
    sql = _insert_sql(table)
    for i in range(inserts):
        await conn.execute(sql, (batch, i, _PAYLOAD))


async def _group_floor(conn: Any, table: str, batch: str, workflows: int) -> None:
    """``workflows`` runs' steps written the client-side group-commit way: for each of the
    ``STEPS`` steps, one autocommit multi-row INSERT of every workflow's row."""
    sql = (
        f"INSERT INTO {table} (run_id, idx, payload) "
        "SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[])"
    )
    ids = [f"{batch}-{w}" for w in range(workflows)]
    for i in range(STEPS):
        await conn.execute(sql, (ids, [i] * workflows, [_PAYLOAD] * workflows))


async def _concurrent_floor(pool: Any, table: str, batch: str, workflows: int) -> None:
    """``workflows`` coroutines at once, each awaiting one autocommit INSERT per step over a
    shared pool: what 200 runs in flight would cost with nothing but their commits."""

    async def one(w: int) -> None:
        sql = _insert_sql(table)
        for i in range(STEPS):
            async with pool.connection() as conn:
                await conn.execute(sql, (f"{batch}-{w}", i, _PAYLOAD))

    await asyncio.gather(*(one(w) for w in range(workflows)))


@dataclass
class _Samples:
    concurrent_floor: list[float] = field(default_factory=list)
    group_floor: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    async_floor: list[float] = field(default_factory=list)
    sequential: list[float] = field(default_factory=list)
    in_flight: list[float] = field(default_factory=list)


async def _measure(dsn: str, sizes: Sizes) -> _Samples:
    import psycopg

    from fluxrun import PostgresStorage

    n, inserts, k = sizes.pg_workflows, sizes.pg_floor_inserts, sizes.in_flight
    flow = noop_workflow()
    samples = _Samples()
    table = f"bench_floor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as floor:
        floor.execute(
            f"CREATE TABLE {table} (run_id text NOT NULL, idx integer NOT NULL, "
            "payload text, PRIMARY KEY (run_id, idx))"
        )
        try:
            async with (
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as async_floor,
                FluxEngine(storage=PostgresStorage(dsn)) as engine,
            ):
                _floor_batch(floor, table, "warm-up", min(inserts, 20))
                await _async_floor_batch(async_floor, table, "warm-up-async", min(inserts, 20))
                await run_sequential(engine, flow, _WARMUP)
                # Floor and engine batches alternate, so a busy spell slows both.
                for r in range(sizes.repeats):
                    samples.floor.append(
                        timed(lambda r=r: _floor_batch(floor, table, f"raw-{r}", inserts))
                    )
                    samples.async_floor.append(
                        await timed_async(
                            lambda r=r: _async_floor_batch(
                                async_floor, table, f"async-{r}", inserts
                            )
                        )
                    )
                    samples.sequential.append(
                        await timed_async(lambda: run_sequential(engine, flow, n))
                    )
                from psycopg_pool import AsyncConnectionPool

                async with AsyncConnectionPool(
                    dsn, min_size=10, max_size=10, kwargs={"autocommit": True}, open=False
                ) as pool:
                    await pool.open(wait=True)
                    for r in range(sizes.in_flight_repeats):
                        samples.concurrent_floor.append(
                            await timed_async(
                                lambda r=r: _concurrent_floor(pool, table, f"cc-{r}", k)
                            )
                        )
                        samples.group_floor.append(
                            await timed_async(
                                lambda r=r: _group_floor(async_floor, table, f"gc-{r}", k)
                            )
                        )
                        samples.in_flight.append(
                            await timed_async(lambda: run_in_flight(engine, flow, k))
                        )
        finally:
            floor.execute(f"DROP TABLE IF EXISTS {table}")
    return samples


async def run_postgres(report: Report, sizes: Sizes, dsn: str | None, *, start: bool) -> bool:
    """Print section 4, on ``dsn`` or (``start``, without a DSN) on a throwaway server.

    Returns False if the section failed (a skip is not a failure).
    """
    report.section(f"4. PostgreSQL store: the same {STEPS}-step workflow (best of {sizes.repeats})")
    if dsn is None and start:
        with throwaway_server(report) as started:
            return await _postgres(report, sizes, started)
    return await _postgres(report, sizes, dsn)


async def _postgres(report: Report, sizes: Sizes, dsn: str | None) -> bool:
    n, inserts, k = sizes.pg_workflows, sizes.pg_floor_inserts, sizes.in_flight
    if dsn is None:
        report.line(
            f"  skipped: no DSN given (--pg-dsn DSN, env {DSN_ENV}, or --pg-start for a "
            "throwaway server)"
        )
        return True
    reason = unavailable()
    if reason is not None:
        report.line(f"  skipped: {reason}")
        return True
    try:
        with scratch_database(dsn) as (bench_dsn, where):
            report.line(f"  on {where}")
            samples = await _measure(bench_dsn, sizes)
    except Exception as exc:
        report.line(f"  ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("postgres", "ERROR"))
        return False

    floor_rate = inserts / best_time(samples.floor)
    async_rate = inserts / best_time(samples.async_floor)
    seq_wf = n / best_time(samples.sequential)
    flight_wf = k / best_time(samples.in_flight)
    report.row(
        "floor: raw autocommit INSERT (psycopg)",
        fmt_rate(floor_rate),
        "steps/s",
        f"{1e6 / floor_rate:.0f} µs per insert ({inserts:,} per batch)",
    )
    report.row(
        "floor, the same via an asyncio connection",
        fmt_rate(async_rate),
        "steps/s",
        f"{1e6 / async_rate:.0f} µs per insert (reference only)",
    )
    report_engine_rates(
        report,
        target="postgres sequential",
        floor_rate=floor_rate,
        ceiling_rate=async_rate * STEPS / (STEPS + COMMITS_PER_RUN),
        ceiling_what="inserts",
        runs=n,
        seq_wf=seq_wf,
        in_flight=k,
        flight_wf=flight_wf,
        flight_repeats=sizes.in_flight_repeats,
    )
    cc_wf = k / best_time(samples.concurrent_floor)
    report.row(
        f"floor: {k:,} workflows' INSERTs at once",
        fmt_rate(cc_wf),
        "workflows/s",
        f"{STEPS} autocommit INSERTs each, over a pool of 10 connections",
    )
    report.target(
        "postgres in flight vs concurrent floor",
        flight_wf >= cc_wf,
        f"engine {k:,} in flight, share of that floor",
        f"{flight_wf / cc_wf:.0%}",
        "",
        "target ≥ 100%",
    )
    group_wf = k / best_time(samples.group_floor)
    report.row(
        f"floor: {k:,} workflows, group commit",
        fmt_rate(group_wf),
        "workflows/s",
        f"one multi-row INSERT per batch of {k:,} ready steps ({STEPS} batches)",
    )
    report.target(
        "postgres in flight vs group-commit floor",
        flight_wf >= 0.33 * group_wf,
        f"engine {k:,} in flight, share of that floor",
        f"{flight_wf / group_wf:.0%}",
        "",
        "target ≥ 33%",
    )
    report.target(
        "postgres in flight",
        flight_wf > seq_wf,
        f"engine {k:,} in flight (asyncio.gather)",
        fmt_rate(flight_wf * STEPS),
        "steps/s",
        f"{flight_wf / seq_wf:.1f}x sequential; target > 1x",
    )
    return True
