"""FluxEngine: the public async API. It owns the registry, the store, sinks, hooks and threads."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from types import TracebackType
from typing import Any

from ._codec import DEFAULT_MAX_SIZE, decode, encode, validate_text
from ._definition import WorkflowBuilder, WorkflowDefinition
from ._lease import LeaseKeeper
from ._records import FluxResult, StepStatus, WorkflowFilter, WorkflowState, WorkflowStatus
from ._recovery import recover_runs
from ._retry import RetryPolicy, seconds
from ._runner import RunDriver, Settings, claim_for, utcnow
from ._seed import SeedStorageAdapter, is_seed_storage
from ._state import replay_data, to_state
from ._trace import HOOK_NAMES, Emitter
from .errors import (
    CommittedStepError,
    ConcurrentModificationError,
    DefinitionError,
    InvalidArgumentError,
    InvalidStateError,
    InvalidStepIndexError,
    SerializationError,
    SignalMismatchError,
    StepNotFoundError,
    UnknownWorkflowError,
    WorkflowDefinitionChangedError,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
    WorkflowNotSuspendedError,
)
from .storage._base import Applied, ListQuery, RunRow, Store, Transition
from .storage.memory import MemoryStorage

__all__ = ["FlowLike", "FluxEngine"]

FlowLike = WorkflowBuilder | WorkflowDefinition | str | Any
"""A builder, a ``Workflow``, a definition, or the name of a registered workflow."""

_CAMEL_HOOKS = {
    "stepStart": "step_start",
    "stepComplete": "step_complete",
    "stepError": "step_error",
    "workflowComplete": "workflow_complete",
    "workflowError": "workflow_error",
}
_NO_TIMEOUT_RETRY = RetryPolicy()


def _hooks(on: object) -> dict[str, Any]:
    if on is None:
        return {}
    if isinstance(on, Mapping):
        items = dict(on)
    else:
        names = (*HOOK_NAMES, *_CAMEL_HOOKS)
        if not any(hasattr(on, n) for n in names):
            # A str, a number or a list here is a mistake, not "an object with no hooks".
            raise InvalidArgumentError(
                f"on must be a dict of hooks or an object with hook attributes "
                f"({', '.join(HOOK_NAMES)}), got {type(on).__name__}"
            )
        items = {n: getattr(on, n) for n in names if getattr(on, n, None) is not None}
    hooks: dict[str, Any] = {}
    for key, fn in items.items():
        name = _CAMEL_HOOKS.get(key, key)
        if name not in HOOK_NAMES:
            raise InvalidArgumentError(
                f"unknown hook {key!r}; the hooks are {', '.join(HOOK_NAMES)}"
            )
        if fn is None:
            continue
        if not callable(fn):
            raise InvalidArgumentError(f"hook {key!r} must be callable, got {fn!r}")
        hooks[name] = fn
    return hooks


def _sinks(trace: object) -> list[Any]:
    if trace is None:
        return []
    sinks = list(trace) if isinstance(trace, list | tuple) else [trace]
    for sink in sinks:
        if not callable(getattr(sink, "emit", None)):
            raise InvalidArgumentError(f"trace sink {sink!r} has no emit(event) method")
    return sinks


def _text_arg(value: object, what: str) -> str:
    try:
        return validate_text(value, what, max_length=1000)
    except SerializationError as exc:
        raise InvalidArgumentError(exc.message) from None


class FluxEngine:
    """Runs workflows durably on a store.

    Args:
        storage: Where runs live: ``MemoryStorage()`` (default), ``SQLiteStorage(path)``,
            ``PostgresStorage(dsn)``, or any object with the seed's
            ``save/load/list/delete`` (single process only).
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
        except DefinitionError as exc:
            raise InvalidArgumentError(exc.message) from None
        self._store = self._make_store(storage)
        self.emitter = Emitter(sinks=_sinks(trace), hooks=_hooks(on), logger=logger)
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._executor: ThreadPoolExecutor | None = None
        self.settings = Settings(
            owner=self.owner,
            default_retries=default_retries,
            default_timeout=timeout,
            retry_policy=retry_policy or _NO_TIMEOUT_RETRY,
            lease_seconds=lease_seconds,
            max_value_size=max_value_size,
            executor=self._thread_pool,
        )
        self._keeper = LeaseKeeper(
            self._store, owner=self.owner, lease_seconds=lease_seconds, log=self.emitter.log
        )
        self._registry: dict[str, WorkflowDefinition] = {}
        self._max_recoveries = max_recoveries
        self._recover_on_start = bool(recover_on_start)
        self._ready = False
        self._closed = False
        self._init_lock: asyncio.Lock | None = None

    @staticmethod
    def _make_store(storage: object | None) -> Store:
        if storage is None:
            return MemoryStorage()
        if isinstance(storage, Store):
            return storage
        if is_seed_storage(storage):
            return SeedStorageAdapter(storage)
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
        if not self._ready or self._closed:
            await self.init()

    async def close(self) -> None:
        """Stop lease renewal, the step thread pool and the store."""
        if self._closed:
            return
        self._closed = True
        self._keeper.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
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
        definition = self._definition(flow)
        existing = self._registry.get(definition.name)
        if existing is not None and existing is not definition:
            if existing.step_names != definition.step_names or (
                existing.version != definition.version
            ):
                raise DefinitionError(
                    f"a different workflow named {definition.name!r} is already registered",
                    workflow_name=definition.name,
                )
        self._registry[definition.name] = definition
        return definition

    def _definition(self, flow: FlowLike) -> WorkflowDefinition:
        if isinstance(flow, WorkflowDefinition):
            return flow
        if isinstance(flow, str):
            found = self._registry.get(flow)
            if found is None:
                known = ", ".join(sorted(self._registry)) or "none"
                raise UnknownWorkflowError(
                    f"no workflow named {flow!r} is registered (registered: {known})",
                    workflow_name=flow,
                )
            return found
        build = getattr(flow, "build", None)
        if callable(build):
            definition = build()
            if isinstance(definition, WorkflowDefinition):
                return definition
        raise InvalidArgumentError(
            "expected a workflow (builder, Workflow, WorkflowDefinition or registered name), "
            f"got {type(flow).__name__}"
        )

    def _spec_for(self, name: str) -> Any:
        definition = self._registry.get(name)
        return None if definition is None else definition.input_spec

    def _driver(self, definition: WorkflowDefinition, **kw: Any) -> RunDriver:
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
        self, driver: RunDriver, start: int | None, rollback_from: int | None = None
    ) -> FluxResult:
        self._keeper.hold(driver.id, driver.fence)
        try:
            if rollback_from is not None:
                return await driver.rollback(rollback_from, driver_error_text(driver))
            assert start is not None
            return await driver.forward(start)
        finally:
            self._keeper.drop(driver.id)

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
        await self._store.create(
            row, lease_owner=self.owner, lease_seconds=self.settings.lease_seconds
        )
        driver = self._driver(
            definition,
            run_id=run_id,
            input=typed,
            input_plain=plain,
            version=1,
            fence=1,
            status=WorkflowStatus.PENDING,
            rows={},
            data={},
            signals={},
            started=started,
        )
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
        started = time.perf_counter()
        run_id = _text_arg(run_id, "run id")
        name = _text_arg(name, "signal name")
        payload_text = encode(
            payload, what=f"payload of signal {name!r}", max_size=self.settings.max_value_size
        )
        await self._ensure_ready()
        row = await self._load_for(definition, run_id)
        if row is None:
            raise WorkflowNotFoundError(
                f"Workflow not found: {run_id}", workflow_id=run_id, workflow_name=definition.name
            )
        waiting = self._waiting_row(row)
        if waiting.waiting_for != name:
            raise SignalMismatchError(
                f"Workflow waiting for signal {waiting.waiting_for!r}, received {name!r}",
                workflow_id=run_id,
                workflow_name=definition.name,
                step=waiting.name,
                details={"expected": waiting.waiting_for, "received": name},
            )
        done = replace(
            waiting, status=StepStatus.COMPLETED.value, completed_at=utcnow(), output=payload_text
        )
        try:
            applied = await self._store.apply(
                Transition(
                    run_id=run_id,
                    expected_version=row.version,
                    updated_at=utcnow(),
                    claim=claim_for(self.settings),
                    status=WorkflowStatus.RUNNING.value,
                    wait_name=None,
                    update_step=replace(done, fence=row.fence + 1),
                )
            )
        except ConcurrentModificationError:
            fresh = await self._store.load(run_id)
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
        driver = self._driver_from(
            definition, row, applied, rows=rows, data=replay_data(rows.values())
        )
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
        return await self._drive(driver, done.index + 1)

    @staticmethod
    def _waiting_row(row: RunRow) -> Any:
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

    async def resume(
        self, flow: FlowLike, run_id: str, from_step: int | str | None = None
    ) -> FluxResult | None:
        """Continue a stopped run from ``from_step`` (index or name; default: where it
        stopped), with ``ctx.data`` as it was when that step first started.

        Returns None when no run has this id.

        Raises:
            WorkflowNameMismatchError, WorkflowDefinitionChangedError: the run does not
                belong to this workflow as it is now.
            StepNotFoundError, InvalidStepIndexError: ``from_step`` names no step.
            CommittedStepError: ``from_step`` is a commit step that already completed.
            InvalidStateError: an earlier step was already compensated (undone).
            RunBusyError: another executor is running the run now.
        """
        definition = self._definition(flow)
        started = time.perf_counter()
        run_id = _text_arg(run_id, "run id")
        if (from_step is not None and not isinstance(from_step, str | int)) or isinstance(
            from_step, bool
        ):
            raise InvalidArgumentError(
                f"from_step must be a step index, a step name or None, got {from_step!r}"
            )
        await self._ensure_ready()
        row = await self._load_for(definition, run_id)
        if row is None:
            return None
        start = self._start_index(definition, row, from_step)
        rows = {r.index: r for r in row.steps}
        undone = [
            i
            for i, r in rows.items()
            if i < start
            and r.status in (StepStatus.COMPENSATED.value, StepStatus.COMPENSATING.value)
        ]
        if undone:
            first = min(undone)
            raise InvalidStateError(
                f"run {run_id!r} was rolled back: step {definition.steps[first].name!r} "
                f"(index {first}) was already compensated; resume from index {first} or earlier",
                workflow_id=run_id,
                workflow_name=definition.name,
                step=definition.steps[start].name,
            )
        keep = tuple(
            i
            for i, r in rows.items()
            if i >= start and definition.steps[i].commit and r.status == StepStatus.COMPLETED.value
        )
        applied = await self._store.apply(
            Transition(
                run_id=run_id,
                expected_version=row.version,
                updated_at=utcnow(),
                claim=claim_for(self.settings),
                status=WorkflowStatus.PENDING.value,
                current_step=start,
                error=None,
                completed_at=None,
                wait_name=None,
                delete_steps_from=start,
                keep_steps=keep,
            )
        )
        kept = {i: r for i, r in rows.items() if i < start or i in keep}
        driver = self._driver_from(
            definition,
            row,
            applied,
            rows=kept,
            data=replay_data(kept.values(), before=start),
        )
        driver.started = started
        driver.status = WorkflowStatus.PENDING
        return await self._drive(driver, start)

    @staticmethod
    def _start_index(
        definition: WorkflowDefinition, row: RunRow, from_step: int | str | None
    ) -> int:
        count = len(definition.steps)
        if from_step is None:
            start = min(max(row.current_step, 0), count - 1)
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
        if step.commit and recorded is not None and recorded.status == StepStatus.COMPLETED.value:
            raise CommittedStepError(
                f"step {step.name!r} is a commit step that already completed; it never runs "
                "again in this run",
                workflow_id=row.id,
                workflow_name=definition.name,
                step=step.name,
            )
        return start

    async def retry_step(self, flow: FlowLike, run_id: str, step: str) -> FluxResult | None:
        """Run a run again from the named step (``resume`` from it)."""
        if not isinstance(step, str):
            raise InvalidArgumentError(f"step must be a step name, got {step!r}")
        return await self.resume(flow, run_id, from_step=step)

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
        run_id = _text_arg(run_id, "run id")
        await self._ensure_ready()
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

    async def delete(self, run_id: str) -> bool:
        """Delete a run and its history; False if there was none.

        Raises:
            RunBusyError: the run is being executed right now.
        """
        run_id = _text_arg(run_id, "run id")
        await self._ensure_ready()
        row = await self._store.load(run_id)
        if row is None:
            return False
        if run_id in self._keeper.holding():
            raise InvalidStateError(f"run {run_id!r} is being executed by this engine")
        return await self._store.delete(run_id)


def driver_error_text(driver: RunDriver) -> str:
    """The stored error of the step whose failure started a rollback."""
    for index in sorted(driver.rows):
        row = driver.rows[index]
        if row.status == StepStatus.FAILED.value:
            return row.error or "step failed"
    return "step failed"
