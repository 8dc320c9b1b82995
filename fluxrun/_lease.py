"""Keeping this executor's leases alive from a thread of its own.

Renewal runs outside the event loop on purpose: a step that blocks the loop (CPU-bound
code, a synchronous call) must not make the executor lose runs it is still driving.
"""

from __future__ import annotations

import threading

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

    def hold(self, run_id: str, fence: int) -> None:
        """Start renewing ``run_id`` under ``fence``."""
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
            lost = self._store.renew_leases(self._owner, fences, self._lease)
        except Exception as exc:
            # The next save checks the fence anyway; a failed renewal only risks expiry.
            self._log.error("fluxrun: lease renewal failed", exc)
            return
        if lost:
            with self._guard:
                self._lost |= {r for r in lost if r in self._held}

    def _loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            self.renew_now()

    def stop(self) -> None:
        """Stop the renewal thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
