"""Actions on a stored run: signal, resume (with its guard rails), skip a compensation, and
read its attempts. ``FluxEngine`` exposes them; each claims the run with one guarded write
and hands it to a driver.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._codec import decode, encode
from ._definition import WorkflowDefinition
from ._driver import final_attempt, rollback_data
from ._records import FluxResult, StepAttempt, StepStatus, WorkflowStatus
from ._runner import claim_for, utcnow
from ._state import replay_data
from .errors import (
    CommittedStepError,
    ConcurrentModificationError,
    InvalidStateError,
    InvalidStepIndexError,
    SignalMismatchError,
    StepNotFoundError,
    WorkflowNotFoundError,
    WorkflowNotSuspendedError,
)
from .storage._base import AttemptRow, RunRow, StepRow, Transition

if TYPE_CHECKING:
    from ._engine import FluxEngine

__all__ = ["list_attempts", "resume_run", "signal_run", "skip_compensation"]

_COMPLETED = StepStatus.COMPLETED.value
_COMPENSATING = StepStatus.COMPENSATING.value
_COMPENSATED = StepStatus.COMPENSATED.value
_UNDONE = (_COMPENSATED, _COMPENSATING)


async def signal_run(
    engine: FluxEngine, definition: WorkflowDefinition, run_id: str, name: str, payload: Any
) -> FluxResult:
    """Complete the waiting step of a suspended run with ``payload`` and continue it."""
    started = time.perf_counter()
    payload_text = encode(
        payload, what=f"payload of signal {name!r}", max_size=engine.settings.max_value_size
    )
    row = await engine._load_for(definition, run_id)
    if row is None:
        raise WorkflowNotFoundError(
            f"Workflow not found: {run_id}", workflow_id=run_id, workflow_name=definition.name
        )
    waiting = _waiting_row(row)
    if waiting.waiting_for != name:
        raise SignalMismatchError(
            f"Workflow waiting for signal {waiting.waiting_for!r}, received {name!r}",
            workflow_id=run_id,
            workflow_name=definition.name,
            step=waiting.name,
            details={"expected": waiting.waiting_for, "received": name},
        )
    done = replace(
        waiting, status=_COMPLETED, completed_at=utcnow(), output=payload_text, fence=row.fence + 1
    )
    try:
        applied = await engine.storage.apply(
            Transition(
                run_id=run_id,
                expected_version=row.version,
                updated_at=utcnow(),
                claim=claim_for(engine.settings),
                status=WorkflowStatus.RUNNING.value,
                wait_name=None,
                update_step=done,
            )
        )
    except ConcurrentModificationError:
        fresh = await engine.storage.load(run_id)
        if fresh is not None and fresh.status != WorkflowStatus.SUSPENDED.value:
            raise WorkflowNotSuspendedError(
                f"Workflow is not suspended (status: {fresh.status}); another signal or "
                "operation got there first",
                workflow_id=run_id,
                workflow_name=definition.name,
                details={"status": fresh.status},
            ) from None
        raise
    rows = {r.index: r for r in row.steps}
    rows[done.index] = replace(done, fence=applied.fence)
    data = replay_data(rows.values())
    driver = engine._driver_from(definition, row, applied, rows=rows, data=data)
    driver.started = started
    driver.status = WorkflowStatus.RUNNING
    driver.signals[name] = decode(payload_text)
    driver.current_step = done.index
    await driver.event(
        "signal:received",
        step_name=done.name,
        step_index=done.index,
        status=WorkflowStatus.SUSPENDED.value,
        input=driver.signals[name],
        meta={"signal": name},
    )
    return await engine._drive(driver, done.index + 1)


def _waiting_row(row: RunRow) -> StepRow:
    if row.status != WorkflowStatus.SUSPENDED.value:
        raise WorkflowNotSuspendedError(
            f"Workflow is not suspended (status: {row.status})",
            workflow_id=row.id,
            workflow_name=row.name,
            details={"status": row.status},
        )
    for r in row.steps:
        if r.index == row.current_step and r.status == StepStatus.SUSPENDED.value:
            return r
    raise WorkflowNotSuspendedError(
        "Workflow state invalid: no suspended step found",
        workflow_id=row.id,
        workflow_name=row.name,
        details={"status": row.status},
    )


async def resume_run(
    engine: FluxEngine, definition: WorkflowDefinition, row: RunRow, from_step: int | str | None
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
        return await continue_rollback(engine, definition, row, started)
    start = _start_index(definition, row, from_step)
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
    logged = await engine.storage.list_attempts(row.id) if any(r.retries for r in replaced) else []
    archived = tuple(a for a in (final_attempt(r, logged) for r in replaced) if a is not None)
    applied = await engine.storage.apply(
        Transition(
            run_id=row.id,
            expected_version=row.version,
            updated_at=utcnow(),
            claim=claim_for(engine.settings),
            status=WorkflowStatus.PENDING.value,
            current_step=start,
            error=None,
            completed_at=None,
            wait_name=None,
            delete_steps_from=start,
            keep_steps=keep,
            attempts=archived,
        )
    )
    kept = {i: r for i, r in rows.items() if i < start or i in keep}
    driver = engine._driver_from(
        definition, row, applied, rows=kept, data=replay_data(kept.values(), before=start)
    )
    driver.started = started
    driver.status = WorkflowStatus.PENDING
    return await engine._drive(driver, start)


def _pivot(definition: WorkflowDefinition, row: RunRow) -> int | None:
    """The last completed commit step before where a failed run stopped."""
    for r in sorted(row.steps, key=lambda r: -r.index):
        if r.index < row.current_step and definition.steps[r.index].commit:
            if r.status == _COMPLETED:
                return r.index
    return None


def _start_index(definition: WorkflowDefinition, row: RunRow, from_step: int | str | None) -> int:
    count = len(definition.steps)
    if from_step is None:
        pivot = _pivot(definition, row) if row.status == WorkflowStatus.FAILED.value else None
        # A run failed after its commit step is finished forward from the step after it.
        start = pivot + 1 if pivot is not None else min(max(row.current_step, 0), count - 1)
    elif isinstance(from_step, str):
        try:
            start = definition.step_names.index(from_step)
        except ValueError:
            raise StepNotFoundError(
                f"Step not found: {from_step}",
                workflow_id=row.id,
                workflow_name=definition.name,
                step=from_step,
            ) from None
    else:
        if not 0 <= from_step < count:
            raise InvalidStepIndexError(
                f"Invalid step index: {from_step} (the workflow has {count} steps)",
                workflow_id=row.id,
                workflow_name=definition.name,
                details={"index": from_step},
            )
        start = from_step
    step = definition.steps[start]
    recorded = next((r for r in row.steps if r.index == start), None)
    if step.commit and recorded is not None and recorded.status == _COMPLETED:
        raise CommittedStepError(
            f"step {step.name!r} is a commit step that already completed; it never runs "
            "again in this run",
            workflow_id=row.id,
            workflow_name=definition.name,
            step=step.name,
        )
    return start


def _failed_index(row: RunRow, count: int) -> tuple[int, str]:
    """The step whose failure started the rollback, and its stored message."""
    for r in row.steps:
        if r.status == StepStatus.FAILED.value:
            return r.index, r.error or "step failed"
    return count, row.error or "step failed"


async def continue_rollback(
    engine: FluxEngine,
    definition: WorkflowDefinition,
    row: RunRow,
    started: float,
    *,
    skipped: StepRow | None = None,
    note: AttemptRow | None = None,
) -> FluxResult:
    """Claim a run stopped in its rollback and carry the rollback on to its end."""
    failed, message = _failed_index(row, len(definition.steps))
    applied = await engine.storage.apply(
        Transition(
            run_id=row.id,
            expected_version=row.version,
            updated_at=utcnow(),
            claim=claim_for(engine.settings),
            status=WorkflowStatus.ROLLING_BACK.value,
            completed_at=None,
            update_step=skipped,
            attempts=() if note is None else (note,),
        )
    )
    rows = {r.index: r for r in row.steps}
    if skipped is not None:
        rows[skipped.index] = replace(skipped, fence=applied.fence)
    driver = engine._driver_from(
        definition, row, applied, rows=rows, data=rollback_data(rows.values(), failed)
    )
    driver.started = started
    driver.status = WorkflowStatus.ROLLING_BACK
    driver.current_step = min(failed, len(definition.steps) - 1)
    return await engine._drive(driver, None, rollback_from=(failed, message))


async def skip_compensation(
    engine: FluxEngine, definition: WorkflowDefinition, row: RunRow, step: str, note: str
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
    logged = await engine.storage.list_attempts(row.id)
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
    engine.emitter.log.warning(
        f"{definition.name}/{row.id}: compensation of step {step!r} recorded as done by hand "
        f"({note})"
    )
    return await continue_rollback(
        engine, definition, row, time.perf_counter(), skipped=skipped, note=log
    )


async def list_attempts(engine: FluxEngine, run_id: str) -> list[StepAttempt]:
    """Every attempt of every step and compensation of a run, in the order they started."""
    row = await engine.storage.load(run_id)
    if row is None:
        raise WorkflowNotFoundError(f"Workflow not found: {run_id}", workflow_id=run_id)
    logged = await engine.storage.list_attempts(run_id)
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
