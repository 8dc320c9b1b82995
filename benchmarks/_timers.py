"""Sections 5 and 6: durable timers, and what sleeping runs cost a process.

Section 5 starts runs that ``return sleep(1)`` and measures how late the step after the
sleep starts (its start minus the wake time the engine stored), beside the lateness of bare
``asyncio.sleep(1)`` tasks in the same process. Section 6 puts many runs to sleep for an hour
and prints what the process holds for them once they all sleep: RSS, asyncio tasks, threads
and coroutines, beside the same counts before the engine started.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import inspect
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fluxrun import (
    FluxEngine,
    FluxTraceEvent,
    MemoryStorage,
    SQLiteStorage,
    WorkflowContext,
    WorkflowDefinition,
    create_workflow,
    sleep,
)

from ._common import Report, Sizes

__all__ = ["CONSTANT_TARGET", "run_sleepers", "run_timers"]

CONSTANT_TARGET = 10
"""Asyncio tasks + threads + coroutines that sleeping runs may add to an idle engine's, in
all, however many runs sleep (a sleeping run is a row in the store: nothing per run)."""

_SLEEP = 1.0
_HANG = 600.0


def _percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def _until(what: str, condition: Callable[[], Any], every: float = 0.05) -> None:
    deadline = time.monotonic() + _HANG
    while not await condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        await asyncio.sleep(every)


# -- section 5: timer lateness -------------------------------------------------------------------


async def _floor_lateness(n: int) -> list[float]:
    """Lateness of ``n`` bare ``asyncio.sleep(1)`` tasks, by the same clock as the engine's."""

    async def one() -> float:
        due = time.time() + _SLEEP
        await asyncio.sleep(_SLEEP)
        return time.time() - due

    return sorted(await asyncio.gather(*(one() for _ in range(n))))


def _timer_flow(started: dict[str, float]) -> WorkflowDefinition:
    async def nap(ctx: WorkflowContext) -> Any:
        return sleep(_SLEEP)

    async def after(ctx: WorkflowContext) -> None:
        started.setdefault(ctx.id, time.time())

    return create_workflow("bench-timer").step("nap", nap).step("after", after).build()


class _WakeTimes:
    """A trace sink that keeps each run's wake time as the engine stored it (``step:suspend``
    carries it as ``meta["wakeAt"]``)."""

    def __init__(self) -> None:
        self.wake: dict[str, float] = {}

    def emit(self, event: FluxTraceEvent) -> None:
        if event.type == "step:suspend" and event.meta and event.meta.get("wakeAt"):
            self.wake[event.workflow_id] = dt.datetime.fromisoformat(
                event.meta["wakeAt"]
            ).timestamp()


async def _engine_lateness(storage: Any, n: int) -> list[float]:
    """Start ``n`` runs that sleep 1 s; the lateness of each one's next step."""
    started: dict[str, float] = {}
    flow = _timer_flow(started)
    wakes = _WakeTimes()
    async with FluxEngine(storage=storage, trace=wakes) as engine:  # default settings
        engine.register(flow)
        ids = [(await engine.start(flow)).id for _ in range(n)]

        async def all_done() -> bool:
            counts = await engine.storage.counts(flow.name)
            return counts.get("completed", 0) == n

        await _until(f"{n} sleeping runs to complete", all_done, every=0.2)
    return sorted(started[run_id] - wakes.wake[run_id] for run_id in ids)


def _lateness_row(report: Report, label: str, late: list[float], floor: list[float]) -> None:
    report.row(
        f"{label}: p50 / p99",
        f"{_ms(_percentile(late, 0.5))} / {_ms(_percentile(late, 0.99))}",
        "ms late",
        f"max {_ms(late[-1])} ms; floor p50 / p99 {_ms(_percentile(floor, 0.5))} / "
        f"{_ms(_percentile(floor, 0.99))} ms",
    )
    report.target(
        f"{label} timers never early",
        late[0] >= 0,
        f"{label}: earliest wake-up",
        _ms(late[0]),
        "ms late",
        "target ≥ 0 ms (a timer never fires early)",
    )


async def run_timers(report: Report, sizes: Sizes, pg_dsn: str | None) -> bool:
    """Print section 5 (PostgreSQL too when ``pg_dsn`` is given); False if a part failed."""
    n = sizes.timer_runs
    report.section(
        f"5. Timers: {n:,} runs that return sleep({_SLEEP:g}); lateness = start of the next "
        "step - the stored wake time (default engine settings)"
    )
    floor = await _floor_lateness(n)
    report.row(
        f"floor: {n:,} bare asyncio.sleep({_SLEEP:g}) tasks: p50 / p99",
        f"{_ms(_percentile(floor, 0.5))} / {_ms(_percentile(floor, 0.99))}",
        "ms late",
        f"max {_ms(floor[-1])} ms",
    )
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        late = await _engine_lateness(SQLiteStorage(os.path.join(tmp, "timers.db")), n)
    _lateness_row(report, "SQLite", late, floor)
    if pg_dsn is None:
        report.line("  PostgreSQL: skipped: no DSN given (--pg-dsn or --pg-start)")
        return True
    from ._postgres import scratch_database, unavailable

    reason = unavailable()
    if reason is not None:
        report.line(f"  PostgreSQL: skipped: {reason}")
        return True
    try:
        from fluxrun import PostgresStorage

        with scratch_database(pg_dsn) as (dsn, _):
            late = await _engine_lateness(PostgresStorage(dsn), n)
    except Exception as exc:
        report.line(f"  PostgreSQL: ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("postgres timers", "ERROR"))
        return False
    _lateness_row(report, "PostgreSQL", late, floor)
    return True


# -- section 6: what sleeping runs hold ------------------------------------------------------------


def _rss() -> int:
    """This process's resident set size in bytes (Linux), or 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _coroutines() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if inspect.iscoroutine(o))


def _held() -> tuple[int, int, int, int]:
    """(RSS bytes, asyncio tasks, threads, coroutines) of this process now."""
    coroutines = _coroutines()
    return _rss(), len(asyncio.all_tasks()), threading.active_count(), coroutines


@dataclass(frozen=True, slots=True)
class _Asleep:
    """What the process held (see :func:`_held`) before the engine, with the engine up and
    idle, and once every run slept; and how long starting them took."""

    before: tuple[int, int, int, int]
    idle: tuple[int, int, int, int]
    asleep: tuple[int, int, int, int]
    took: float


async def _asleep(storage: Any, n: int) -> _Asleep:
    """Start ``n`` runs that sleep an hour in one engine (see :class:`_Asleep`)."""

    async def nap(ctx: WorkflowContext) -> Any:
        return sleep(3600)

    async def never(ctx: WorkflowContext) -> None:
        raise RuntimeError("an hour-long sleep ended during the benchmark")

    flow = create_workflow("bench-sleeper").step("nap", nap).step("never", never).build()
    before = _held()
    async with FluxEngine(storage=storage) as engine:
        engine.register(flow)
        await engine.storage.counts(flow.name)
        await asyncio.sleep(0.05)  # let the scheduler settle into its wait
        idle = _held()
        began = time.perf_counter()
        for _ in range(n):
            await engine.start(flow)

        async def all_asleep() -> bool:
            counts = await engine.storage.counts(flow.name)
            return counts.get("suspended", 0) == n

        await _until(f"{n} runs to fall asleep", all_asleep, every=0.1)
        took = time.perf_counter() - began
        await asyncio.sleep(0.05)
        asleep = _held()
    return _Asleep(before, idle, asleep, took)


@contextlib.contextmanager
def _sqlite_store() -> Iterator[SQLiteStorage]:
    with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
        yield SQLiteStorage(os.path.join(tmp, "sleepers.db"))


async def run_sleepers(report: Report, sizes: Sizes) -> None:
    """Print section 6."""
    n = sizes.sleeping_runs
    report.section(
        f"6. Sleeping runs: {n:,} runs that sleep for an hour, in one process (default "
        "engine settings); what the process holds once they all sleep"
    )
    for label, opened in (
        ("memory store", contextlib.nullcontext(MemoryStorage())),
        ("SQLite", _sqlite_store()),
    ):
        with opened as storage:
            held = await _asleep(storage, n)
        before, idle, asleep = held.before, held.idle, held.asleep
        rss0, rss1 = before[0], asleep[0]
        report.row(f"{label}: floor: RSS before the engine", f"{rss0 / 2**20:.1f}", "MiB")
        report.row(
            f"{label}: RSS growth, all asleep",
            f"{(rss1 - rss0) / 2**20:.1f}",
            "MiB",
            f"{(rss1 - rss0) / n:,.0f} bytes per run"
            + (" (the store's rows are in this process)" if label == "memory store" else "")
            + f"; started and asleep in {held.took:.1f}s",
        )
        added = sum(asleep[1:]) - sum(idle[1:])
        report.target(
            f"{label} nothing per sleeping run",
            added <= CONSTANT_TARGET,
            f"{label}: tasks / threads / coroutines",
            " / ".join(str(x) for x in asleep[1:]),
            "",
            f"engine idle: {' / '.join(str(x) for x in idle[1:])}, no engine: "
            f"{' / '.join(str(x) for x in before[1:])}; {added} more for {n:,} sleeping runs; "
            f"target ≤ {CONSTANT_TARGET} more, whatever the number of runs",
        )
