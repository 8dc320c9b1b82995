"""A run's state machine: every decision about its next transition, and no I/O.

:class:`RunMachine` is what a driver knows about one run it owns (version, fence, status, the
recorded step rows, the history) and builds each :class:`Transition` the driver commits;
:meth:`RunMachine.record` folds a committed one back in. :func:`decide` says what a run that
has just been claimed needs (continue forward, wake from a sleep, take a signal, time out a
wait, finish a rollback, cancel, pause, give up, or nothing yet), and the ``*_transition``
functions build the claims of the operator actions (``signal``, ``resume``, continuing a
rollback). The driver (:mod:`fluxrun._runner` and its bases) runs user code, commits what
this module decides, and tells hooks, sinks and the log; the scheduler and the actions only
claim runs and hand them over.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ._children import child_of, is_child_signal, read_outcome
from ._definition import WorkflowDefinition
from ._records import StepExecution, StepStatus, WorkflowStatus
from ._state import apply_changes, entry, replay_data, snapshot_text
from .errors import (
    CommittedStepError,
    InvalidStepIndexError,
    StepNotFoundError,
    WorkflowNotSuspendedError,
)
from .storage._base import (
    KEEP,
    Applied,
    AttemptRow,
    Claim,
    Keep,
    RunRow,
    SignalRef,
    SignalRow,
    Snapshot,
    StepRow,
    Transition,
    Wake,
)

__all__ = [
    "Cancel",
    "ChildDone",
    "ChildFailed",
    "Decision",
    "Deliver",
    "Forward",
    "GiveUp",
    "Park",
    "Pause",
    "Rest",
    "Rollback",
    "RunMachine",
    "TimedOut",
    "WakeSleep",
    "decide",
    "failed_index",
    "final_attempt",
    "first_unrecorded",
    "rollback_data",
    "start_index",
    "waiting_row",
]

_COMPLETED = StepStatus.COMPLETED.value
_SUSPENDED = StepStatus.SUSPENDED.value
_COMPENSATED = StepStatus.COMPENSATED.value
_COMPENSATING = StepStatus.COMPENSATING.value
_RUNNING = WorkflowStatus.RUNNING.value
_RUNNING_STATUS = WorkflowStatus.RUNNING
_WAITING = (WorkflowStatus.SUSPENDED, WorkflowStatus.PAUSED)


def _epoch() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunMachine:
    """The state of one owned run, and the transitions that move it."""

    def __init__(
        self,
        *,
        definition: WorkflowDefinition,
        run_id: str,
        version: int,
        fence: int,
        status: WorkflowStatus,
        rows: dict[int, StepRow],
        steps_from: int = 0,
    ) -> None:
        self.definition = definition
        self.id = run_id
        self.version = version
        self.fence = fence
        self.status = status
        self.rows = rows
        self.current_step = 0
        self.names = definition.step_names
        # The rows (and so the history entries) before this index are not loaded yet: the
        # run was continued from its snapshot (see merge_prefix).
        self.steps_from = steps_from
        # ctx.data as last saved is the replay of the rows before this index (-1: not known
        # to be, e.g. after a signal's delivery): only then is a snapshot of it written.
        self.data_at = 0
        self.history: list[StepExecution] = list(definition.pending_history)
        for i, row in rows.items():
            self.history[i] = entry(row)

    def merge_prefix(self, rows: Iterable[StepRow]) -> None:
        """Fold in the rows before ``steps_from``, now that something needs them."""
        for row in rows:
            if row.index < self.steps_from and row.index not in self.rows:
                self.rows[row.index] = row
                self.history[row.index] = entry(row)
        self.steps_from = 0

    def snapshot(
        self, status: WorkflowStatus | Keep, saved: dict[str, str], signals: Any
    ) -> Snapshot | None:
        """The snapshot a transition to ``status`` that lets the run go writes: only for a
        run that stops to wait, and only when the saved data is exactly that of the rows
        before the current step (what a snapshot at that step means)."""
        if status not in _WAITING or self.data_at != self.current_step:
            return None
        return Snapshot(text=snapshot_text(saved, signals), at=self.current_step)

    def transition(
        self,
        *,
        status: WorkflowStatus | Keep = KEEP,
        insert_step: StepRow | None = None,
        update_step: StepRow | None = None,
        error: str | Keep | None = KEEP,
        completed_at: dt.datetime | Keep | None = KEEP,
        wait_name: str | Keep | None = KEEP,
        release: bool = False,
        attempts: tuple[AttemptRow, ...] = (),
        run_after: dt.datetime | Keep | None = KEEP,
        wait_kind: str | Keep | None = KEEP,
        attempt: int | Keep = KEEP,
        requested: Keep | Literal["pause"] | None = KEEP,
        consume_signal: SignalRef | None = None,
        delete_steps_from: int | None = None,
        snapshot: Snapshot | None = None,
        run_after_from: dt.datetime | None = None,
        wake: Wake | None = None,
        updated_at: dt.datetime,
    ) -> Transition:
        """One fenced write of this run as the machine last saw it."""
        if status is self.status:
            # Unchanged (a fenced write applies only to the run as this driver last saw it):
            # writing it again would make the SQL stores rewrite their status indexes.
            status = KEEP
        return Transition(
            run_id=self.id,
            expected_version=self.version,
            updated_at=updated_at,
            fence=self.fence,
            status=status if isinstance(status, Keep) else status.value,
            current_step=self.current_step,
            error=error,
            completed_at=completed_at,
            wait_name=wait_name,
            insert_step=insert_step,
            update_step=update_step,
            # No lease renewal here: the LeaseKeeper thread does it, and leaving lease_until
            # alone lets PostgreSQL update the run row in place (no index writes per step).
            release=release,
            attempts=attempts,
            run_after=run_after,
            wait_kind=wait_kind,
            attempt=attempt,
            requested=requested,
            consume_signal=consume_signal,
            delete_steps_from=delete_steps_from,
            snapshot=snapshot,
            run_after_from=run_after_from,
            wake=wake,
        )

    def suspended_row(
        self,
        index: int,
        started: dt.datetime,
        now: dt.datetime,
        waiting_for: str | None,
        duration: float,
        attempts: int,
        changes: str | None,
    ) -> StepRow:
        """The row of step ``index`` that stops the run to wait (a signal, a child's
        outcome, or a timer when ``waiting_for`` is None), with its attempt's changes."""
        return StepRow(
            index=index,
            name=self.names[index],
            status=StepStatus.SUSPENDED.value,
            started_at=started,
            suspended_at=now,
            waiting_for=waiting_for,
            duration_ms=duration,
            retries=attempts - 1,
            changes=changes,
            fence=self.fence,
        )

    def step_transition(self, row: StepRow) -> Transition:
        """The commit of a step's outcome on the forward path (the hot path: one per step,
        so it names only what it changes); the run is ``running`` after it."""
        return Transition(
            run_id=self.id,
            expected_version=self.version,
            updated_at=row.completed_at or row.started_at or _epoch(),
            fence=self.fence,
            status=KEEP if self.status is _RUNNING_STATUS else _RUNNING,
            current_step=self.current_step,
            insert_step=row,
        )

    def step_recorded(self, row: StepRow, applied: Applied) -> None:
        """Fold a committed :meth:`step_transition` into the machine's state."""
        self.version = applied.version
        self.status = _RUNNING_STATUS
        self.rows[row.index] = row
        self.history[row.index] = entry(row)
        self.data_at = row.index + 1

    def record(self, t: Transition, applied: Applied) -> None:
        """Fold a committed transition into the machine's state."""
        self.version = applied.version
        if not isinstance(t.status, Keep):
            self.status = WorkflowStatus(t.status)
        for row in (t.insert_step, t.update_step):
            if row is not None:
                self.rows[row.index] = row
                self.history[row.index] = entry(row)
        if t.insert_step is not None:
            self.data_at = t.insert_step.index + 1
        elif t.update_step is not None and t.update_step.status == _COMPLETED:
            self.data_at = t.update_step.index + 1  # a sleep or wait completed

    def pivot(self, before: int) -> int | None:
        """The last completed commit step before index ``before``, if any (rule 11)."""
        steps = self.definition.steps
        for index in range(before - 1, -1, -1):
            row = self.rows.get(index)
            if steps[index].commit and row is not None and row.status == _COMPLETED:
                return index
        return None


# -- what a claimed run needs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """Run the steps from ``start``; the first at attempt ``attempt`` (a durable backoff or a
    crash kept the count)."""

    start: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Rollback:
    """Carry on the rollback that the failure of step ``failed`` started."""

    failed: int
    message: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Compensate (rule 11) and end the run ``cancelled``."""

    reason: str | None


@dataclass(frozen=True, slots=True)
class Pause:
    """Mark the run ``paused`` and let it go."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Too many executor crashes in a row without progress: end the run ``failed``."""

    message: str


@dataclass(frozen=True, slots=True)
class Park:
    """The run cannot be continued by this definition (its steps changed)."""

    message: str


@dataclass(frozen=True, slots=True)
class WakeSleep:
    """The sleep of step ``index`` is over."""

    index: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """The wait of step ``index`` takes ``signal`` from the inbox."""

    index: int
    signal: SignalRow


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The wait of step ``index`` saw no signal in time (its attempt ``attempt`` failed)."""

    index: int
    attempt: int


@dataclass(frozen=True, slots=True)
class ChildDone:
    """The child run step ``index`` waits for completed: ``signal`` (its outcome, in the
    inbox) completes the step with the child's data."""

    index: int
    signal: SignalRow


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """The child run step ``index`` waits for did not complete: ``signal`` says how; the
    step's attempt ``attempt`` failed."""

    index: int
    signal: SignalRow
    attempt: int


@dataclass(frozen=True, slots=True)
class Rest:
    """Nothing is due yet: put the run back as it was."""


Decision = (
    Forward
    | Rollback
    | Cancel
    | Pause
    | GiveUp
    | Park
    | WakeSleep
    | Deliver
    | TimedOut
    | ChildDone
    | ChildFailed
    | Rest
)


def first_unrecorded(rows: Iterable[int], start: int = 0) -> int:
    """The first step index from ``start`` on without a recorded row."""
    recorded = set(rows)
    while start in recorded:
        start += 1
    return start


def decide(
    row: RunRow,
    definition: WorkflowDefinition,
    *,
    max_recoveries: int,
    signal: SignalRow | None,
    timer_due: bool,
) -> Decision:
    """What a run this executor has just claimed needs now.

    ``row`` has its step rows; ``signal`` is the oldest unconsumed inbox row named by the
    run's wait (if it waits for one); ``timer_due`` whether its ``run_after`` has come.
    """
    status = row.status
    if tuple(row.step_names) != definition.step_names:
        return Park(
            f"cannot continue run {row.id!r}: workflow {row.name!r} changed its steps since "
            f"the run started (stored {list(row.step_names)}, now "
            f"{list(definition.step_names)})"
        )
    if row.requested == "cancel":
        return Cancel(row.request_reason)
    crashed = status in (_RUNNING, WorkflowStatus.PENDING.value, WorkflowStatus.ROLLING_BACK.value)
    if crashed and row.claims > max_recoveries:
        return GiveUp(
            f"run gave up after {row.claims - 1} executor crashes in a row "
            f"(max_recoveries={max_recoveries})"
        )
    if row.requested == "pause":
        return Pause()
    if status == WorkflowStatus.ROLLING_BACK.value:
        return Rollback(*failed_index(row, len(definition.steps)))
    if status == WorkflowStatus.SUSPENDED.value:
        return _decide_waiting(row, signal, timer_due)
    if status in (_RUNNING, WorkflowStatus.PENDING.value):
        start = first_unrecorded((r.index for r in row.steps), row.steps_from)
        attempt = row.attempt + 1 if row.attempt and row.current_step == start else 1
        return Forward(start, attempt)
    return Rest()


def _decide_waiting(row: RunRow, signal: SignalRow | None, timer_due: bool) -> Decision:
    index = row.current_step
    kind = row.wait_kind
    if kind == "backoff":
        return Forward(index, row.attempt + 1) if timer_due else Rest()
    waiting = next((r for r in row.steps if r.index == index and r.status == _SUSPENDED), None)
    if waiting is None:
        return Rest()
    if kind == "sleep":
        return WakeSleep(index) if timer_due else Rest()
    # A signal wait (kind "signal", or a run suspended before schema 3 recorded kinds); a
    # child step waits on its child's outcome signal.
    if signal is not None and is_child_signal(signal.name):
        if read_outcome(signal.payload, child_of(signal.name) or "?").completed:
            return ChildDone(index, signal)
        return ChildFailed(index, signal, waiting.retries + 1)
    if signal is not None:
        return Deliver(index, signal)
    if timer_due and row.run_after is not None:
        return TimedOut(index, waiting.retries + 1)
    return Rest()


def woken_step(row: RunRow, applied: Applied, index: int, now: dt.datetime) -> StepRow:
    """The sleeping step ``index`` of a claimed run, completed at ``now``."""
    waiting = next(r for r in row.steps if r.index == index)
    return replace(waiting, status=_COMPLETED, completed_at=now, fence=applied.fence)


def deliver_step(row: RunRow, applied: Applied, d: Deliver, now: dt.datetime) -> StepRow:
    """The waiting step of a claimed run, completed with the signal's payload."""
    waiting = next(r for r in row.steps if r.index == d.index)
    return replace(
        waiting,
        status=_COMPLETED,
        completed_at=now,
        output=d.signal.payload,
        fence=applied.fence,
    )


def signal_ref(d: Deliver) -> SignalRef:
    """The inbox row a delivery consumes."""
    return SignalRef(seq=d.signal.seq, step=d.index)


def rollback_data(rows: Iterable[StepRow], failed: int) -> dict[str, Any]:
    """``ctx.data`` for continuing a rollback: as before step ``failed``, then the changes of
    the compensations already recorded, last step first."""
    ordered = sorted(rows, key=lambda r: r.index)
    data = replay_data(ordered, before=failed)
    for r in reversed(ordered):
        if r.index < failed:
            apply_changes(data, r.compensation_changes)
    return data


def final_attempt(row: StepRow, logged: Iterable[AttemptRow]) -> AttemptRow | None:
    """The last forward attempt a step row stands for (None for a skipped step)."""
    if row.status in (StepStatus.SKIPPED.value, StepStatus.PENDING.value):
        return None
    status = row.status
    if status in (_COMPENSATED, _COMPENSATING):
        status = _COMPLETED
    finished = row.completed_at or row.suspended_at
    started = row.started_at
    if row.retries:
        # The row spans every attempt; the last one began when the one before it ended.
        earlier = [
            a.finished_at
            for a in logged
            if a.kind == "step"
            and a.index == row.index
            and a.finished_at is not None
            and (started is None or a.finished_at >= started)
        ]
        if earlier:
            started = max(earlier)
    duration = row.duration_ms
    if row.retries and started is not None and finished is not None:
        duration = (finished - started).total_seconds() * 1000.0
    forward_error = status == StepStatus.FAILED.value
    return AttemptRow(
        index=row.index,
        name=row.name,
        attempt=row.retries + 1,
        kind="step",
        status=status,
        started_at=started,
        finished_at=finished,
        duration_ms=duration,
        error_type=row.error_type if forward_error else None,
        error=row.error if forward_error else None,
        traceback=row.traceback if forward_error else None,
    )


# -- the claims of operator actions ------------------------------------------------------------


def waiting_row(row: RunRow) -> StepRow:
    """The suspended step of a run waiting for a signal (rule 10's checks)."""
    if row.status != WorkflowStatus.SUSPENDED.value or row.wait_kind not in (None, "signal"):
        raise WorkflowNotSuspendedError(
            f"Workflow is not suspended on a signal (status: {row.status}"
            + (f", waiting for {row.wait_kind}" if row.wait_kind else "")
            + ")",
            workflow_id=row.id,
            workflow_name=row.name,
            details={"status": row.status},
        )
    for r in row.steps:
        if r.index == row.current_step and r.status == _SUSPENDED:
            child = child_of(r.waiting_for)
            if child is not None:
                raise WorkflowNotSuspendedError(
                    f"Workflow is waiting for its child run {child!r}, not for a signal",
                    workflow_id=row.id,
                    workflow_name=row.name,
                    details={"status": row.status, "child_id": child},
                )
            return r
    raise WorkflowNotSuspendedError(
        "Workflow state invalid: no suspended step found",
        workflow_id=row.id,
        workflow_name=row.name,
        details={"status": row.status},
    )


def failed_index(row: RunRow, count: int) -> tuple[int, str]:
    """The step whose failure started a rollback, and its stored message."""
    for r in row.steps:
        if r.status == StepStatus.FAILED.value:
            return r.index, r.error or "step failed"
    return count, row.error or "step failed"


def _pivot_of(definition: WorkflowDefinition, row: RunRow) -> int | None:
    """The last completed commit step before where a failed run stopped."""
    for r in sorted(row.steps, key=lambda r: -r.index):
        if r.index < row.current_step and definition.steps[r.index].commit:
            if r.status == _COMPLETED:
                return r.index
    return None


def start_index(definition: WorkflowDefinition, row: RunRow, from_step: int | str | None) -> int:
    """Where ``resume`` continues a run (rule 15)."""
    count = len(definition.steps)
    if from_step is None:
        pivot = _pivot_of(definition, row) if row.status == WorkflowStatus.FAILED.value else None
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


def claim_transition(
    row: RunRow, claim: Claim | None, now: dt.datetime, **patch: Any
) -> Transition:
    """Claim a stored (unowned) run as part of an operator action's first write (or, with
    no ``claim``, leave it for a claim: a run under a concurrency limit)."""
    return Transition(
        run_id=row.id, expected_version=row.version, updated_at=now, claim=claim, **patch
    )
