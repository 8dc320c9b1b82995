"""``FluxClient``: start, watch and steer runs that workers drive, without workflow code.

A web app, a script or the CLI uses a client on the same database as the workers: it writes
rows (a new run, a signal, a cancel or pause request) and reads them, and never runs a step.
It is an engine whose scheduler never starts, so every call means exactly what it means on
:class:`~fluxrun.FluxEngine`.
"""

from __future__ import annotations

import builtins
import datetime as dt
from types import TracebackType
from typing import Any

from ._codec import DEFAULT_MAX_SIZE
from ._control import RunHandle, check_priority, opt_text, prepare_run, start_run
from ._definition import WorkflowDefinition
from ._engine import FluxEngine
from ._named import prepare_named_run
from ._options import naming, text_arg
from ._records import StepAttempt, WorkflowFilter, WorkflowState
from ._registry import FlowLike, Registry
from ._retry import seconds
from ._schedules import ScheduleInfo
from .errors import DefinitionError, InvalidArgumentError
from .storage._base import Store
from .storage._workers import WorkerInfo

__all__ = ["FluxClient"]


class FluxClient:
    """Everything of :class:`~fluxrun.FluxEngine` that runs no user code, for the processes
    that start and steer runs which workers drive (``fluxrun worker``)::

        async with FluxClient(PostgresStorage(dsn)) as client:
            handle = await client.start("order", {"order_id": "A17"})
            await client.send_signal(handle.id, "approved", {"by": "ann"})
            result = await handle.result(timeout=60)

    ``start`` takes a workflow by name: the run is stored with its input as given, and the
    first worker that has the workflow records its steps and checks the input (an input it
    refuses fails the run before any step). Given a workflow object instead, the client
    checks the input at once, as an engine does.

    Args:
        storage: The store the workers use (``PostgresStorage``, or ``SQLiteStorage`` for
            processes on one machine).
        poll_interval: Seconds between looks at the store while ``RunHandle.result`` waits.
        max_value_size: Largest encoded input or signal payload, in bytes.
    """

    def __init__(
        self,
        storage: Store,
        *,
        poll_interval: float | dt.timedelta = 1.0,
        max_value_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if not isinstance(storage, Store):
            raise InvalidArgumentError(
                "FluxClient storage must be a fluxrun store (PostgresStorage, SQLiteStorage, "
                f"MemoryStorage), got {type(storage).__name__}"
            )
        self._engine = FluxEngine(
            storage=storage, poll_interval=poll_interval, max_value_size=max_value_size
        )
        self._engine._drives = False

    @property
    def storage(self) -> Store:
        """The store this client reads and writes."""
        return self._engine.storage

    async def init(self) -> None:
        """Prepare the store (create or migrate its schema); idempotent."""
        await self._engine.init()

    async def close(self) -> None:
        """Close the store."""
        await self._engine.close()

    async def __aenter__(self) -> FluxClient:
        await self.init()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(
        self,
        workflow: str | FlowLike,
        input: Any = None,
        *,
        id: str | None = None,
        idempotency_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        priority: int = 0,
    ) -> RunHandle:
        """Store a new run of ``workflow`` (its name, or the workflow itself) for a worker to
        drive, and return at once. Idempotent by ``idempotency_key`` or ``id`` as
        :meth:`FluxEngine.start` is; a higher ``priority`` is claimed first.

        Raises:
            InvalidInputError: the input cannot be stored (or, with a workflow object, failed
                its validation).
            IdempotencyConflictError: the key (or id) is taken by a run with another input.
        """
        engine = self._engine
        priority = check_priority(priority)
        wait = None
        if delay is not None:
            try:
                wait = seconds(delay, "delay", allow_zero=True)
            except DefinitionError as exc:
                raise InvalidArgumentError(exc.message) from None
        run_id = opt_text(id, "id")
        key = opt_text(idempotency_key, "idempotency_key")
        if isinstance(workflow, str):
            name = text_arg(workflow, "workflow name")
            new = prepare_named_run(
                engine._runtime,
                name,
                input,
                run_id=run_id,
                idempotency_key=key,
                delay=wait,
                priority=priority,
            )
        else:
            definition: WorkflowDefinition = Registry().resolve(workflow)
            new = prepare_run(
                engine._runtime,
                definition,
                input,
                run_id=run_id,
                idempotency_key=key,
                delay=wait,
                priority=priority,
            )
        await engine._ensure_ready()
        with naming(new.row.id, new.row.name):
            started_id, created = await start_run(engine._runtime, new, own=False)
        return RunHandle(engine, started_id, created=created)

    def handle(self, run_id: str) -> RunHandle:
        """A handle on an existing run, to wait for its result or steer it."""
        return self._engine.handle(run_id)

    async def send_signal(
        self, run_id: str, name: str, payload: Any = None, *, dedupe_key: str | None = None
    ) -> bool:
        """Put a signal in a run's inbox (see :meth:`FluxEngine.send_signal`)."""
        return await self._engine.send_signal(run_id, name, payload, dedupe_key=dedupe_key)

    async def cancel(self, run_id: str, *, reason: str | None = None) -> bool:
        """Ask for a run's cancel (see :meth:`FluxEngine.cancel`); its worker carries it out."""
        return await self._engine.cancel(run_id, reason=reason)

    async def pause(self, run_id: str) -> bool:
        """Ask for a run's pause (see :meth:`FluxEngine.pause`)."""
        return await self._engine.pause(run_id)

    async def unpause(self, run_id: str) -> bool:
        """Make a paused run due again (see :meth:`FluxEngine.unpause`)."""
        return await self._engine.unpause(run_id)

    async def get(self, run_id: str) -> WorkflowState | None:
        """The stored state of a run, or None (its input as stored: plain JSON values)."""
        return await self._engine.get(run_id)

    async def list(self, filter: WorkflowFilter | None = None) -> builtins.list[WorkflowState]:
        """Runs matching ``filter``, newest first."""
        return await self._engine.list(filter)

    async def counts(self, name: str | None = None) -> dict[str, int]:
        """How many runs are in each status (of workflow ``name``, or of all)."""
        if name is not None:
            name = text_arg(name, "workflow name")
        await self._engine._ensure_ready()
        return await self.storage.counts(name)

    async def schedule(
        self,
        id: str,
        cron: str | None = None,
        workflow: str | FlowLike | None = None,
        input: Any = None,
        *,
        every: dt.timedelta | float | None = None,
        timezone: str = "UTC",
        enabled: bool = True,
    ) -> str:
        """Store a schedule of ``workflow`` (its name, or the workflow itself) that the
        workers fire (see :meth:`FluxEngine.schedule`); its input is checked by the engine
        that starts each tick's run when given by name."""
        return await self._engine.schedule(
            id, cron, workflow, input, every=every, timezone=timezone, enabled=enabled
        )

    async def unschedule(self, id: str) -> bool:
        """Delete a schedule (see :meth:`FluxEngine.unschedule`)."""
        return await self._engine.unschedule(id)

    async def list_schedules(self) -> builtins.list[ScheduleInfo]:
        """Every stored schedule, by id."""
        return await self._engine.list_schedules()

    async def workers(self) -> builtins.list[WorkerInfo]:
        """The engines and workers that drive (or drove) runs on this store (see
        :meth:`FluxEngine.workers`)."""
        return await self._engine.workers()

    async def attempts(self, run_id: str) -> builtins.list[StepAttempt]:
        """Every attempt of every step and compensation of a run (see
        :meth:`FluxEngine.attempts`)."""
        return await self._engine.attempts(run_id)

    def __repr__(self) -> str:
        return f"FluxClient({self.storage!r})"
