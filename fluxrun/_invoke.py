"""Calling user code for one attempt: sync or async, with a timeout, and reporting mistakes.

Everything that touches a handler's call lives here, so the runner only decides what an
outcome means:

* an async handler runs on the event loop under ``asyncio.timeout``; each slice of it that
  runs without awaiting is timed, and one that holds the loop for over
  :data:`BLOCKING_WARN_SECONDS` is named in a warning (a loop that is held cannot fire the
  timeout either);
* a sync handler runs on the engine's thread pool; a thread cannot be stopped, so after a
  timeout the attempt's thread is kept (:class:`Attempt.thread`) and the runner waits for it
  before starting the next attempt: one step never has two attempts running at once;
* a ``wait()`` made during the attempt but not returned fails the attempt;
* :func:`describe` turns any exception into what is stored: qualified type, message and a
  bounded traceback, even when the exception's ``__str__`` raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import time
import traceback as tb
from collections.abc import Callable, Generator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from ._context import MADE_WAITS, Marker, WorkflowContext
from .errors import DefinitionError, EngineClosedError, StepTimeoutError

__all__ = [
    "BLOCKING_WARN_SECONDS",
    "MAX_TRACEBACK",
    "Attempt",
    "ErrorInfo",
    "call_handler",
    "describe",
    "is_async",
    "safe_message",
]

BLOCKING_WARN_SECONDS = 1.0
"""A handler slice that holds the event loop longer than this is named in a warning."""

MAX_TRACEBACK = 16 * 1024
"""Stored tracebacks keep at most this many characters (the end, where the error is)."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What is stored of an exception."""

    type: str
    message: str
    traceback: str | None


def _storable(text: str) -> str:
    if "\x00" in text or not text.isascii():
        # PostgreSQL refuses NUL in text and no database encodes a lone surrogate; escape
        # both, the same way on every backend.
        text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_message(error: BaseException) -> str:
    """``str(error)`` (or the type name when empty), even when ``__str__`` itself raises."""
    try:
        text = str(error) or type(error).__name__
    except Exception as exc:
        text = f"<{type(error).__name__}: str() raised {type(exc).__name__}>"
    return _storable(text)


def type_name(error: BaseException) -> str:
    """The qualified name of the exception's class, e.g. ``builtins.KeyError``."""
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(error: BaseException) -> ErrorInfo:
    """Type, message and traceback of ``error``; the traceback keeps its last 16 KB."""
    try:
        text = "".join(tb.format_exception(error))
    except Exception:  # pragma: no cover - format_exception guards __str__ itself
        text = ""
    if len(text) > MAX_TRACEBACK:
        text = "... (traceback truncated)\n" + text[-(MAX_TRACEBACK - 30) :]
    return ErrorInfo(type_name(error), safe_message(error), _storable(text) or None)


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine (not cached: handlers must not be kept alive)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


@dataclass(slots=True)
class Attempt:
    """The attempts of one step (or compensation) being made, besides their results."""

    run_id: str
    workflow: str
    step: str
    kind: str
    """``"step"`` or ``"compensation of step"``."""
    warn: Callable[[str], None]
    number: int = 1
    thread: concurrent.futures.Future[Any] | None = None
    """The thread of a sync attempt that timed out and may still be running."""

    @property
    def label(self) -> str:
        """``"<workflow>/<run id> step 'name'"`` for log lines (built only when logging)."""
        return f"{self.workflow}/{self.run_id} {self.kind} {self.step!r}"

    def timed_out(self, timeout: float) -> StepTimeoutError:
        """The error of an attempt that ran past ``timeout`` seconds."""
        return StepTimeoutError(
            f"step {self.step!r} timed out after {timeout:g}s (attempt {self.number})",
            workflow_id=self.run_id,
            workflow_name=self.workflow,
            step=self.step,
        )


def _check_slice(attempt: Attempt, timeout: float | None, t0: float) -> None:
    """Warn if a slice of an async handler held the event loop since ``t0`` for too long."""
    held = time.perf_counter() - t0
    if held > BLOCKING_WARN_SECONDS:
        extra = ""
        if timeout is not None and held > timeout:
            extra = f" (longer than its {timeout:g}s timeout, which cannot interrupt it)"
        attempt.warn(
            f"{attempt.label} blocked the event loop for {held:.1f}s{extra}; use await "
            "(asyncio.sleep, async I/O) or a sync def handler, which runs in a thread"
        )


_NOT_STARTED: Any = object()


class _Timed:
    """Awaits a coroutine, timing each slice it runs without yielding to the event loop.

    ``first`` is what the coroutine yielded from a first slice already run by the caller
    (see :func:`call_handler`), or :data:`_NOT_STARTED`.
    """

    __slots__ = ("_attempt", "_coro", "_first", "_timeout")

    def __init__(
        self, coro: Any, attempt: Attempt, timeout: float | None, first: Any = None
    ) -> None:
        self._coro = coro
        self._attempt = attempt
        self._timeout = timeout
        self._first = first

    def _check(self, t0: float) -> None:
        _check_slice(self._attempt, self._timeout, t0)

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        if self._first is not _NOT_STARTED:
            try:
                value = yield self._first
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                value, error = None, exc
        while True:
            t0 = time.perf_counter()
            try:
                if error is None:
                    yielded = coro.send(value)
                else:
                    yielded = coro.throw(error)
            except StopIteration as stop:
                self._check(t0)
                return stop.value
            except BaseException:
                self._check(t0)
                raise
            self._check(t0)
            try:
                value = yield yielded
                error = None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                value, error = None, exc


async def _limited(awaitable: Any, timeout: float, attempt: Attempt) -> Any:
    scope = asyncio.timeout(timeout)
    try:
        async with scope:
            return await awaitable
    except TimeoutError as exc:
        if scope.expired():
            raise attempt.timed_out(timeout) from exc
        raise


def _check_waits(made: list[Marker], result: Any, step: str) -> None:
    for marker in made:
        if marker is not result:
            call = marker.call_text()
            raise DefinitionError(
                f"step {step!r} called {call} but did not return it; "
                f"write `return {call}` to suspend the run",
                step=step,
            )


async def call_handler(
    fn: Callable[[WorkflowContext], Any],
    fn_is_async: bool,
    ctx: WorkflowContext,
    timeout: float | None,
    *,
    attempt: Attempt,
    executor: Callable[[], Executor],
) -> Any:
    """Run one attempt of ``fn``; return its result or raise its error."""
    made: list[Marker] = []
    token = MADE_WAITS.set(made)
    try:
        if fn_is_async and timeout is None:
            # The first slice runs right here: most handlers finish in it, and then no
            # wrapper is needed (this runs for every step).
            coro = fn(ctx)
            t0 = time.perf_counter()
            try:
                first = coro.send(None)
            except StopIteration as stop:
                _check_slice(attempt, None, t0)
                result = stop.value
            except BaseException:
                _check_slice(attempt, None, t0)
                raise
            else:
                _check_slice(attempt, None, t0)
                result = await _Timed(coro, attempt, None, first)
        elif fn_is_async:
            assert timeout is not None
            timed = _Timed(fn(ctx), attempt, timeout, _NOT_STARTED)
            result = await _limited(timed, timeout, attempt)
        else:
            result = await _call_sync(fn, ctx, timeout, attempt, executor)
        if result is not None and inspect.isawaitable(result):
            result = await result
    finally:
        MADE_WAITS.reset(token)
    if made:
        _check_waits(made, result, ctx.step)
    return result


async def _call_sync(
    fn: Callable[[WorkflowContext], Any],
    ctx: WorkflowContext,
    timeout: float | None,
    attempt: Attempt,
    executor: Callable[[], Executor],
) -> Any:
    # The copied context carries MADE_WAITS (the same list) into the thread.
    try:
        thread = executor().submit(contextvars.copy_context().run, fn, ctx)
    except RuntimeError as exc:  # the pool was shut down by close()
        raise _closed(attempt) from exc
    future = asyncio.wrap_future(thread)
    try:
        if timeout is None:
            return await future
        return await _limited(future, timeout, attempt)
    except StepTimeoutError:
        if not thread.done():
            attempt.thread = thread  # the runner waits for it before the next attempt
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if thread.cancelled() and (task is None or task.cancelling() == 0):
            # close() cancelled the queued call; nobody cancelled the caller.
            raise _closed(attempt) from None
        raise


def _closed(attempt: Attempt) -> EngineClosedError:
    return EngineClosedError(
        f"{attempt.label}: the engine was closed before the step's thread started; the run "
        "was released and another engine's recover() continues it"
    )


async def wait_for_thread(thread: concurrent.futures.Future[Any], grace: float) -> bool:
    """Wait up to ``grace`` seconds for a timed-out attempt's thread; True if it returned."""
    if thread.done():
        return True
    done, _ = await asyncio.wait({asyncio.wrap_future(thread)}, timeout=grace)
    return bool(done)
