"""Section 7: from ``kill -9`` of a process with running runs to the first step elsewhere.

A child process (this module, ``python -m benchmarks._restart '<json>'``) starts runs whose
step stays in flight, says ``READY`` once every run is inside it, and is SIGKILLed. This
process then starts a new engine on the same store and measures from the kill to the first
step that engine runs. SQLite recognises the dead owner by its process, so the lease does
not matter there; PostgreSQL judges only leases (its processes may be on other hosts), so
there the figure is about one lease plus the scheduler's poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fluxrun import FluxEngine, SQLiteStorage, WorkflowContext, WorkflowDefinition, create_workflow

from ._common import Report, Sizes

__all__ = ["run_restart"]

_ROOT = Path(__file__).resolve().parent.parent
_HANG = 300.0
_DEFAULT_LEASE = 15.0
_DEFAULT_POLL = 1.0
# The new engine logs each run it takes over from the dead one; the report says it instead.
_QUIET = logging.getLogger("fluxrun.benchmarks.restart")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

# What the step does in this process: in the child it stays in flight; here it notes the time.
_child = False
_entered = 0
_first: list[float] = []


async def _hold(ctx: WorkflowContext) -> None:
    global _entered
    if _child:
        _entered += 1
        await asyncio.Event().wait()  # in flight until the process is killed
    _first.append(time.time())


def _flow() -> WorkflowDefinition:
    return create_workflow("bench-restart").step("hold", _hold).build()


def _storage(backend: str, target: str) -> Any:
    if backend == "sqlite":
        return SQLiteStorage(target)
    from fluxrun import PostgresStorage

    return PostgresStorage(target)


async def _child_main(config: dict[str, Any]) -> None:
    global _child
    _child = True
    n = int(config["runs"])
    engine = FluxEngine(
        storage=_storage(config["backend"], config["target"]),
        lease=float(config["lease"]),
        max_concurrent_runs=max(32, n),
    )
    flow = _flow()
    engine.register(flow)
    async with engine:
        for _ in range(n):
            await engine.start(flow)
        deadline = time.monotonic() + _HANG
        while _entered < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the runs never all started")
            await asyncio.sleep(0.01)
        print("READY", flush=True)
        await asyncio.Event().wait()


async def _measure(backend: str, target: str, n: int, lease: float) -> tuple[float, float]:
    """Kill a child holding ``n`` running runs; (kill to first step, new engine's init to
    first step), in seconds."""
    config = {"backend": backend, "target": target, "runs": n, "lease": lease}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._restart", json.dumps(config)],
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), _HANG)
        if line.strip() != "READY":
            raise RuntimeError(f"the child said {line!r} (exit {proc.poll()})")
        killed = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=_HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    _first.clear()
    engine = FluxEngine(storage=_storage(backend, target), lease=lease, logger=_QUIET)
    engine.register(_flow())
    began = time.time()
    await engine.init()
    try:
        deadline = time.monotonic() + _HANG
        while not _first:
            if time.monotonic() > deadline:
                raise RuntimeError("the new engine never ran a step")
            await asyncio.sleep(0.001)
        first = min(_first)
        while len(_first) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the new engine did not finish the runs")
            await asyncio.sleep(0.01)
    finally:
        await engine.close()
    return first - killed, first - began


def _row(report: Report, label: str, n: int, lease: float, figures: tuple[float, float]) -> None:
    to_first, init_to_first = figures
    report.row(
        f"{label}: kill -9 to the first step",
        f"{to_first:.3f}",
        "s",
        f"lease {lease:g}s, poll {_DEFAULT_POLL:g}s; new engine's init to first step "
        f"{init_to_first:.3f}s; {n} runs were running",
    )


async def run_restart(report: Report, sizes: Sizes, pg_dsn: str | None) -> bool:
    """Print section 7 (PostgreSQL too when ``pg_dsn`` is given); False if a part failed."""
    n = sizes.restart_runs
    report.section(
        f"7. Restart: kill -9 of a process driving {n} runs, then a new engine on the same "
        "store (new process's clock; SQLite knows the dead owner, PostgreSQL waits a lease)"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="fluxrun-bench-") as tmp:
            figures = await _measure("sqlite", os.path.join(tmp, "restart.db"), n, _DEFAULT_LEASE)
    except Exception as exc:
        report.line(f"  SQLite: ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("sqlite restart", "ERROR"))
        return False
    _row(report, "SQLite", n, _DEFAULT_LEASE, figures)
    if pg_dsn is None:
        report.line("  PostgreSQL: skipped: no DSN given (--pg-dsn or --pg-start)")
        return True
    from ._postgres import scratch_database, unavailable

    reason = unavailable()
    if reason is not None:
        report.line(f"  PostgreSQL: skipped: {reason}")
        return True
    lease = sizes.restart_pg_lease
    try:
        with scratch_database(pg_dsn) as (dsn, _):
            figures = await _measure("postgres", dsn, n, lease)
    except Exception as exc:
        report.line(f"  PostgreSQL: ERROR: {type(exc).__name__}: {exc}")
        report.verdicts.append(("postgres restart", "ERROR"))
        return False
    _row(report, "PostgreSQL", n, lease, figures)
    return True


if __name__ == "__main__":
    asyncio.run(_child_main(json.loads(sys.argv[1])))
