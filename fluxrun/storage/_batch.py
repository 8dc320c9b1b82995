"""Durable batches in the store: the rows, the verbs a store implements, and what every
backend shares (SQL fragments, the item categories).

A batch is one row of ``flux_batches`` (its workflow, size, ``concurrency``,
``continue_on_error`` and status) plus one run per item, created up front in one bulk
insert with ``batch_id`` and ``batch_index``. The batch's limit is enforced in
:meth:`Store.claim_due`: an item that has not started (pending, unowned, nothing asked of
it) is *gated*: it is claimed only while fewer than ``concurrency`` runs of its batch are
running (``running``, ``rolling_back``, or pending and owned: claimed, about to start).
Every other run of a batch (one that crashed, one asked to cancel, one waking from a
wait) is claimed as any run is. A batch that stops (the first failure of a
``continue_on_error=False`` batch, or a cancel) marks its items that never started as
*not run*: status ``cancelled`` with ``wait_kind = 'not_run'``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import InvalidArgumentError
from ..errors import StorageError as _StorageError

if TYPE_CHECKING:  # _base builds Store on BatchStore
    from ._base import RunRow

__all__ = [
    "BATCH_CATEGORY_SQL",
    "BATCH_STATUSES",
    "FAILURE_STATUSES",
    "GATED_SQL",
    "HOLDS_SLOT_SQL",
    "NOT_RUN",
    "BatchRow",
    "BatchStore",
    "StopKind",
    "batch_category",
    "check_batch_row",
    "not_run_error",
]

NOT_RUN = "not_run"
"""The ``wait_kind`` that marks a finished (``cancelled``) batch item that never started."""

BATCH_STATUSES = ("running", "stopped", "cancelled")
"""A stored batch is ``running`` until it stops on an error or is cancelled (whether all
its items are done is counted, not stored)."""

FAILURE_STATUSES = ("failed", "rolled_back", "compensation_failed", "cancelled")
"""Run statuses that count as a failed item."""

StopKind = Literal["stopped", "cancelled"]

_CHILD_WAIT = "flux:child:"  # a parent waiting for its child run (see fluxrun._children)
_NOT_FOR_A_CHILD = f"substr(coalesce(wait_name, ''), 1, {len(_CHILD_WAIT)}) <> '{_CHILD_WAIT}'"
# What each run of a batch counts as; the same rule as batch_category(), in SQL (both
# dialects: owner IS NOT NULL means claimed; a claimed pending run is about to start).
BATCH_CATEGORY_SQL = (
    "CASE WHEN wait_kind = 'not_run' AND status = 'cancelled' THEN 'not_run' "
    "WHEN status = 'completed' THEN 'succeeded' "
    "WHEN status IN ('failed', 'rolled_back', 'compensation_failed', 'cancelled') "
    "THEN 'failed' "
    "WHEN status = 'pending' AND owner IS NULL THEN 'pending' "
    "WHEN status = 'paused' OR (status = 'suspended' AND "
    "(wait_kind IS NULL OR wait_kind = 'signal') "
    "AND " + _NOT_FOR_A_CHILD + ") THEN 'waiting' "
    "ELSE 'running' END"
)


GATED_SQL = "(batch_id IS NOT NULL AND status = 'pending' AND owner IS NULL AND requested IS NULL)"
"""A batch item not started: only the batch's claim takes it (within its concurrency)."""

HOLDS_SLOT_SQL = (
    "(status IN ('running', 'rolling_back') OR (status = 'pending' AND owner IS NOT NULL))"
)
"""A run of a batch that takes one of its slots (``holds_slot`` in the memory store)."""


def batch_category(
    status: str, wait_kind: str | None, owner: str | None, wait_name: str | None = None
) -> str:
    """What a run of a batch counts as: ``pending`` (not started), ``running`` (running,
    rolling back, claimed, asleep, backing off or waiting for a child run), ``waiting`` (on
    a signal, or paused), ``succeeded``, ``failed`` or ``not_run``."""
    if status == "cancelled" and wait_kind == NOT_RUN:
        return "not_run"
    if status == "completed":
        return "succeeded"
    if status in FAILURE_STATUSES:
        return "failed"
    if status == "pending" and owner is None:
        return "pending"
    if status == "paused":
        return "waiting"
    if status == "suspended" and wait_kind in (None, "signal"):
        return "running" if (wait_name or "").startswith(_CHILD_WAIT) else "waiting"
    return "running"


def not_run_error(batch_id: str, kind: StopKind) -> str:
    """The error stored on an item that never started because its batch stopped."""
    why = "was cancelled" if kind == "cancelled" else "stopped on an earlier item's failure"
    return f"not run: batch {batch_id!r} {why} before this item started"


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A durable batch as stored: the workflow its items run, how many there are, how many
    may run at once (across every engine on the store), whether it goes on after a failed
    item, and its status (``running``, ``stopped``, ``cancelled``)."""

    id: str
    name: str
    total: int
    concurrency: int
    continue_on_error: bool
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime


def check_batch_row(batch: BatchRow, runs: Sequence[RunRow]) -> None:
    """Refuse a batch whose rows disagree (a store's own guard; the engine builds them)."""
    if batch.total != len(runs):
        raise InvalidArgumentError(
            f"batch {batch.id!r} says {batch.total} items but {len(runs)} runs were given"
        )
    if type(batch.concurrency) is not int or not 1 <= batch.concurrency <= 2**31 - 1:
        raise InvalidArgumentError(
            f"batch concurrency must be an int >= 1, got {batch.concurrency!r}"
        )
    if any(r.name != batch.name for r in runs):
        raise InvalidArgumentError(f"every run of batch {batch.id!r} must be of {batch.name!r}")


class BatchStore:
    """The store verbs of durable batches. A store that keeps no batches (the whole-state
    adapter, a user's store) inherits these, which refuse with a clear error; the
    in-process ``execute_batch`` needs none of them."""

    def _no_batches(self) -> _StorageError:
        return _StorageError(
            f"{type(self).__name__} keeps no durable batches (start_batch); use "
            "execute_batch, or MemoryStorage, SQLiteStorage or PostgresStorage"
        )

    async def create_batch(self, batch: BatchRow, runs: Sequence[RunRow]) -> None:
        """Insert the batch and its runs (unowned, ``batch_index`` = position) in one
        transaction, in bulk.

        Raises:
            ConcurrentModificationError: the batch id or a run id exists.
        """
        raise self._no_batches()

    async def load_batch(self, batch_id: str) -> BatchRow | None:
        """The batch row, or None."""
        raise self._no_batches()

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """How many runs of the batch are in each category of :func:`batch_category`
        (absent: 0)."""
        raise self._no_batches()

    async def batch_runs(self, batch_id: str) -> list[RunRow]:
        """The batch's runs with their step rows, by ``batch_index``."""
        raise self._no_batches()

    async def stop_batch(self, batch_id: str, kind: StopKind) -> list[str]:
        """Stop a running batch, in one transaction: set its status to ``kind`` and mark
        every item not started (pending, unowned, nothing asked) *not run*. With
        ``"cancelled"``, also ask every other unfinished run of the batch to cancel (as
        :meth:`Store.request`) and return their ids (empty for ``"stopped"``). A stopped
        batch can still be cancelled; a cancelled one is left as it is (``[]``).

        Raises:
            WorkflowNotFoundError: no batch has this id.
        """
        raise self._no_batches()
