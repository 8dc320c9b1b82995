"""A blocking facade over :class:`FluxEngine`, for code that is not async."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import threading
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from ._batches import BatchResult
from ._engine import FlowLike, FluxEngine
from ._records import FluxResult, StepAttempt, WorkflowFilter, WorkflowState
from ._schedules import ScheduleInfo
from .errors import InvalidStateError

__all__ = ["SyncFluxEngine"]

T = TypeVar("T")


class SyncFluxEngine:
    """The engine's API as plain blocking calls (Flask, Django, scripts).

    It runs a :class:`FluxEngine` on an event loop in a background thread; each method
    blocks until the engine's coroutine finishes and returns its result or raises its
    error. Takes the same keyword arguments as :class:`FluxEngine`. Use it as a context
    manager or call :meth:`close`.
    """

    def __init__(self, **engine_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fluxrun-sync", daemon=True
        )
        self._thread.start()
        try:
            self.engine: FluxEngine = self._call(_make(engine_options))
        except BaseException:
            self._stop()
            raise
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if getattr(self, "_closed", False):
            coro.close()
            raise InvalidStateError("this SyncFluxEngine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def init(self) -> None:
        """Prepare the store (optional: the first call does it)."""
        self._call(self.engine.init())

    def register(self, flow: FlowLike) -> Any:
        """Register a workflow (see :meth:`FluxEngine.register`)."""
        return self.engine.register(flow)

    def execute(self, flow: FlowLike, input: Any = None) -> FluxResult:
        """Start a run and drive it (see :meth:`FluxEngine.execute`)."""
        return self._call(self.engine.execute(flow, input))

    def execute_batch(self, flow: FlowLike, inputs: Iterable[Any], **options: Any) -> BatchResult:
        """Run a batch in the engine's process (see :meth:`FluxEngine.execute_batch`; a sync
        ``on_progress`` runs on the engine's loop thread)."""
        return self._call(self.engine.execute_batch(flow, inputs, **options))

    def execute_many(self, items: Iterable[tuple[FlowLike, Any]], **options: Any) -> BatchResult:
        """A batch of several workflows (see :meth:`FluxEngine.execute_many`)."""
        return self._call(self.engine.execute_many(items, **options))

    def signal(self, flow: FlowLike, run_id: str, name: str, payload: Any = None) -> FluxResult:
        """Signal a suspended run (see :meth:`FluxEngine.signal`)."""
        return self._call(self.engine.signal(flow, run_id, name, payload))

    def resume(
        self, flow: FlowLike, run_id: str, from_step: int | str | None = None
    ) -> FluxResult | None:
        """Resume a run (see :meth:`FluxEngine.resume`)."""
        return self._call(self.engine.resume(flow, run_id, from_step))

    def retry_step(self, flow: FlowLike, run_id: str, step: str) -> FluxResult | None:
        """Run again from a step (see :meth:`FluxEngine.retry_step`)."""
        return self._call(self.engine.retry_step(flow, run_id, step))

    def skip_compensation(self, flow: FlowLike, run_id: str, step: str, *, note: str) -> FluxResult:
        """Record a failed compensation as done by hand (see
        :meth:`FluxEngine.skip_compensation`)."""
        return self._call(self.engine.skip_compensation(flow, run_id, step, note=note))

    def attempts(self, run_id: str) -> list[StepAttempt]:
        """Every attempt of a run (see :meth:`FluxEngine.attempts`)."""
        return self._call(self.engine.attempts(run_id))

    def recover(self) -> list[FluxResult]:
        """Finish interrupted runs (see :meth:`FluxEngine.recover`)."""
        return self._call(self.engine.recover())

    def get(self, run_id: str) -> WorkflowState | None:
        """A run's stored state (see :meth:`FluxEngine.get`)."""
        return self._call(self.engine.get(run_id))

    def list(self, filter: WorkflowFilter | None = None) -> list[WorkflowState]:
        """Stored runs, newest first (see :meth:`FluxEngine.list`)."""
        return self._call(self.engine.list(filter))

    def delete(self, run_id: str) -> bool:
        """Delete a run (see :meth:`FluxEngine.delete`)."""
        return self._call(self.engine.delete(run_id))

    def schedule(
        self,
        id: str,
        cron: str | None = None,
        flow: FlowLike | None = None,
        input: Any = None,
        *,
        every: dt.timedelta | float | None = None,
        timezone: str = "UTC",
        enabled: bool = True,
    ) -> str:
        """Store a schedule (see :meth:`FluxEngine.schedule`)."""
        return self._call(
            self.engine.schedule(
                id, cron, flow, input, every=every, timezone=timezone, enabled=enabled
            )
        )

    def unschedule(self, id: str) -> bool:
        """Delete a schedule (see :meth:`FluxEngine.unschedule`)."""
        return self._call(self.engine.unschedule(id))

    def list_schedules(self) -> builtins.list[ScheduleInfo]:
        """Every stored schedule (see :meth:`FluxEngine.list_schedules`)."""
        return self._call(self.engine.list_schedules())

    def close(self, *, timeout: float = 10.0) -> None:
        """Close the engine and stop the background loop (see :meth:`FluxEngine.close`)."""
        if getattr(self, "_closed", True):
            return
        try:
            self._call(self.engine.close(timeout=timeout))
        finally:
            self._closed = True
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncFluxEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _make(options: dict[str, Any]) -> FluxEngine:
    # Built on the background loop so that everything it creates belongs to that loop.
    return FluxEngine(**options)
