"""What a step sees (:class:`WorkflowContext`) and how it asks to wait (:func:`wait`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._codec import validate_text
from ._records import StepExecution, WorkflowStatus
from .errors import InvalidArgumentError, SerializationError

__all__ = ["MADE_WAITS", "Flux", "WaitMarker", "WorkflowContext", "wait"]

MADE_WAITS: ContextVar[list[WaitMarker] | None] = ContextVar("fluxrun_made_waits", default=None)
"""The waits a running attempt made, so one made but not returned is reported, not lost."""


@dataclass(frozen=True, slots=True)
class WaitMarker:
    """Returned by a step handler to suspend the run until ``signal`` arrives."""

    signal: str


def wait(signal: str) -> WaitMarker:
    """Suspend the run after this step until the named signal is sent.

    Return it from a step handler: ``return wait("approved")``. The signal's payload becomes
    the step's ``output`` and ``ctx.signals[signal]``.
    """
    try:
        validate_text(signal, "signal name")
    except SerializationError as exc:
        raise InvalidArgumentError(exc.message) from None
    marker = WaitMarker(signal)
    made = MADE_WAITS.get()
    if made is not None:
        made.append(marker)
    return marker


class Flux:
    """Namespace kept for familiarity with @gravito/flux: ``Flux.wait(...)`` is :func:`wait`."""

    wait = staticmethod(wait)


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
