"""Carrying out what :func:`~fluxrun._machine.decide` said of a claimed run, on the driver
that now holds it: go forward, roll back, cancel, pause, give up, wake a sleep, deliver a
signal, take a child's outcome, or fail a wait that timed out.

:class:`~fluxrun._runtime.Runtime` builds the driver (it loads the run and replays its data);
this module only maps each decision to the driver's calls, so that table is read apart from
the runtime's bookkeeping of the runs in flight and their waiters.
"""

from __future__ import annotations

import time

from ._child_runs import after_failed_try, take_outcome, wait_timed_out
from ._codec import decode
from ._driver import Failed, utcnow
from ._machine import (
    Cancel,
    ChildDone,
    ChildFailed,
    Decision,
    Deliver,
    Forward,
    GiveUp,
    Pause,
    Rollback,
    TimedOut,
    WakeSleep,
    deliver_step,
    signal_ref,
    woken_step,
)
from ._records import FluxResult, WorkflowStatus
from ._runner import RunDriver
from .storage._base import Applied, RunRow

__all__ = ["drive_decision"]


async def drive_decision(driver: RunDriver, decision: Decision, row: RunRow) -> FluxResult:
    """Carry out ``decision`` on a driver that holds the claimed run."""
    now = utcnow()
    if isinstance(decision, Forward):
        return await driver.forward(decision.start, decision.attempt)
    if isinstance(decision, Rollback):
        driver.current_step = min(decision.failed, len(driver.names) - 1)
        return await driver.rollback(decision.failed, decision.message)
    if isinstance(decision, Cancel):
        return await driver.cancel(decision.reason)
    if isinstance(decision, Pause):
        return await driver.on_request()
    if isinstance(decision, GiveUp):
        return await driver.give_up(decision.message)
    if isinstance(decision, WakeSleep):
        done = woken_step(row, Applied(driver.version, driver.fence), decision.index, now)
        await driver.save(
            updated_at=now,
            status=WorkflowStatus.RUNNING,
            update_step=done,
            wait_kind=None,
            run_after=None,
        )
        return await driver.forward(decision.index + 1)
    if isinstance(decision, Deliver):
        done = deliver_step(row, Applied(driver.version, driver.fence), decision, now)
        await driver.save(
            updated_at=now,
            status=WorkflowStatus.RUNNING,
            update_step=done,
            wait_name=None,
            wait_kind=None,
            run_after=None,
            consume_signal=signal_ref(decision),
        )
        payload = decode(decision.signal.payload)
        driver.signals[decision.signal.name] = payload
        await driver.event(
            "signal:received",
            step_name=done.name,
            step_index=done.index,
            status=WorkflowStatus.SUSPENDED.value,
            input=payload,
            meta={"signal": decision.signal.name},
        )
        return await driver.forward(decision.index + 1)
    if isinstance(decision, ChildDone | ChildFailed):
        return await take_outcome(driver, decision)
    assert isinstance(decision, TimedOut)
    return await _timed_out(driver, decision, row)


async def _timed_out(driver: RunDriver, decision: TimedOut, row: RunRow) -> FluxResult:
    """A wait saw no signal in time: its step's attempt failed with WaitTimeoutError."""
    index = decision.index
    step = driver.definition.steps[index]
    waiting = driver.rows.pop(index)
    error = await wait_timed_out(driver, step, waiting)
    t0 = time.perf_counter()
    failed = Failed(error, decision.attempt, waiting.started_at or utcnow(), t0)
    await driver.save(
        status=WorkflowStatus.RUNNING,
        delete_steps_from=index,
        wait_name=None,
        wait_kind=None,
        run_after=None,
    )
    return await after_failed_try(driver, index, step, failed, t0)
