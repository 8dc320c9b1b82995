"""Failure and rollback of a run (rule 11), on top of :class:`~fluxrun._driver.DriverBase`.

The completed steps before the failure are compensated last first, but never across a
completed commit step (the *pivot*): the steps up to it stand, and the run ends ``failed``
with an error that says to finish it forward. A compensation that still fails stops the
rollback (``compensation_failed``); ``resume`` retries it and ``skip_compensation`` records
it as done by hand.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ._definition import StepDefinition
from ._driver import DriverBase, Failed, since, utcnow
from ._records import FluxResult, StepStatus, WorkflowStatus
from .errors import CompensationError, FluxError
from .storage._base import AttemptRow, StepRow

__all__ = ["RollbackDriver"]

_COMPLETED = StepStatus.COMPLETED.value
_COMPENSATED = StepStatus.COMPENSATED.value
_COMPENSATING = StepStatus.COMPENSATING.value


class RollbackDriver(DriverBase):
    """The failure path: record a failed step, compensate back to the pivot, end the run."""

    # -- failure and compensation ------------------------------------------------------------

    async def fail(self, index: int, step: StepDefinition, failed: Failed, t0: float) -> FluxResult:
        """Record step ``index`` as failed for good and roll back."""
        duration = (time.perf_counter() - t0) * 1000.0
        info = failed.info
        row = StepRow(
            index=index,
            name=step.name,
            status=StepStatus.FAILED.value,
            started_at=failed.started if failed.attempts == 1 else since(t0),
            completed_at=utcnow(),
            duration_ms=duration,
            error=info.message,
            retries=failed.attempts - 1,
            fence=self.fence,
            error_type=info.type,
            traceback=info.traceback,
        )
        self.emitter.log.warning(
            f"{self.label} step {step.name!r} failed after {failed.attempts} attempt(s): "
            f"{info.type}: {info.message}",
            failed.error,
        )
        await self.emitter.hook(
            "step_error", step.name, self.context(index, failed.attempts), failed.error
        )
        await self.event(
            "step:error",
            step_name=step.name,
            step_index=index,
            commit=step.commit,
            retries=failed.attempts - 1,
            duration_ms=duration,
            error=info.message,
            status=StepStatus.FAILED.value,
            meta={"errorType": info.type, "traceback": info.traceback},
        )
        await self.save(status=WorkflowStatus.ROLLING_BACK, insert_step=row, error=info.message)
        self.error = failed.error
        return await self.rollback(index, info.message)

    async def rollback(
        self, failed_index: int, message: str, *, ending: WorkflowStatus | None = None
    ) -> FluxResult:
        """Compensate the completed steps before ``failed_index`` back to the pivot, then end
        (``ending``: the status a cancel ends in, whatever was compensated)."""
        await self.load_prefix()  # every completed step is looked at, back to the first
        await self.event(
            "workflow:rollback_start", status=WorkflowStatus.ROLLING_BACK.value, error=message
        )
        pivot = self.pivot(failed_index)
        compensated = 0
        for index in range(failed_index - 1, -1 if pivot is None else pivot, -1):
            step = self.definition.steps[index]
            row = self.rows.get(index)
            if step.compensate is None or row is None:
                continue
            if row.status == _COMPENSATED:
                compensated += 1  # done before a crash (or by hand); never twice
                continue
            if row.status not in (_COMPLETED, _COMPENSATING):
                continue
            failure = await self._compensate(index, step, row, message)
            if failure is not None:
                return failure
            compensated += 1
        if ending is None and self.request == "cancel":
            # Cancelled while it was rolling back a failure: cancel() said yes, so it ends
            # cancelled (its compensations ran all the same).
            ending = WorkflowStatus.CANCELLED
        if ending is not None:
            await self.save(status=ending, completed_at=utcnow(), release=True, requested=None)
            if compensated:
                await self.event("workflow:rollback_complete", status=ending.value)
            return await self._error_end(ending, message)
        if pivot is not None:
            return await self._stop_at_pivot(failed_index, pivot, message, compensated)
        status = WorkflowStatus.ROLLED_BACK if compensated else WorkflowStatus.FAILED
        await self.save(status=status, completed_at=utcnow(), release=True)
        if compensated:
            await self.event("workflow:rollback_complete", status=status.value)
        return await self._error_end(status, message)

    async def _stop_at_pivot(
        self, failed_index: int, pivot: int, message: str, compensated: int
    ) -> FluxResult:
        commit = self.definition.steps[pivot].name
        failed = self.names[failed_index] if failed_index < len(self.names) else "?"
        after = (
            "the steps after it were compensated"
            if compensated
            else "no step after it needed compensating"
        )
        text = (
            f"step {failed!r} failed after commit step {commit!r} completed: {message}. "
            f"Compensation stops at {commit!r} (its effects are committed; {after}). "
            f"Finish the run forward: resume(flow, run_id) continues from the step after "
            f"{commit!r}, or retry_step(flow, run_id, {failed!r})."
        )
        await self.save(
            status=WorkflowStatus.FAILED, error=text, completed_at=utcnow(), release=True
        )
        if compensated:
            await self.event("workflow:rollback_complete", status=WorkflowStatus.FAILED.value)
        return await self._error_end(WorkflowStatus.FAILED, text)

    async def _compensate(
        self, index: int, step: StepDefinition, row: StepRow, message: str
    ) -> FluxResult | None:
        self.current_step = index
        if row.status != _COMPENSATING:
            row = replace(row, status=_COMPENSATING, fence=self.fence)
            await self.save(update_step=row)
        assert step.compensate is not None
        t0 = time.perf_counter()
        try:
            _, changes, _, attempts, t_last = await self.attempts(index, step, compensating=True)
        except Failed as failed:
            failure: Failed | None = failed
        else:
            failure = None
        if failure is not None:
            return await self._compensation_failed(index, step, row, failure, message)
        now = utcnow()
        started = since(t_last)
        done = replace(
            row,
            status=_COMPENSATED,
            compensated_at=now,
            compensation_changes=changes,
            fence=self.fence,
            error=None,
            error_type=None,
            traceback=None,
        )
        log = AttemptRow(
            index=index,
            name=step.name,
            attempt=attempts,
            kind="compensation",
            status=_COMPENSATED,
            started_at=started,
            finished_at=now,
            duration_ms=(now - started).total_seconds() * 1000.0,
        )
        await self.event(
            "step:compensate",
            step_name=step.name,
            step_index=index,
            retries=attempts - 1,
            duration_ms=(time.perf_counter() - t0) * 1000.0,
            status=_COMPENSATED,
        )
        await self.save(update_step=done, attempts=(log,))
        self.tracked.accept()
        return None

    async def _compensation_failed(
        self, index: int, step: StepDefinition, row: StepRow, failed: Failed, original: str
    ) -> FluxResult:
        info = failed.info
        text = f"Compensation failed at step {step.name!r}: {info.type}: {info.message}"
        error = CompensationError(
            text,
            workflow_id=self.id,
            workflow_name=self.definition.name,
            step=step.name,
            original_error=original,
        )
        error.__cause__ = failed.error
        self.error = error
        self.emitter.log.error(f"{self.label}: {text}", failed.error)
        log = failed.log_row(index, step.name, "compensation")
        stuck = replace(
            row,
            status=_COMPENSATING,
            error=info.message,
            error_type=info.type,
            traceback=info.traceback,
            fence=self.fence,
        )
        await self.save(
            status=WorkflowStatus.COMPENSATION_FAILED,
            update_step=stuck,
            error=text,
            completed_at=utcnow(),
            release=True,
            attempts=(log,),
        )
        return await self._error_end(WorkflowStatus.COMPENSATION_FAILED, text)

    async def give_up(self, message: str) -> FluxResult:
        """End a run whose executors kept crashing (``max_recoveries``) ``failed``."""
        self.error = FluxError(message, workflow_id=self.id, workflow_name=self.definition.name)
        await self.save(
            status=WorkflowStatus.FAILED, error=message, completed_at=utcnow(), release=True
        )
        self.emitter.log.error(f"{self.label}: {message}")
        await self.event(
            "workflow:error", status=WorkflowStatus.FAILED.value, error=message, duration_ms=0.0
        )
        return self.result()

    async def _error_end(self, status: WorkflowStatus, message: str) -> FluxResult:
        if self.error is None:
            # A rollback continued after a crash: the step's own exception died with the
            # process that raised it; its stored message stands in for it.
            self.error = FluxError(message, workflow_id=self.id, workflow_name=self.definition.name)
        error = self.error
        await self.emitter.hook("workflow_error", self.context(self.current_step), error)
        await self.event(
            "workflow:error",
            status=status.value,
            duration_ms=self.elapsed_ms(),
            error=message,
        )
        return self.result()
