"""The run driver's base: the state of one run being driven, saving it, and attempts.

Layers of the driver: :class:`DriverBase` (here: state, ``save``, attempts with retries and
the attempt log), :class:`~fluxrun._rollback.RollbackDriver` (failure and compensation) and
:class:`~fluxrun._runner.RunDriver` (the forward path). Together they are the one place that
decides a run's transitions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import TYPE_CHECKING, Any, Self

from ._children import child_signal, is_user_signal, outcome_text
from ._codec import decode
from ._context import WorkflowContext
from ._data import TrackedData
from ._definition import StepDefinition, WorkflowDefinition
from ._driver_common import Failed, Interrupted, Released, Settings, since, utcnow
from ._invoke import Attempt, call_handler, safe_message, wait_for_thread
from ._machine import RunMachine
from ._records import TERMINAL_STATUSES, FluxResult, StepExecution, StepStatus, WorkflowStatus
from ._retry import RetryPolicy
from ._trace import Emitter, FluxTraceEvent, TraceEventType, now_ms
from .errors import (
    DefinitionError,
    EngineClosedError,
    LeaseLostError,
    SerializationError,
    StepTimeoutError,
)
from .storage._base import KEEP, Applied, RunRow, StepRow, Store, Wake

if TYPE_CHECKING:
    from ._lease import LeaseKeeper
    from ._runtime import Runtime

__all__ = [
    "DriverBase",
    "Failed",
    "Interrupted",
    "Released",
    "Settings",
    "since",
    "utcnow",
]

_COMPLETED = StepStatus.COMPLETED.value
_PENDING = WorkflowStatus.PENDING
_IMMUTABLE = (type(None), str, int, float, bool)


_INTERRUPT = "fluxrun: run cancelled"


def _retryable(exc: BaseException, policy: RetryPolicy) -> bool:
    return not isinstance(exc, SerializationError | DefinitionError) and policy.should_retry(exc)


class DriverBase(RunMachine):
    """A run being driven: its machine, the services it uses, saving, and attempts."""

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
        input_text: str,
        version: int,
        fence: int,
        status: WorkflowStatus,
        rows: dict[int, StepRow],
        data: dict[str, Any],
        signals: dict[str, Any],
        started: float,
        steps_from: int = 0,
    ) -> None:
        super().__init__(
            definition=definition,
            run_id=run_id,
            version=version,
            fence=fence,
            status=status,
            rows=rows,
            steps_from=steps_from,
        )
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.keeper = keeper
        self.input = input
        self.input_plain = input_plain
        self.input_text = input_text
        # Each step gets the stored input, so what one step does to it never reaches the
        # next (with or without a crash in between); immutable inputs need no copy.
        self._input_shared = definition.input_spec is None and type(input_plain) in _IMMUTABLE
        self.signals = signals
        self.started = started
        self.tracked = TrackedData(data, max_size=settings.max_value_size)
        self.error: BaseException | None = None
        # A cancel or pause asked of this run while it is driven (see interrupt()).
        self.request: str | None = None
        self.request_reason: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self._interruptible = False
        self._cut_at_close = False
        # What the run waits for after this drive, when it suspended ("signal", "sleep",
        # "backoff", "child"): a caller waiting for its result waits through all but signals.
        self.wait_kind: str | None = None
        self.host: Runtime | None = None  # the engine's runtime: children start through it
        self.parent_id: str | None = None  # this run's end goes to that run's inbox

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
        signals: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Self:
        """A driver for a stored run this executor has just claimed (``row`` as
        :meth:`Store.load_tail` gave it: ``signals`` are those of its snapshot)."""
        rows = {r.index: r for r in row.steps} if rows is None else rows
        signals = {} if signals is None else signals
        signals.update(
            (r.waiting_for, decode(r.output) if r.output is not None else None)
            for r in sorted(rows.values(), key=lambda r: r.index)
            if is_user_signal(r.waiting_for) and r.status != StepStatus.SUSPENDED.value
        )
        driver = cls(
            definition=definition,
            run_id=row.id,
            input=input,
            input_plain=input_plain,
            input_text=row.input,
            version=applied.version,
            fence=applied.fence,
            status=WorkflowStatus(row.status),
            rows=rows,
            data=data,
            signals=signals,
            started=time.perf_counter(),
            steps_from=row.steps_from,
            **kw,
        )
        driver.parent_id = row.parent_id
        return driver

    @property
    def data(self) -> dict[str, Any]:
        """The live ``ctx.data`` the steps share."""
        return self.tracked.data

    @property
    def label(self) -> str:
        """How log lines name this run."""
        return f"{self.definition.name}/{self.id}"

    def _snapshot_history(self) -> tuple[StepExecution, ...]:
        if self.steps_from:
            # A step reads ctx.history of a run continued from its snapshot: read the rows
            # before it now, once (on the event loop for an async step: one short query).
            self.merge_prefix(self.store.read_steps_blocking(self.id, self.steps_from))
        return tuple(self.history)

    async def load_prefix(self) -> None:
        """Read the step rows this driver left out (a rollback needs them all, and so does a
        result someone waits for)."""
        if self.steps_from:
            self.merge_prefix(await self.store.load_steps(self.id, self.steps_from))

    def _step_input(self) -> Any:
        if self._input_shared:
            return self.input
        plain = decode(self.input_text)
        spec = self.definition.input_spec
        return plain if spec is None else spec.revive(plain)

    def context(self, index: int, attempt: int = 1) -> WorkflowContext:
        """A fresh context for one attempt (or hook call) at step ``index``."""
        return WorkflowContext(
            id=self.id,
            name=self.definition.name,
            input=self._step_input(),
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

    async def save(self, *, updated_at: dt.datetime | None = None, **patch: Any) -> None:
        """Commit one transition (see :meth:`RunMachine.transition`), fenced by this
        executor's claim."""
        if self.keeper.lost(self.id):
            raise self._lease_lost()
        if updated_at is None:
            # A step row's own end time doubles as the run's update time (one clock read).
            row = patch.get("insert_step")
            updated_at = (row.completed_at if row is not None else None) or utcnow()
        if patch.get("status") in TERMINAL_STATUSES:
            # A cancel or pause asked too late must not stop a later resume of this run.
            patch.setdefault("requested", None)
            if self.parent_id is not None:
                patch["wake"] = self._outcome(patch["status"], patch.get("error", KEEP))
        if patch.get("release"):
            snapshot = self.snapshot(patch.get("status", KEEP), self.tracked.saved(), self.signals)
            if snapshot is not None:
                patch["snapshot"] = snapshot
        t = self.transition(updated_at=updated_at, **patch)
        self.record(t, await self.store.apply(t))
        if t.wake is not None and self.host is not None:
            self.host.on_idle()  # the parent may be driven here: look for it now

    def _outcome(self, status: WorkflowStatus, error: object) -> Wake:
        """The signal telling this child run's parent how it ended (in the same write)."""
        done = status is WorkflowStatus.COMPLETED
        if not isinstance(error, str):
            error = None if done or self.error is None else safe_message(self.error)
        text = outcome_text(self.id, self.definition.name, status.value, self.data, error)
        return Wake(self.parent_id or "", child_signal(self.id), text)

    def _lease_lost(self) -> LeaseLostError:
        return LeaseLostError(
            f"run {self.id!r}: this executor's lease was taken over",
            workflow_id=self.id,
            workflow_name=self.definition.name,
        )

    async def save_step(self, row: StepRow) -> None:
        """Commit a step's outcome on the forward path (see :meth:`save`)."""
        if self.keeper.lost(self.id):
            raise self._lease_lost()
        self.step_recorded(row, await self.store.apply(self.step_transition(row)))

    # -- attempts ----------------------------------------------------------------------------

    async def attempts(
        self,
        index: int,
        step: StepDefinition,
        *,
        compensating: bool = False,
        first: int = 1,
    ) -> tuple[Any, str | None, WorkflowContext, int, float]:
        """Run the step's handler (or its compensation) with the step's retries, from
        attempt ``first`` (a durable backoff or a crash kept the count).

        Returns:
            (result, changes to ``ctx.data``, the context, attempts made, when the last
            attempt started by ``time.perf_counter``).

        Each failed attempt that is retried is added to the run's attempt log first. A wait
        before the next attempt longer than ``Settings.durable_backoff`` is kept in the store
        instead: the run is released, suspended until then, and :class:`Released` is raised.

        Raises:
            Failed: the last attempt failed (or the error is not retried).
            Interrupted: a cancel interrupted an async attempt.
            Released: the wait before the next attempt is kept in the store.
        """
        retries = step.retries if step.retries is not None else self.settings.default_retries
        timeout = step.timeout if step.timeout is not None else self.settings.default_timeout
        policy = step.retry or self.settings.retry_policy
        if compensating:
            assert step.compensate is not None
            fn, fn_is_async = step.compensate, step.compensate_is_async
        else:
            fn, fn_is_async = step.handler, step.handler_is_async
        handle = Attempt(
            self.id,
            self.definition.name,
            step.name,
            "compensation of step" if compensating else "step",
            self.emitter.log.warning,
        )
        attempt = first
        while True:
            ctx = self.context(index, attempt)
            handle.number = attempt
            t0 = time.perf_counter()
            # Only an async forward attempt is cut short by a cancel (a thread cannot be).
            self._interruptible = fn_is_async and not compensating
            try:
                result = await call_handler(
                    fn,
                    fn_is_async,
                    ctx,
                    timeout,
                    attempt=handle,
                    executor=self.settings.executor,
                )
                self.tracked.data = ctx.data
                changes = self.tracked.diff()
                return result, changes, ctx, attempt, t0
            except EngineClosedError:
                self.tracked.restore()
                raise
            except asyncio.CancelledError:
                self.tracked.restore()
                self._absorb_cancel()
                raise Interrupted() from None
            except Exception as exc:
                self.tracked.restore()
                failed = Failed(exc, attempt, since(t0), t0)
                if attempt > retries or not _retryable(exc, policy):
                    raise failed from None
            finally:
                self._interruptible = False
            await self._before_retry(index, step, failed, retries, policy, compensating, handle)
            attempt += 1

    async def retry_after(self, index: int, step: StepDefinition, failed: Failed) -> int | None:
        """After ``failed`` (an attempt that failed outside :meth:`attempts`, such as a wait
        that timed out): the number of the next attempt once its backoff is over, or None
        when the step has no retry left (or the error is not retried).

        Raises:
            Released: the backoff is kept in the store.
            Interrupted: a cancel came during the backoff.
        """
        retries = step.retries if step.retries is not None else self.settings.default_retries
        policy = step.retry or self.settings.retry_policy
        if failed.attempts > retries or not _retryable(failed.error, policy):
            return None
        await self._before_retry(index, step, failed, retries, policy, False)
        return failed.attempts + 1

    async def _before_retry(
        self,
        index: int,
        step: StepDefinition,
        failed: Failed,
        retries: int,
        policy: RetryPolicy,
        compensating: bool,
        handle: Attempt | None = None,
    ) -> None:
        """Log the failed attempt and wait out the backoff before the next one (in the
        store, releasing the run, when it is long: :class:`Released`). A timed-out sync
        attempt's thread is waited for first: one attempt at a time, in any process."""
        delay = policy.delay(failed.attempts)
        if delay > self.settings.durable_backoff and not compensating:
            if handle is not None and handle.thread is not None:
                await self._await_thread(handle, step, failed.attempts, failed.started)
            await self._store_backoff(index, step, failed, retries, delay)
            raise Released()
        await self._retry(index, step, failed, retries, compensating)
        if handle is not None and handle.thread is not None:
            await self._await_thread(handle, step, failed.attempts, failed.started)
        if self.request == "cancel" and not compensating:
            # Asked while the attempt was finishing (no task to interrupt then): the
            # backoff and the attempts after it never start.
            raise Interrupted()
        if delay > 0:
            self._interruptible = not compensating
            try:
                await self.settings.clock.sleep(delay)
            except asyncio.CancelledError:
                self._absorb_cancel()
                raise Interrupted() from None
            finally:
                self._interruptible = False

    def interrupt(self, kind: str, reason: str | None) -> None:
        """Note a cancel or pause asked of this run; a cancel also cuts short an async
        attempt (or an in-process backoff) at once. Called on the driver's event loop."""
        if self.request == "cancel":
            return  # a cancel is never weakened to a pause
        self.request = kind
        self.request_reason = reason
        if kind == "cancel" and self._interruptible and self.task is not None:
            self.task.cancel(_INTERRUPT)

    def cut_at_close(self) -> None:
        """close() stopped waiting: cut an async attempt (or in-memory backoff) short, so the
        run is released now (its caller gets :class:`EngineClosedError`). A sync attempt's
        thread cannot be stopped: that run stays owned until its lease expires."""
        if self._interruptible and self.task is not None:
            self._cut_at_close = True
            self.task.cancel(_INTERRUPT)

    def _absorb_cancel(self) -> None:
        """Turn this driver's own interruption back into normal flow (a cancel of the run)
        or into :class:`EngineClosedError` (a close); re-raise any other cancellation (the
        caller's or the event loop's)."""
        task = self.task
        if (
            (self.request != "cancel" and not self._cut_at_close)
            or task is None
            or task is not asyncio.current_task()
            or task.cancelling() == 0
        ):
            raise asyncio.CancelledError()
        task.uncancel()
        if self._cut_at_close:
            raise EngineClosedError(
                f"run {self.id!r}: the engine was closed while a step ran; the run was "
                "released and another engine continues it",
                workflow_id=self.id,
                workflow_name=self.definition.name,
            )

    async def _store_backoff(
        self, index: int, step: StepDefinition, failed: Failed, retries: int, delay: float
    ) -> None:
        """Keep a long wait before the next attempt in the store, and let the run go."""
        now = utcnow()
        timers = self.settings.clock.now()
        wake = timers + dt.timedelta(seconds=delay)
        log = failed.log_row(index, step.name, "step")
        self.current_step = index
        self.wait_kind = "backoff"
        await self.save(
            updated_at=now,
            status=WorkflowStatus.SUSPENDED,
            attempts=(log,),
            attempt=failed.attempts,
            wait_kind="backoff",
            wait_name=None,
            run_after=wake,
            run_after_from=timers,  # a delay: the store's clock decides when it is over
            release=True,
        )
        await self._retry_told(index, step, failed, retries, False, delay)

    async def _retry(
        self, index: int, step: StepDefinition, failed: Failed, retries: int, compensating: bool
    ) -> None:
        log = failed.log_row(index, step.name, "compensation" if compensating else "step")
        # The attempt count is kept with the run, so a crash before the next attempt
        # neither resets the retry budget nor counts as a crash of that attempt.
        await self.save(attempts=(log,), attempt=failed.attempts)
        await self._retry_told(index, step, failed, retries, compensating, None)

    async def _retry_told(
        self,
        index: int,
        step: StepDefinition,
        failed: Failed,
        retries: int,
        compensating: bool,
        stored_delay: float | None,
    ) -> None:
        info = failed.info
        if not compensating:
            await self.event(
                "step:retry",
                step_name=step.name,
                step_index=index,
                commit=step.commit,
                retries=failed.attempts,
                max_retries=retries,
                error=info.message,
                status="running",
                meta={"errorType": info.type},
            )
        when = "" if stored_delay is None else f" after {stored_delay:g}s (the run sleeps)"
        self.emitter.log.info(
            f"{self.label} step {step.name!r} attempt {failed.attempts} failed "
            f"({info.type}: {info.message}); retrying{when}"
        )

    async def _await_thread(
        self, handle: Attempt, step: StepDefinition, attempt: int, started: dt.datetime
    ) -> None:
        """One attempt at a time: wait for a timed-out sync attempt's thread to return."""
        assert handle.thread is not None
        grace = self.settings.sync_timeout_grace
        if not handle.thread.done():
            self.emitter.log.warning(
                f"{handle.label}: attempt {attempt} timed out but its thread is still running; "
                f"waiting up to {grace:g}s for it before the next attempt"
            )
        if not await wait_for_thread(handle.thread, grace):
            error = StepTimeoutError(
                f"step {step.name!r}: attempt {attempt} timed out and its thread was still "
                f"running {grace:g}s later (sync_timeout_grace); no further attempt was "
                "started, so that two attempts never run at once",
                workflow_id=self.id,
                workflow_name=self.definition.name,
                step=step.name,
            )
            raise Failed(error, attempt, started, time.perf_counter())
        handle.thread = None

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
