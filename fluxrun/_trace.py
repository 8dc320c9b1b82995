"""Trace events, and delivering them to hooks, sinks and the logger without ever failing a run."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import InvalidArgumentError

__all__ = [
    "HOOK_NAMES",
    "TRACE_EVENT_TYPES",
    "Emitter",
    "FluxLogger",
    "FluxTraceEvent",
    "FluxTraceSink",
    "TraceEventType",
]

TraceEventType = Literal[
    "workflow:start",
    "workflow:complete",
    "workflow:error",
    "workflow:rollback_start",
    "workflow:rollback_complete",
    "step:start",
    "step:complete",
    "step:error",
    "step:skipped",
    "step:retry",
    "step:suspend",
    "step:compensate",
    "signal:received",
]

TRACE_EVENT_TYPES: tuple[str, ...] = TraceEventType.__args__  # type: ignore[attr-defined]

HOOK_NAMES = (
    "step_start",
    "step_complete",
    "step_error",
    "workflow_complete",
    "workflow_error",
)

_CAMEL = (
    ("step_name", "stepName"),
    ("step_index", "stepIndex"),
    ("commit", "commit"),
    ("retries", "retries"),
    ("max_retries", "maxRetries"),
    ("duration_ms", "duration"),
    ("error", "error"),
    ("status", "status"),
    ("input", "input"),
    ("data", "data"),
    ("meta", "meta"),
)


@dataclass(frozen=True, slots=True)
class FluxTraceEvent:
    """One thing that happened to a run. ``timestamp`` is epoch milliseconds."""

    type: TraceEventType
    timestamp: float
    workflow_id: str
    workflow_name: str
    step_name: str | None = None
    step_index: int | None = None
    commit: bool | None = None
    retries: int | None = None
    max_retries: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    status: str | None = None
    input: Any = None
    data: Any = None
    meta: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The @gravito/flux JSON shape: camelCase keys, absent fields left out."""
        out: dict[str, Any] = {
            "type": self.type,
            "timestamp": self.timestamp,
            "workflowId": self.workflow_id,
            "workflowName": self.workflow_name,
        }
        for attr, key in _CAMEL:
            value = getattr(self, attr)
            if value is not None:
                out[key] = dict(value) if attr == "meta" else value
        return out


@runtime_checkable
class FluxTraceSink(Protocol):
    """Anything with ``emit(event)``; ``emit`` may be a coroutine function."""

    def emit(self, event: FluxTraceEvent) -> Awaitable[None] | None:
        """Receive one event."""


class FluxLogger(Protocol):
    """The logger interface of @gravito/flux; a ``logging.Logger`` also fits."""

    def debug(self, message: str, /, *args: Any) -> None:
        """Log a debug message."""

    def info(self, message: str, /, *args: Any) -> None:
        """Log an informational message."""

    def error(self, message: str, /, *args: Any) -> None:
        """Log an error."""


class _Log:
    """Adapts a stdlib logger or any object with debug/info/warn(ing)/error."""

    __slots__ = ("_debug_enabled", "_is_std", "_logger", "_warn")

    def __init__(self, logger: object | None) -> None:
        if logger is None:
            logger = logging.getLogger("fluxrun")
        for method in ("debug", "info", "error"):
            if not callable(getattr(logger, method, None)):
                raise InvalidArgumentError(
                    f"logger must have debug/info/warn(ing)/error methods; {method} is missing"
                )
        warn = getattr(logger, "warning", None) or getattr(logger, "warn", None)
        if not callable(warn):
            raise InvalidArgumentError("logger must have a warning (or warn) method")
        self._logger: Any = logger
        self._warn: Callable[..., Any] = warn
        self._is_std = isinstance(logger, logging.Logger)

    def debug_enabled(self) -> bool:
        if self._is_std:
            return bool(self._logger.isEnabledFor(logging.DEBUG))
        return True

    def debug(self, message: str) -> None:
        self._safe(self._logger.debug, message)

    def info(self, message: str) -> None:
        self._safe(self._logger.info, message)

    def warning(self, message: str, exc: BaseException | None = None) -> None:
        if self._is_std:
            self._safe(self._warn, message, exc)
        else:
            self._safe(self._warn, message)

    def error(self, message: str, exc: BaseException | None = None) -> None:
        if self._is_std:
            self._safe(self._logger.error, message, exc)
        else:
            self._safe(self._logger.error, f"{message}: {exc!r}" if exc else message)

    def _safe(self, fn: Callable[..., Any], message: str, exc: BaseException | None = None) -> None:
        # A broken logger must not break a run either.
        try:
            if exc is not None:
                fn(message, exc_info=exc)
            else:
                fn(message)
        except Exception:  # pragma: no cover - nowhere left to report it
            pass


class Emitter:
    """Delivers events to sinks and the logger, and calls hooks; never raises."""

    def __init__(
        self, *, sinks: list[Any], hooks: Mapping[str, Callable[..., Any]], logger: object | None
    ) -> None:
        self.log = _Log(logger)
        self._sinks = sinks
        self._hooks = dict(hooks)

    @property
    def wants_events(self) -> bool:
        """Whether building an event is worth it (someone will receive it)."""
        return bool(self._sinks) or self.log.debug_enabled()

    def has_hook(self, name: str) -> bool:
        """Whether the hook ``name`` is set."""
        return name in self._hooks

    async def emit(self, event: FluxTraceEvent) -> None:
        """Send ``event`` to every sink in turn; a failing sink is logged and skipped."""
        if self.log.debug_enabled():
            self.log.debug(_describe(event))
        for sink in self._sinks:
            try:
                result = sink.emit(event)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.log.error(f"trace sink {sink!r} failed on {event.type}", exc)

    async def hook(self, name: str, *args: Any) -> None:
        """Call hook ``name`` if set; a failing hook is logged, never raised."""
        fn = self._hooks.get(name)
        if fn is None:
            return
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.log.error(f"hook {name} failed", exc)


def _describe(event: FluxTraceEvent) -> str:
    parts = [f"{event.type} {event.workflow_name}/{event.workflow_id}"]
    if event.step_name is not None:
        parts.append(f"step={event.step_name}")
    if event.status is not None:
        parts.append(f"status={event.status}")
    if event.retries is not None:
        parts.append(f"retry={event.retries}/{event.max_retries}")
    if event.duration_ms is not None:
        parts.append(f"duration={event.duration_ms:.1f}ms")
    if event.error is not None:
        parts.append(f"error={event.error!r}")
    return " ".join(parts)


def now_ms() -> float:
    """Epoch milliseconds, as trace timestamps use."""
    return time.time() * 1000.0
