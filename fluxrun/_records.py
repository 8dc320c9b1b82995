"""Immutable records the engine hands out: statuses, step history, run state, results."""

from __future__ import annotations

import datetime as dt
import enum
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._codec import validate_text
from .errors import InvalidArgumentError, SerializationError

__all__ = [
    "FluxResult",
    "StepAttempt",
    "StepExecution",
    "StepStatus",
    "WorkflowFilter",
    "WorkflowState",
    "WorkflowStatus",
]


class WorkflowStatus(enum.StrEnum):
    """Lifecycle status of a run."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    SUSPENDED = "suspended"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"


class StepStatus(enum.StrEnum):
    """Status of one entry of a run's history."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    SUSPENDED = "suspended"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


_MAX_INT64 = 2**63 - 1

TERMINAL_STATUSES = frozenset(
    {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.ROLLED_BACK,
        WorkflowStatus.COMPENSATION_FAILED,
        WorkflowStatus.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class StepExecution:
    """One entry of a run's history: what happened to one step.

    Timestamps are timezone-aware UTC datetimes; ``duration_ms`` spans all attempts and the
    waits between them; ``retries`` counts the retries used (attempts - 1). For a failed step,
    or a step whose compensation failed (status ``compensating``), ``error`` is the message,
    ``error_type`` the exception's qualified class name (``"builtins.KeyError"``) and
    ``traceback`` its formatted traceback (the last 16 KB). ``wake_at``: for a step suspended
    on a sleep (or a wait with a timeout), when it wakes (or times out). ``child_id``: for
    a ``.child`` step, the child run it started (its latest try's); its ``output`` is the
    child's final data once it completed.
    """

    name: str
    status: StepStatus = StepStatus.PENDING
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    suspended_at: dt.datetime | None = None
    compensated_at: dt.datetime | None = None
    waiting_for: str | None = None
    duration_ms: float | None = None
    output: Any = None
    error: str | None = None
    retries: int = 0
    error_type: str | None = None
    traceback: str | None = None
    wake_at: dt.datetime | None = None
    child_id: str | None = None


@dataclass(frozen=True, slots=True)
class StepAttempt:
    """One attempt of a step or of its compensation (``engine.attempts(run_id)``).

    ``kind`` is ``"step"`` or ``"compensation"``; ``attempt`` is 1-based within one try of
    the step (a ``resume`` starts again at 1). ``status``: ``completed``, ``failed``,
    ``suspended`` (a step attempt that returned ``wait``), ``compensated``, or ``skipped``
    (a compensation recorded as done by hand with ``skip_compensation``; ``note`` holds the
    operator's note).
    """

    step: str
    index: int
    attempt: int
    kind: str
    status: StepStatus
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    duration_ms: float | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """A run as stored: what ``engine.get`` and ``engine.list`` return.

    ``version`` rises by one on every save; ``current_step`` is the index of the step the run
    is at (the one running, or the last one it reached). ``wake_at``: when a waiting run
    becomes due by itself (a sleep's end, a retry after a backoff, a wait's timeout, a
    delayed start), else None. ``parent_id``: the run that started this one as a child
    workflow (None for a run started otherwise); a parent's children are named by the
    ``child_id`` of its history entries.
    """

    id: str
    name: str
    status: WorkflowStatus
    input: Any
    data: dict[str, Any]
    current_step: int
    history: tuple[StepExecution, ...]
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None
    error: str | None
    version: int
    definition_version: str | None = None
    wake_at: dt.datetime | None = None
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class FluxResult:
    """What ``execute``, ``signal``, ``resume`` and ``retry_step`` return.

    ``error`` is the exception that stopped the run (the failing step's own exception), or
    None. ``duration_ms`` is the wall-clock time of this call.
    """

    id: str
    status: WorkflowStatus
    data: dict[str, Any]
    history: tuple[StepExecution, ...]
    duration_ms: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class WorkflowFilter:
    """Which runs ``engine.list`` returns: by name and status(es), paged, newest first.

    ``limit=None`` returns every match; ``offset`` skips that many first.
    """

    name: str | None = None
    status: WorkflowStatus | str | Sequence[WorkflowStatus | str] | None = None
    limit: int | None = None
    offset: int = 0
    statuses: tuple[WorkflowStatus, ...] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise InvalidArgumentError(
                f"WorkflowFilter.name must be a str, got {type(self.name).__name__}"
            )
        if self.name:
            # No run can have such a name, and not every database can even take it as a query
            # parameter (SQLite cannot encode a lone surrogate): refuse it the same way on all.
            try:
                validate_text(self.name, "WorkflowFilter.name", max_length=sys.maxsize)
            except SerializationError as exc:
                raise InvalidArgumentError(exc.message) from None
        for label, value in (("limit", self.limit), ("offset", self.offset)):
            if value is None and label == "limit":
                continue
            if type(value) is not int or not 0 <= value <= _MAX_INT64:
                raise InvalidArgumentError(
                    f"WorkflowFilter.{label} must be an int >= 0 and < 2**63, got {value!r}"
                )
        object.__setattr__(self, "statuses", _parse_statuses(self.status))


def _parse_statuses(
    status: WorkflowStatus | str | Sequence[WorkflowStatus | str] | None,
) -> tuple[WorkflowStatus, ...] | None:
    if status is None:
        return None
    items = [status] if isinstance(status, str) else status
    if not isinstance(items, Sequence):
        raise InvalidArgumentError(
            f"WorkflowFilter.status must be a status or a list of them, got {status!r}"
        )
    out: list[WorkflowStatus] = []
    for item in items:
        try:
            out.append(WorkflowStatus(item))
        except ValueError:
            known = ", ".join(s.value for s in WorkflowStatus)
            raise InvalidArgumentError(
                f"WorkflowFilter.status: unknown status {item!r} (known: {known})"
            ) from None
    return tuple(out)
