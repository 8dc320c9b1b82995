"""Batches: many runs with a concurrency limit and progress (SPEC §7).

``execute_batch`` / ``execute_many`` run a list of inputs in this process: one ``execute``
per item, at most ``concurrency`` at once, first come first served, and return every
item's outcome in input order. ``start_batch`` stores a *durable* batch instead: its
items are runs created up front in one bulk insert, which every engine on the store
drives (the batch's ``concurrency`` holds across all of them, enforced in the claim), and
which survives restarts; :class:`BatchHandle` reads its progress, waits for its results
and cancels it.

What an item comes to (``BatchItemResult.status``):

* ``"succeeded"``: its run completed (``success`` is True only then);
* ``"failed"``: its run ended ``failed``, ``rolled_back``, ``compensation_failed`` or
  ``cancelled``, or its input was refused (``result`` is None, ``error`` the
  ``InvalidInputError``) or the call raised;
* ``"waiting"``: its run is suspended on a signal or paused: it needs something from
  outside, so the batch does not wait for it (``result`` is that suspended result, and
  it is not a failure: ``continue_on_error=False`` goes on);
* ``"not_run"``: it never started because the batch stopped first (``error`` is a
  :class:`~fluxrun.errors.BatchItemNotRunError`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._control import prepare_run
from ._definition import WorkflowDefinition
from ._driver import utcnow
from ._records import FluxResult, WorkflowStatus
from ._registry import FlowLike, Registry
from ._runtime import Runtime, stored_result
from ._scheduler import Scheduler
from ._state import to_state
from .errors import (
    BatchItemNotRunError,
    FluxError,
    InvalidArgumentError,
    InvalidInputError,
    WorkflowNotFoundError,
)
from .storage._base import RunRow, Store
from .storage._batch import FAILURE_STATUSES, NOT_RUN, BatchRow, batch_category

__all__ = ["BatchHandle", "BatchItemResult", "BatchProgress", "BatchResult", "Batches"]

ProgressCallback = Callable[[int, int, "BatchItemResult"], Any]

_MAX_CONCURRENCY = 2**31 - 1
_MAX_RESULT_POLL = 0.25


@dataclass(frozen=True, slots=True)
class BatchItemResult:
    """The outcome of one item of a batch (see the module docs for ``status``).

    Attributes:
        index: The item's position in the inputs.
        input: The input as given (``execute_batch``) or as stored (a durable batch).
        result: The run's result; None when the item did not run or its input was refused.
        error: Why it failed or did not run (the run's error, the refusal), else None.
        success: Whether the run completed.
        status: ``"succeeded"``, ``"failed"``, ``"waiting"`` or ``"not_run"``.
        run_id: The item's run, when one was created.
    """

    index: int
    input: Any
    result: FluxResult | None
    error: BaseException | None
    success: bool
    status: str
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Every item's outcome, in input order; ``succeeded + failed + waiting + not_run ==
    total``. ``duration_ms`` is the batch's wall time (for a durable batch: of the wait in
    ``results()``)."""

    total: int
    succeeded: int
    failed: int
    results: tuple[BatchItemResult, ...]
    duration_ms: float
    waiting: int = 0
    not_run: int = 0


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Where a durable batch stands, counted from its runs.

    ``status`` is ``"running"``, ``"completed"`` (nothing pending or running any more),
    ``"stopped"`` (a failed item stopped a ``continue_on_error=False`` batch) or
    ``"cancelled"``. ``pending``: not started; ``running``: running, claimed, asleep or
    backing off; ``waiting``: suspended on a signal or paused; ``not_run``: will never
    start (the batch stopped).
    """

    id: str
    status: str
    total: int
    pending: int
    running: int
    waiting: int
    succeeded: int
    failed: int
    not_run: int

    @property
    def done(self) -> int:
        """Items whose outcome is known: succeeded, failed, waiting or not run."""
        return self.succeeded + self.failed + self.waiting + self.not_run

    @property
    def finished(self) -> bool:
        """Whether nothing is pending or running any more (``results()`` returns)."""
        return self.pending == 0 and self.running == 0


def _check_concurrency(concurrency: object) -> int:
    if type(concurrency) is not int or not 1 <= concurrency <= _MAX_CONCURRENCY:
        raise InvalidArgumentError(f"batch concurrency must be an int >= 1, got {concurrency!r}")
    return concurrency


def _listed(inputs: object, what: str) -> list[Any]:
    # A str, bytes or a mapping is iterable but almost surely not meant as a list of items.
    if isinstance(inputs, str | bytes | bytearray | Mapping) or not isinstance(inputs, Iterable):
        raise InvalidArgumentError(
            f"{what} must be an iterable of items (a list, a tuple, a generator), "
            f"got {type(inputs).__name__}"
        )
    return list(inputs)


def _check_callback(on_progress: object) -> ProgressCallback | None:
    if on_progress is not None and not callable(on_progress):
        raise InvalidArgumentError(f"on_progress must be callable or None, got {on_progress!r}")
    return on_progress


def item_from_result(index: int, value: Any, result: FluxResult) -> BatchItemResult:
    """What an item whose run came to ``result`` counts as."""
    status = result.status
    if status is WorkflowStatus.COMPLETED:
        return BatchItemResult(index, value, result, None, True, "succeeded", result.id)
    if status.value in FAILURE_STATUSES:
        error = result.error or FluxError(f"run ended {status.value}", workflow_id=result.id)
        return BatchItemResult(index, value, result, error, False, "failed", result.id)
    return BatchItemResult(index, value, result, None, False, "waiting", result.id)


def summary(items: list[BatchItemResult], started: float) -> BatchResult:
    """The :class:`BatchResult` of ``items`` (in input order)."""
    counts = {"succeeded": 0, "failed": 0, "waiting": 0, "not_run": 0}
    for item in items:
        counts[item.status] += 1
    return BatchResult(
        total=len(items),
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        results=tuple(items),
        duration_ms=(time.perf_counter() - started) * 1000.0,
        waiting=counts["waiting"],
        not_run=counts["not_run"],
    )


class BatchHandle:
    """A durable batch started by ``start_batch`` (or found by ``batch_handle``)."""

    __slots__ = ("_engine", "id")

    def __init__(self, engine: Batches, batch_id: str) -> None:
        self._engine = engine
        self.id = batch_id

    async def _batch(self) -> BatchRow:
        engine = self._engine
        await engine._ensure_ready()
        batch = await engine._store.load_batch(self.id)
        if batch is None:
            raise WorkflowNotFoundError(f"Batch not found: {self.id}")
        return batch

    async def progress(self) -> BatchProgress:
        """Count the batch's items by where they stand (see :class:`BatchProgress`).

        Raises:
            WorkflowNotFoundError: no batch has this id.
        """
        store = self._engine._store
        batch = await self._batch()
        counts = await store.batch_counts(self.id)
        if (
            batch.status == "running"
            and not batch.continue_on_error
            and counts.get("failed", 0)
            and counts.get("pending", 0)
        ):
            # A failed item stops the batch; any engine's claim does it too, this makes it
            # so even when no engine with the workflow runs.
            await store.stop_batch(self.id, "stopped")
            batch = await self._batch()
            counts = await store.batch_counts(self.id)
        status = batch.status
        if status == "running" and not counts.get("pending", 0) and not counts.get("running", 0):
            status = "completed"
        return BatchProgress(
            id=self.id,
            status=status,
            total=batch.total,
            pending=counts.get("pending", 0),
            running=counts.get("running", 0),
            waiting=counts.get("waiting", 0),
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            not_run=counts.get("not_run", 0),
        )

    async def results(self, timeout: float | None = None) -> BatchResult:
        """Wait until no item is pending or running (whichever engines drive them), then
        return every item's outcome in input order.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the batch goes on).
            WorkflowNotFoundError: no batch has this id.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise InvalidArgumentError(
                f"results timeout must be seconds >= 0 or None, got {timeout!r}"
            )
        engine = self._engine
        started = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = min(engine._runtime.poll_interval, _MAX_RESULT_POLL)
        while not (await self.progress()).finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {self.id!r} did not finish within {timeout:g}s")
            await asyncio.sleep(poll)
        rows = await engine._store.batch_runs(self.id)
        return summary([self._item(i, row, started) for i, row in enumerate(rows)], started)

    def _item(self, index: int, row: RunRow, started: float) -> BatchItemResult:
        value = to_state(row, self._engine._registry.input_spec(row.name)).input
        if row.status == "cancelled" and row.wait_kind == NOT_RUN:
            error = BatchItemNotRunError(
                row.error or "not run", workflow_id=row.id, workflow_name=row.name
            )
            return BatchItemResult(index, value, None, error, False, "not_run", row.id)
        if batch_category(row.status, row.wait_kind, row.owner, row.wait_name) == "pending":
            # Only when the batch is read as it finishes: report what is stored.
            return BatchItemResult(index, value, None, None, False, "waiting", row.id)
        return item_from_result(index, value, stored_result(row, started))

    async def cancel(self) -> bool:
        """Cancel the batch: items not started are never run (reported ``not_run``), the
        running and waiting ones are cancelled like ``engine.cancel`` (compensated, ended
        ``cancelled``). False if it was cancelled already.

        Raises:
            WorkflowNotFoundError: no batch has this id.
        """
        batch = await self._batch()
        if batch.status == "cancelled":
            return False
        rt = self._engine._runtime
        asked = await self._engine._store.stop_batch(self.id, "cancelled")
        for run_id in asked:
            rt.interrupt(run_id, "cancel", f"batch {self.id!r} cancelled")
        rt.on_idle()  # the others are due now: a claim carries their cancel out
        return True

    def __repr__(self) -> str:
        return f"BatchHandle(id={self.id!r})"


class Batches:
    """The engine's batch calls (a mixin of :class:`~fluxrun.FluxEngine`)."""

    _runtime: Runtime
    _registry: Registry
    _scheduler: Scheduler
    _store: Store

    async def _ensure_ready(self) -> None:
        raise NotImplementedError

    async def execute(
        self,
        flow: FlowLike,
        input: Any = None,
        *,
        id: str | None = None,
        idempotency_key: str | None = None,
    ) -> FluxResult:
        raise NotImplementedError

    async def execute_batch(
        self,
        flow: FlowLike,
        inputs: Iterable[Any],
        *,
        concurrency: int = 10,
        continue_on_error: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> BatchResult:
        """Run ``flow`` once per input here, at most ``concurrency`` at once (first come
        first served), and return every item's outcome in input order.

        ``on_progress(done, total, item)`` (sync or async) is called once per item as it
        ends, ``done`` counting up to ``total``; an exception it raises is logged and does
        not affect the batch. With ``continue_on_error=False`` the first failed item stops
        the batch: items in flight finish, the others are not run (``status="not_run"``).
        An invalid input fails only its own item. Cancelling the call cancels the items in
        flight (their runs are released for recovery).

        Raises:
            InvalidArgumentError: a bad ``inputs``, ``concurrency`` or ``on_progress``.
            UnknownWorkflowError: ``flow`` names no registered workflow.
        """
        definition = self._registry.resolve(flow)
        values = _listed(inputs, "inputs")
        return await self._run_batch(
            [(definition, v) for v in values],
            _check_concurrency(concurrency),
            bool(continue_on_error),
            _check_callback(on_progress),
        )

    async def execute_many(
        self,
        items: Iterable[tuple[FlowLike, Any]],
        *,
        concurrency: int = 10,
        continue_on_error: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> BatchResult:
        """:meth:`execute_batch` for items of several workflows: ``items`` is an iterable of
        ``(flow, input)`` pairs; ``BatchItemResult.input`` is the pair's input.

        Raises:
            InvalidArgumentError: an item is not a ``(flow, input)`` pair, or a bad option.
            UnknownWorkflowError: a flow names no registered workflow (nothing runs).
        """
        pairs: list[tuple[WorkflowDefinition, Any]] = []
        for index, item in enumerate(_listed(items, "items")):
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise InvalidArgumentError(
                    f"execute_many item {index} must be a (flow, input) pair, got {item!r}"
                )
            pairs.append((self._registry.resolve(item[0]), item[1]))
        return await self._run_batch(
            pairs,
            _check_concurrency(concurrency),
            bool(continue_on_error),
            _check_callback(on_progress),
        )

    async def _run_batch(
        self,
        pairs: list[tuple[WorkflowDefinition, Any]],
        concurrency: int,
        continue_on_error: bool,
        on_progress: ProgressCallback | None,
    ) -> BatchResult:
        started = time.perf_counter()
        total = len(pairs)
        items: list[BatchItemResult | None] = [None] * total
        order = iter(range(total))  # shared by the workers: FIFO, each index taken once
        stopped = False
        done = 0
        reporting = asyncio.Lock()  # one on_progress call at a time, done strictly rising
        log = self._runtime.emitter.log

        async def report(item: BatchItemResult) -> None:
            nonlocal done
            async with reporting:
                done += 1
                if on_progress is None:
                    return
                try:
                    outcome = on_progress(done, total, item)
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception as exc:  # a callback's bug must not break the batch
                    log.warning(f"batch on_progress raised {exc!r}; the batch goes on")

        async def worker() -> None:
            nonlocal stopped
            for index in order:
                definition, value = pairs[index]
                if stopped:
                    item = BatchItemResult(
                        index,
                        value,
                        None,
                        BatchItemNotRunError(
                            "not run: the batch stopped on an earlier item's failure",
                            workflow_name=definition.name,
                        ),
                        False,
                        "not_run",
                    )
                else:
                    item = await self._batch_item(index, definition, value)
                    if item.status == "failed" and not continue_on_error:
                        stopped = True
                items[index] = item
                await report(item)

        await self._ensure_ready()
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, total)):
                group.create_task(worker())
        return summary([i for i in items if i is not None], started)

    async def _batch_item(
        self, index: int, definition: WorkflowDefinition, value: Any
    ) -> BatchItemResult:
        try:
            result = await self.execute(definition, value)
        except Exception as exc:  # a refused input, a store error: this item failed
            run_id = exc.workflow_id if isinstance(exc, FluxError) else None
            return BatchItemResult(index, value, None, exc, False, "failed", run_id)
        return item_from_result(index, value, result)

    async def start_batch(
        self,
        flow: FlowLike,
        inputs: Iterable[Any],
        *,
        concurrency: int = 10,
        continue_on_error: bool = True,
    ) -> BatchHandle:
        """Store a durable batch: one run per input, created in one bulk insert, which the
        schedulers of every engine on the store with ``flow`` registered drive, at most
        ``concurrency`` at once across all of them, items in input order. It survives
        restarts. Returns at once.

        Every input is validated first; an invalid one raises and nothing is stored.

        Raises:
            InvalidInputError: an input failed validation (the message names its index).
            InvalidArgumentError: a bad ``inputs`` or ``concurrency``.
            StorageError: the store keeps no durable batches (a whole-state storage).
        """
        definition = self._registry.adopt(flow)
        values = _listed(inputs, "inputs")
        limit = _check_concurrency(concurrency)
        rows = []
        for index, value in enumerate(values):
            try:
                new = prepare_run(
                    self._runtime,
                    definition,
                    value,
                    run_id=None,
                    idempotency_key=None,
                    delay=None,
                )
            except InvalidInputError as exc:
                exc.message = f"batch item {index}: {exc.message}"
                exc.args = (exc.message, *exc.args[1:])
                exc.details = {"index": index, "cause": exc.details}
                raise
            rows.append(new.row)
        await self._ensure_ready()
        now = utcnow()
        batch = BatchRow(
            id=str(uuid.uuid4()),
            name=definition.name,
            total=len(rows),
            concurrency=limit,
            continue_on_error=bool(continue_on_error),
            status="running",
            created_at=now,
            updated_at=now,
        )
        await self._store.create_batch(batch, rows)
        self._scheduler.wake()
        return BatchHandle(self, batch.id)

    def batch_handle(self, batch_id: str) -> BatchHandle:
        """A handle on a durable batch by id (e.g. after a restart)."""
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidArgumentError(f"batch id must be a non-empty str, got {batch_id!r}")
        return BatchHandle(self, batch_id)
