"""@gravito/flux-style whole-state storage (``WorkflowStorage``) and the adapter that runs
the engine on it.

A user's class with ``save/load/list/delete`` (and optionally ``init/close``) of whole
:class:`WorkflowState` records can be passed as ``storage=``. The engine keeps the runs it
touches in an in-process :class:`MemoryStorage`, which gives the same compare-and-set and
lease rules as the built-in stores, and writes the whole state through to the user's storage
after every change. This is for a single process: the user's storage has no
compare-and-set of its own. A run read back from it after a restart carries its data as of
its last save, so ``resume`` from an earlier step keeps that data rather than the data as it
was when that step first ran.

The attempt log (``engine.attempts``) lives only in the in-process cache: a
:class:`WorkflowState` has no place for it, so it is not written to the user's storage, and
a run read back after a restart starts with an empty log. ``delete`` refuses a run that this
process is executing right now (:class:`~fluxrun.errors.RunBusyError`), like every store.

The scheduling verbs (``start``, ``claim_due``, ``next_due``, ``send_signal``, ``request``)
work on the in-process cache: a whole-state store has no atomic insert-or-observe, no claim
over sets of runs and no signal inbox. The unfinished runs of a workflow are read in from the
user's storage on the first claim for it (so a restarted process continues them); timers
and runs' states are written through, but a signal sent before its run waits for it (a
child run's outcome included) and a pending cancel or pause live only in this process.
``counts`` is computed from ``list``; ``list_children`` scans it.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ._children import child_signal
from ._codec import encode
from ._records import StepStatus, WorkflowFilter, WorkflowState
from ._state import changes_text, to_state
from .errors import StorageError
from .storage._base import (
    FINISHED_STATUSES,
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
)
from .storage._limits import page, row_limit
from .storage.memory import MemoryStorage

__all__ = ["WholeStateStorageAdapter", "WorkflowStorage", "is_whole_state_storage"]


@runtime_checkable
class WorkflowStorage(Protocol):
    """@gravito/flux-style whole-state storage: save/load/list/delete of whole
    :class:`WorkflowState` records, with plain or async methods."""

    def save(self, state: WorkflowState) -> Any:
        """Insert or replace the state of one run."""

    def load(self, id: str) -> Any:
        """The state of one run, or None."""

    def list(self, filter: WorkflowFilter | None = None) -> Any:
        """States matching the filter, newest first."""

    def delete(self, id: str) -> Any:
        """Remove one run."""


def is_whole_state_storage(obj: object) -> bool:
    """Whether ``obj`` is a user's ``WorkflowStorage`` (has save/load/list/delete)."""
    return all(callable(getattr(obj, m, None)) for m in ("save", "load", "list", "delete"))


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _row_from_state(state: WorkflowState) -> RunRow:
    recorded = [(i, h) for i, h in enumerate(state.history) if h.status != StepStatus.PENDING.value]
    data_text = changes_text({k: encode(v) for k, v in state.data.items()}, ())
    steps = tuple(
        StepRow(
            index=i,
            name=h.name,
            status=h.status.value,
            started_at=h.started_at,
            completed_at=h.completed_at,
            suspended_at=h.suspended_at,
            compensated_at=h.compensated_at,
            waiting_for=h.waiting_for if h.child_id is None else child_signal(h.child_id),
            duration_ms=h.duration_ms,
            output=None if h.output is None else encode(h.output),
            error=h.error,
            retries=h.retries,
            error_type=h.error_type,
            traceback=h.traceback,
            # The whole data rides on the first recorded step: replaying any rows gives it,
            # so a resume from any later step starts from the data as last saved.
            changes=data_text if (i, h) == recorded[0] else None,
        )
        for i, h in recorded
    )
    return RunRow(
        id=state.id,
        name=state.name,
        status=state.status.value,
        input=encode(state.input),
        step_names=tuple(h.name for h in state.history),
        current_step=state.current_step,
        created_at=state.created_at,
        updated_at=state.updated_at,
        version=state.version,
        fence=0,
        definition_version=state.definition_version,
        error=state.error,
        completed_at=state.completed_at,
        steps=steps,
        parent_id=state.parent_id,
    )


class WholeStateStorageAdapter(Store):
    """Runs the engine on a user's ``WorkflowStorage`` (single process; see the module)."""

    def __init__(self, storage: Any) -> None:
        self.user = storage
        self._cache = MemoryStorage()
        self._imported: set[str] = set()

    async def init(self) -> None:
        """Call the user's ``init`` if it has one."""
        if callable(getattr(self.user, "init", None)):
            await self._call("init")

    async def close(self) -> None:
        """Call the user's ``close`` if it has one."""
        if callable(getattr(self.user, "close", None)):
            await self._call("close")

    async def _call(self, method: str, *args: Any, run_id: str | None = None) -> Any:
        try:
            return await _maybe(getattr(self.user, method)(*args))
        except Exception as exc:
            about = "" if run_id is None else f" for run {run_id!r}"
            raise StorageError(
                f"{type(self.user).__name__}.{method}{about} failed: {exc}", workflow_id=run_id
            ) from exc

    async def _cached(self, run_id: str) -> RunRow | None:
        row = await self._cache.load(run_id)
        if row is not None:
            return row
        state = await self._call("load", run_id, run_id=run_id)
        if state is None:
            return None
        if not isinstance(state, WorkflowState):
            raise StorageError(
                f"{type(self.user).__name__}.load for run {run_id!r} returned "
                f"{type(state).__name__}, not a WorkflowState",
                workflow_id=run_id,
            )
        imported = _row_from_state(state)
        await self._cache.create(imported, lease_owner=None, lease_seconds=0)
        for step in imported.steps:
            current = await self._cache.load(run_id)
            assert current is not None
            await self._cache.apply(
                Transition(
                    run_id=run_id,
                    expected_version=current.version,
                    updated_at=current.updated_at,
                    insert_step=step,
                )
            )
        return await self._cache.load(run_id)

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run and save it."""
        await self._cache.create(run, lease_owner=lease_owner, lease_seconds=lease_seconds)
        await self._write_through(run.id)

    async def apply(self, t: Transition) -> Applied:
        """Apply a transition to the cached run, then save its whole state."""
        await self._cached(t.run_id)
        if t.wake is not None:
            await self._cached(t.wake.run_id)  # the inbox it writes to is the cached run's
        applied = await self._cache.apply(t)
        await self._write_through(t.run_id)
        return applied

    async def _write_through(self, run_id: str) -> None:
        row = await self._cache.load(run_id)
        if row is None:
            return
        try:
            await self._call("save", to_state(row, None), run_id=run_id)
        except StorageError:
            # The user's storage is the truth: forget what it did not take (whoever owns
            # it), so the next read comes from it rather than from a change it never saved.
            self._cache._evict(run_id)
            raise

    async def load(self, run_id: str) -> RunRow | None:
        """The run, from this process's cache or the user's storage."""
        return await self._cached(run_id)

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs from the user's storage."""
        limit, offset = page(query)
        states = await self._call(
            "list",
            WorkflowFilter(
                name=query.name,
                status=list(query.statuses) if query.statuses is not None else None,
                limit=limit,
                offset=offset,
            ),
        )
        return [_row_from_state(s) for s in states or ()]

    async def delete(self, run_id: str) -> bool:
        """Delete from both, unless this process is executing the run (RunBusyError)."""
        existed = await self._cached(run_id) is not None
        await self._cache.delete(run_id)  # raises RunBusyError before anything is deleted
        await self._call("delete", run_id, run_id=run_id)
        return existed

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The attempts this process recorded (the user's storage keeps none)."""
        return await self._cache.list_attempts(run_id)

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs, read from the user's storage."""
        limit = row_limit(limit, "limit")
        found: list[RunRow] = []
        for name in names:
            for row in await self.list_runs(ListQuery(name=name)):
                if row.status in ("pending", "running", "rolling_back"):
                    cached = await self._cached(row.id)
                    if cached is not None:
                        found.extend(await self._cache.find_recoverable([name], limit))
                        break
        unique = {r.id: r for r in found}
        return list(unique.values())[:limit]

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        """Leases live in the in-process cache."""
        return self._cache.renew_leases(owner, fences, lease_seconds)

    async def _import_unfinished(self, names: Sequence[str]) -> None:
        """Bring the unfinished runs of these workflows from the user's storage into the
        cache, once per workflow name: after that this process's cache is their truth."""
        for name in names:
            if name in self._imported:
                continue
            for row in await self.list_runs(ListQuery(name=name)):
                if row.status not in FINISHED_STATUSES:
                    await self._cached(row.id)
            self._imported.add(name)

    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        """Insert-or-observe among the runs this process knows (single process only)."""
        await self._cached(run.id)  # a run with this id in the user's storage counts
        started = await self._cache.start(
            run,
            lease_owner=lease_owner,
            lease_seconds=lease_seconds,
            idempotency_key=idempotency_key,
            input_hash=input_hash,
        )
        if started.created:
            await self._write_through(run.id)
        return started

    async def claim_due(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease_seconds: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[RunRow]:
        """Claim due runs among the runs this process knows (the user's unfinished runs are
        read in on the first call for each workflow)."""
        await self._import_unfinished(names)
        claimed = await self._cache.claim_due(owner, names, limit, lease_seconds, limits)
        for row in claimed:
            await self._write_through(row.id)
        return claimed

    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        """The earliest timer among the runs this process knows."""
        return await self._cache.next_due(names)

    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        """Into the run's inbox in this process (a WorkflowState has no inbox: a signal not
        yet taken is lost if the process stops)."""
        await self._cached(run_id)
        return await self._cache.send_signal(run_id, name, payload, dedupe_key)

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """The inbox this process holds for the run."""
        return await self._cache.list_signals(run_id)

    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        """The oldest signal of that name waiting in this process's inbox for the run."""
        return await self._cache.first_signal(run_id, name)

    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        """A cancel or pause, kept in this process."""
        await self._cached(run_id)
        return await self._cache.request(run_id, kind, reason)

    async def counts(self, name: str | None = None) -> dict[str, int]:
        """Runs by status, from the user's storage."""
        found: dict[str, int] = {}
        for row in await self.list_runs(ListQuery(name=name)):
            found[row.status] = found.get(row.status, 0) + 1
        return found
