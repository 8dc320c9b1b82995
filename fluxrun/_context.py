"""What a step sees (:class:`WorkflowContext`) and how it asks to wait (:func:`wait`)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._children import check_signal_name
from ._codec import validate_text
from ._records import StepExecution, WorkflowStatus
from .errors import InvalidArgumentError, SerializationError

__all__ = [
    "MADE_WAITS",
    "MAX_WAIT_SECONDS",
    "Flux",
    "Marker",
    "SleepMarker",
    "WaitMarker",
    "WorkflowContext",
    "duration_seconds",
    "sleep",
    "sleep_until",
    "wait",
]

MAX_WAIT_SECONDS = 100 * 365 * 86400.0
"""The longest sleep or wait timeout (a century): anything longer is surely a unit mistake."""


@dataclass(frozen=True, slots=True)
class WaitMarker:
    """Returned by a step handler to suspend the run until ``signal`` arrives (at most
    ``timeout`` seconds, when given)."""

    signal: str
    timeout: float | None = None

    def call_text(self) -> str:
        """How the handler wrote it, for error messages."""
        return f"wait({self.signal!r})"


@dataclass(frozen=True, slots=True)
class SleepMarker:
    """Returned by a step handler to suspend the run for ``seconds`` or until ``until``."""

    seconds: float | None = None
    until: dt.datetime | None = None

    def call_text(self) -> str:
        """How the handler wrote it, for error messages."""
        if self.until is not None:
            return f"sleep_until({self.until.isoformat()!r})"
        return f"sleep({self.seconds:g})"


Marker = WaitMarker | SleepMarker

MADE_WAITS: ContextVar[list[Marker] | None] = ContextVar("fluxrun_made_waits", default=None)
"""The waits and sleeps a running attempt made, so one made but not returned is reported."""


def _made(marker: Marker) -> None:
    made = MADE_WAITS.get()
    if made is not None:
        made.append(marker)


def duration_seconds(value: object, what: str, *, allow_zero: bool) -> float:
    if isinstance(value, dt.timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        raise InvalidArgumentError(
            f"{what} must be seconds (int or float) or a timedelta, got {type(value).__name__}"
        )
    if not math.isfinite(result) or result < 0 or (result == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgumentError(f"{what} must be a finite duration {bound}, got {value!r}")
    if result > MAX_WAIT_SECONDS:
        raise InvalidArgumentError(f"{what} must be at most 100 years, got {value!r}")
    return result


def wait(signal: str, *, timeout: float | dt.timedelta | None = None) -> WaitMarker:
    """Suspend the run after this step until the named signal is sent.

    Return it from a step handler: ``return wait("approved")``. The signal's payload becomes
    the step's ``output`` and ``ctx.signals[signal]``. A signal sent before the run reached
    this wait is waiting in the run's inbox and is taken at once. With ``timeout`` (seconds
    or timedelta), a wait that sees no signal in time fails its step with
    :class:`~fluxrun.errors.WaitTimeoutError` (the step's retries and compensation apply).
    """
    try:
        validate_text(signal, "signal name")
    except SerializationError as exc:
        raise InvalidArgumentError(exc.message) from None
    check_signal_name(signal)  # a reserved name would wait for a child run's outcome
    seconds = (
        None if timeout is None else duration_seconds(timeout, "wait timeout", allow_zero=False)
    )
    marker = WaitMarker(signal, seconds)
    _made(marker)
    return marker


def sleep(duration: float | dt.timedelta) -> SleepMarker:
    """Suspend the run after this step for ``duration`` (seconds or timedelta), durably.

    Return it from a step handler: ``return sleep(3600)``. The run holds nothing in memory
    while it sleeps; it wakes after any restart, never before its time (judged by the
    store's clock), and the step is recorded ``completed`` when it wakes (the handler is
    not called again).
    """
    marker = SleepMarker(seconds=duration_seconds(duration, "sleep duration", allow_zero=True))
    _made(marker)
    return marker


def sleep_until(when: dt.datetime) -> SleepMarker:
    """Suspend the run after this step until ``when`` (a timezone-aware datetime), durably.

    A time in the past wakes the run at once.
    """
    if not isinstance(when, dt.datetime):
        raise InvalidArgumentError(f"sleep_until needs a datetime, got {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgumentError(
            f"sleep_until needs a timezone-aware datetime (for example with tzinfo=UTC), "
            f"got {when!r}"
        )
    try:
        until = when.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidArgumentError(f"sleep_until: {when!r} is out of range in UTC") from None
    marker = SleepMarker(until=until)
    _made(marker)
    return marker


class Flux:
    """Namespace kept for familiarity with @gravito/flux: ``Flux.wait(...)`` is :func:`wait`."""

    wait = staticmethod(wait)
    sleep = staticmethod(sleep)
    sleep_until = staticmethod(sleep_until)


class WorkflowContext:
    """What a step handler receives.

    Attributes:
        id: The run's id.
        name: The workflow's name.
        input: The run's input (typed when the workflow declares an input model).
        data: Mutable dict shared by the steps; saved after every step.
        status: The run's status.
        current_step: Index of the running step.
        step: Name of the running step.
        attempt: 1-based attempt of the running step.
        signals: Signal name -> last payload received by this run.
        idempotency_key: ``"<run id>:<step name>"``, stable across retries and recoveries;
            pass it to outside APIs so a repeated attempt does not repeat their effect.
    """

    __slots__ = (
        "_history",
        "attempt",
        "current_step",
        "data",
        "id",
        "input",
        "name",
        "signals",
        "status",
        "step",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        input: Any,
        data: dict[str, Any],
        status: WorkflowStatus,
        current_step: int,
        step: str,
        attempt: int,
        signals: Mapping[str, Any],
        history: Callable[[], tuple[StepExecution, ...]],
    ) -> None:
        self.id = id
        self.name = name
        self.input = input
        self.data = data
        self.status = status
        self.current_step = current_step
        self.step = step
        self.attempt = attempt
        self.signals: Mapping[str, Any] = MappingProxyType(dict(signals))
        self._history = history

    @property
    def history(self) -> tuple[StepExecution, ...]:
        """The run's history as it is now, one entry per step."""
        return self._history()

    @property
    def idempotency_key(self) -> str:
        """A key stable per run and step, for making outside calls idempotent."""
        return f"{self.id}:{self.step}"

    def __repr__(self) -> str:
        return (
            f"WorkflowContext(id={self.id!r}, name={self.name!r}, step={self.step!r}, "
            f"attempt={self.attempt}, status={self.status.value!r})"
        )
