"""Keeping this executor's leases alive from a thread of its own.

Renewal runs outside the event loop on purpose: a step that blocks the loop (CPU-bound
code, a synchronous call) must not make the executor lose runs it is still driving.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from ._trace import _Log
from .storage._base import Store

__all__ = ["LeaseKeeper"]


class LeaseKeeper:
    """Renews the leases of the runs this executor drives, every third of the lease."""

    def __init__(self, store: Store, *, owner: str, lease_seconds: float, log: _Log) -> None:
        self._store = store
        self._owner = owner
        self._lease = lease_seconds
        self._log = log
        self._held: dict[str, int] = {}
        self._lost: set[str] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_renewal = time.monotonic()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        # Told (on the event loop) of a cancel or pause asked of a held run by anyone.
        self.on_request: Callable[[str, str], None] = lambda run_id, kind: None

    def hold(self, run_id: str, fence: int) -> None:
        """Start renewing ``run_id`` under ``fence`` (called on the event loop)."""
        if self._event_loop is None:
            try:
                self._event_loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # held from outside a loop (tests): requests are not forwarded
        with self._guard:
            self._held[run_id] = fence
            self._lost.discard(run_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fluxrun-lease", daemon=True)
            self._thread.start()

    def drop(self, run_id: str) -> None:
        """Stop renewing ``run_id``."""
        with self._guard:
            self._held.pop(run_id, None)
            self._lost.discard(run_id)

    def lost(self, run_id: str) -> bool:
        """Whether a renewal found that another executor took ``run_id`` over."""
        return run_id in self._lost

    def holding(self) -> frozenset[str]:
        """The runs being renewed now."""
        with self._guard:
            return frozenset(self._held)

    def renew_now(self) -> None:
        """Renew every held lease once (the thread does this every third of the lease)."""
        with self._guard:
            fences = dict(self._held)
        if not fences:
            return
        try:
            renewed = self._store.renew_leases(self._owner, fences, self._lease)
        except Exception as exc:
            # The next save checks the fence anyway; a failed renewal only risks expiry.
            self._log.error("lease renewal failed", exc)
            return
        if renewed.lost:
            with self._guard:
                self._lost |= {r for r in renewed.lost if r in self._held}
        loop = self._event_loop
        if renewed.requested and loop is not None and not loop.is_closed():
            for run_id, kind in renewed.requested.items():
                try:
                    loop.call_soon_threadsafe(self.on_request, run_id, kind)
                except RuntimeError:
                    return  # the loop closed meanwhile

    def _loop(self) -> None:
        interval = self._lease / 3
        self._last_renewal = time.monotonic()
        while not self._stop.wait(interval):
            late = time.monotonic() - self._last_renewal - interval
            if late > interval / 2 and self.holding():
                # Something held the GIL (a long C call) or starved this thread: a renewal
                # later than the lease lets another executor take the runs over.
                self._log.warning(
                    f"lease renewal ran {late:.1f}s late (lease {self._lease:g}s): a step "
                    "may be holding the GIL in a long C call; runs are lost when a renewal "
                    "comes after the lease expires. Use a longer lease."
                )
            # Measured from when the previous renewal began: a renewal that itself stalled
            # (a frozen database) leaves the lease just as close to expiring.
            self._last_renewal = time.monotonic()
            self.renew_now()

    def stop(self) -> None:
        """Stop the renewal thread (waiting at most 5 s for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    async def stop_async(self, timeout: float = 5.0) -> None:
        """Stop the renewal thread without blocking the event loop while it finishes."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            # A renewal stuck on a frozen database must not hold close() for long either.
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
