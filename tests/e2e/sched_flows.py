"""Workflows shared by ``test_scheduler_crashes.py`` and its child ``sched_child.py``.

Every step and compensation appends ``run_id,key,attempt,wall time,pid`` to the effects file
named in the run's input (``input["fx"]``): an unguarded side effect that counts real
executions (``os.write`` on an ``O_APPEND`` file is one system call into the page cache, so
the line survives a SIGKILL of the writer). The wall time (``time.time()``) is when the step
started, by the machine clock; the pid tells which process ran it.

Steps that must stay in flight until the test says so poll (asynchronously, so the event
loop, the lease keeper and a cancel go on) for a file ``input["release"]``; they give up
after :data:`BLOCK_DEADLINE` so a mistake in a test ends as a failure, not a hang.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluxrun import (
    PostgresStorage,
    RetryPolicy,
    SQLiteStorage,
    WorkflowContext,
    create_workflow,
    sleep_until,
    wait,
)

__all__ = [
    "BACKOFF",
    "BLOCK_DEADLINE",
    "FLOWS",
    "Effect",
    "make_storage",
    "read_effects",
]

#: How long a blocked step waits for its release file before it fails.
BLOCK_DEADLINE = 120.0
#: The stored retry backoff of ``sc-backoff`` (longer than the engines' durable_backoff, 1 s).
BACKOFF = 2.0


@dataclass(frozen=True, slots=True)
class Effect:
    """One line of an effects file."""

    run_id: str
    key: str
    attempt: int
    at: float
    pid: int
    note: str


def record(ctx: WorkflowContext, key: str, note: str = "") -> None:
    """Append one side-effect line; it is in the file when this returns."""
    line = f"{ctx.id},{key},{ctx.attempt},{time.time():.6f},{os.getpid()},{note}\n"
    fd = os.open(ctx.input["fx"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_effects(path: str) -> list[Effect]:
    """The side-effect lines of ``path``, in the order they were written."""
    if not os.path.exists(path):
        return []
    out: list[Effect] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                continue  # a line being written right now
            run_id, key, attempt, at, pid, note = line.rstrip("\n").split(",")
            out.append(Effect(run_id, key, int(attempt), float(at), int(pid), note))
    return out


async def _blocked(ctx: WorkflowContext, key: str) -> None:
    """Stay in flight (awaiting) until the release file exists."""
    release = ctx.input["release"]
    deadline = time.monotonic() + BLOCK_DEADLINE
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{key} waited {BLOCK_DEADLINE}s for {release}")
        await asyncio.sleep(0.02)


def _recorded(key: str, then: Callable[[WorkflowContext], Any] | None = None) -> Any:
    async def handler(ctx: WorkflowContext) -> Any:
        record(ctx, key)
        return None if then is None else then(ctx)

    handler.__name__ = key
    return handler


# -- 1. a durable sleep ------------------------------------------------------------------------


async def _nap(ctx: WorkflowContext) -> Any:
    # The wake time is chosen (and recorded) here, by the machine clock, before the run
    # sleeps: the test compares the next step's start with it whatever it saw of the sleep.
    wake = time.time() + ctx.input["secs"]
    record(ctx, "nap", f"{wake:.6f}")
    return sleep_until(dt.datetime.fromtimestamp(wake, dt.UTC))


sleeper = create_workflow("sc-sleep").step("nap", _nap).step("after", _recorded("after")).build()
"""Sleeps ``input["secs"]`` (recording its wake time), then one quick step."""


# -- 2. a stored retry backoff -----------------------------------------------------------------


async def _flaky(ctx: WorkflowContext) -> str:
    record(ctx, "flaky")
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")
    return f"attempt {ctx.attempt}"


backoff = (
    create_workflow("sc-backoff")
    .step(
        "flaky",
        _flaky,
        retries=2,
        retry=RetryPolicy(initial_delay=BACKOFF, factor=1.0, max_delay=BACKOFF, jitter=False),
    )
    .step("after", _recorded("after"))
    .build()
)


# -- 3. and 6. the signal inbox ----------------------------------------------------------------

inbox = (
    create_workflow("sc-inbox")
    .step("w1", _recorded("w1", lambda ctx: wait("go")))
    .step("w2", _recorded("w2", lambda ctx: wait("go")))
    .step("after", _recorded("after"))
    .build()
)
"""Two waits for ``go``: the first takes the oldest signal, the second the next one."""

waiter = (
    create_workflow("sc-wait")
    .step("gate", _recorded("gate", lambda ctx: wait("go")))
    .step("after", _recorded("after"))
    .build()
)


# -- 4. a cancel's compensations ---------------------------------------------------------------


def _undo(key: str, *, slow: bool) -> Any:
    async def handler(ctx: WorkflowContext) -> None:
        record(ctx, f"undo_{key}:start")
        if slow:
            await _blocked(ctx, f"undo_{key}")
        record(ctx, f"undo_{key}:done")

    handler.__name__ = f"undo_{key}"
    return handler


cancel_saga = (
    create_workflow("sc-cancel")
    .step("a", _recorded("a"), compensate=_undo("a", slow=True))
    .step("b", _recorded("b"), compensate=_undo("b", slow=False))
    .step("gate", _recorded("gate", lambda ctx: wait("never")))
    .build()
)
"""Suspends after two completed steps; undo_b is quick, undo_a stays in flight until the
release file exists (so a kill lands inside it)."""


# -- 7. a cancel of a run another process drives -----------------------------------------------

LIVE_STEPS = 4


def _live(i: int) -> Any:
    async def handler(ctx: WorkflowContext) -> None:
        record(ctx, f"s{i}:start")
        if i == ctx.input["block_at"]:
            await _blocked(ctx, f"s{i}")
        record(ctx, f"s{i}:done")

    handler.__name__ = f"s{i}"
    return handler


def _live_undo(i: int) -> Any:
    async def handler(ctx: WorkflowContext) -> None:
        record(ctx, f"u{i}:start")
        await asyncio.sleep(0.05)
        record(ctx, f"u{i}:done")

    handler.__name__ = f"u{i}"
    return handler


_live_builder = create_workflow("sc-live")
for _i in range(LIVE_STEPS):
    _live_builder = _live_builder.step(f"s{_i}", _live(_i), compensate=_live_undo(_i))
live = _live_builder.build()
"""``LIVE_STEPS`` steps with compensations; step ``input["block_at"]`` stays in flight."""


# -- kill -9 and clean stops of a process holding running runs ----------------------------------


async def _work(ctx: WorkflowContext) -> None:
    record(ctx, "work:start")
    await _blocked(ctx, "work")
    record(ctx, "work:done")


busy = create_workflow("sc-busy").step("work", _work).step("after", _recorded("after")).build()
"""A step that stays in flight until released, then a quick one."""

quick = create_workflow("sc-quick").step("only", _recorded("only")).build()


# -- child workflows across a kill ----------------------------------------------------------------


async def _kid_work(ctx: WorkflowContext) -> None:
    record(ctx, "kid:start")
    await _blocked(ctx, "kid")
    record(ctx, "kid:done")
    ctx.data["by"] = os.getpid()


kid = create_workflow("sc-kid").step("work", _kid_work).build()
"""A child workflow whose one step stays in flight until released."""

parent = (
    create_workflow("sc-parent")
    .step("before", _recorded("before"))
    .child("call", kid, input=lambda ctx: ctx.input)
    .step("after", _recorded("after"))
    .build()
)
"""A step, a child run of ``sc-kid`` (given the parent's input), and a step."""

FLOWS = {
    f.name: f
    for f in (sleeper, backoff, inbox, waiter, cancel_saga, live, busy, quick, kid, parent)
}


def make_storage(backend: str, target: str) -> Any:
    """A store on the SQLite file or PostgreSQL DSN ``target``."""
    if backend == "sqlite":
        return SQLiteStorage(target)
    return PostgresStorage(target)
