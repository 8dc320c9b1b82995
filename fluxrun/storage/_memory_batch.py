"""The durable-batch verbs of :class:`~fluxrun.storage.memory.MemoryStorage` (see
:mod:`fluxrun.storage._batch`), over its runs and under its one lock."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import ConcurrentModificationError
from ._base import FINISHED_STATUSES, RunRow, stronger_request
from ._batch import (
    NOT_RUN,
    BatchRow,
    BatchStore,
    StopKind,
    batch_category,
    check_batch_row,
    not_run_error,
)
from ._limits import check_new_run
from ._sched import not_found_error

if TYPE_CHECKING:
    from ._memory_run import RunEntry

__all__ = ["MemoryBatches", "claim_entry", "gated", "holds_slot"]


def gated(r: RunRow) -> bool:
    """Whether a run of a batch is an item not started: only the batch's claim takes it."""
    return r.status == "pending" and r.owner is None and r.requested is None


def claim_entry(e: RunEntry, owner: str, until: dt.datetime) -> RunRow:
    """Claim one run (the lock held): owner, lease, ``fence``, ``claims``, ``version``."""
    r = e.row
    e.row = dataclasses.replace(
        r,
        owner=owner,
        lease_until=until,
        fence=r.fence + 1,
        claims=r.claims + 1,
        version=r.version + 1,
    )
    return e.row


def holds_slot(status: str, owner: str | None) -> bool:
    """Whether a run of a batch takes one of its ``concurrency`` slots: it runs, rolls back,
    or was claimed and is about to start. A run waiting (for a signal, a timer) holds none."""
    return status in ("running", "rolling_back") or (status == "pending" and owner is not None)


class MemoryBatches(BatchStore):
    """Batches kept in the store's dicts (the reference model of the SQL stores)."""

    _runs: dict[str, RunEntry]
    _batches: dict[str, BatchRow]
    _lock: threading.Lock
    _now: Callable[[], dt.datetime]
    _insert: Callable[[RunRow, str | None, float, str | None], None]

    async def create_batch(self, batch: BatchRow, runs: Sequence[RunRow]) -> None:
        """Insert the batch and its runs at once."""
        check_batch_row(batch, runs)
        for run in runs:
            check_new_run(run)
        with self._lock:
            if batch.id in self._batches or any(r.id in self._runs for r in runs):
                raise ConcurrentModificationError(
                    f"batch {batch.id!r} (or one of its runs) already exists"
                )
            if len({r.id for r in runs}) != len(runs):
                raise ConcurrentModificationError(f"batch {batch.id!r} repeats a run id")
            self._batches[batch.id] = batch
            for index, run in enumerate(runs):
                self._insert(run, None, 0.0, None)
                entry = self._runs[run.id]
                entry.batch_id = batch.id
                entry.batch_index = index

    async def load_batch(self, batch_id: str) -> BatchRow | None:
        """The batch row, or None."""
        with self._lock:
            return self._batches.get(batch_id)

    def _members(self, batch_id: str) -> list[RunEntry]:
        found = [e for e in self._runs.values() if e.batch_id == batch_id]
        found.sort(key=lambda e: e.batch_index)
        return found

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """Runs of the batch by category."""
        with self._lock:
            counts: dict[str, int] = {}
            for e in self._members(batch_id):
                r = e.row
                key = batch_category(r.status, r.wait_kind, r.owner, r.wait_name)
                counts[key] = counts.get(key, 0) + 1
            return counts

    async def batch_runs(self, batch_id: str) -> list[RunRow]:
        """The batch's runs with their step rows, by index."""
        with self._lock:
            return [
                dataclasses.replace(e.row, steps=tuple(e.steps[i] for i in sorted(e.steps)))  # type: ignore[misc]
                for e in self._members(batch_id)
            ]

    async def stop_batch(self, batch_id: str, kind: StopKind) -> list[str]:
        """Stop the batch (see :meth:`BatchStore.stop_batch`)."""
        with self._lock:
            if batch_id not in self._batches:
                raise not_found_error(batch_id)
            return self._stop(batch_id, kind, self._now())

    def _stop(self, batch_id: str, kind: StopKind, now: dt.datetime) -> list[str]:
        """:meth:`stop_batch`, the lock held."""
        batch = self._batches[batch_id]
        if batch.status == "cancelled" or (batch.status == "stopped" and kind == "stopped"):
            return []
        self._batches[batch_id] = dataclasses.replace(batch, status=kind, updated_at=now)
        asked = []
        for e in self._members(batch_id):
            r = e.row
            if e.gated():
                e.row = dataclasses.replace(
                    r,
                    status="cancelled",
                    wait_kind=NOT_RUN,
                    error=not_run_error(batch_id, kind),
                    completed_at=now,
                    updated_at=now,
                    version=r.version + 1,
                )
            elif kind == "cancelled" and r.status not in FINISHED_STATUSES:
                if stronger_request(r.requested, "cancel"):
                    e.row = dataclasses.replace(
                        r, requested="cancel", request_reason=f"batch {batch_id!r} cancelled"
                    )
                asked.append(r.id)
        return asked

    def _batch_items(
        self,
        wanted: set[str],
        limit: int,
        now: dt.datetime,
        admit: Callable[[RunRow], bool] | None = None,
    ) -> list[RunEntry]:
        """The batch items to claim now (the lock held): of each running batch of these
        workflows, oldest batch first, its next items by index, while fewer than its
        ``concurrency`` runs hold a slot (and ``admit`` takes them: the workflow's own
        concurrency limit). A stop-on-error batch with a failed item stops here instead
        (its items not started are marked not run)."""
        picked: list[RunEntry] = []
        batches = sorted(
            (b for b in self._batches.values() if b.status == "running" and b.name in wanted),
            key=lambda b: b.created_at,
        )
        for batch in batches:
            if len(picked) >= limit:
                break
            members = self._members(batch.id)
            rows = [e.row for e in members]
            if not batch.continue_on_error and any(
                batch_category(r.status, r.wait_kind, r.owner) == "failed" for r in rows
            ):
                self._stop(batch.id, "stopped", now)
                continue
            busy = sum(holds_slot(r.status, r.owner) for r in rows)
            free = min(batch.concurrency - busy, limit - len(picked))
            if free <= 0:
                continue
            ready = (
                e
                for e in members
                if e.gated()
                and (e.row.run_after is None or e.row.run_after <= now)
                and (admit is None or admit(e.row))
            )
            picked += itertools.islice(ready, free)
        return picked
