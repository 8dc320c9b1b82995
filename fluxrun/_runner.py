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

import inspect
import time
from typing import Any

from ._codec import encode
from ._context import WaitMarker
from ._definition import StepDefinition
from ._driver import Failed, Settings, utcnow
from ._records import FluxResult, StepStatus, WorkflowStatus
from ._rollback import RollbackDriver
from ._state import entry
from .errors import EngineClosedError, SerializationError
from .storage._base import Claim, StepRow

__all__ = ["RunDriver", "Settings", "claim_for", "utcnow"]

_COMPLETED = StepStatus.COMPLETED.value


class RunDriver(RollbackDriver):
    """Drives one run of ``definition`` that this executor owns (``fence``)."""

    async def forward(self, start: int) -> FluxResult:
        """Run the steps from ``start`` to the end, a suspension or a failure."""
        steps = self.definition.steps
        index = start
        while index < len(steps):
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
            self.current_step = index
            row = self.rows.get(index)
            if row is not None and step.commit and row.status == _COMPLETED:
                self.tracked.apply_recorded(row.changes)
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
            outcome = await self._step(index, step)
            if outcome is not None:
                return outcome
            index += 1
        return await self._complete()

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

    async def _step(self, index: int, step: StepDefinition) -> FluxResult | None:
        """Run one step; None means go on with the next one."""
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
                await self.save(status=WorkflowStatus.RUNNING, insert_step=row)
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
            result, changes, ctx, attempts, _ = await self.attempts(index, step)
        except Failed as failed:
            failure: Failed | None = failed
        else:
            failure = None
        if failure is not None:
            # Outside the except block, so that compensations' errors are not chained to it.
            return await self.fail(index, step, failure, t0)
        duration = (time.perf_counter() - t0) * 1000.0
        if isinstance(result, WaitMarker):
            return await self._suspend(index, step, result, changes, started, duration, attempts)
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
        await self.save(status=WorkflowStatus.RUNNING, insert_step=row)
        self.tracked.accept()
        return None

    async def _suspend(
        self,
        index: int,
        step: StepDefinition,
        marker: WaitMarker,
        changes: str | None,
        started: Any,
        duration: float,
        attempts: int,
    ) -> FluxResult:
        row = StepRow(
            index=index,
            name=step.name,
            status=StepStatus.SUSPENDED.value,
            started_at=started,
            suspended_at=utcnow(),
            waiting_for=marker.signal,
            duration_ms=duration,
            retries=attempts - 1,
            changes=changes,
            fence=self.fence,
        )
        await self.event(
            "step:suspend",
            step_name=step.name,
            step_index=index,
            commit=step.commit,
            duration_ms=duration,
            status=StepStatus.SUSPENDED.value,
            meta={"signal": marker.signal},
        )
        await self.save(
            status=WorkflowStatus.SUSPENDED,
            insert_step=row,
            wait_name=marker.signal,
            release=True,
        )
        self.tracked.accept()
        return self.result()

    async def _complete(self) -> FluxResult:
        await self.save(
            status=WorkflowStatus.COMPLETED, error=None, completed_at=utcnow(), release=True
        )
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


def claim_for(settings: Settings) -> Claim:
    """The claim this executor makes on a run it takes over."""
    return Claim(owner=settings.owner, lease_seconds=settings.lease_seconds)

