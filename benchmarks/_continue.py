"""Section 8: what continuing a run costs as its history grows (SQLite).

A run does ``history`` no-op steps and then waits for a signal at each of its last steps.
Each figure is the median over several continuations, at each history length:

* ``send_signal`` → the next step starts: the signal is stored, the scheduler claims the run,
  reads it from its snapshot on, completes the wait and runs the next step. Nobody asks for
  the result, so nothing before the snapshot is read: the target is a cost that does not grow
  with the history (at most 2x from the shortest history to the longest).
* ``signal()``: the same, driven in the caller, which gets the new ``FluxResult`` with the
  whole history: it reads every step row once (no replay of ``ctx.data``).

The floor is one raw SQLite commit (WAL, ``synchronous=FULL``) in the same directory; a
continuation makes three (the signal, the claim, the delivery) and one more when the run
suspends again.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from typing import Any

from fluxrun import FluxEngine, SQLiteStorage, WorkflowContext, create_workflow, wait

from ._common import Report, Sizes

__all__ = ["GROWTH_TARGET", "run_continue"]

GROWTH_TARGET = 2.0
"""How much a ``send_signal`` continuation may cost at the longest history over the shortest."""

_WAITS = 12
_HANG = 120.0


def _flow(history: int, started: dict[int, float]) -> Any:
    builder = create_workflow(f"bench-continue-{history}")
    for i in range(history):
        builder = builder.step(f"s{i}", lambda ctx: None)
    for w in range(_WAITS):

        def waits(ctx: WorkflowContext, w: int = w) -> Any:
            started[w] = time.perf_counter()
            ctx.data["w"] = w
            return wait("tick")

        builder = builder.step(f"w{w}", waits)
    return builder.step("end", lambda ctx: None)


async def _suspended_at(store: SQLiteStorage, run_id: str, index: int) -> None:
    deadline = time.monotonic() + _HANG
    while True:
        row = await store.load_tail(run_id)
        if row is not None and row.current_step == index and row.owner is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} never suspended at step {index}")
        await asyncio.sleep(0.002)


async def _measure(history: int, tmp: str) -> tuple[float, float]:
    started: dict[int, float] = {}
    flow = _flow(history, started)
    store = SQLiteStorage(os.path.join(tmp, f"continue-{history}.db"))
    async with FluxEngine(storage=store, poll_interval=1.0) as engine:
        first = await engine.execute(flow, {})
        run_id = first.id
        pushed: list[float] = []
        called: list[float] = []
        half = _WAITS // 2
        for w in range(1, half + 1):
            t0 = time.perf_counter()
            await engine.send_signal(run_id, "tick", w)
            while w not in started:
                await asyncio.sleep(0)
            pushed.append(started[w] - t0)
            await _suspended_at(store, run_id, history + w)
        for w in range(half + 1, _WAITS):
            t0 = time.perf_counter()
            await engine.signal(flow, run_id, "tick", w)
            called.append(time.perf_counter() - t0)
    return statistics.median(pushed[1:]), statistics.median(called[1:])


def _commit_floor(tmp: str, commits: int = 200) -> float:
    conn = sqlite3.connect(os.path.join(tmp, "floor.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (i INTEGER)")
    t0 = time.perf_counter()
    for i in range(commits):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.execute("COMMIT")
    conn.close()
    return (time.perf_counter() - t0) / commits


async def run_continue(report: Report, sizes: Sizes) -> None:
    """Print section 8."""
    histories = (10, 100) if sizes.repeats == 1 else (100, 1_000, 10_000)
    report.section("8. continuing a run, by the length of its history (SQLite)")
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        floor = _commit_floor(tmp)
        report.row("floor: one raw SQLite commit", f"{floor * 1000:.2f}", "ms")
        figures = [(h, *await _measure(h, tmp)) for h in histories]
    for history, pushed, called in figures:
        report.row(
            f"history {history:>6,}: send_signal → next step",
            f"{pushed * 1000:.1f}",
            "ms",
            f"{pushed / floor:.1f} commits' time",
        )
        report.row(
            f"history {history:>6,}: signal() with its result",
            f"{called * 1000:.1f}",
            "ms",
            "reads the whole history for the result",
        )
    growth = figures[-1][1] / figures[0][1]
    report.target(
        "continue",
        growth <= GROWTH_TARGET,
        f"send_signal at {histories[-1]:,} over {histories[0]:,} entries",
        f"{growth:.2f}",
        "x",
        f"target ≤ {GROWTH_TARGET:g}x",
    )
