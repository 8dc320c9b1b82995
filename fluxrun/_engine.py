"""FluxEngine: the public async API. It owns the registry, the store, sinks, hooks and threads."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import datetime as dt
import math
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ._actions import list_attempts, resume_run, signal_run, skip_compensation
from ._batches import Batches
from ._clock import SYSTEM_CLOCK, Clock
from ._codec import DEFAULT_MAX_SIZE
from ._control import RunControl, opt_text, prepare_run, start_run
from ._definition import WorkflowDefinition
from ._lease import LeaseKeeper
from ._options import hooks_from, naming, sinks_from, text_arg
from ._owner import new_owner_id
from ._records import FluxResult, StepAttempt, WorkflowFilter, WorkflowState, WorkflowStatus
from ._registry import FlowLike, Registry
from ._retry import RetryPolicy, seconds
from ._runner import Settings
from ._runtime import Runtime, is_final
from ._scheduler import Scheduler
from ._schedules import ScheduleControl
from ._state import to_state
from ._trace import Emitter
from ._whole_state_storage import WholeStateStorageAdapter, is_whole_state_storage
from .errors import (
    DefinitionError,
    InvalidArgumentError,
    InvalidStateError,
    RunBusyError,
    WorkflowDefinitionChangedError,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
)
from .storage._base import ListQuery, RunRow, Store
from .storage._workers import WorkerInfo
from .storage.memory import MemoryStorage

__all__ = ["FlowLike", "FluxEngine"]


_NO_TIMEOUT_RETRY = RetryPolicy()
_MAX_LEASE = 7 * 86400.0


class FluxEngine(RunControl, ScheduleControl, Batches):
    """Runs workflows durably on a store.

    Args:
        storage: Where runs live: ``MemoryStorage()`` (default), ``SQLiteStorage(path)``,
            ``PostgresStorage(dsn)``, or a ``WorkflowStorage``: any object with
            @gravito/flux's whole-state ``save/load/list/delete`` (single process only).
        logger: A ``logging.Logger`` (default: the ``fluxrun`` logger) or any object with
            ``debug/info/warn(ing)/error``.
        trace: A trace sink (anything with ``emit(event)``) or a list of them.
        default_retries: Retries of a step that does not set its own (default 0).
        default_timeout: Per-attempt timeout in seconds (or timedelta) of a step that does
            not set its own (default none).
        on: Hooks: a dict (or object) with any of ``step_start``, ``step_complete``,
            ``step_error``, ``workflow_complete``, ``workflow_error``; sync or async.
        retry_policy: Backoff between attempts of steps without their own policy.
        lease: Seconds (or timedelta) a claim on a run lasts without renewal; renewed
            every third of it while the run executes (default 15). A cancel or pause asked
            from another process reaches the run's driver within a third of it.
        max_recoveries: A run whose executor crashed this many times in a row, with no
            step recorded in between, is marked failed by ``recover`` instead of being
            retried forever.
        recover_on_start: Run :meth:`recover` in :meth:`init`.
        max_value_size: Limit, in characters of JSON, of one stored value.
        sync_timeout_grace: Seconds to wait, after a sync handler timed out, for its thread
            to return before the next attempt starts (one attempt at a time); if it has not
            returned by then, the step fails without further attempts.
        max_concurrent_runs: Runs this engine drives at once (its scheduler claims no more;
            runs started here count too).
        poll_interval: Seconds between the scheduler's looks at the store for work other
            processes made due (a timer's time, a start, a signal, a crash); work made due
            in this process is seen at once.
        durable_backoff: A wait before a retry longer than this many seconds is kept in the
            store (the run sleeps, holding nothing) instead of in memory.
        clock: What timers are judged by (default: the system clock); tests pass a
            ``fluxrun.testing.FakeClock`` (to the store as well).
    """

    def __init__(
        self,
        *,
        storage: object | None = None,
        logger: object | None = None,
        trace: object | None = None,
        default_retries: int = 0,
        default_timeout: float | dt.timedelta | None = None,
        on: object | None = None,
        retry_policy: RetryPolicy | None = None,
        lease: float | dt.timedelta = 15.0,
        max_recoveries: int = 5,
        recover_on_start: bool = False,
        max_value_size: int = DEFAULT_MAX_SIZE,
        sync_timeout_grace: float | dt.timedelta = 60.0,
        max_concurrent_runs: int = 32,
        poll_interval: float | dt.timedelta = 1.0,
        durable_backoff: float | dt.timedelta = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if type(default_retries) is not int or default_retries < 0:
            raise InvalidArgumentError(
                f"default_retries must be an int >= 0, got {default_retries!r}"
            )
        if type(max_recoveries) is not int or max_recoveries < 1:
            raise InvalidArgumentError(
                f"max_recoveries must be an int >= 1, got {max_recoveries!r}"
            )
        if type(max_value_size) is not int or max_value_size < 16:
            raise InvalidArgumentError(
                f"max_value_size must be an int >= 16, got {max_value_size!r}"
            )
        if type(max_concurrent_runs) is not int or max_concurrent_runs < 1:
            raise InvalidArgumentError(
                f"max_concurrent_runs must be an int >= 1, got {max_concurrent_runs!r}"
            )
        if clock is not None and not isinstance(clock, Clock):
            raise InvalidArgumentError(f"clock must be a fluxrun clock, got {clock!r}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise InvalidArgumentError(f"retry_policy must be a RetryPolicy, got {retry_policy!r}")
        try:
            timeout = (
                None if default_timeout is None else seconds(default_timeout, "default_timeout")
            )
            lease_seconds = seconds(lease, "lease")
            grace = seconds(sync_timeout_grace, "sync_timeout_grace", allow_zero=True)
            poll = seconds(poll_interval, "poll_interval")
            backoff = seconds(durable_backoff, "durable_backoff", allow_zero=True)
        except DefinitionError as exc:
            raise InvalidArgumentError(exc.message) from None
        if lease_seconds > _MAX_LEASE:
            raise InvalidArgumentError(
                f"lease must be at most {_MAX_LEASE:g} seconds (7 days), got {lease!r}"
            )
        self._store = self._make_store(storage)
        self.emitter = Emitter(sinks=sinks_from(trace), hooks=hooks_from(on), logger=logger)
        self.owner = new_owner_id()
        self._executor: ThreadPoolExecutor | None = None
        self.settings = Settings(
            owner=self.owner,
            default_retries=default_retries,
            default_timeout=timeout,
            retry_policy=retry_policy or _NO_TIMEOUT_RETRY,
            lease_seconds=lease_seconds,
            max_value_size=max_value_size,
            executor=self._thread_pool,
            sync_timeout_grace=grace,
            closing=self._is_closing,
            durable_backoff=backoff,
            clock=clock or SYSTEM_CLOCK,
        )
        self._keeper = LeaseKeeper(
            self._store, owner=self.owner, lease_seconds=lease_seconds, log=self.emitter.log
        )
        self._registry = Registry()
        self._runtime = Runtime(
            store=self._store,
            emitter=self.emitter,
            settings=self.settings,
            keeper=self._keeper,
            registry=self._registry,
            max_recoveries=max_recoveries,
            poll_interval=poll,
        )
        self._keeper.on_request = self._on_request
        self._scheduler = Scheduler(self._runtime, max_concurrent=max_concurrent_runs)
        self.settings.clock.subscribe(self._clock_moved)
        self._recover_on_start = bool(recover_on_start)
        self._drives = True  # False for a FluxClient's engine: it never runs user code
        self._ready = False
        self._closing = False
        self._closed = False
        self._init_lock: asyncio.Lock | None = None

    @staticmethod
    def _make_store(storage: object | None) -> Store:
        if storage is None:
            return MemoryStorage()
        if isinstance(storage, Store):
            return storage
        if is_whole_state_storage(storage):
            return WholeStateStorageAdapter(storage)
        raise InvalidArgumentError(
            "storage must be MemoryStorage, SQLiteStorage, PostgresStorage or an object with "
            f"save/load/list/delete methods, got {type(storage).__name__}"
        )

    @property
    def storage(self) -> Store:
        """The store this engine runs on."""
        return self._store

    def _thread_pool(self) -> Executor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=min(32, (os.cpu_count() or 1) + 4),
                thread_name_prefix="fluxrun-step",
            )
        return self._executor

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self) -> None:
        """Prepare the store (create or migrate its schema) and start the scheduler, which
        from then on claims and drives the due runs of the registered workflows; idempotent.

        With ``recover_on_start``, also recovers unfinished runs of the registered workflows
        before returning.
        """
        if self._closed:
            raise InvalidStateError("this FluxEngine is closed")
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if self._ready:
                return
            await self._store.init()
            self._ready = True
        if self._recover_on_start:
            await self.recover()
        if not self._closing and self._drives:
            self._scheduler.start()

    async def _ensure_ready(self) -> None:
        # A closed engine must refuse work even on a store (memory) that still answers.
        if self._closing and not self._closed:
            raise InvalidStateError("this FluxEngine is closing")
        if not self._ready or self._closed:
            await self.init()

    def _is_closing(self) -> bool:
        return self._closing

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop the scheduler, stop driving runs, release them, and close the thread pool
        and the store.

        Runs being driven stop at their next step boundary (waiting at most ``timeout``
        seconds for running steps, then cutting async ones short) and are released, so
        another engine continues them at once; their callers (and ``result()`` waiters) get
        :class:`EngineClosedError`. Sync steps still queued for a thread do not start.
        """
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise InvalidArgumentError(
                f"close timeout must be a finite number of seconds >= 0, got {timeout!r}"
            )
        if self._closed or self._closing:
            return
        self._closing = True
        await self._scheduler.stop()
        # Runs claimed but not yet driven start, see the engine closing, and are released.
        await self._scheduler.drain(timeout)
        await self._runtime.stop_driving(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        # Callers of cancelled queued steps get EngineClosedError and release their runs.
        await self._runtime.wait_idle(1.0)
        self._closed = True
        await self._keeper.stop_async()
        await self._store.close()

    async def __aenter__(self) -> FluxEngine:
        await self.init()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- registry ----------------------------------------------------------------------------

    def register(self, flow: FlowLike) -> WorkflowDefinition:
        """Register a workflow so it can be named by string and recovered.

        Raises:
            DefinitionError: another definition is registered under the same name.
        """
        return self._registry.register(flow)

    def _definition(self, flow: FlowLike) -> WorkflowDefinition:
        return self._registry.resolve(flow)

    def _spec_for(self, name: str) -> Any:
        return self._registry.input_spec(name)

    def _clock_moved(self) -> None:
        # A test moved its fake clock: leases first (so they do not look expired), then
        # look for what came due.
        self._keeper.renew_now()
        self._scheduler.wake()

    def _on_request(self, run_id: str, kind: str) -> None:
        # A lease renewal saw a cancel or pause asked of a run driven here.
        self._runtime.interrupt(run_id, kind, None)

    # -- running -----------------------------------------------------------------------------

    async def execute(
        self,
        flow: FlowLike,
        input: Any = None,
        *,
        id: str | None = None,
        idempotency_key: str | None = None,
    ) -> FluxResult:
        """Start a run and drive it here until it finishes or needs something from outside
        (a signal, an unpause); it waits through sleeps and stored retry backoffs.

        With ``id`` or ``idempotency_key``, a run that exists already is not started again:
        its result is returned (see :meth:`start`).

        Raises:
            InvalidInputError: the input failed validation or cannot be stored; nothing was
                stored.
            IdempotencyConflictError: the key (or id) is taken by a run with another input.
            StorageError, ConcurrentModificationError: the store refused a write.
        """
        definition = self._definition(flow)
        started = time.perf_counter()
        new = prepare_run(
            self._runtime,
            definition,
            input,
            run_id=opt_text(id, "id"),
            idempotency_key=opt_text(idempotency_key, "idempotency_key"),
            delay=None,
        )
        await self._ensure_ready()
        run_id = new.row.id
        limited = definition.concurrency is not None
        with naming(run_id, definition.name):
            # A failed create may still have committed: the error names the run to look for.
            # A run under a concurrency limit is taken by a claim (within the limit).
            run_id, created = await start_run(self._runtime, new, own=not limited)
        if limited and created:
            self._scheduler.wake()
            later = await self._runtime.wait_result(run_id, None)
            return dataclasses.replace(later, duration_ms=(time.perf_counter() - started) * 1000.0)
        if not created:
            return await self._runtime.wait_result(run_id, None)
        driver = self._runtime.new_driver(
            definition,
            run_id=run_id,
            input=new.typed,
            input_plain=new.plain,
            input_text=new.row.input,
            version=1,
            fence=1,
            status=WorkflowStatus.PENDING,
            rows={},
            data={},
            signals={},
            started=started,
        )
        with naming(run_id, definition.name):
            await driver.event(
                "workflow:start", status=WorkflowStatus.RUNNING.value, input=new.plain
            )
            result = await self._runtime.drive(driver, lambda d: d.forward(0))
            if is_final(result):
                return result
            # Asleep (or backing off): the scheduler wakes it; wait for what it comes to.
            later = await self._runtime.wait_result(run_id, None)
            return dataclasses.replace(later, duration_ms=(time.perf_counter() - started) * 1000.0)

    async def _load_for(
        self, definition: WorkflowDefinition, run_id: str, *, tail: bool = False
    ) -> RunRow | None:
        # tail: the run as a continuation needs it (Store.load_tail), not its whole history.
        row = await (self._store.load_tail(run_id) if tail else self._store.load(run_id))
        if row is None:
            return None
        if row.name != definition.name:
            raise WorkflowNameMismatchError(
                f"Workflow name mismatch: run {run_id!r} belongs to {row.name!r}, not "
                f"{definition.name!r}",
                workflow_id=run_id,
                workflow_name=definition.name,
                details={"expected": definition.name, "received": row.name},
            )
        if tuple(row.step_names) != definition.step_names:
            raise WorkflowDefinitionChangedError(
                f"Workflow definition changed; continuing run {run_id!r} is not safe: it "
                f"started with steps {list(row.step_names)}, the workflow now has "
                f"{list(definition.step_names)}",
                workflow_id=run_id,
                workflow_name=definition.name,
                details={"stored": list(row.step_names), "current": list(definition.step_names)},
            )
        return row

    async def signal(
        self, flow: FlowLike, run_id: str, name: str, payload: Any = None
    ) -> FluxResult:
        """Deliver signal ``name`` to a suspended run and continue it.

        Raises:
            WorkflowNotFoundError: no run with this id.
            WorkflowNotSuspendedError: the run is not waiting for a signal.
            SignalMismatchError: the run waits for another signal.
            InvalidInputError: the payload cannot be stored.
        """
        definition = self._definition(flow)
        run_id = text_arg(run_id, "run id")
        name = text_arg(name, "signal name")
        await self._ensure_ready()
        with naming(run_id, definition.name):
            row = await self._load_for(definition, run_id, tail=True)
            if row is None:
                raise WorkflowNotFoundError(
                    f"Workflow not found: {run_id}",
                    workflow_id=run_id,
                    workflow_name=definition.name,
                )
            return await signal_run(self._runtime, definition, row, name, payload)

    async def resume(
        self, flow: FlowLike, run_id: str, from_step: int | str | None = None
    ) -> FluxResult | None:
        """Continue a stopped run from ``from_step`` (index or name; default: where it
        stopped), with ``ctx.data`` as it was when that step first started.

        Without ``from_step``: a run that failed after a completed commit step continues
        from the step after that commit step; a ``compensation_failed`` (or interrupted
        ``rolling_back``) run retries the failed compensation and finishes its rollback,
        never running forward steps. Earlier outcomes stay in :meth:`attempts`.

        Returns None when no run has this id.

        Raises:
            WorkflowNameMismatchError, WorkflowDefinitionChangedError: the run does not
                belong to this workflow as it is now.
            StepNotFoundError, InvalidStepIndexError: ``from_step`` names no step.
            CommittedStepError: ``from_step`` is a commit step that already completed.
            InvalidStateError: the run is completed or cancelled and no ``from_step`` was
                given; ``from_step`` was given for a run in its rollback; or an earlier
                step was already compensated (undone).
            RunBusyError: another executor is running the run now.
        """
        definition = self._definition(flow)
        run_id = text_arg(run_id, "run id")
        if (from_step is not None and not isinstance(from_step, str | int)) or isinstance(
            from_step, bool
        ):
            raise InvalidArgumentError(
                f"from_step must be a step index, a step name or None, got {from_step!r}"
            )
        await self._ensure_ready()
        with naming(run_id, definition.name):
            row = await self._load_for(definition, run_id)
            if row is None:
                return None
            return await resume_run(self._runtime, definition, row, from_step)

    async def retry_step(self, flow: FlowLike, run_id: str, step: str) -> FluxResult | None:
        """Run a run again from the named step (``resume`` from it)."""
        if not isinstance(step, str):
            raise InvalidArgumentError(f"step must be a step name, got {step!r}")
        return await self.resume(flow, run_id, from_step=step)

    async def skip_compensation(
        self, flow: FlowLike, run_id: str, step: str, *, note: str
    ) -> FluxResult:
        """Record the failed compensation of ``step`` as done by hand and finish the rollback.

        For a ``compensation_failed`` run whose compensation of ``step`` an operator has
        carried out outside the engine. ``note`` (why, by whom) is kept in the attempt log.

        Raises:
            WorkflowNotFoundError: no run with this id.
            StepNotFoundError: the workflow has no such step.
            InvalidStateError: the run is not ``compensation_failed``, or that step's
                compensation did not fail.
        """
        definition = self._definition(flow)
        run_id = text_arg(run_id, "run id")
        step = text_arg(step, "step")
        note = text_arg(note, "note")
        await self._ensure_ready()
        with naming(run_id, definition.name):
            row = await self._load_for(definition, run_id)
            if row is None:
                raise WorkflowNotFoundError(
                    f"Workflow not found: {run_id}",
                    workflow_id=run_id,
                    workflow_name=definition.name,
                )
            return await skip_compensation(self._runtime, definition, row, step, note)

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self, *, concurrency: int = 16) -> list[FluxResult]:
        """Claim and drive due runs of the registered workflows until none is due, and
        return the outcome of each run driven meanwhile (by these claims, or by the
        scheduler's claims that were in flight).

        The scheduler does this by itself; ``recover`` is for waiting until it is done.
        Pending and running runs nobody owns continue after their last recorded step;
        rolling-back runs continue their compensations; due timers and signals are taken.
        A run whose executors crashed ``max_recoveries`` times in a row without progress is
        marked failed.
        """
        if type(concurrency) is not int or concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be an int >= 1, got {concurrency!r}")
        await self._ensure_ready()
        return await self._scheduler.recover(concurrency)

    # -- reading -----------------------------------------------------------------------------

    async def get(self, run_id: str) -> WorkflowState | None:
        """The stored state of a run, or None."""
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        with naming(run_id, None):
            row = await self._store.load(run_id)
            return None if row is None else to_state(row, self._spec_for(row.name))

    async def list(self, filter: WorkflowFilter | None = None) -> list[WorkflowState]:
        """Runs matching ``filter`` (default: all), newest first."""
        if filter is None:
            filter = WorkflowFilter()
        if not isinstance(filter, WorkflowFilter):
            raise InvalidArgumentError(
                f"filter must be a WorkflowFilter, got {type(filter).__name__}"
            )
        await self._ensure_ready()
        rows = await self._store.list_runs(
            ListQuery(
                name=filter.name,
                statuses=filter.statuses,
                limit=filter.limit,
                offset=filter.offset,
            )
        )
        return [to_state(r, self._spec_for(r.name)) for r in rows]

    async def workers(self) -> builtins.list[WorkerInfo]:
        """The engines that run (or ran) a scheduler on this store, most recent first: host,
        pid, workflows, runs held, start and last heartbeat (the store's clock)."""
        await self._ensure_ready()
        return await self._store.list_workers()

    async def attempts(self, run_id: str) -> builtins.list[StepAttempt]:
        """Every attempt of every step and compensation of a run, in the order they started.

        Retried failures, compensations and the outcomes a ``resume``/``retry_step``
        replaced are all kept; the history (``get``) shows only each step's current outcome.

        Raises:
            WorkflowNotFoundError: no run with this id.
        """
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        with naming(run_id, None):
            return await list_attempts(self._runtime, run_id)

    async def delete(self, run_id: str) -> bool:
        """Delete a run with its history and attempts; False if there was none.

        Raises:
            RunBusyError: the run is being executed right now (by this or another engine).
        """
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        if run_id in self._runtime.active or run_id in self._keeper.holding():
            raise RunBusyError(
                f"run {run_id!r} is being executed by this engine", workflow_id=run_id
            )
        with naming(run_id, None):
            return await self._store.delete(run_id)
