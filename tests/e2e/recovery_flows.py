"""Workflows shared by ``test_recovery.py`` and its child program ``recovery_child.py``.

Every step and compensation appends ``run_id,key,attempt`` to the effects file named in the
run's input (``input["fx"]``) before it returns: an unguarded side effect that counts real
executions, which survives a SIGKILL because ``os.write`` on an ``O_APPEND`` file is one
system call into the page cache.

The input also says where a step misbehaves:

* ``crash``: ``{"at": key, "mode": "exit" | "kill", "once": marker path or None}`` (or a
  list of such plans for different keys): the step
  (or compensation) ``key`` ends its process with ``os._exit(1)`` or SIGKILL, every time or,
  with ``once``, only the first time (the marker file remembers it across processes). Only a
  child process (``FLUXRUN_E2E_CHILD=1``) ever crashes; in the test process the step fails
  instead, so a mistake in a test can never kill pytest.
* ``block``: ``{"at": key, ...}``: the step blocks the event loop with ``time.sleep``, as
  CPU-bound or synchronous code inside an async handler would, until the file
  ``"until": path`` exists (the test creates it once it saw what it waits for) or until the
  effects file holds ``"until_count": n`` lines of this step of this run (other executors
  ran it too): as long as the machine needs, never a guessed number of seconds.
* ``fail``: true makes the last step ``d`` raise, which rolls the run back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from fluxrun import WorkflowContext, create_workflow, wait
from fluxrun.storage._sqlite_lease import system_boot_clock
from fluxrun.storage.sqlite import BootClock, SQLiteStorage

__all__ = [
    "CHILD_ENV",
    "FileClock",
    "read_effects",
    "record",
    "saga",
    "store_on",
    "waiter",
]

CHILD_ENV = "FLUXRUN_E2E_CHILD"
#: How long a step blocked until a condition waits for it before it gives up (and fails).
BLOCK_DEADLINE = 120.0


class FileClock:
    """A store clock (``SQLiteStorage(clock=...)``) shared by processes through a file.

    It stands still until :meth:`advance` moves it, so leases expire when a test says so,
    not when a busy machine happens to get there (:func:`store_on` moves the store's boot
    clock, which judges the leases, with it).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def start(cls, path: str) -> FileClock:
        """A new clock at ``path``, set to the current time (whole seconds)."""
        clock = cls(path)
        clock.set(float(int(time.time())))
        return clock

    def __call__(self) -> float:
        with open(self.path, encoding="utf-8") as fh:
            return float(fh.read())

    def set(self, now: float) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(repr(now))
        os.replace(tmp, self.path)  # readers see the old or the new time, never half of it

    def advance(self, seconds: float) -> None:
        self.set(self() + seconds)


def store_on(db: str, clock: Callable[[], float] | None = None) -> SQLiteStorage:
    """A store on ``db``; with ``clock``, its wall clock and a boot clock that moves with it.

    The boot clock reads ``clock()`` minus the machine's boot time (wall clock minus
    ``CLOCK_BOOTTIME``), under this boot's id: a store with the real clocks on the same file
    (another test engine, a child process) then agrees with it about leases, and the leases
    written under a clock an hour ahead are an hour further on for the real clocks too.
    """
    if clock is None:
        return SQLiteStorage(db)
    system = system_boot_clock()
    assert system is not None, "these tests run on Linux"
    read = system.read

    def boot() -> float:
        return clock() - (time.time() - read())

    return SQLiteStorage(db, clock=clock, boot_clock=BootClock(system.boot_id, boot))


def record(path: str, run_id: str, key: str, attempt: int) -> None:
    """Append one side-effect line; it is in the file when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run_id},{key},{attempt}\n".encode())
    finally:
        os.close(fd)


def read_effects(path: str) -> list[tuple[str, str, int]]:
    """The side-effect lines of ``path`` as ``(run_id, key, attempt)``."""
    if not os.path.exists(path):
        return []
    out: list[tuple[str, str, int]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            run_id, key, attempt = line.rstrip("\n").split(",")
            out.append((run_id, key, int(attempt)))
    return out


def _misbehave(ctx: WorkflowContext, key: str) -> None:
    plan: dict[str, Any] = ctx.input.get("block") or {}
    if plan.get("at") == key:
        _block_until(ctx, key, plan)  # blocks the event loop on purpose
    plans = ctx.input.get("crash") or {}
    # One plan, or a list of them (a crash at several places, e.g. each once).
    listed = [plans] if isinstance(plans, dict) else plans
    plan = next((p for p in listed if p.get("at") == key), {})
    if plan.get("at") != key:
        return
    once = plan.get("once")
    if once is not None:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return  # crashed here before; this time the step goes through
    if os.environ.get(CHILD_ENV) != "1":
        raise RuntimeError(f"step {key!r} would crash its process (only children may)")
    if plan.get("mode") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _block_until(ctx: WorkflowContext, key: str, plan: dict[str, Any]) -> None:
    def done() -> bool:
        if "until" in plan:
            return os.path.exists(plan["until"])
        runs = [k for rid, k, _ in read_effects(ctx.input["fx"]) if rid == ctx.id and k == key]
        return len(runs) >= int(plan["until_count"])

    deadline = time.monotonic() + BLOCK_DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"step {key!r} blocked on {plan} for {BLOCK_DEADLINE}s")
        time.sleep(0.01)


def _forward(key: str) -> Any:
    async def handler(ctx: WorkflowContext) -> Any:
        record(ctx.input["fx"], ctx.id, key, ctx.attempt)
        _misbehave(ctx, key)
        if key == "d" and ctx.input.get("fail"):
            raise RuntimeError("d failed on purpose")
        seen = sorted(ctx.data)  # the data replayed for this step, before it adds its own
        ctx.data[key] = f"{key}-done"
        return {"step": key, "seen": seen, "signals": dict(ctx.signals)}

    handler.__name__ = f"step_{key}"
    return handler


def _undo(key: str) -> Any:
    async def handler(ctx: WorkflowContext) -> None:
        record(ctx.input["fx"], ctx.id, f"undo_{key}", ctx.attempt)
        _misbehave(ctx, f"undo_{key}")
        ctx.data[f"undo_{key}"] = True

    handler.__name__ = f"undo_{key}"
    return handler


saga = (
    create_workflow("rec-saga")
    .step("a", _forward("a"), compensate=_undo("a"))
    .step("b", _forward("b"), compensate=_undo("b"))
    .step("c", _forward("c"), compensate=_undo("c"))
    .step("d", _forward("d"))
    .build()
)
"""Four steps; ``a``..``c`` have compensations; ``d`` fails when ``input["fail"]``."""


async def _gate(ctx: WorkflowContext) -> Any:
    record(ctx.input["fx"], ctx.id, "gate", ctx.attempt)
    _misbehave(ctx, "gate")
    return wait("go")


waiter = (
    create_workflow("rec-wait")
    .step("a", _forward("a"))
    .step("gate", _gate)
    .step("c", _forward("c"))
    .build()
)
"""Waits for the signal ``go`` at its second step."""
