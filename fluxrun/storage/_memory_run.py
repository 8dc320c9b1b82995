"""The runs of :class:`~fluxrun.storage.memory.MemoryStorage` as it keeps them: the mutable
:class:`RunEntry` (a row patched in place, its steps, attempts and inbox), the cheap row copy
the per-step path needs, and the fast path of a plain step commit.

They are apart from the store's verbs because the store's mixins (batches, children) work on
the same entries, and because this is the per-step hot path, tuned on its own.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable
from typing import Any

from ._base import (
    FINISHED_STATUSES,
    KEEP,
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    RunRow,
    SignalRow,
    Snapshot,
    Transition,
)
from ._memory_batch import gated

__all__ = ["RunEntry", "commit_step", "plain_step_commit", "replace_row"]


class RunEntry:
    """Mutable twin of :class:`RunRow`, private to the store (never handed out)."""

    __slots__ = (
        "_patch",
        "_row",
        "attempts",
        "batch_id",
        "batch_index",
        "input_hash",
        "seq",
        "signals",
        "snapshot",
        "steps",
    )

    def __init__(self, row: RunRow, seq: int, input_hash: str | None = None) -> None:
        self._row = row
        # Changes not yet copied into _row: a step commit only records what it changes, and
        # the (wide) row is rebuilt once, when someone reads it.
        self._patch: dict[str, object] = {}
        self.seq = seq
        self.steps: dict[int, object] = {}
        self.attempts: list[AttemptRow] = []
        self.signals: list[SignalRow] = []  # seq n is at index n - 1
        self.input_hash = input_hash
        self.snapshot: Snapshot | None = None
        self.batch_id: str | None = None
        self.batch_index = 0

    @property
    def row(self) -> RunRow:
        """The run as stored now."""
        if self._patch:
            self._row = replace_row(self._row, **self._patch)
            self._patch = {}
        return self._row

    @row.setter
    def row(self, value: RunRow) -> None:
        self._row = value
        self._patch = {}

    def col(self, name: str) -> Any:
        """One column of the run as stored now, without rebuilding the row."""
        patch = self._patch
        return patch[name] if name in patch else getattr(self._row, name)

    def due(self, now: dt.datetime) -> bool:
        """Whether :meth:`Store.claim_due` takes this run now (its name aside)."""
        r = self.row
        if r.owner is not None and r.lease_until is not None and r.lease_until > now:
            return False  # a live lease: never stolen
        if r.status in FINISHED_STATUSES:
            return False
        if r.requested is not None:
            return True
        if r.status in RECOVERABLE_STATUSES:
            return r.run_after is None or r.run_after <= now
        if r.status == "suspended":
            if r.run_after is not None and r.run_after <= now:
                return True
            if r.wait_kind == "signal":
                return any(
                    s.name == r.wait_name and s.consumed_by_step is None for s in self.signals
                )
        return False

    def gated(self) -> bool:
        """Whether this is a batch item not started (the batch's claim takes it)."""
        return self.batch_id is not None and gated(self.row)

    def claim_order(self) -> tuple[bool, int, dt.datetime, int]:
        r = self.row
        return (r.owner is None, -r.priority, r.run_after or r.created_at, self.seq)


def replace_row(row: RunRow, **changes: object) -> RunRow:
    # dataclasses.replace re-runs __init__ with every field; on the per-step path it is
    # cheaper to read every slot in one call and set each through its slot descriptor
    # (which a frozen dataclass's __setattr__ does not guard).
    new = object.__new__(RunRow)
    get = changes.get
    for (set_slot, name), value in zip(_SLOT_SETTERS, _ROW_SLOTS(row), strict=True):
        set_slot(new, get(name, value))
    return new


_ROW_SLOTS = operator.attrgetter(*RunRow.__slots__)
_SLOT_SETTERS: tuple[tuple[Callable[[RunRow, object], None], str], ...] = tuple(
    (getattr(RunRow, name).__set__, name) for name in RunRow.__slots__
)


def plain_step_commit(t: Transition) -> bool:
    """Whether ``t`` only records a step's outcome under its fence (the hot path: one per
    step) and moves the cursor and the status."""
    return (
        t.insert_step is not None
        and t.fence is not None
        and t.claim is None
        and t.renew_lease is None
        and not t.release
        and t.update_step is None
        and t.delete_steps_from is None
        and not t.attempts
        and t.consume_signal is None
        and t.snapshot is None
        and t.requested is KEEP
        and t.error is KEEP
        and t.completed_at is KEEP
        and t.wait_name is KEEP
        and t.run_after is KEEP
        and t.wait_kind is KEEP
        and t.attempt is KEEP
        and t.step_names is None
        and t.definition_version is KEEP
        and t.concurrency_key is KEEP
        and t.wake is None
    )


def commit_step(entry: RunEntry, t: Transition) -> Applied | None:
    """:meth:`~fluxrun.storage.memory.MemoryStorage.apply` of a :func:`plain_step_commit`
    that applies (the same effect as the general path), or None to let the general path
    judge it."""
    step = t.insert_step
    assert step is not None
    version = entry.col("version")
    fence = entry.col("fence")
    if fence != t.fence or version != t.expected_version or step.index in entry.steps:
        return None  # the general path raises the precise error
    entry.steps[step.index] = step
    patch = entry._patch
    patch["version"] = version + 1
    patch["updated_at"] = t.updated_at
    patch["claims"] = 1  # progress: only the current claim counts now
    if t.current_step is not KEEP:
        patch["current_step"] = t.current_step
    if t.status is not KEEP:
        patch["status"] = t.status
    return Applied(version=version + 1, fence=fence)
