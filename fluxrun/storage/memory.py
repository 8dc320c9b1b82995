"""In-process store: the reference model every other backend is tested against."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ..errors import ConcurrentModificationError, InvalidArgumentError
from ._base import (
    FINISHED_STATUSES,
    KEEP,
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    ListQuery,
    Renewed,
    RequestKind,
    RunRow,
    SignalRow,
    SignalSent,
    Started,
    StepRow,
    Store,
    Transition,
    check_request_kind,
    delete_busy_error,
    stronger_request,
    transition_error,
)
from ._batch import BatchRow
from ._children import MemoryChildren
from ._concurrency import SlotGate, check_limits
from ._limits import (
    check_new_run,
    check_transition_numbers,
    lease_expiry,
    on_store_clock,
    page,
    row_limit,
    usable_fences,
)
from ._memory_batch import MemoryBatches
from ._memory_batch import claim_entry as _claim
from ._memory_run import RunEntry, commit_step, plain_step_commit
from ._memory_run import replace_row as _replace
from ._memory_schedules import MemorySchedules
from ._sched import check_signal, finished_error, not_found_error, unconsumable_error
from ._sqlplan import PATCHED
from ._workers import MemoryWorkers, WorkerInfo

__all__ = ["MemoryStorage"]

_UTC = dt.UTC
#: Run columns a transition may set (``KEEP`` leaves them), in the order the SQL stores do.
_NO_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)  # stands in for "now" where none is read


class MemoryStorage(MemorySchedules, MemoryBatches, MemoryWorkers, MemoryChildren, Store):
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
        super().__init__()  # the schedules
        self._runs: dict[str, RunEntry] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._keys: dict[tuple[str, str], str] = {}  # (name, idempotency key) -> run id
        self._lock = threading.Lock()
        self._seq = 0
        self._clock = clock
        self._batches: dict[str, BatchRow] = {}

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
            key = run.idempotency_key
            if run.id in self._runs or (key is not None and (run.name, key) in self._keys):
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} (or its idempotency key) already exists",
                    workflow_id=run.id,
                )
            self._insert(run, lease_owner, lease_seconds, None)

    def _insert(
        self, run: RunRow, owner: str | None, lease_seconds: float, input_hash: str | None
    ) -> None:
        lease = None
        if owner is not None:
            lease = lease_expiry(self._now(), lease_seconds)
        self._seq += 1
        stored = _replace(run, owner=owner, lease_until=lease, claims=1 if owner else 0, steps=())
        self._runs[run.id] = RunEntry(stored, self._seq, input_hash)
        if run.idempotency_key is not None:
            self._keys[(run.name, run.idempotency_key)] = run.id

    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        """Insert-or-observe a run (see :meth:`Store.start`)."""
        check_new_run(run)
        key = idempotency_key if idempotency_key is not None else run.idempotency_key
        with self._lock:
            found = None if key is None else self._keys.get((run.name, key))
            if found is None and run.id in self._runs:
                found = run.id
            if found is not None:
                return Started(found, False, self._runs[found].input_hash)
            self._insert(_replace(run, idempotency_key=key), lease_owner, lease_seconds, input_hash)
            return Started(run.id, True, input_hash)

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition atomically."""
        check_transition_numbers(t)
        if t.run_after_from is not None:
            t = on_store_clock(t, self._now())
        with self._lock:
            entry = self._runs.get(t.run_id)
            if entry is None:
                raise ConcurrentModificationError(
                    f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
                )
            if plain_step_commit(t):
                applied = commit_step(entry, t)
                if applied is not None:
                    return applied
            col = entry.col
            # The clock judges leases: a fenced step commit needs none (one read less per step).
            now = (
                self._now()
                if t.fence is None or t.claim is not None or t.renew_lease is not None
                else _NO_TIME
            )
            version = col("version")
            error = transition_error(
                t.run_id,
                col("name"),
                version,
                col("fence"),
                col("owner"),
                col("lease_until"),
                t,
                now,
            )
            if error is not None:
                raise error
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
            changes: dict[str, object] = {"version": version + 1, "updated_at": t.updated_at}
            fence, owner = col("fence"), col("owner")
            lease, claims = col("lease_until"), col("claims")
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
            signal = t.consume_signal
            if signal is not None:
                # Checked before anything changes: a consumed signal refuses the transition.
                signals = entry.signals
                if not (
                    0 < signal.seq <= len(signals)
                    and signals[signal.seq - 1].consumed_by_step is None
                ):
                    raise unconsumable_error(t.run_id, signal.seq)
                signals[signal.seq - 1] = dataclasses.replace(
                    signals[signal.seq - 1], consumed_by_step=signal.step, consumed_at=t.updated_at
                )
            for name in PATCHED:
                value = getattr(t, name)
                if value is not KEEP:
                    changes[name] = value
            if t.requested is None or (t.requested == "pause" and col("requested") == "pause"):
                changes.update(requested=None, request_reason=None)
            if t.step_names is not None:
                changes["step_names"] = t.step_names
            if t.snapshot is not None:
                entry.snapshot = t.snapshot
            elif (
                t.delete_steps_from is not None
                and entry.snapshot is not None
                and entry.snapshot.at > t.delete_steps_from
            ):
                entry.snapshot = None  # the rows it stands for are being deleted
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
            self._wake(t.wake)
            entry._patch.update(changes)
            return Applied(version=version + 1, fence=fence)

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, or None."""
        with self._lock:
            entry = self._runs.get(run_id)
            return None if entry is None else self._snapshot(entry)

    async def load_tail(self, run_id: str) -> RunRow | None:
        """The run with its snapshot and the step rows from it on (see
        :meth:`Store.load_tail`)."""
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is None:
                return None
            snap = entry.snapshot
            if snap is None or entry.col("current_step") < snap.at:
                return self._snapshot(entry)
            steps = tuple(entry.steps[i] for i in sorted(entry.steps) if i >= snap.at)
            return _replace(entry.row, steps=steps, snapshot=snap, steps_from=snap.at)

    async def load_steps(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """The run's step rows below index ``before``."""
        return self.read_steps_blocking(run_id, before)

    def read_steps_blocking(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """:meth:`load_steps`, here and now."""
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is None:
                return ()
            return tuple(entry.steps[i] for i in sorted(entry.steps) if i < before)  # type: ignore[misc]

    def _snapshot(self, entry: RunEntry) -> RunRow:
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
            self._forget(run_id)
            return True

    def _forget(self, run_id: str) -> None:
        entry = self._runs.pop(run_id, None)
        if entry is not None and entry.row.idempotency_key is not None:
            self._keys.pop((entry.row.name, entry.row.idempotency_key), None)

    def _evict(self, run_id: str) -> None:
        """Drop a run whatever its lease (the whole-state adapter forgets a failed write)."""
        with self._lock:
            self._forget(run_id)

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

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        """Extend ``owner``'s leases; report the runs it lost and the requests of the rest."""
        fences, lost = usable_fences(fences)
        requested: dict[str, str] = {}
        with self._lock:
            until = lease_expiry(self._now(), lease_seconds)
            for run_id, fence in fences.items():
                entry = self._runs.get(run_id)
                if entry is None or entry.row.fence != fence or entry.row.owner != owner:
                    lost.add(run_id)
                    continue
                entry.row = _replace(entry.row, lease_until=until)
                if entry.row.requested is not None:
                    requested[run_id] = entry.row.requested
        return Renewed(lost, requested)

    # -- scheduling ---------------------------------------------------------------------------

    async def claim_due(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease_seconds: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[RunRow]:
        """Claim up to ``limit`` due runs (see :meth:`Store.claim_due`)."""
        limit = row_limit(limit, "limit")
        checked = check_limits(limits)
        with self._lock:
            now = self._now()
            wanted = set(names)
            due = [
                e
                for e in self._runs.values()
                if e.row.name in wanted and e.due(now) and not e.gated()
            ]
            due.sort(key=RunEntry.claim_order)
            gate = None
            if checked:
                gate = SlotGate(checked, (e.row for e in self._runs.values()))
                due = list(itertools.islice((e for e in due if gate.admit(e.row)), limit))
            until = lease_expiry(now, lease_seconds)
            claimed = [_claim(e, owner, until) for e in due[:limit]]
            if len(claimed) < limit and self._batches:
                admit = None if gate is None else gate.admit
                picked = self._batch_items(wanted, limit - len(claimed), now, admit)
                claimed += [_claim(e, owner, until) for e in picked]
            return claimed

    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        """The earliest ``run_after`` among pending and suspended runs of these workflows."""
        with self._lock:
            wanted = set(names)
            times = [
                e.row.run_after
                for e in self._runs.values()
                if e.row.name in wanted
                and e.row.run_after is not None
                and e.row.status in ("pending", "suspended")
            ]
            return min(times, default=None)

    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        """Append a signal to an unfinished run's inbox (see :meth:`Store.send_signal`)."""
        check_signal(run_id, name, payload, dedupe_key)
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is None:
                raise not_found_error(run_id)
            if dedupe_key is not None:
                # A repeat of a signal sent before is answered as such even when the run
                # has finished since (perhaps because of that signal): a sender's retry.
                for s in entry.signals:
                    if s.dedupe_key == dedupe_key:
                        return SignalSent(s.seq, False)
            if entry.row.status in FINISHED_STATUSES:
                raise finished_error(run_id, entry.row.name, entry.row.status)
            seq = len(entry.signals) + 1
            entry.signals.append(SignalRow(seq, name, payload, dedupe_key, self._now()))
            return SignalSent(seq, True)

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """Every inbox row of the run, by ``seq``."""
        with self._lock:
            entry = self._runs.get(run_id)
            return [] if entry is None else list(entry.signals)

    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        """The oldest unconsumed inbox row of the run with this name, or None."""
        with self._lock:
            entry = self._runs.get(run_id)
            signals = () if entry is None else entry.signals
            return next((s for s in signals if s.name == name and s.consumed_by_step is None), None)

    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        """Record a cancel or pause request (see :meth:`Store.request`)."""
        check_request_kind(kind)
        with self._lock:
            entry = self._runs.get(run_id)
            if entry is None:
                raise not_found_error(run_id)
            if entry.row.status in FINISHED_STATUSES:
                return False
            if stronger_request(entry.row.requested, kind):
                entry.row = _replace(entry.row, requested=kind, request_reason=reason)
            return True

    async def counts(self, name: str | None = None) -> dict[str, int]:
        """Runs by status (of workflow ``name``, or all)."""
        with self._lock:
            found: dict[str, int] = {}
            for e in self._runs.values():
                if name is None or e.row.name == name:
                    found[e.row.status] = found.get(e.row.status, 0) + 1
            return found
