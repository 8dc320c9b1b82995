"""FluxEngine: the public async API. It owns the registry, the store, sinks, hooks and threads."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import math
import os
import time
import uuid
from concurrent.futures import Executor, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ._actions import list_attempts, resume_run, signal_run, skip_compensation
from ._codec import DEFAULT_MAX_SIZE, decode, encode
from ._definition import WorkflowDefinition
from ._lease import LeaseKeeper
from ._options import hooks_from, naming, sinks_from, text_arg
from ._owner import new_owner_id
from ._records import (
    TERMINAL_STATUSES,
    FluxResult,
    StepAttempt,
    WorkflowFilter,
    WorkflowState,
    WorkflowStatus,
)
from ._recovery import recover_runs
from ._registry import FlowLike, Registry
from ._retry import RetryPolicy, seconds
from ._runner import RunDriver, Settings, utcnow
from ._state import to_state
from ._trace import Emitter
from ._whole_state_storage import WholeStateStorageAdapter, is_whole_state_storage
from .errors import (
    ConcurrentModificationError,
    DefinitionError,
    InvalidArgumentError,
    InvalidStateError,
    RunBusyError,
    WorkflowDefinitionChangedError,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
    with_run,
)
from .storage._base import Applied, ListQuery, RunRow, Store, Transition
from .storage.memory import MemoryStorage

__all__ = ["FlowLike", "FluxEngine"]



_NO_TIMEOUT_RETRY = RetryPolicy()
_MAX_LEASE = 7 * 86400.0


class FluxEngine:
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
            every third of it while the run executes.
        max_recoveries: A run whose executor crashed this many times in a row, with no
            step recorded in between, is marked failed by ``recover`` instead of being
            retried forever.
        recover_on_start: Run :meth:`recover` in :meth:`init`.
        max_value_size: Limit, in characters of JSON, of one stored value.
        sync_timeout_grace: Seconds to wait, after a sync handler timed out, for its thread
            to return before the next attempt starts (one attempt at a time); if it has not
            returned by then, the step fails without further attempts.
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
        lease: float | dt.timedelta = 30.0,
        max_recoveries: int = 5,
        recover_on_start: bool = False,
        max_value_size: int = DEFAULT_MAX_SIZE,
        sync_timeout_grace: float | dt.timedelta = 60.0,
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
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise InvalidArgumentError(f"retry_policy must be a RetryPolicy, got {retry_policy!r}")
        try:
            timeout = (
                None if default_timeout is None else seconds(default_timeout, "default_timeout")
            )
            lease_seconds = seconds(lease, "lease")
            grace = seconds(sync_timeout_grace, "sync_timeout_grace", allow_zero=True)
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
        )
        self._keeper = LeaseKeeper(
            self._store, owner=self.owner, lease_seconds=lease_seconds, log=self.emitter.log
        )
        self._registry = Registry()
        self._max_recoveries = max_recoveries
        self._recover_on_start = bool(recover_on_start)
        self._ready = False
        self._closing = False
        self._closed = False
        self._init_lock: asyncio.Lock | None = None
        # Runs this engine is driving now -> set when the drive has ended (close waits).
        self._active: dict[str, asyncio.Event] = {}

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
        """Prepare the store (create or migrate its schema); idempotent.

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

    async def _ensure_ready(self) -> None:
        # A closed engine must refuse work even on a store (memory) that still answers.
        if self._closing and not self._closed:
            raise InvalidStateError("this FluxEngine is closing")
        if not self._ready or self._closed:
            await self.init()

    def _is_closing(self) -> bool:
        return self._closing

    async def close(self, *, timeout: float = 10.0) -> None:
        """Stop driving runs, release them, and close the thread pool and the store.

        Runs being driven stop at their next step boundary (waiting at most ``timeout``
        seconds for running steps) and are released, so another engine's ``recover()``
        continues them at once; their callers get :class:`EngineClosedError`. Sync steps
        still queued for a thread do not start.
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
        await self._wait_active(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        # Callers of cancelled queued steps get EngineClosedError and release their runs.
        await self._wait_active(1.0)
        self._closed = True
        await self._keeper.stop_async()
        await self._store.close()

    async def _wait_active(self, timeout: float) -> None:
        if not self._active:
            return
        waiters = [asyncio.ensure_future(ev.wait()) for ev in self._active.values()]
        _, pending = await asyncio.wait(waiters, timeout=timeout)
        for w in pending:
            w.cancel()

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

    def _driver(self, definition: WorkflowDefinition, **kw: Any) -> RunDriver:
        """A driver for a run this engine has just created."""
        return RunDriver(
            definition=definition,
            store=self._store,
            emitter=self.emitter,
            settings=self.settings,
            keeper=self._keeper,
            **kw,
        )

    def _driver_from(
        self, definition: WorkflowDefinition, row: RunRow, applied: Applied, **kw: Any
    ) -> RunDriver:
        spec = definition.input_spec
        plain = decode(row.input)
        return RunDriver.from_row(
            row,
            applied,
            definition=definition,
            input=plain if spec is None else spec.revive(plain),
            input_plain=plain,
            store=self._store,
            emitter=self.emitter,
            settings=self.settings,
            keeper=self._keeper,
            **kw,
        )

    async def _drive(
        self,
        driver: RunDriver,
        start: int | None,
        rollback_from: tuple[int, str] | None = None,
    ) -> FluxResult:
        """Drive a claimed run; on any way out but a saved end, release it at once."""
        self._keeper.hold(driver.id, driver.fence)
        done = asyncio.Event()
        self._active[driver.id] = done
        try:
            if rollback_from is not None:
                return await driver.rollback(*rollback_from)
            assert start is not None
            return await driver.forward(start)
        except BaseException as exc:
            await self._release(driver, exc)
            with_run(exc, driver.id, driver.definition.name)
            raise
        finally:
            self._keeper.drop(driver.id)
            self._active.pop(driver.id, None)
            done.set()

    async def _release(self, driver: RunDriver, exc: BaseException) -> None:
        """Give up a run cut off by cancellation, close() or an unexpected error, so that it
        is not left owned until its lease expires (a crash would be the only other way)."""
        if isinstance(exc, ConcurrentModificationError) or driver.status in TERMINAL_STATUSES:
            return  # not ours any more, or already released with its end
        if driver.status is WorkflowStatus.SUSPENDED:
            return
        release = Transition(
            run_id=driver.id,
            expected_version=driver.version,
            updated_at=utcnow(),
            fence=driver.fence,
            release=True,
        )
        try:
            # Shielded: a cancelled caller still gets its run released.
            await asyncio.shield(self._store.apply(release))
        except BaseException as failure:
            self.emitter.log.warning(
                f"{driver.label}: could not release the run after "
                f"{type(exc).__name__}; it is recovered when its lease expires ({failure!r})"
            )

    # -- running -----------------------------------------------------------------------------

    async def execute(self, flow: FlowLike, input: Any = None) -> FluxResult:
        """Start a new run and drive it until it completes, fails or suspends.

        Raises:
            InvalidInputError: the input failed validation or cannot be stored; nothing was
                stored.
            StorageError, ConcurrentModificationError: the store refused a write.
        """
        definition = self._definition(flow)
        started = time.perf_counter()
        spec = definition.input_spec
        typed = input if spec is None else spec.validate(input, definition.name)
        plain = typed if spec is None else spec.to_plain(typed)
        input_text = encode(plain, what="input", max_size=self.settings.max_value_size)
        plain = decode(input_text)
        if spec is None:
            typed = plain
        await self._ensure_ready()
        now = utcnow()
        run_id = str(uuid.uuid4())
        row = RunRow(
            id=run_id,
            name=definition.name,
            status=WorkflowStatus.PENDING.value,
            input=input_text,
            step_names=definition.step_names,
            current_step=0,
            created_at=now,
            updated_at=now,
            version=1,
            fence=1,
            definition_version=definition.version,
        )
        with naming(run_id, definition.name):
            # A failed create may still have committed: the error names the run to look for.
            await self._store.create(
                row, lease_owner=self.owner, lease_seconds=self.settings.lease_seconds
            )
        driver = self._driver(
            definition,
            run_id=run_id,
            input=typed,
            input_plain=plain,
            input_text=input_text,
            version=1,
            fence=1,
            status=WorkflowStatus.PENDING,
            rows={},
            data={},
            signals={},
            started=started,
        )
        with naming(run_id, definition.name):
            await driver.event("workflow:start", status=WorkflowStatus.RUNNING.value, input=plain)
            return await self._drive(driver, 0)

    async def _load_for(self, definition: WorkflowDefinition, run_id: str) -> RunRow | None:
        row = await self._store.load(run_id)
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
            return await signal_run(self, definition, run_id, name, payload)

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
            return await resume_run(self, definition, row, from_step)

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
            return await skip_compensation(self, definition, row, step, note)

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self, *, concurrency: int = 16) -> list[FluxResult]:
        """Finish every unfinished run of the registered workflows that no live executor owns.

        Pending and running runs continue after their last recorded step; rolling-back runs
        continue their compensations. A run whose executors crashed ``max_recoveries`` times
        in a row without progress is marked failed. Returns the outcome of each run recovered.
        """
        if type(concurrency) is not int or concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be an int >= 1, got {concurrency!r}")
        await self._ensure_ready()
        return await recover_runs(self, concurrency)

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
            return await list_attempts(self, run_id)

    async def delete(self, run_id: str) -> bool:
        """Delete a run with its history and attempts; False if there was none.

        Raises:
            RunBusyError: the run is being executed right now (by this or another engine).
        """
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        if run_id in self._keeper.holding():
            raise RunBusyError(
                f"run {run_id!r} is being executed by this engine", workflow_id=run_id
            )
        with naming(run_id, None):
            return await self._store.delete(run_id)
