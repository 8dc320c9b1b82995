"""Helpers for testing code that uses fluxrun.

:class:`FakeClock` makes time a test's to move: sleeps, wait timeouts, retry backoffs and
delayed starts elapse when the test calls :meth:`FakeClock.advance`, at once, however long
they are::

    clock = FakeClock()
    async with FluxEngine(storage=MemoryStorage(clock=clock), clock=clock) as engine:
        handle = await engine.start(flow)        # its step returns sleep(timedelta(days=3))
        await clock.advance(timedelta(days=3))
        result = await handle.result()

Pass the same clock to the store (it judges which timers are due) and to the engine (it
computes wake times and waits in-process backoffs).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from .._clock import Clock
from ..errors import InvalidArgumentError
from ..storage.memory import MemoryStorage

__all__ = ["FakeClock", "MemoryStorage"]


class FakeClock(Clock):
    """A clock that stands still until :meth:`advance` moves it (see the module)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        if start is None:
            start = dt.datetime.now(dt.UTC)
        if start.tzinfo is None:
            raise InvalidArgumentError("FakeClock start must be a timezone-aware datetime")
        self._now = start.timestamp()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has been advanced ``seconds`` past now."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    def subscribe(self, on_advance: Callable[[], None]) -> None:
        self._listeners.append(on_advance)

    async def advance(self, by: float | dt.timedelta) -> None:
        """Move the clock forward; what came due runs (this yields to let it start)."""
        seconds = by.total_seconds() if isinstance(by, dt.timedelta) else float(by)
        if not seconds >= 0:
            raise InvalidArgumentError(f"advance needs a duration >= 0, got {by!r}")
        self._now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)
        for listener in self._listeners:
            listener()
        for _ in range(3):
            await asyncio.sleep(0)
