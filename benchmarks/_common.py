"""Shared pieces: sizes, the benchmark workflows, timing, and the printed report."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fluxrun import (
    FluxEngine,
    WorkflowContext,
    WorkflowDefinition,
    WorkflowStatus,
    create_workflow,
)

__all__ = [
    "BIG_KEYS",
    "BIG_VALUE_CHARS",
    "COMMITS_PER_RUN",
    "STEPS",
    "Report",
    "Sizes",
    "best_time",
    "big_data_workflow",
    "fmt_rate",
    "noop_workflow",
    "run_in_flight",
    "run_sequential",
    "timed",
    "timed_async",
    "verdict",
]

STEPS = 10
"""Steps of the benchmark workflow."""

BIG_KEYS = 100
BIG_VALUE_CHARS = 1000
"""``ctx.data`` of the large-data case: BIG_KEYS keys of about BIG_VALUE_CHARS characters."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each section does; ``quick`` is for smoke tests, not for figures."""

    repeats: int
    memory_workflows: int
    sqlite_floor_commits: int
    sqlite_workflows: int
    big_workflows: int
    pg_floor_inserts: int
    pg_workflows: int
    in_flight: int
    in_flight_repeats: int
    timer_runs: int
    sleeping_runs: int
    restart_runs: int
    restart_pg_lease: float

    @classmethod
    def default(cls) -> Sizes:
        return cls(
            repeats=7,
            memory_workflows=2000,
            sqlite_floor_commits=1000,
            sqlite_workflows=100,
            big_workflows=40,
            pg_floor_inserts=500,
            pg_workflows=50,
            in_flight=200,
            in_flight_repeats=3,
            timer_runs=1000,
            sleeping_runs=10_000,
            restart_runs=20,
            restart_pg_lease=15.0,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            repeats=1,
            memory_workflows=20,
            sqlite_floor_commits=20,
            sqlite_workflows=3,
            big_workflows=2,
            pg_floor_inserts=20,
            pg_workflows=3,
            in_flight=10,
            in_flight_repeats=1,
            timer_runs=20,
            sleeping_runs=50,
            restart_runs=3,
            restart_pg_lease=1.0,
        )


# -- the workflows ---------------------------------------------------------------------------


async def _noop(ctx: WorkflowContext) -> None:
    return None


def noop_workflow(name: str = "bench-noop", steps: int = STEPS) -> WorkflowDefinition:
    """``steps`` async steps that do nothing."""
    builder = create_workflow(name)
    for i in range(steps):
        builder = builder.step(f"s{i}", _noop)
    return builder.build()


def _big_value(i: int, mark: str) -> str:
    return f"{i:03d}:" + mark * (BIG_VALUE_CHARS - 4)


async def _fill(ctx: WorkflowContext) -> None:
    for i in range(BIG_KEYS):
        ctx.data[f"k{i:03d}"] = _big_value(i, "a")


def _changer(i: int) -> Callable[[WorkflowContext], Awaitable[None]]:
    async def change(ctx: WorkflowContext) -> None:
        ctx.data[f"k{i:03d}"] = _big_value(i, "b")

    return change


def big_data_workflow(name: str = "bench-big", changers: int = STEPS) -> WorkflowDefinition:
    """A first step that fills ``ctx.data`` (~100 KB), then ``changers`` steps that each
    change one key of it."""
    builder = create_workflow(name).step("fill", _fill)
    for i in range(changers):
        builder = builder.step(f"c{i}", _changer(i))
    return builder.build()


# -- running them ----------------------------------------------------------------------------


async def run_sequential(
    engine: FluxEngine, flow: WorkflowDefinition, n: int, input: Any = None
) -> None:
    """``n`` runs of ``flow``, one after another."""
    for _ in range(n):
        result = await engine.execute(flow, input)
        _check(result.status, result.error)


async def run_in_flight(engine: FluxEngine, flow: WorkflowDefinition, n: int) -> None:
    """``n`` runs of ``flow``, all started at once."""
    results = await asyncio.gather(*(engine.execute(flow) for _ in range(n)))
    for result in results:
        _check(result.status, result.error)


def _check(status: WorkflowStatus, error: BaseException | None) -> None:
    if status is not WorkflowStatus.COMPLETED:
        raise RuntimeError(f"a benchmark run ended {status.value}: {error!r}")


# -- timing ----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (after a garbage collection, so none is pending)."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def timed_async(fn: Callable[[], Awaitable[Any]]) -> float:
    """Seconds one await of ``fn()`` takes (after a garbage collection)."""
    gc.collect()
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def best_time(samples: list[float]) -> float:
    """The fastest sample: interference from other processes only ever adds time."""
    return min(samples)


# -- the report ------------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class Report:
    """Collects the printed lines, and the target verdicts for the summary."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self._out = out
        self.verdicts: list[tuple[str, str]] = []

    def line(self, text: str = "") -> None:
        self._out(text)

    def section(self, title: str) -> None:
        self._out("")
        self._out(title)

    def row(self, label: str, value: str, unit: str = "", note: str = "") -> None:
        text = f"  {label:<42} {value:>10} {unit:<12}"
        self._out((text + " " + note).rstrip())

    def target(self, name: str, ok: bool, label: str, value: str, unit: str, note: str) -> None:
        """A row checked against a target; remembered for the summary."""
        result = verdict(ok)
        self.verdicts.append((name, result))
        self.row(label, value, unit, f"{note}  {result}")


COMMITS_PER_RUN = 1
"""Commits a run makes besides one per step: its creation (the last step's commit also
completes it)."""

SEQUENTIAL_TARGET = 0.5
"""Engine steps/s run one after another, as a share of the floor's."""


def report_engine_rates(
    report: Report,
    *,
    target: str,
    floor_rate: float,
    ceiling_rate: float,
    ceiling_what: str,
    runs: int,
    seq_wf: float,
    in_flight: int,
    flight_wf: float,
    flight_repeats: int,
) -> None:
    """The rows a store's section shares: its ceiling, the sequential target, in-flight runs."""
    report.row(
        f"ceiling: {STEPS + COMMITS_PER_RUN} such {ceiling_what} per {STEPS} steps",
        fmt_rate(ceiling_rate),
        "steps/s",
        f"a run is created, then saved per step (the last with its completion): "
        f"{ceiling_rate / floor_rate:.0%} of "
        "floor at best (reference only)",
    )
    share = seq_wf * STEPS / floor_rate
    report.row(f"engine sequential ({runs:,} runs per batch)", fmt_rate(seq_wf), "workflows/s")
    report.target(
        target,
        share >= SEQUENTIAL_TARGET,
        "engine sequential",
        fmt_rate(seq_wf * STEPS),
        "steps/s",
        f"{1e6 / (seq_wf * STEPS):.0f} µs/step, {share:.0%} of floor; "
        f"target ≥ {SEQUENTIAL_TARGET:.0%}",
    )
    report.row(
        f"engine {in_flight:,} in flight (asyncio.gather)",
        fmt_rate(flight_wf),
        "workflows/s",
        f"best of {flight_repeats}",
    )
