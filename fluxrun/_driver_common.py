"""What the run driver's layers share with the modules around them, apart from the driver:
the engine :class:`Settings` a run needs, the time helpers :func:`utcnow` and :func:`since`,
and the internal exceptions that steer a drive (:class:`Interrupted`, :class:`Released`,
:class:`Failed`).

Many modules need only these, not :class:`~fluxrun._driver.DriverBase`; they are kept here so
that :mod:`fluxrun._driver` holds the run being driven. :mod:`fluxrun._driver` re-exports them
(they are imported from there).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from ._clock import SYSTEM_CLOCK, Clock
from ._invoke import ErrorInfo, describe
from ._records import StepStatus
from ._retry import RetryPolicy
from .storage._base import AttemptRow

__all__ = ["Failed", "Interrupted", "Released", "Settings", "since", "utcnow"]

_UTC = dt.UTC


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime."""
    return dt.datetime.now(_UTC)


def since(t0: float) -> dt.datetime:
    """The UTC time at which ``time.perf_counter()`` read ``t0``."""
    return utcnow() - dt.timedelta(seconds=time.perf_counter() - t0)


@dataclass(frozen=True, slots=True)
class Settings:
    """The engine settings a run needs."""

    owner: str
    default_retries: int
    default_timeout: float | None
    retry_policy: RetryPolicy
    lease_seconds: float
    max_value_size: int
    executor: Callable[[], Executor]
    sync_timeout_grace: float = 60.0
    closing: Callable[[], bool] = lambda: False
    durable_backoff: float = 1.0
    clock: Clock = SYSTEM_CLOCK


class Interrupted(Exception):
    """Internal: a cancel cut the running attempt short."""


class Released(Exception):
    """Internal: the run was let go to wait in the store (a long retry backoff)."""


class Failed(Exception):
    """Internal: a step (or compensation) failed for good; carries what to record."""

    def __init__(self, error: BaseException, attempts: int, started: dt.datetime, t0: float):
        super().__init__("step failed")
        self.error = error
        self.attempts = attempts
        self.started = started  # when the last attempt started
        self.t0 = t0
        self.info: ErrorInfo = describe(error)

    def log_row(self, index: int, name: str, kind: str) -> AttemptRow:
        """This failed attempt as an entry of the run's attempt log."""
        info = self.info
        return AttemptRow(
            index=index,
            name=name,
            attempt=self.attempts,
            kind=kind,
            status=StepStatus.FAILED.value,
            started_at=self.started,
            finished_at=utcnow(),
            duration_ms=(time.perf_counter() - self.t0) * 1000.0,
            error_type=info.type,
            error=info.message,
            traceback=info.traceback,
        )
