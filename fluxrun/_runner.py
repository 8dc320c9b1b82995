"""Driving one run forward: steps in order, conditions, retries, timeouts, suspension.

The runner is the one place that decides transitions. It owns the run while it drives it
(the store's lease, with a fence number), saves every transition with one conditional
:meth:`Store.apply`, and tells hooks, sinks and the logger what happened. Failure and
compensation live in :mod:`fluxrun._rollback` (the base class); calling user code lives in
:mod:`fluxrun._invoke`.

``ctx.data`` is tracked per top-level key by :class:`~fluxrun._data.TrackedData`, so a
step writes only what it changed and a failed attempt's half-made changes are thrown away.
"""

from __future__ import annotations

import datetime as dt
import inspect
import time
from dataclasses import replace
from typing import Any

from ._child_runs import await_child, cancel_children
from ._children import ChildMarker
from ._codec import decode, encode
from ._context import SleepMarker, WaitMarker
from ._definition import StepDefinition
from ._driver import Failed, Interrupted, Released, Settings, utcnow
from ._records import FluxResult, StepStatus, WorkflowStatus
from ._rollback import RollbackDriver
from ._state import entry
from .errors import EngineClosedError, FluxError, SerializationError
from .storage._base import Claim, SignalRef, StepRow

__all__ = ["RunDriver", "Settings", "claim_for", "utcnow"]

_COMPLETED = StepStatus.COMPLETED.value


class RunDriver(RollbackDriver):
    """Drives one run of ``definition`` that this executor owns (``fence``)."""

    async def forward(self, start: int, first_attempt: int = 1) -> FluxResult:
        """Run the steps from ``start`` (its first attempt numbered ``first_attempt``) to the
        end, a suspension, a pause, a cancel or a failure."""
        steps = self.definition.steps
        index = start
        while index < len(steps):
            # Set first: a pause at this boundary is stored as stopped before this step.
            self.current_step = index
            if self.request is not None:
                return await self.on_request()
            if self.settings.closing():
                raise EngineClosedError(
                    f"run {self.id!r}: the engine was closed before step "
                    f"{steps[index].name!r}; the run was released and another engine's "
                    "recover() continues it",
                    workflow_id=self.id,
                    workflow_name=self.definition.name,
                    step=steps[index].name,
                )
            step = steps[index]
            row = self.rows.get(index)
            if row is not None and step.commit and row.status == _COMPLETED:
                self.tracked.apply_recorded(row.changes)
                self.data_at = index + 1
                await self.event(
                    "step:skipped",
                    step_name=step.name,
                    step_index=index,
                    commit=True,
                    status=_COMPLETED,
                    meta={"reason": "committed"},
                )
                index += 1
                continue
            outcome = await self._step(
                index, step, first_attempt if index == start else 1, last=index == len(steps) - 1
            )
            if outcome is not None:
                return outcome
            index += 1
        if self.request == "cancel":
            return await self.on_request()
        return await self._complete()

    async def on_request(self) -> FluxResult:
        """Carry out a cancel or pause asked of this run, at a step boundary."""
        if self.request == "cancel":
            return await self.cancel(self.request_reason)
        self.emitter.log.info(f"{self.label} paused at step {self.names[self.current_step]!r}")
        # Clears the pause only: a cancel asked meanwhile stays, and the run is claimed for it.
        await self.save(status=WorkflowStatus.PAUSED, requested="pause", release=True)
        self.request = None
        return self.result()

    async def cancel(self, reason: str | None) -> FluxResult:
        """Compensate the completed steps back to the pivot (rule 11); end ``cancelled``."""
        if reason is None:
            # Asked from elsewhere (seen by a lease renewal): the reason is with the run.
            stored = await self.store.load(self.id)
            reason = stored.request_reason if stored is not None else None
        message = "cancelled" + (f": {reason}" if reason else "")
        self.emitter.log.warning(f"{self.label} {message}")
        self.error = FluxError(
            f"run {self.id!r} was {message}",
            workflow_id=self.id,
            workflow_name=self.definition.name,
        )
        self.request = "cancel"
        await cancel_children(self, message)  # children are cancelled with their parent
        if self.status is not WorkflowStatus.ROLLING_BACK:
            await self.save(
                status=WorkflowStatus.ROLLING_BACK,
                error=message,
                wait_name=None,
                wait_kind=None,
                run_after=None,
            )
        return await self.rollback(len(self.names), message, ending=WorkflowStatus.CANCELLED)

    async def _condition(self, index: int, step: StepDefinition) -> bool | FluxResult:
        """Evaluate ``when``: True/False, or the result of failing the step on its error."""
        assert step.when is not None
        ctx = self.context(index)
        try:
            run_it = step.when(ctx)
            if inspect.isawaitable(run_it):
                run_it = await run_it
            # The truth test itself may raise (a numpy array, say): it is the step's error.
            return bool(run_it)
        except Exception as exc:
            failure = Failed(exc, 1, utcnow(), time.perf_counter())
        await self.emitter.hook("step_start", step.name, ctx)
        return await self.fail(index, step, failure, time.perf_counter())

    async def _step(
        self, index: int, step: StepDefinition, first: int, *, last: bool = False
    ) -> FluxResult | None:
        """Run one step; None means go on with the next one. The ``last`` step's outcome
        and the run's completion are one commit (unless a cancel or pause is pending)."""
        emitter = self.emitter
        if step.when is not None:
            decided = await self._condition(index, step)
            if isinstance(decided, FluxResult):
                return decided
            if not decided:
                row = StepRow(index=index, name=step.name, status="skipped", fence=self.fence)
                await emitter.hook("step_complete", step.name, self.context(index), entry(row))
                await self.event(
                    "step:skipped",
                    step_name=step.name,
                    step_index=index,
                    commit=step.commit,
                    status="skipped",
                )
                await self.save_step(row)
                return None
        if emitter.has_hook("step_start"):
            await emitter.hook("step_start", step.name, self.context(index))
        if emitter.wants_events:  # checked here too: this path runs for every step
            await self.event(
                "step:start",
                step_name=step.name,
                step_index=index,
                commit=step.commit,
                status="running",
            )
        started = utcnow()
        t0 = time.perf_counter()
        try:
            result, changes, ctx, attempts, _ = await self.attempts(index, step, first=first)
        except Failed as failed:
            failure: Failed | None = failed
        except Interrupted:
            return await self.on_request()
        except Released:
            return self.result()
        else:
            failure = None
        if failure is not None:
            # Outside the except block, so that compensations' errors are not chained to it.
            return await self.fail(index, step, failure, t0)
        duration = (time.perf_counter() - t0) * 1000.0
        if isinstance(result, WaitMarker | SleepMarker):
            return await self._suspend(index, step, result, changes, started, duration, attempts)
        if isinstance(result, ChildMarker):
            return await await_child(
                self, index, step, result, changes, started, duration, attempts, t0
            )
        try:
            output = None
            if result is not None:
                output = encode(
                    result,
                    what=f"the return value of step {step.name!r}",
                    max_size=self.settings.max_value_size,
                )
        except SerializationError as exc:
            self.tracked.restore()
            failure = Failed(exc, attempts, started, t0)
        else:
            failure = None
        if failure is not None:
            return await self.fail(index, step, failure, t0)
        row = StepRow(
            index=index,
            name=step.name,
            status=_COMPLETED,
            started_at=started,
            completed_at=utcnow(),
            duration_ms=duration,
            output=output,
            retries=attempts - 1,
            changes=changes,
            fence=self.fence,
        )
        if emitter.has_hook("step_complete"):
            await emitter.hook("step_complete", step.name, ctx, entry(row))
        if emitter.wants_events:
            await self.event(
                "step:complete",
                step_name=step.name,
                step_index=index,
                commit=step.commit,
                retries=attempts - 1,
                duration_ms=duration,
                status=_COMPLETED,
            )
        if last and self.request is None:
            await self.save(
                insert_step=row,
                status=WorkflowStatus.COMPLETED,
                error=None,
                completed_at=row.completed_at,
                release=True,
            )
            self.tracked.accept()
            return await self._completed()
        await self.save_step(row)
        self.tracked.accept()
        return None

    async def _suspend(
        self,
        index: int,
        step: StepDefinition,
        marker: WaitMarker | SleepMarker,
        changes: str | None,
        started: Any,
        duration: float,
        attempts: int,
    ) -> FluxResult | None:
        """Suspend the run on a wait or a sleep; None if it goes on at once (the signal was
        in the inbox already, or the sleep is over)."""
        now = utcnow()
        timers = self.settings.clock.now()  # a test's fake clock, or the system's
        taken = None
        if isinstance(marker, WaitMarker):
            signal = marker.signal
            wake = None
            if marker.timeout is not None:
                wake = timers + dt.timedelta(seconds=marker.timeout)
            # A signal sent before the run got here waits in the inbox: take it now.
            taken = await self.store.first_signal(self.id, signal)
        else:
            signal = None
            wake = marker.until or timers + dt.timedelta(seconds=marker.seconds or 0.0)
        row = self.suspended_row(index, started, now, signal, duration, attempts, changes)
        if taken is not None or (signal is None and wake is not None and wake <= timers):
            output = None if taken is None else taken.payload
            done = replace(row, status=_COMPLETED, completed_at=now, output=output)
            if signal is not None and taken is not None:
                self.signals[signal] = decode(taken.payload)
            await self.save(
                status=WorkflowStatus.RUNNING,
                insert_step=done,
                consume_signal=None if taken is None else SignalRef(taken.seq, index),
            )
            self.tracked.accept()
            return None
        await self.event(
            "step:suspend",
            step_name=step.name,
            step_index=index,
            commit=step.commit,
            duration_ms=duration,
            status=StepStatus.SUSPENDED.value,
            meta={"signal": signal}
            if wake is None
            else {"signal": signal, "wakeAt": wake.isoformat()},
        )
        self.wait_kind = "signal" if signal is not None else "sleep"
        await self.save(
            updated_at=now,
            status=WorkflowStatus.SUSPENDED,
            insert_step=row,
            wait_name=signal,
            wait_kind=self.wait_kind,
            run_after=wake,
            # A wait's timeout or a sleep's duration is a delay, judged by the store's clock
            # (sleep_until names an instant).
            run_after_from=None if isinstance(marker, SleepMarker) and marker.until else timers,
            release=True,
        )
        if wake is not None:
            self.history[index] = replace(self.history[index], wake_at=wake)
        self.tracked.accept()
        return self.result()

    async def _complete(self) -> FluxResult:
        await self.save(
            status=WorkflowStatus.COMPLETED, error=None, completed_at=utcnow(), release=True
        )
        return await self._completed()

    async def _completed(self) -> FluxResult:
        """Tell the hooks and sinks that the run completed (it is saved so)."""
        ctx = self.context(len(self.names) - 1)
        await self.emitter.hook("workflow_complete", ctx)
        if self.emitter.wants_events:
            await self.event(
                "workflow:complete",
                status=WorkflowStatus.COMPLETED.value,
                duration_ms=self.elapsed_ms(),
                data=self.tracked.committed(),
            )
        return self.result()


def _wait_meta(signal: str | None, wake: dt.datetime | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if signal is not None:
        meta["signal"] = signal
    if wake is not None:
        meta["wakeAt"] = wake.isoformat()
    return meta


def claim_for(settings: Settings) -> Claim:
    """The claim this executor makes on a run it takes over."""
    return Claim(owner=settings.owner, lease_seconds=settings.lease_seconds)
