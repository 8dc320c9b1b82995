"""Helpers of the scheduling tests (``test_scheduling_*.py``): engines on one store that a
test can close and open again (a restart), and waiting for a stored condition.

No helper bounds how long anything takes: :func:`until` only guards against a hang (it
fails after ``HANG`` seconds), and every check a test makes on time is a "not before" check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

from contract_support import open_store

from fluxrun import FluxEngine, FluxResult, FluxTraceEvent, RetryPolicy, WorkflowContext
from fluxrun.storage._base import RunRow, Store
from fluxrun.storage.memory import MemoryStorage

#: Retries without any wait between attempts (kept in memory).
FAST = RetryPolicy(initial_delay=0, jitter=False)

#: How long a test waits for an outcome before it calls it a hang (never a timing check).
HANG = 30.0

#: A small poll interval, so that the scheduler's net catches work quickly.
POLL = 0.05

#: A wait that does not end while a test runs.
HOUR = 3600.0

_FINISHED = ("completed", "failed", "rolled_back", "cancelled", "compensation_failed")


class Engines:
    """Engines on one store (one MemoryStorage shared by all, or one SQLite file, or one
    PostgreSQL database); each has its own store object, like a process of its own."""

    def __init__(self, kind: str, location: str | None) -> None:
        self.kind = kind
        self.location = location
        self._memory = MemoryStorage() if kind == "memory" else None
        self.made: list[FluxEngine] = []

    async def store(self) -> Store:
        """A store on this test's database (the shared one for memory)."""
        if self._memory is not None:
            return self._memory
        return await open_store(self.kind, self.location)

    async def open(self, **kwargs: Any) -> FluxEngine:
        """An initialised engine with a small poll interval and no retry delays (unless
        told otherwise); it is closed after the test."""
        if "storage" not in kwargs:
            kwargs["storage"] = await self.store()
        kwargs.setdefault("poll_interval", POLL)
        kwargs.setdefault("retry_policy", FAST)
        engine = FluxEngine(**kwargs)
        self.made.append(engine)
        await engine.init()
        return engine

    async def close_all(self) -> None:
        for engine in reversed(self.made):
            await engine.close(timeout=5.0)


async def until(check: Callable[[], Awaitable[Any]], what: str, *, timeout: float = HANG) -> Any:
    """Call ``check`` until it returns something truthy and return that; fail after
    ``timeout`` seconds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g}s for: {what}")
        await asyncio.sleep(0.01)


async def load(engine: FluxEngine, run_id: str) -> RunRow:
    """The stored row of a run (it must exist)."""
    row = await engine.storage.load(run_id)
    assert row is not None, run_id
    return row


async def stored_as(
    engine: FluxEngine, run_id: str, status: str, *, wait_kind: str | None = None
) -> RunRow:
    """Wait until the run is stored with ``status`` (and ``wait_kind``) and nobody owns it."""

    async def check() -> RunRow | None:
        row = await load(engine, run_id)
        if row.status != status or row.owner is not None:
            return None
        if wait_kind is not None and row.wait_kind != wait_kind:
            return None
        return row

    found: RunRow = await until(check, f"run {run_id} {status} ({wait_kind}) and unowned")
    return found


class Events:
    """A trace sink keeping every event."""

    def __init__(self) -> None:
        self.events: list[FluxTraceEvent] = []

    def emit(self, event: FluxTraceEvent) -> None:
        self.events.append(event)

    def types(self, run_id: str | None = None) -> list[str]:
        return [e.type for e in self.events if run_id is None or e.workflow_id == run_id]


async def true(value: Any) -> bool:
    """``value`` as an awaitable check for :func:`until`."""
    return bool(value)


async def finished(engine: FluxEngine, run_id: str) -> FluxResult:
    """The run's result once it is stored finished (its result, read through ``engine``)."""

    async def check() -> FluxResult | None:
        if (await load(engine, run_id)).status in _FINISHED:
            return await engine.handle(run_id).result(timeout=HANG)
        return None

    result: FluxResult = await until(check, f"run {run_id} finishes")
    return result


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def noop(ctx: WorkflowContext) -> None:
    """A step that does nothing."""


def gated(gate: asyncio.Event, started: asyncio.Event | None = None) -> Any:
    """An async step that waits for ``gate`` (telling ``started`` it began)."""

    async def step(ctx: WorkflowContext) -> None:
        if started is not None:
            started.set()
        await gate.wait()

    return step


class Log:
    """What the steps and compensations did, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, name: str) -> Any:
        def run(ctx: WorkflowContext) -> None:
            self.lines.append(name)

        return run

    def undo(self, name: str) -> Any:
        def run(ctx: WorkflowContext) -> None:
            self.lines.append(f"undo {name}")

        return run

    def held(self, name: str, gate: asyncio.Event) -> Any:
        """An async step that notes it began, then waits for ``gate``."""

        async def run(ctx: WorkflowContext) -> None:
            self.lines.append(name)
            await gate.wait()

        return run

    def forever(self, name: str, began: asyncio.Event) -> Any:
        """An async step that never ends by itself: it awaits an event nobody sets."""

        async def run(ctx: WorkflowContext) -> None:
            self.lines.append(name)
            began.set()
            await asyncio.Event().wait()
            self.lines.append(f"{name} went on")  # pragma: no cover - never reached

        return run
