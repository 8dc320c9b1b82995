"""Retry policy: which errors are retried and how long to wait between attempts."""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass

from .errors import DefinitionError, NonRetryableError

__all__ = ["RetryPolicy", "seconds"]


def seconds(value: object, what: str, *, allow_zero: bool = False) -> float:
    """Turn a duration given as seconds (int/float) or a ``timedelta`` into float seconds.

    Raises:
        DefinitionError: the value is not a finite, positive duration.
    """
    if isinstance(value, dt.timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        raise DefinitionError(
            f"{what} must be seconds (int or float) or a timedelta, got {type(value).__name__}"
        )
    if not math.isfinite(result) or result < 0 or (result == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DefinitionError(f"{what} must be a finite duration {bound}, got {value!r}")
    return result


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed step attempt is retried.

    The wait before retry ``n`` (1-based) is ``initial_delay * factor ** (n - 1)``, capped at
    ``max_delay``; with ``jitter`` it is drawn uniformly between half of that and all of it,
    so that many runs failing together do not retry in lockstep. An error is retried when it
    is an instance of ``retry_on`` and not of ``never_retry``. Delays are seconds (float or
    ``timedelta``).
    """

    initial_delay: float | dt.timedelta = 1.0
    factor: float = 2.0
    max_delay: float | dt.timedelta = 10.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    never_retry: tuple[type[BaseException], ...] = (NonRetryableError,)

    def __post_init__(self) -> None:
        initial = seconds(self.initial_delay, "RetryPolicy.initial_delay", allow_zero=True)
        maximum = seconds(self.max_delay, "RetryPolicy.max_delay", allow_zero=True)
        object.__setattr__(self, "initial_delay", initial)
        object.__setattr__(self, "max_delay", maximum)
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float):
            raise DefinitionError(f"RetryPolicy.factor must be a number, got {self.factor!r}")
        if not math.isfinite(self.factor) or self.factor < 1:
            raise DefinitionError(f"RetryPolicy.factor must be >= 1, got {self.factor!r}")
        if not isinstance(self.jitter, bool):
            raise DefinitionError(f"RetryPolicy.jitter must be a bool, got {self.jitter!r}")
        for label in ("retry_on", "never_retry"):
            kinds = getattr(self, label)
            if isinstance(kinds, type):
                kinds = (kinds,)
                object.__setattr__(self, label, kinds)
            if not isinstance(kinds, tuple) or not all(
                isinstance(k, type) and issubclass(k, BaseException) for k in kinds
            ):
                raise DefinitionError(
                    f"RetryPolicy.{label} must be a tuple of exception types, got {kinds!r}"
                )

    def should_retry(self, error: BaseException) -> bool:
        """Whether ``error`` may be retried under this policy."""
        return isinstance(error, self.retry_on) and not isinstance(error, self.never_retry)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        initial = float(self.initial_delay)  # type: ignore[arg-type]
        cap = float(self.max_delay)  # type: ignore[arg-type]
        try:
            base = min(initial * self.factor ** (retry - 1), cap)
        except OverflowError:
            base = cap
        if self.jitter and base > 0:
            return random.uniform(base / 2, base)
        return base
