"""Actions on a stored run: signal, resume (with its guard rails), skip a compensation, and
read its attempts. ``FluxEngine`` exposes them; each claims the run with one guarded write
(built by :mod:`fluxrun._machine`) and hands it to a driver through the :class:`Runtime`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from ._codec import encode
from ._definition import WorkflowDefinition
from ._machine import (
    claim_transition,
    failed_index,
    final_attempt,
    rollback_data,
    start_index,
    waiting_row,
)
from ._records import FluxResult, StepAttempt, StepStatus, WorkflowStatus
from ._runner import claim_for, utcnow
from ._runtime import Runtime
from ._state import replay_data
from .errors import (
    InvalidStateError,
    SignalMismatchError,
    StepNotFoundError,
    WorkflowNotFoundError,
)
from .storage._base import AttemptRow, Claim, RunRow, StepRow

__all__ = [
    "continue_rollback",
    "list_attempts",
    "resume_run",
    "signal_run",
    "skip_compensation",
]

_COMPLETED = StepStatus.COMPLETED.value
_COMPENSATING = StepStatus.COMPENSATING.value
_COMPENSATED = StepStatus.COMPENSATED.value
_UNDONE = (_COMPENSATED, _COMPENSATING)


def _claim(rt: Runtime, definition: WorkflowDefinition) -> Claim | None:
    """This engine's claim for an action's first write; none for a run under a concurrency
    limit, which the action leaves due for a claim that counts it (see :func:`_handed_over`)."""
    return claim_for(rt.settings) if definition.concurrency is None else None


async def _handed_over(rt: Runtime, run_id: str) -> FluxResult:
    """Wait for a run an action made due (and left unowned) to be claimed within its
    workflow's concurrency limit and driven, here or elsewhere."""
    rt.on_idle()
    return await rt.wait_result(run_id, None)


async def signal_run(
    rt: Runtime, definition: WorkflowDefinition, row: RunRow, name: str, payload: Any
) -> FluxResult:
    """Rule 10: deliver ``name`` to a run waiting for it, and return the continued result.

    The signal goes through the run's inbox (so it is never lost and consumed once), then
    the run is driven here at once (or, if another executor got to it first, waited for).
    """
    payload_text = encode(
        payload, what=f"payload of signal {name!r}", max_size=rt.settings.max_value_size
    )
    waiting = waiting_row(row)
    if waiting.waiting_for != name:
        raise SignalMismatchError(
            f"Workflow waiting for signal {waiting.waiting_for!r}, received {name!r}",
            workflow_id=row.id,
            workflow_name=definition.name,
            step=waiting.name,
            details={"expected": waiting.waiting_for, "received": name},
        )
    await rt.store.send_signal(row.id, name, payload_text)
    return await rt.drive_now(row.id, definition, row)


async def resume_run(
    rt: Runtime, definition: WorkflowDefinition, row: RunRow, from_step: int | str | None
) -> FluxResult:
    """Continue a stopped run (rule 15): forward from a step, or the rollback it stopped in."""
    started = time.perf_counter()
    status = row.status
    if from_step is None and status in (
        WorkflowStatus.COMPLETED.value,
        WorkflowStatus.CANCELLED.value,
    ):
        raise InvalidStateError(
            f"run {row.id!r} is {status}; resume needs an explicit from_step to run a "
            "finished run again",
            workflow_id=row.id,
            workflow_name=definition.name,
            details={"status": status},
        )
    if status in (WorkflowStatus.COMPENSATION_FAILED.value, WorkflowStatus.ROLLING_BACK.value):
        if from_step is not None:
            raise InvalidStateError(
                f"run {row.id!r} is {status}: finish its rollback first (resume without "
                "from_step retries the failed compensation; skip_compensation records one as "
                "done by hand)",
                workflow_id=row.id,
                workflow_name=definition.name,
                details={"status": status},
            )
        return await continue_rollback(rt, definition, row, started)
    if status == WorkflowStatus.PAUSED.value and from_step is None:
        # Resuming a paused run unpauses it: it continues where it stopped.
        await rt.unpause(row)
        return await rt.drive_now(row.id, definition)
    start = start_index(definition, row, from_step)
    rows = {r.index: r for r in row.steps}
    undone = [i for i, r in rows.items() if i < start and r.status in _UNDONE]
    if undone:
        first = min(undone)
        raise InvalidStateError(
            f"run {row.id!r} was rolled back: step {definition.steps[first].name!r} "
            f"(index {first}) was already compensated; resume from index {first} or earlier",
            workflow_id=row.id,
            workflow_name=definition.name,
            step=definition.steps[start].name,
        )
    keep = tuple(
        i
        for i, r in rows.items()
        if i >= start and definition.steps[i].commit and r.status == _COMPLETED
    )
    replaced = [r for i, r in sorted(rows.items()) if i >= start and i not in keep]
    # The outcomes about to be replaced stay readable in the attempt log.
    logged = await rt.store.list_attempts(row.id) if any(r.retries for r in replaced) else []
    archived = tuple(a for a in (final_attempt(r, logged) for r in replaced) if a is not None)
    applied = await rt.store.apply(
        claim_transition(
            row,
            _claim(rt, definition),
            utcnow(),
            status=WorkflowStatus.PENDING.value,
            current_step=start,
            error=None,
            completed_at=None,
            wait_name=None,
            wait_kind=None,
            run_after=None,
            attempt=0,
            delete_steps_from=start,
            keep_steps=keep,
            attempts=archived,
        )
    )
    if definition.concurrency is not None:
        return await _handed_over(rt, row.id)
    kept = {i: r for i, r in rows.items() if i < start or i in keep}
    driver = rt.driver_from(
        definition, row, applied, rows=kept, data=replay_data(kept.values(), before=start)
    )
    driver.started = started
    driver.status = WorkflowStatus.PENDING
    return await rt.drive(driver, lambda d: d.forward(start))


async def continue_rollback(
    rt: Runtime,
    definition: WorkflowDefinition,
    row: RunRow,
    started: float,
    *,
    skipped: StepRow | None = None,
    note: AttemptRow | None = None,
) -> FluxResult:
    """Claim a run stopped in its rollback and carry the rollback on to its end."""
    failed, message = failed_index(row, len(definition.steps))
    applied = await rt.store.apply(
        claim_transition(
            row,
            _claim(rt, definition),
            utcnow(),
            status=WorkflowStatus.ROLLING_BACK.value,
            completed_at=None,
            update_step=skipped,
            attempts=() if note is None else (note,),
        )
    )
    if definition.concurrency is not None:
        return await _handed_over(rt, row.id)
    rows = {r.index: r for r in row.steps}
    if skipped is not None:
        rows[skipped.index] = replace(skipped, fence=applied.fence)
    driver = rt.driver_from(
        definition, row, applied, rows=rows, data=rollback_data(rows.values(), failed)
    )
    driver.started = started
    driver.status = WorkflowStatus.ROLLING_BACK
    driver.current_step = min(failed, len(definition.steps) - 1)
    # A rollback a cancel started ends cancelled, however it was continued.
    ending = WorkflowStatus.CANCELLED if row.requested == "cancel" else None
    return await rt.drive(driver, lambda d: d.rollback(failed, message, ending=ending))


async def skip_compensation(
    rt: Runtime, definition: WorkflowDefinition, row: RunRow, step: str, note: str
) -> FluxResult:
    """Record the failed compensation of ``step`` as done by hand, then finish the rollback."""
    if row.status != WorkflowStatus.COMPENSATION_FAILED.value:
        raise InvalidStateError(
            f"run {row.id!r} is {row.status}; only a compensation_failed run has a "
            "compensation to skip",
            workflow_id=row.id,
            workflow_name=definition.name,
            step=step,
            details={"status": row.status},
        )
    if step not in definition.step_names:
        raise StepNotFoundError(
            f"Step not found: {step}", workflow_id=row.id, workflow_name=definition.name, step=step
        )
    index = definition.step_names.index(step)
    recorded = next((r for r in row.steps if r.index == index), None)
    if recorded is None or recorded.status != _COMPENSATING:
        raise InvalidStateError(
            f"run {row.id!r}: the compensation of step {step!r} did not fail "
            f"(step status: {recorded.status if recorded else 'pending'}); nothing to skip",
            workflow_id=row.id,
            workflow_name=definition.name,
            step=step,
        )
    now = utcnow()
    logged = await rt.store.list_attempts(row.id)
    tries = sum(1 for a in logged if a.kind == "compensation" and a.index == index)
    skipped = replace(
        recorded,
        status=_COMPENSATED,
        compensated_at=now,
        error=None,
        error_type=None,
        traceback=None,
        fence=row.fence + 1,
    )
    log = AttemptRow(
        index=index,
        name=step,
        attempt=tries + 1,
        kind="compensation",
        status=StepStatus.SKIPPED.value,
        started_at=now,
        finished_at=now,
        duration_ms=0.0,
        error=note,  # for a skipped compensation the store's error column holds the note
    )
    rt.emitter.log.warning(
        f"{definition.name}/{row.id}: compensation of step {step!r} recorded as done by hand "
        f"({note})"
    )
    return await continue_rollback(
        rt, definition, row, time.perf_counter(), skipped=skipped, note=log
    )


async def list_attempts(rt: Runtime, run_id: str) -> list[StepAttempt]:
    """Every attempt of every step and compensation of a run, in the order they started."""
    row = await rt.store.load(run_id)
    if row is None:
        raise WorkflowNotFoundError(f"Workflow not found: {run_id}", workflow_id=run_id)
    logged = await rt.store.list_attempts(run_id)
    live = [a for a in (final_attempt(r, logged) for r in row.steps) if a is not None]
    merged = [(a, a.seq) for a in logged] + [(a, 1 << 62) for a in live]

    def order(item: tuple[AttemptRow, int]) -> tuple[Any, ...]:
        a, seq = item
        when = a.started_at or a.finished_at
        return (when is None, when or row.created_at, seq)

    return [_public(a) for a, _ in sorted(merged, key=order)]


def _public(a: AttemptRow) -> StepAttempt:
    skipped = a.kind == "compensation" and a.status == StepStatus.SKIPPED.value
    return StepAttempt(
        step=a.name,
        index=a.index,
        attempt=a.attempt,
        kind=a.kind,
        status=StepStatus(a.status),
        started_at=a.started_at,
        finished_at=a.finished_at,
        duration_ms=a.duration_ms,
        error_type=a.error_type,
        error=None if skipped else a.error,
        traceback=a.traceback,
        note=a.error if skipped else None,
    )
