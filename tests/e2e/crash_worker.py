"""Child program of ``test_crash_recovery.py``: one worker process of the kill -9 test.

Usage: ``python crash_worker.py '<json config>'`` with the keys

* ``backend``: ``"sqlite"`` or ``"postgres"``; ``target``: the SQLite file or the DSN;
* ``fx_dir``: directory of the side-effect files (one per process, ``effects-<pid>.log``);
* ``runs``: how many runs the whole test starts (inputs ``run_input(0..runs-1)``);
* ``concurrency``: runs driven at once (so at most this many steps are in flight);
* ``lease``, ``max_recoveries``: engine settings;
* ``final``: keep going until every run is finished (the last worker of the test).

What it does: prints ``START``, builds an engine with ``recover_on_start`` (so ``init``
finishes the runs a killed predecessor left, once its leases expired), prints ``READY``,
signals the runs it finds suspended, starts the runs nobody started yet (found by listing the
store: a run's input carries its ``idx``), and prints ``DONE`` when it has nothing left to do.
Any error a run raises is printed as an ``ERROR`` line; the parent fails the test on one.

Every step and compensation first appends ``run_id,key,attempt`` to this process's effects
file with ``os.write`` on an ``O_APPEND`` descriptor (in the page cache when it returns, so it
survives SIGKILL), then works for a few milliseconds, then returns. A kill between the two
makes the step run again after recovery: the repeated side effects the test counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

from fluxrun import (
    FluxEngine,
    RetryPolicy,
    SQLiteStorage,
    WorkflowContext,
    WorkflowFilter,
    WorkflowStatus,
    create_workflow,
    wait,
)

NAME = "crash-e2e"
STEPS = 5
GATE = 2  # the step at which waiting runs suspend until the signal "go"
COMPENSATED = (0, 2)  # steps with a compensation
TERMINAL = frozenset(
    {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.ROLLED_BACK,
        WorkflowStatus.COMPENSATION_FAILED,
        WorkflowStatus.CANCELLED,
    }
)

_fx_fd = -1
# The largest group commit this process's store has made so far (written to
# ``group-<pid>.log`` beside the effects directory whenever it grows: kills find batches of
# step commits in flight, and the test shows there were some).
_group_fd = -1
_group_seen = 0
_store: Any = None


def run_input(idx: int) -> dict[str, Any]:
    """The input of run ``idx``: which runs fail at the last step, which wait for a signal."""
    return {"idx": idx, "fail": idx % 6 == 5, "wait": idx % 10 == 3}


def step_output(idx: int, step: int) -> int:
    """What step ``step`` of run ``idx`` returns (the checker compares)."""
    return idx * 100 + step


def signal_payload(idx: int) -> dict[str, int]:
    """The payload of the signal ``go`` sent to waiting run ``idx``."""
    return {"idx": idx}


def _effect(ctx: WorkflowContext, key: str) -> None:
    os.write(_fx_fd, f"{ctx.id},{key},{ctx.attempt}\n".encode())
    global _group_seen
    largest = _store._group.largest if _store is not None else 0
    if largest > _group_seen:
        _group_seen = largest
        os.write(_group_fd, f"{largest}\n".encode())


def _work_seconds(idx: int, step: int) -> float:
    # 20..60 ms, deterministic: long enough that a kill finds runs in flight.
    return 0.02 + ((idx * 7 + step * 3) % 5) * 0.01


def _forward(step: int) -> Any:
    async def handler(ctx: WorkflowContext) -> Any:
        idx = ctx.input["idx"]
        _effect(ctx, f"s{step}")
        await asyncio.sleep(_work_seconds(idx, step))
        if step == STEPS - 1 and ctx.input["fail"]:
            raise RuntimeError(f"run {idx} fails at its last step on purpose")
        if step == GATE and ctx.input["wait"]:
            return wait("go")
        ctx.data[f"s{step}"] = step_output(idx, step)
        return step_output(idx, step)

    handler.__name__ = f"s{step}"
    return handler


def _undo(step: int) -> Any:
    async def handler(ctx: WorkflowContext) -> None:
        _effect(ctx, f"u{step}")
        await asyncio.sleep(_work_seconds(ctx.input["idx"], step))
        ctx.data[f"u{step}"] = True

    handler.__name__ = f"u{step}"
    return handler


def build_flow() -> Any:
    """Five steps; steps 0 and 2 have compensations."""
    builder = create_workflow(NAME)
    for step in range(STEPS):
        builder.step(
            f"s{step}", _forward(step), compensate=_undo(step) if step in COMPENSATED else None
        )
    return builder.build()


def make_storage(backend: str, target: str) -> Any:
    if backend == "sqlite":
        return SQLiteStorage(target)
    from fluxrun import PostgresStorage

    return PostgresStorage(target)  # type: ignore[call-arg]


def say(line: str) -> None:
    print(line, flush=True)


async def main(config: dict[str, Any]) -> None:
    global _fx_fd, _group_fd, _store
    _fx_fd = os.open(
        os.path.join(config["fx_dir"], f"effects-{os.getpid()}.log"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    _group_fd = os.open(
        os.path.join(os.path.dirname(config["fx_dir"]), f"group-{os.getpid()}.log"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    flow = build_flow()
    _store = make_storage(config["backend"], config["target"])
    engine = FluxEngine(
        storage=_store,
        lease=float(config["lease"]),
        max_recoveries=int(config["max_recoveries"]),
        retry_policy=RetryPolicy(initial_delay=0, jitter=False),
        recover_on_start=True,
    )
    engine.register(flow)
    say("START")
    await engine.init()  # recovers what a killed worker left
    say("READY")
    total = int(config["runs"])
    deadline = time.monotonic() + float(config.get("give_up_after", 120))
    while True:
        runs = await engine.list(WorkflowFilter(name=NAME))
        started = {r.input["idx"] for r in runs}
        jobs: list[tuple[str, Any]] = [
            ("signal", r) for r in runs if r.status == WorkflowStatus.SUSPENDED
        ]
        jobs += [("start", i) for i in range(total) if i not in started]
        await drive(engine, flow, jobs, int(config["concurrency"]))
        if not config.get("final"):
            break
        runs = await engine.list(WorkflowFilter(name=NAME))
        if len(runs) == total and all(r.status in TERMINAL for r in runs):
            break
        if time.monotonic() > deadline:
            say("ERROR the final worker gave up: runs are still unfinished")
            break
        # Runs of a killed worker whose lease has not expired yet: try again shortly.
        await asyncio.sleep(0.2)
        await engine.recover()
    await engine.close()
    os.close(_fx_fd)
    say("DONE")


async def drive(engine: FluxEngine, flow: Any, jobs: list[tuple[str, Any]], width: int) -> None:
    """Run the jobs with at most ``width`` runs in flight."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            kind, arg = queue.get_nowait()
            try:
                if kind == "signal":
                    await engine.signal(flow, arg.id, "go", signal_payload(arg.input["idx"]))
                else:
                    await engine.execute(flow, run_input(arg))
            except Exception as exc:
                say(f"ERROR {kind} {arg if kind == 'start' else arg.id}: {exc!r}")
                traceback.print_exc()

    await asyncio.gather(*(worker() for _ in range(width)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
