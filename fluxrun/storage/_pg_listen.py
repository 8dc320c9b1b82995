"""Wake-ups across processes on PostgreSQL: ``NOTIFY flux_due`` when a write makes a run
due for someone else (a run started unowned, a signal, a cancel or pause request, a run
released or made pending again), and a listener that wakes the scheduler when one comes.

A notification is only a hint: a listener that is down (the database restarting, a
connection pooler that cannot ``LISTEN``) loses nothing, since the scheduler polls anyway;
it only wakes later. The listener reconnects with backoff and wakes the scheduler once it
is back, for what it may have missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = ["CHANNEL", "Listener", "notify"]

CHANNEL = "flux_due"
_NOTIFY = "SELECT pg_notify('" + CHANNEL + "', '')"
_MAX_BACKOFF = 30.0
_log = logging.getLogger("fluxrun")


async def notify(conn: psycopg.AsyncConnection[Any]) -> None:
    """Tell every listener that a run may be due (delivered when the write commits: call it
    after an autocommit write, or inside its transaction)."""
    await conn.execute(_NOTIFY)


class Listener:
    """``LISTEN flux_due`` on a connection of its own, calling ``wake`` per notification."""

    def __init__(
        self,
        conninfo: Callable[[], Any],
        wake: Callable[[], None],
        *,
        name: str,
    ) -> None:
        self._conninfo = conninfo
        self._wake = wake
        self._name = name
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fluxrun-listen")
        #: Whether the listener is connected and listening now (tests and observers).
        self.listening = asyncio.Event()

    async def _run(self) -> None:
        import psycopg

        failures = 0
        while True:
            try:
                settings = await self._conninfo()
                conninfo, options = settings
                options = {k: v for k, v in options.items() if k != "autocommit"}
                self._conn = conn = await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, **options
                )
                async with conn:
                    await conn.execute("LISTEN " + CHANNEL)
                    _log.debug(f"{self._name}: listening")
                    self.listening.set()
                    if failures:
                        _log.info(f"{self._name}: listening for wake-ups again")
                    failures = 0
                    self._wake()  # anything sent while it was not listening
                    async for _ in conn.notifies():
                        _log.debug(f"{self._name}: wake-up")
                        self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down, restarting, refused: poll meanwhile, retry
                self.listening.clear()
                failures += 1
                delay = min(_MAX_BACKOFF, 0.1 * 2**failures)
                _log.warning(
                    f"{self._name}: no wake-ups from PostgreSQL ({exc!r}); polling meanwhile, "
                    f"reconnecting in {delay:.1f}s"
                )
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop listening and close the connection."""
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
        conn = self._conn
        if conn is not None and not conn.closed:
            await conn.close()
