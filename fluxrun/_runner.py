"""Driving one run: steps in order, conditions, retries, timeouts, suspension, compensation.

The runner is the one place that decides transitions. It owns the run while it drives it
(the store's lease, with a fence number), saves every transition with one conditional
:meth:`Store.apply`, and tells hooks, sinks and the logger what happened.

``ctx.data`` is tracked per top-level key by :class:`~fluxrun._data.TrackedData`, so a
step writes only what it changed and a failed attempt's half-made changes are thrown away.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import inspect
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ._codec import decode, encode
from ._context import WaitMarker, WorkflowContext
from ._data import TrackedData
from ._definition import StepDefinition, WorkflowDefinition
from ._records import FluxResult, StepExecution, StepStatus, WorkflowStatus
from ._retry import RetryPolicy
from ._state import entry
from ._trace import Emitter, FluxTraceEvent, TraceEventType, now_ms
from .errors import (
    CompensationError,
    FluxError,
    LeaseLostError,
    SerializationError,
    StepTimeoutError,
)
from .storage._base import KEEP, Applied, Claim, Keep, RunRow, StepRow, Store, Transition

if TYPE_CHECKING:
    from ._lease import LeaseKeeper

__all__ = ["RunDriver", "Settings", "utcnow"]

_UTC = dt.UTC
_COMPLETED = StepStatus.COMPLETED.value
_PENDING = WorkflowStatus.PENDING


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime."""
    return dt.datetime.now(_UTC)


@dataclass(frozen=True, slots=True)
class Settings:
    """The engine settings a run needs."""

    owner: str
    default_retries: int
    default_timeout: float | None
    retry_policy: RetryPolicy
    lease_seconds: float
    max_value_size: int
    executor: Callable[[], Executor]


class _Failed(Exception):
    """Internal: a step failed for good; carries what to record."""

    def __init__(self, error: BaseException, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if "\x00" in text or not text.isascii():
        # The text is stored as the step's error: PostgreSQL refuses NUL in text, and no
        # database can encode a lone surrogate; escape both, the same way on every backend.
        text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@functools.cache
def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


@functools.lru_cache(maxsize=4096)
def _pending(name: str) -> StepExecution:
    """The history entry of a step not reached yet; immutable, so runs share one per name."""
    return StepExecution(name=name)


class RunDriver:
    """Drives one run of ``definition`` that this executor owns (``fence``)."""

    def __init__(
        self,
        *,
        definition: WorkflowDefinition,
        store: Store,
        emitter: Emitter,
        settings: Settings,
        keeper: LeaseKeeper,
        run_id: str,
        input: Any,
        input_plain: Any,
        version: int,
        fence: int,
        status: WorkflowStatus,
        rows: dict[int, StepRow],
        data: dict[str, Any],
        signals: dict[str, Any],
        started: float,
    ) -> None:
        self.definition = definition
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.keeper = keeper
        self.id = run_id
        self.input = input
        self.input_plain = input_plain
        self.version = version
        self.fence = fence
        self.status = status
        self.rows = rows
        self.signals = signals
        self.started = started
        self.current_step = 0
        self.names = definition.step_names
        self.history: list[StepExecution] = [
            entry(rows[i]) if i in rows else _pending(n) for i, n in enumerate(self.names)
        ]
        self.tracked = TrackedData(data, max_size=settings.max_value_size)
        self.error: BaseException | None = None

    # -- building blocks ---------------------------------------------------------------------

    @classmethod
    def from_row(
        cls,
        row: RunRow,
        applied: Applied,
        *,
        definition: WorkflowDefinition,
        input: Any,
        input_plain: Any,
        data: dict[str, Any],
        rows: dict[int, StepRow] | None = None,
        **kw: Any,
    ) -> RunDriver:
        """A driver for a stored run this executor has just claimed."""
        rows = {r.index: r for r in row.steps} if rows is None else rows
        signals = {
            r.waiting_for: decode(r.output) if r.output is not None else None
            for r in sorted(rows.values(), key=lambda r: r.index)
            if r.waiting_for is not None and r.status != StepStatus.SUSPENDED.value
        }
        return cls(
            definition=definition,
            run_id=row.id,
            input=input,
            input_plain=input_plain,
            version=applied.version,
            fence=applied.fence,
            status=WorkflowStatus(row.status),
            rows=rows,
            data=data,
            signals=signals,
            started=time.perf_counter(),
            **kw,
        )

    @property
    def data(self) -> dict[str, Any]:
        """The live ``ctx.data`` the steps share."""
        return self.tracked.data

    def _snapshot_history(self) -> tuple[StepExecution, ...]:
        return tuple(self.history)

    def context(self, index: int, attempt: int = 1) -> WorkflowContext:
        """A fresh context for one attempt (or hook call) at step ``index``."""
        return WorkflowContext(
            id=self.id,
            name=self.definition.name,
            input=self.input,
            data=self.data,
            # A run is saved as running with its first step's outcome; its steps see it
            # running already.
            status=WorkflowStatus.RUNNING if self.status is _PENDING else self.status,
            current_step=index,
            step=self.names[index],
            attempt=attempt,
            signals=self.signals,
            history=self._snapshot_history,
        )

    async def event(self, type_: TraceEventType, **fields: Any) -> None:
        """Emit a trace event if anyone listens."""
        if self.emitter.wants_events:
            await self.emitter.emit(
                FluxTraceEvent(
                    type=type_,
                    timestamp=now_ms(),
                    workflow_id=self.id,
                    workflow_name=self.definition.name,
                    **fields,
                )
            )

    async def save(
        self,
        *,
        status: WorkflowStatus | Keep = KEEP,
        insert_step: StepRow | None = None,
        update_step: StepRow | None = None,
        error: str | Keep | None = KEEP,
        completed_at: dt.datetime | Keep | None = KEEP,
        wait_name: str | Keep | None = KEEP,
        release: bool = False,
    ) -> None:
        """Write one transition, fenced by this executor's claim."""
        if status is self.status:
            # Unchanged (a fenced write applies only to the run as this driver last saw it):
            # writing it again would make the SQL stores rewrite their status indexes.
            status = KEEP
        if self.keeper.lost(self.id):
            raise LeaseLostError(
                f"run {self.id!r}: this executor's lease was taken over",
                workflow_id=self.id,
                workflow_name=self.definition.name,
            )
        t = Transition(
            run_id=self.id,
            expected_version=self.version,
            updated_at=utcnow(),
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
        )
        applied = await self.store.apply(t)
        self.version = applied.version
        if not isinstance(status, Keep):
            self.status = status
        for row in (insert_step, update_step):
            if row is not None:
                self.rows[row.index] = row
                self.history[row.index] = entry(row)

    # -- calling user code -------------------------------------------------------------------

    async def _call(
        self, fn: Callable[[WorkflowContext], Any], ctx: WorkflowContext, timeout: float | None
    ) -> Any:
        if _is_async(fn):
            if timeout is None:
                return await fn(ctx)
            return await self._limited(fn(ctx), ctx, timeout)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, ctx)
        future = loop.run_in_executor(self.settings.executor(), call)
        # A thread cannot be stopped: on timeout its late result is discarded (and _restore
        # gives the run a fresh ctx.data, so its late writes land nowhere).
        result = await (future if timeout is None else self._limited(future, ctx, timeout))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _limited(self, awaitable: Any, ctx: WorkflowContext, timeout: float) -> Any:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await awaitable
        except TimeoutError as exc:
            if scope.expired():
                raise self._timeout_error(ctx, timeout) from exc
            raise

    def _timeout_error(self, ctx: WorkflowContext, timeout: float) -> StepTimeoutError:
        return StepTimeoutError(
            f"step {ctx.step!r} timed out after {timeout:g}s (attempt {ctx.attempt})",
            workflow_id=self.id,
            workflow_name=self.definition.name,
            step=ctx.step,
        )

    async def _attempts(
        self,
        index: int,
        step: StepDefinition,
        fn: Callable[[WorkflowContext], Any],
        *,
        compensating: bool = False,
    ) -> tuple[Any, str | None, WorkflowContext, int]:
        """Run ``fn`` with the step's retries; return (result, changes, ctx, attempts)."""
        retries = step.retries if step.retries is not None else self.settings.default_retries
        timeout = step.timeout if step.timeout is not None else self.settings.default_timeout
        policy = step.retry or self.settings.retry_policy
        attempt = 1
        while True:
            ctx = self.context(index, attempt)
            try:
                result = await self._call(fn, ctx, timeout)
                self.tracked.data = ctx.data
                changes = self.tracked.diff()
                return result, changes, ctx, attempt
            except Exception as exc:
                self.tracked.restore()
                retryable = not isinstance(exc, SerializationError) and policy.should_retry(exc)
                if attempt > retries or not retryable:
                    raise _Failed(exc, attempt) from exc
                if not compensating:
                    await self.event(
                        "step:retry",
                        step_name=step.name,
                        step_index=index,
                        commit=step.commit,
                        retries=attempt,
                        max_retries=retries,
                        error=_message(exc),
                        status="running",
                    )
                self.emitter.log.info(
                    f"fluxrun: {self.definition.name}/{self.id} step {step.name!r} attempt "
                    f"{attempt} failed ({_message(exc)}); retrying"
                )
                delay = policy.delay(attempt)
                if delay > 0:
                    await asyncio.sleep(delay)
                attempt += 1

    # -- the forward path --------------------------------------------------------------------

    async def forward(self, start: int) -> FluxResult:
        """Run the steps from ``start`` to the end, a suspension or a failure."""
        steps = self.definition.steps
        index = start
        while index < len(steps):
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

    async def _step(self, index: int, step: StepDefinition) -> FluxResult | None:
        """Run one step; None means go on with the next one."""
        emitter = self.emitter
        if step.when is not None:
            ctx = self.context(index)
            try:
                run_it = step.when(ctx)
                if inspect.isawaitable(run_it):
                    run_it = await run_it
            except Exception as exc:
                started = utcnow()
                await emitter.hook("step_start", step.name, ctx)
                return await self._fail(index, step, exc, 1, started, time.perf_counter())
            if not run_it:
                row = StepRow(index=index, name=step.name, status="skipped", fence=self.fence)
                await emitter.hook("step_complete", step.name, ctx, entry(row))
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
            result, changes, ctx, attempts = await self._attempts(index, step, step.handler)
        except _Failed as failed:
            return await self._fail(index, step, failed.error, failed.attempts, started, t0)
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
            return await self._fail(index, step, exc, attempts, started, t0)
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
        started: dt.datetime,
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

    # -- failure and compensation ------------------------------------------------------------

    async def _fail(
        self,
        index: int,
        step: StepDefinition,
        error: BaseException,
        attempts: int,
        started: dt.datetime,
        t0: float,
    ) -> FluxResult:
        duration = (time.perf_counter() - t0) * 1000.0
        message = _message(error)
        row = StepRow(
            index=index,
            name=step.name,
            status=StepStatus.FAILED.value,
            started_at=started,
            completed_at=utcnow(),
            duration_ms=duration,
            error=message,
            retries=attempts - 1,
            fence=self.fence,
        )
        self.emitter.log.warning(
            f"fluxrun: {self.definition.name}/{self.id} step {step.name!r} failed after "
            f"{attempts} attempt(s): {message}"
        )
        await self.emitter.hook("step_error", step.name, self.context(index, attempts), error)
        await self.event(
            "step:error",
            step_name=step.name,
            step_index=index,
            commit=step.commit,
            retries=attempts - 1,
            duration_ms=duration,
            error=message,
            status=StepStatus.FAILED.value,
        )
        await self.save(status=WorkflowStatus.ROLLING_BACK, insert_step=row, error=message)
        self.error = error
        return await self.rollback(index, message)

    async def rollback(self, failed_index: int, message: str) -> FluxResult:
        """Compensate the completed steps before ``failed_index``, last first, then finish."""
        await self.event(
            "workflow:rollback_start", status=WorkflowStatus.ROLLING_BACK.value, error=message
        )
        compensated = 0
        for index in range(failed_index - 1, -1, -1):
            step = self.definition.steps[index]
            row = self.rows.get(index)
            if step.compensate is None or row is None:
                continue
            if row.status == StepStatus.COMPENSATED.value:
                compensated += 1  # done before a crash; never twice
                continue
            if row.status not in (_COMPLETED, StepStatus.COMPENSATING.value):
                continue
            failure = await self._compensate(index, step, row, message)
            if failure is not None:
                return failure
            compensated += 1
        if compensated:
            status = WorkflowStatus.ROLLED_BACK
        else:
            status = WorkflowStatus.FAILED
        await self.save(status=status, completed_at=utcnow(), release=True)
        if compensated:
            await self.event("workflow:rollback_complete", status=status.value)
        return await self._error_end(status, message)

    async def _compensate(
        self, index: int, step: StepDefinition, row: StepRow, message: str
    ) -> FluxResult | None:
        self.current_step = index
        if row.status != StepStatus.COMPENSATING.value:
            row = replace(row, status=StepStatus.COMPENSATING.value, fence=self.fence)
            await self.save(update_step=row)
        assert step.compensate is not None
        t0 = time.perf_counter()
        try:
            _, changes, _, attempts = await self._attempts(
                index, step, step.compensate, compensating=True
            )
        except _Failed as failed:
            return await self._compensation_failed(step, failed.error, message)
        done = replace(
            row,
            status=StepStatus.COMPENSATED.value,
            compensated_at=utcnow(),
            compensation_changes=changes,
            fence=self.fence,
        )
        await self.event(
            "step:compensate",
            step_name=step.name,
            step_index=index,
            retries=attempts - 1,
            duration_ms=(time.perf_counter() - t0) * 1000.0,
            status=StepStatus.COMPENSATED.value,
        )
        await self.save(update_step=done)
        self.tracked.accept()
        return None

    async def _compensation_failed(
        self, step: StepDefinition, cause: BaseException, original: str
    ) -> FluxResult:
        text = f"Compensation failed at step {step.name!r}: {_message(cause)}"
        error = CompensationError(
            text,
            workflow_id=self.id,
            workflow_name=self.definition.name,
            step=step.name,
            original_error=original,
        )
        error.__cause__ = cause
        self.error = error
        self.emitter.log.error(f"fluxrun: {self.definition.name}/{self.id}: {text}")
        await self.save(
            status=WorkflowStatus.COMPENSATION_FAILED,
            error=text,
            completed_at=utcnow(),
            release=True,
        )
        return await self._error_end(WorkflowStatus.COMPENSATION_FAILED, text)

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

    # -- results -----------------------------------------------------------------------------

    def elapsed_ms(self) -> float:
        """Milliseconds since this call started driving the run."""
        return (time.perf_counter() - self.started) * 1000.0

    def result(self) -> FluxResult:
        """The outcome of this call, consistent with what was saved."""
        return FluxResult(
            id=self.id,
            status=self.status,
            data=self.tracked.committed(),
            history=tuple(self.history),
            duration_ms=self.elapsed_ms(),
            error=self.error,
        )


def claim_for(settings: Settings) -> Claim:
    """The claim this executor makes on a run it takes over."""
    return Claim(owner=settings.owner, lease_seconds=settings.lease_seconds)
