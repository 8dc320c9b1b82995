"""The clock that timers are judged by: the system's, or a test's :class:`FakeClock`.

Only timers use it (a sleep's wake time, a retry's backoff, a wait's timeout, a delayed
start): the times a run records of what happened (started, completed) are the system's.
The store judges whether a timer is due by its own clock, so a test passes the same fake
clock to its store (``MemoryStorage(clock=clock)``, ``SQLiteStorage(path, clock=clock)``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable

__all__ = ["SYSTEM_CLOCK", "Clock"]


class Clock:
    """The system clock: wall time for timers, ``asyncio.sleep`` for in-process waits."""

    def __call__(self) -> float:
        """Seconds since the epoch (a store's ``clock`` argument takes this)."""
        return time.time()

    def now(self) -> dt.datetime:
        """The time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self(), dt.UTC)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (an in-process retry backoff)."""
        await asyncio.sleep(seconds)

    def subscribe(self, on_advance: Callable[[], None]) -> None:
        """Be told when the clock jumps (never, for the system clock)."""


SYSTEM_CLOCK = Clock()
