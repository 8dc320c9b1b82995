"""In-process store: the reference model every other backend is tested against."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ..errors import ConcurrentModificationError, InvalidArgumentError
from ._base import (
    KEEP,
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    ListQuery,
    RunRow,
    Store,
    Transition,
    check_transition,
    delete_busy_error,
)
from ._limits import (
    check_new_run,
    check_transition_numbers,
    lease_expiry,
    page,
    row_limit,
    usable_fences,
)

__all__ = ["MemoryStorage"]

_UTC = dt.UTC


class _Run:
    """Mutable twin of :class:`RunRow`, private to the store (never handed out)."""

    __slots__ = ("attempts", "row", "seq", "steps")

    def __init__(self, row: RunRow, seq: int) -> None:
        self.row = row
        self.seq = seq
        self.steps: dict[int, object] = {}
        self.attempts: list[AttemptRow] = []


class MemoryStorage(Store):
    """Keeps runs in a dict: fast, not durable, gone when the process ends.

    It has the same semantics as the SQL stores (compare-and-set, fencing, leases), with one
    lock; values are stored as encoded JSON, so a run read back is independent of the objects
    the steps still hold.

    Args:
        clock: Seconds since the epoch; injectable so tests can move time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        if not callable(clock):
            raise InvalidArgumentError(f"MemoryStorage clock must be callable, got {clock!r}")
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._clock = clock

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), _UTC)

    def size(self) -> int:
        """How many runs are stored."""
        return len(self._runs)

    async def init(self) -> None:
        """Nothing to prepare."""

    async def close(self) -> None:
        """Nothing to release; the runs stay readable."""

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run."""
        check_new_run(run)
        with self._lock:
            if run.id in self._runs:
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} already exists", workflow_id=run.id
                )
            lease = None
            if lease_owner is not None:
                lease = lease_expiry(self._now(), lease_seconds)
            self._seq += 1
            stored = _replace(
                run,
                owner=lease_owner,
                lease_until=lease,
                claims=1 if lease_owner else 0,
                steps=(),
            )
            self._runs[run.id] = _Run(stored, self._seq)

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition atomically."""
        check_transition_numbers(t)
        with self._lock:
            entry = self._runs.get(t.run_id)
            if entry is None:
                raise ConcurrentModificationError(
                    f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
                )
            row = entry.row
            now = self._now()
            check_transition(row, t, now)
            steps = entry.steps

            # The parts apply in order (delete, insert, update), as in the SQL stores: judge
            # each against the rows the earlier parts leave.
            def survives(index: int) -> bool:
                return index in steps and (
                    t.delete_steps_from is None
                    or index < t.delete_steps_from
                    or index in t.keep_steps
                )

            inserted = None if t.insert_step is None else t.insert_step.index
            if inserted is not None and survives(inserted):
                raise ConcurrentModificationError(
                    f"step {inserted} of run {t.run_id!r} is already recorded",
                    workflow_id=t.run_id,
                )
            updated = None if t.update_step is None else t.update_step.index
            if updated is not None and updated != inserted and not survives(updated):
                raise ConcurrentModificationError(
                    f"step {updated} of run {t.run_id!r} has no recorded outcome",
                    workflow_id=t.run_id,
                )
            changes: dict[str, object] = {"version": row.version + 1, "updated_at": t.updated_at}
            fence, owner, lease, claims = row.fence, row.owner, row.lease_until, row.claims
            if t.claim is not None:
                fence += 1
                owner = t.claim.owner
                lease = lease_expiry(now, t.claim.lease_seconds)
                claims += 1
            elif t.renew_lease is not None:
                lease = lease_expiry(now, t.renew_lease)
            if t.release:
                owner, lease, claims = None, None, 0
            elif t.claim is None and (t.insert_step is not None or t.update_step is not None):
                claims = 1  # progress: only the current claim counts now
            changes.update(fence=fence, owner=owner, lease_until=lease, claims=claims)
            for name in ("status", "current_step", "error", "completed_at", "wait_name"):
                value = getattr(t, name)
                if value is not KEEP:
                    changes[name] = value
            if t.delete_steps_from is not None:
                for index in [i for i in steps if i >= t.delete_steps_from]:
                    if index not in t.keep_steps:
                        del steps[index]
            if t.insert_step is not None:
                steps[t.insert_step.index] = t.insert_step
            if t.update_step is not None:
                steps[t.update_step.index] = t.update_step
            for attempt in t.attempts:
                entry.attempts.append(dataclasses.replace(attempt, seq=len(entry.attempts) + 1))
            entry.row = _replace(row, **changes)
            return Applied(version=row.version + 1, fence=fence)

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, or None."""
        with self._lock:
            entry = self._runs.get(run_id)
            return None if entry is None else self._snapshot(entry)

    def _snapshot(self, entry: _Run) -> RunRow:
        steps = tuple(entry.steps[i] for i in sorted(entry.steps))
        return _replace(entry.row, steps=steps)

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs matching ``query``, newest first."""
        limit, offset = page(query)
        with self._lock:
            statuses = None if query.statuses is None else {s.value for s in query.statuses}
            found = [
                e
                for e in self._runs.values()
                if (query.name is None or e.row.name == query.name)
                and (statuses is None or e.row.status in statuses)
            ]
            found.sort(key=lambda e: (e.row.created_at, e.seq), reverse=True)
            end = None if limit is None else offset + limit
            return [self._snapshot(e) for e in found[offset:end]]

    async def delete(self, run_id: str) -> bool:
        """Delete a run with its steps and attempts; False if it did not exist.

        Raises:
            RunBusyError: a live lease owns the run.
        """
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is None:
                return False
            row = entry.row
            if row.owner is not None and row.lease_until is not None:
                if row.lease_until > self._now():
                    raise delete_busy_error(run_id, row.name, row.owner)
            del self._runs[run_id]
            return True

    def _evict(self, run_id: str) -> None:
        """Drop a run whatever its lease (the whole-state adapter forgets a failed write)."""
        with self._lock:
            self._runs.pop(run_id, None)

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The run's attempt log, oldest first (empty for an unknown run)."""
        with self._lock:
            entry = self._runs.get(run_id)
            return [] if entry is None else list(entry.attempts)

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease protects."""
        limit = row_limit(limit, "limit")
        with self._lock:
            now = self._now()
            wanted = set(names)
            found = [
                e
                for e in self._runs.values()
                if e.row.name in wanted
                and e.row.status in RECOVERABLE_STATUSES
                and (e.row.owner is None or e.row.lease_until is None or e.row.lease_until <= now)
            ]
            found.sort(key=lambda e: (e.row.created_at, e.seq))
            return [e.row for e in found[:limit]]

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> set[str]:
        """Extend ``owner``'s leases; return the runs it no longer owns."""
        fences, lost = usable_fences(fences)
        with self._lock:
            until = lease_expiry(self._now(), lease_seconds)
            for run_id, fence in fences.items():
                entry = self._runs.get(run_id)
                if entry is None or entry.row.fence != fence or entry.row.owner != owner:
                    lost.add(run_id)
                    continue
                entry.row = _replace(entry.row, lease_until=until)
        return lost


def _replace(row: RunRow, **changes: object) -> RunRow:
    # dataclasses.replace re-runs __init__ with every field; copying the slots is cheaper on
    # the per-step path.
    new = object.__new__(RunRow)
    for name in RunRow.__slots__:
        object.__setattr__(new, name, changes[name] if name in changes else getattr(row, name))
    return new
