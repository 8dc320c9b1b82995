"""Section 9: storing a durable batch (``start_batch``): every input is validated and
encoded, and the batch's runs are inserted in one transaction (SQLite: ``executemany``;
PostgreSQL: one ``INSERT ... SELECT FROM unnest``). Beside it, the floor: the same number
of plain rows inserted the same way into a one-column table. The batch is then cancelled
(its items are marked not run in one statement) so nothing drives it.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from typing import Any

from fluxrun import FluxEngine, PostgresStorage, SQLiteStorage, create_workflow

from ._common import Report, Sizes

__all__ = ["run_batches"]


def _flow() -> Any:
    return create_workflow("bench-batch").step("s", lambda ctx: None)


async def _measure(storage: Any, n: int) -> tuple[float, float]:
    inputs = [{"n": i, "sku": f"item-{i:05d}"} for i in range(n)]
    async with FluxEngine(storage=storage, poll_interval=60.0) as engine:
        t0 = time.perf_counter()
        handle = await engine.start_batch(_flow(), inputs, concurrency=1)
        stored = time.perf_counter() - t0
        t0 = time.perf_counter()
        await handle.cancel()
        cancelled = time.perf_counter() - t0
        progress = await handle.progress()
        if progress.total != n:
            raise RuntimeError(f"batch stored {progress.total} items, not {n}")
    return stored, cancelled


def _sqlite_floor(path: str, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT)")
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t VALUES (?, ?)", ((str(i), '{"n": 1}') for i in range(n)))
    conn.execute("COMMIT")
    took = time.perf_counter() - t0
    conn.close()
    return took


def _rows(report: Report, where: str, n: int, floor: float, figures: tuple[float, float]) -> None:
    stored, cancelled = figures
    report.row(f"{where}: floor: {n:,} plain rows in one transaction", f"{floor * 1000:.0f}", "ms")
    report.row(
        f"{where}: start_batch of {n:,} inputs",
        f"{stored * 1000:.0f}",
        "ms",
        f"{n / stored:,.0f} items/s, validation and encoding included",
    )
    report.row(f"{where}: cancel (mark {n:,} items not run)", f"{cancelled * 1000:.0f}", "ms")


async def run_batches(report: Report, sizes: Sizes, pg_dsn: str | None) -> bool:
    """Print section 9 (PostgreSQL too when ``pg_dsn`` is given); False if a part failed."""
    n = 100 if sizes.repeats == 1 else 10_000
    report.section(f"9. Batches: storing {n:,} items in bulk (start_batch)")
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
            floor = _sqlite_floor(os.path.join(tmp, "floor.db"), n)
            figures = await _measure(SQLiteStorage(os.path.join(tmp, "batch.db")), n)
    except Exception as exc:
        report.line(f"  SQLite: ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("sqlite batch", "ERROR"))
        return False
    _rows(report, "SQLite", n, floor, figures)
    if pg_dsn is None:
        report.line("  PostgreSQL: skipped: no DSN given (--pg-dsn or --pg-start)")
        return True
    from ._postgres import scratch_database, unavailable

    reason = unavailable()
    if reason is not None:
        report.line(f"  PostgreSQL: skipped: {reason}")
        return True
    try:
        with scratch_database(pg_dsn) as (dsn, _):
            floor = await _pg_floor(dsn, n)
            figures = await _measure(PostgresStorage(dsn), n)
    except Exception as exc:
        report.line(f"  PostgreSQL: ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("postgres batch", "ERROR"))
        return False
    _rows(report, "PostgreSQL", n, floor, figures)
    return True


async def _pg_floor(dsn: str, n: int) -> float:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE bench_batch_floor (id TEXT PRIMARY KEY, body JSONB)")
        t0 = time.perf_counter()
        await conn.execute(
            "INSERT INTO bench_batch_floor SELECT x, '{\"n\": 1}'::jsonb "
            "FROM unnest(%s::text[]) AS x",
            ([str(i) for i in range(n)],),
        )
        return time.perf_counter() - t0
