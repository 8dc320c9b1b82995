"""Driving ``.child`` steps (SPEC §7): start the child run, wait for it durably, take its
outcome; and cancel a run's children with it.

A child step's attempt computes the child's input (its handler, see
:func:`~fluxrun._children.child_handler`), then :func:`await_child` starts the child run,
unowned, with an id derived from the parent's, the step and how many times the step was
tried before (:func:`~fluxrun._children.child_id`): a crash-restart of the same try finds the
same child (the store's insert-or-observe ``start``); a retry or a resume starts a new one.
The parent then suspends on the child's outcome signal like any signal wait: no task, lease
or connection is held, and any engine continues it. The child is driven like any run, by
whichever scheduler claims it; its last write puts its outcome into the parent's inbox
(:class:`~fluxrun.storage.Wake`), which makes the parent due. :func:`take_outcome` then
completes the step with the child's data, or fails its attempt (retries and compensation
apply). The decisions themselves (:class:`~fluxrun._machine.ChildDone`,
:class:`~fluxrun._machine.ChildFailed`) are the machine's.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._children import (
    ChildMarker,
    child_id,
    child_of,
    child_signal,
    flow_name,
    outcome_text,
    read_outcome,
)
from ._codec import encode
from ._definition import StepDefinition, WorkflowDefinition
from ._driver import Failed, Interrupted, Released, utcnow
from ._machine import ChildDone, ChildFailed
from ._records import FluxResult, StepExecution, StepStatus, WorkflowStatus
from ._state import replay_data
from .errors import (
    ChildWorkflowError,
    DefinitionError,
    FluxError,
    InvalidArgumentError,
    InvalidInputError,
    UnknownWorkflowError,
    WaitTimeoutError,
)
from .storage._base import FINISHED_STATUSES, RunRow, SignalRef, StepRow

if TYPE_CHECKING:
    from ._runner import RunDriver
    from ._runtime import Runtime

__all__ = ["await_child", "cancel_children", "take_outcome", "wait_timed_out"]

_UNLIMITED = 1 << 62  # the child's data was stored already, key by key, within the limit
# What keeps a child from starting: a mistake in the workflow, not bad luck; not retried.
_START_ERRORS = (
    ChildWorkflowError,
    DefinitionError,
    InvalidArgumentError,
    InvalidInputError,
    UnknownWorkflowError,
)


async def await_child(
    d: RunDriver,
    index: int,
    step: StepDefinition,
    marker: ChildMarker,
    changes: str | None,
    started: dt.datetime,
    duration: float,
    attempts: int,
    t0: float,
) -> FluxResult:
    """Start (or find) the child of step ``index``'s current try and suspend the run on its
    outcome; the attempt fails for good if the child cannot be started."""
    try:
        child, workflow = await _start(d, index, step, marker)
    except _START_ERRORS as exc:
        d.tracked.restore()
        return await d.fail(index, step, Failed(exc, attempts, started, t0), t0)
    now = utcnow()
    timers = d.settings.clock.now()
    # The step's own timeout bounds the wait (the engine's default is for handlers).
    wake = None if step.timeout is None else timers + dt.timedelta(seconds=step.timeout)
    name = child_signal(child)
    row = d.suspended_row(index, started, now, name, duration, attempts, changes)
    meta: dict[str, Any] = {"child": child, "workflow": workflow}
    if wake is not None:
        meta["wakeAt"] = wake.isoformat()
    await d.event(
        "step:suspend",
        step_name=step.name,
        step_index=index,
        commit=step.commit,
        duration_ms=duration,
        status=StepStatus.SUSPENDED.value,
        meta=meta,
    )
    d.wait_kind = "child"  # a caller waiting for the result waits through it
    await d.save(
        updated_at=now,
        status=WorkflowStatus.SUSPENDED,
        insert_step=row,
        wait_name=name,
        wait_kind="signal",  # stored as a signal wait: claim_due needs no rule of its own
        run_after=wake,
        run_after_from=None if wake is None else timers,
        release=True,
    )
    if wake is not None:
        d.history[index] = replace(d.history[index], wake_at=wake)
    d.tracked.accept()
    return d.result()


def _definition(rt: Runtime, step: StepDefinition, flow: Any) -> WorkflowDefinition:
    """The definition the child runs on: the one registered under its name (which the
    scheduler drives it by), registering a workflow object first if its name is new."""
    try:
        name = rt.registry.adopt(flow).name
    except UnknownWorkflowError:
        raise UnknownWorkflowError(
            f"step {step.name!r} cannot start its child: no workflow named "
            f"{flow_name(flow)!r} is registered with this engine (register it with "
            "engine.register wherever the parent runs)",
            workflow_name=flow_name(flow),
            step=step.name,
        ) from None
    return rt.registry[name]


async def _start(
    d: RunDriver, index: int, step: StepDefinition, marker: ChildMarker
) -> tuple[str, str]:
    """Insert-or-observe the child run of this try of the step; its id and workflow name."""
    from ._control import prepare_run  # it imports the runtime, which imports this module

    rt = d.host
    assert rt is not None, "a driver made by the runtime has its host"
    definition = _definition(rt, step, marker.flow)
    # Every earlier try of the step (retried, timed out, or replaced by a resume) is in the
    # attempt log; the try a crash cut short is not, so it gets its child back.
    logged = await d.store.list_attempts(d.id)
    tries = sum(1 for a in logged if a.kind == "step" and a.index == index)
    child = child_id(d.id, step.name, tries + 1)
    new = prepare_run(rt, definition, marker.input, run_id=child, idempotency_key=None, delay=None)
    row = replace(new.row, parent_id=d.id)
    started = await d.store.start(row, lease_owner=None, lease_seconds=rt.settings.lease_seconds)
    if started.created:
        d.emitter.log.info(f"{d.label} step {step.name!r} started child run {child!r}")
        rt.on_idle()  # this engine's scheduler may claim it now (any engine may)
        return child, definition.name
    found = await d.store.load(child)
    if found is None or found.parent_id != d.id or found.name != definition.name:
        raise ChildWorkflowError(
            f"step {step.name!r} cannot start its child run {child!r}: that id is taken by "
            + ("a run that was deleted meanwhile" if found is None else f"a {found.name!r} run")
            + " that is not this run's child",
            workflow_id=d.id,
            step=step.name,
            child_id=child,
        )
    name = child_signal(child)
    if found.status in FINISHED_STATUSES and await d.store.first_signal(d.id, name) is None:
        # It ended and its outcome was taken by this try before a crash cut the try short
        # (or it never reached a store without an inbox): put the outcome back for the wait.
        data = replay_data(found.steps)
        text = outcome_text(child, found.name, found.status, data, found.error)
        await d.store.send_signal(d.id, name, text)
    return child, definition.name


async def take_outcome(d: RunDriver, decision: ChildDone | ChildFailed) -> FluxResult:
    """Carry out a child's outcome: complete the waiting step with the child's data, or
    fail its attempt (then retry it with a new child, or fail the step and roll back)."""
    index = decision.index
    step = d.definition.steps[index]
    waiting = d.rows[index]
    child = child_of(decision.signal.name) or "?"
    outcome = read_outcome(decision.signal.payload, child)
    consumed = SignalRef(seq=decision.signal.seq, step=index)
    now = utcnow()
    if isinstance(decision, ChildDone):
        done = replace(
            waiting,
            status=StepStatus.COMPLETED.value,
            completed_at=now,
            output=encode(
                outcome.data, what=f"the data of child run {child!r}", max_size=_UNLIMITED
            ),
            fence=d.fence,
        )
        await d.save(
            updated_at=now,
            status=WorkflowStatus.RUNNING,
            update_step=done,
            wait_name=None,
            wait_kind=None,
            run_after=None,
            consume_signal=consumed,
        )
        await d.event(
            "step:complete",
            step_name=step.name,
            step_index=index,
            commit=step.commit,
            retries=waiting.retries,
            duration_ms=waiting.duration_ms,
            status=StepStatus.COMPLETED.value,
            meta={"child": child},
        )
        return await d.forward(index + 1)
    error = ChildWorkflowError(
        f"child run {child!r} (workflow {outcome.workflow!r}) ended {outcome.status}"
        + (f": {outcome.error}" if outcome.error else ""),
        workflow_id=d.id,
        workflow_name=d.definition.name,
        step=step.name,
        child_id=child,
        child_status=outcome.status,
    )
    t0 = time.perf_counter()
    failed = Failed(error, decision.attempt, waiting.started_at or now, t0)
    await d.save(
        updated_at=now,
        status=WorkflowStatus.RUNNING,
        delete_steps_from=index,
        wait_name=None,
        wait_kind=None,
        run_after=None,
        consume_signal=consumed,
    )
    return await after_failed_try(d, index, step, failed, t0)


async def after_failed_try(
    d: RunDriver, index: int, step: StepDefinition, failed: Failed, t0: float
) -> FluxResult:
    """A try of a waiting step (on a child, on a signal that did not come in time) failed
    after its row was taken back: retry or fail."""
    d.rows.pop(index, None)
    d.history[index] = StepExecution(name=step.name)  # not reached again yet
    d.current_step = index
    try:
        first = await d.retry_after(index, step, failed)
    except Released:
        return d.result()
    except Interrupted:
        return await d.on_request()
    if first is None:
        return await d.fail(index, step, failed, t0)
    return await d.forward(index, first)


async def wait_timed_out(d: RunDriver, step: StepDefinition, waiting: StepRow) -> WaitTimeoutError:
    """The error of a wait that ran out of time; a child step's child is cancelled."""
    child = child_of(waiting.waiting_for)
    if child is None:
        what = f"waited for signal {waiting.waiting_for!r} and none came in time"
    else:
        what = f"waited for its child run {child!r}, which did not finish in time"
        await _cancel(d, child, f"its parent run {d.id!r} stopped waiting for it (timeout)")
    return WaitTimeoutError(
        f"step {step.name!r} {what}",
        workflow_id=d.id,
        workflow_name=d.definition.name,
        step=step.name,
    )


async def cancel_children(d: RunDriver, why: str) -> None:
    """Ask every unfinished child run of this run to cancel (whoever drives each carries it
    out, and cancels its own children in turn). Never raises: the parent's cancel goes on."""
    try:
        children: list[RunRow] = await d.store.list_children(d.id)
    except FluxError as exc:
        d.emitter.log.warning(f"{d.label}: could not look up its child runs to cancel ({exc!r})")
        return
    for child in children:
        if child.status not in FINISHED_STATUSES:
            await _cancel(d, child.id, f"its parent run {d.id!r} was {why}")


async def _cancel(d: RunDriver, child: str, reason: str) -> None:
    from ._control import request_run  # it imports the runtime, which imports this module

    try:
        if d.host is not None:
            await request_run(d.host, child, "cancel", reason)
        else:
            await d.store.request(child, "cancel", reason)
    except FluxError as exc:  # deleted meanwhile, or the store failed: the parent goes on
        d.emitter.log.warning(f"{d.label}: could not cancel child run {child!r} ({exc!r})")
