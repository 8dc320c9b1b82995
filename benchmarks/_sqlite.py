"""Sections 2 and 3: the SQLite store beside raw sqlite3 commits with the same pragmas."""

from __future__ import annotations

import os
import sqlite3
import tempfile

from fluxrun import FluxEngine, SQLiteStorage

from ._common import (
    BIG_KEYS,
    BIG_VALUE_CHARS,
    COMMITS_PER_RUN,
    STEPS,
    Report,
    Sizes,
    best_time,
    big_data_workflow,
    fmt_rate,
    noop_workflow,
    report_engine_rates,
    run_in_flight,
    run_sequential,
    timed,
    timed_async,
)

__all__ = ["BIG_TARGET_RATIO", "run_sqlite"]


BIG_TARGET_RATIO = 2.0
"""With ~100 KB of ctx.data, a step may cost at most this many times a small-data step."""

_WARMUP = 20


def _open_floor(path: str) -> sqlite3.Connection:
    """A raw connection with the pragmas SQLiteStorage uses (WAL, synchronous=FULL)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_size_limit = 67108864")
    conn.execute(
        "CREATE TABLE floor (run_id TEXT NOT NULL, idx INTEGER NOT NULL, payload TEXT, "
        "PRIMARY KEY (run_id, idx)) WITHOUT ROWID"
    )
    return conn


def _commit_one(conn: sqlite3.Connection, run_id: str, index: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO floor (run_id, idx, payload) VALUES (?, ?, ?)",
        (run_id, index, '{"set":{},"del":[]}'),
    )
    conn.execute("COMMIT")


def _floor_batch(conn: sqlite3.Connection, batch: str, commits: int) -> None:
    """One ``BEGIN IMMEDIATE; INSERT; COMMIT`` per step: what a step commit cannot beat."""
    for i in range(commits):
        _commit_one(conn, batch, i)


def _group_floor(conn: sqlite3.Connection, batch: str, workflows: int) -> None:
    """``workflows`` runs' steps written the group-commit way: for each of the ``STEPS``
    steps, one ``BEGIN IMMEDIATE``, one INSERT per workflow (the floor's own statement), one
    ``COMMIT``."""
    sql = "INSERT INTO floor (run_id, idx, payload) VALUES (?, ?, ?)"
    ids = [f"{batch}-{w}" for w in range(workflows)]
    for i in range(STEPS):
        conn.execute("BEGIN IMMEDIATE")
        for run_id in ids:
            conn.execute(sql, (run_id, i, '{"set":{},"del":[]}'))
        conn.execute("COMMIT")


async def run_sqlite(
    report: Report, sizes: Sizes, *, section2: bool = True, big: bool = True
) -> None:
    """Print section 2 and section 3 (each unless switched off)."""
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        floor = _open_floor(os.path.join(tmp, "floor.db"))
        try:
            async with FluxEngine(storage=SQLiteStorage(os.path.join(tmp, "engine.db"))) as engine:
                if section2:
                    await _section2(report, sizes, engine, floor)
                if big:
                    await _section3(report, sizes, engine)
        finally:
            floor.close()


async def _section2(
    report: Report, sizes: Sizes, engine: FluxEngine, floor: sqlite3.Connection
) -> None:
    n, commits, k = sizes.sqlite_workflows, sizes.sqlite_floor_commits, sizes.in_flight
    report.section(
        f"2. SQLite store (WAL, synchronous=FULL, temp file): the same {STEPS}-step workflow "
        f"(best of {sizes.repeats})"
    )
    flow = noop_workflow()
    floor_s: list[float] = []
    seq_s: list[float] = []
    _floor_batch(floor, "warm-up", min(commits, 50))
    await run_sequential(engine, flow, _WARMUP)
    # Floor and engine batches alternate, so a busy spell slows both rather than one.
    for r in range(sizes.repeats):
        floor_s.append(timed(lambda r=r: _floor_batch(floor, f"raw-{r}", commits)))
        seq_s.append(await timed_async(lambda: run_sequential(engine, flow, n)))
    flight_s: list[float] = []
    group_s: list[float] = []
    for r in range(sizes.in_flight_repeats):
        group_s.append(timed(lambda r=r: _group_floor(floor, f"group-{r}", k)))
        flight_s.append(await timed_async(lambda: run_in_flight(engine, flow, k)))
    floor_rate = commits / best_time(floor_s)
    group_wf = k / best_time(group_s)
    seq_wf = n / best_time(seq_s)
    flight_wf = k / best_time(flight_s)
    report.row(
        "floor: raw BEGIN IMMEDIATE;INSERT;COMMIT",
        fmt_rate(floor_rate),
        "steps/s",
        f"{1e6 / floor_rate:.0f} µs per commit ({commits:,} per batch)",
    )
    report_engine_rates(
        report,
        target="sqlite sequential",
        floor_rate=floor_rate,
        ceiling_rate=floor_rate * STEPS / (STEPS + COMMITS_PER_RUN),
        ceiling_what="commits",
        runs=n,
        seq_wf=seq_wf,
        in_flight=k,
        flight_wf=flight_wf,
        flight_repeats=sizes.in_flight_repeats,
    )
    report.row(
        f"engine {k:,} in flight (asyncio.gather)",
        fmt_rate(flight_wf * STEPS),
        "steps/s",
        f"{flight_wf * STEPS / floor_rate:.0%} of floor",
    )
    report.row(
        f"floor: {k:,} workflows, group commit",
        fmt_rate(group_wf),
        "workflows/s",
        f"one transaction per batch of {k:,} ready steps ({STEPS} batches)",
    )
    report.target(
        "sqlite in flight vs group-commit floor",
        flight_wf >= 0.35 * group_wf,
        f"engine {k:,} in flight, share of that floor",
        f"{flight_wf / group_wf:.0%}",
        "",
        "target ≥ 35%",
    )


async def _section3(report: Report, sizes: Sizes, engine: FluxEngine) -> None:
    n = sizes.big_workflows
    report.section(
        f"3. SQLite sequential, ~{BIG_KEYS * BIG_VALUE_CHARS // 1000} KB ctx.data "
        f"({BIG_KEYS} keys x {BIG_VALUE_CHARS} chars, set by a first step), each later step "
        f"changes one key ({n:,} runs per batch, best of {sizes.repeats})"
    )
    report.line(
        "  per-step cost = (a run - a run of its first step alone) / its other steps, so the "
        "one-off fill is not counted"
    )
    small = noop_workflow("bench-small")
    small_first = noop_workflow("bench-small-1", steps=1)
    large = big_data_workflow("bench-big")
    large_first = big_data_workflow("bench-big-1", changers=0)
    flows = (small, small_first, large, large_first)
    for flow in flows:
        await run_sequential(engine, flow, max(2, _WARMUP // 4))
    samples: dict[str, list[float]] = {f.name: [] for f in flows}
    for _ in range(sizes.repeats):
        for flow in flows:
            samples[flow.name].append(
                await timed_async(lambda flow=flow: run_sequential(engine, flow, n))
            )
    per_run = {name: best_time(s) / n for name, s in samples.items()}
    small_us = (per_run[small.name] - per_run[small_first.name]) / (STEPS - 1) * 1e6
    large_us = (per_run[large.name] - per_run[large_first.name]) / STEPS * 1e6
    ratio = large_us / small_us if small_us > 0 else float("inf")
    report.row(
        f"small data ({STEPS} no-op steps)",
        f"{small_us:.0f}",
        "µs/step",
        f"(run {per_run[small.name] * 1e3:.2f} ms, first step alone "
        f"{per_run[small_first.name] * 1e3:.2f} ms)",
    )
    report.target(
        "sqlite 100 KB data",
        ratio <= BIG_TARGET_RATIO,
        f"~{BIG_KEYS * BIG_VALUE_CHARS // 1000} KB data, 1 key changed per step",
        f"{large_us:.0f}",
        "µs/step",
        f"{ratio:.2f}x small, target ≤ {BIG_TARGET_RATIO:g}x",
    )
    report.row(
        "",
        "",
        "",
        f"(run {per_run[large.name] * 1e3:.2f} ms, fill step alone "
        f"{per_run[large_first.name] * 1e3:.2f} ms)",
    )
