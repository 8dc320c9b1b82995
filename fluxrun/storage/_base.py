"""The store protocol: what the engine asks of a backend, and the rows it exchanges.

A run is one row (:class:`RunRow`) plus one row per step that has an outcome
(:class:`StepRow`). Never-reached steps have no row; the engine shows them as ``pending``.
``ctx.data`` is not stored whole: each step row holds the changes the step made to it
(``changes``), so a step costs in proportion to what it changed, and the data as it was
before any step can be rebuilt by replaying the changes of the rows before it. A run that
stops to wait keeps a :class:`Snapshot` of its data, so continuing it later reads only the
step rows from its snapshot on (:meth:`Store.load_tail`), not its whole history.

Every mutation after :meth:`Store.create` goes through :meth:`Store.apply`, one atomic,
conditional write (a :class:`Transition`): it applies only if the run's ``version`` still
equals ``expected_version`` and, for an owned write, the run's ``fence`` still equals the
writer's. Otherwise nothing is written and a :class:`~fluxrun.errors.ConcurrentModificationError`
(or its subclasses :class:`~fluxrun.errors.LeaseLostError`, :class:`~fluxrun.errors.RunBusyError`)
is raised. Ownership is a lease: an owner id, a fence number raised on every claim, and an
expiry judged by the store's own clock.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .._records import WorkflowStatus
from ..errors import (
    ConcurrentModificationError,
    InvalidArgumentError,
    LeaseLostError,
    RunBusyError,
)
from ._batch import BatchStore
from ._schedules import ScheduleVerbs
from ._types import (
    KEEP,
    Applied,
    AttemptRow,
    Claim,
    Keep,
    ListQuery,
    Renewed,
    RequestKind,
    RunRow,
    SignalRef,
    SignalRow,
    SignalSent,
    Snapshot,
    Started,
    StepRow,
    Transition,
    Wake,
)
from ._workers import WorkerVerbs

__all__ = [
    "FINISHED_STATUSES",
    "KEEP",
    "RECOVERABLE_STATUSES",
    "REQUEST_KINDS",
    "Applied",
    "AttemptRow",
    "Claim",
    "Keep",
    "ListQuery",
    "Renewed",
    "RequestKind",
    "RunRow",
    "SignalRef",
    "SignalRow",
    "SignalSent",
    "Snapshot",
    "Started",
    "StepRow",
    "Store",
    "Transition",
    "Wake",
    "check_request_kind",
    "check_transition",
    "delete_busy_error",
    "stronger_request",
    "transition_error",
]


RECOVERABLE_STATUSES: tuple[str, ...] = (
    WorkflowStatus.PENDING.value,
    WorkflowStatus.RUNNING.value,
    WorkflowStatus.ROLLING_BACK.value,
)
"""Statuses of runs that stopped half-way and that recovery continues."""

FINISHED_STATUSES: tuple[str, ...] = (
    WorkflowStatus.COMPLETED.value,
    WorkflowStatus.FAILED.value,
    WorkflowStatus.ROLLED_BACK.value,
    WorkflowStatus.COMPENSATION_FAILED.value,
    WorkflowStatus.CANCELLED.value,
)
"""Statuses of runs that are over: no signal, request or claim applies to them."""


class Store(ScheduleVerbs, BatchStore, WorkerVerbs, abc.ABC):
    """A backend the engine runs on. Every method is safe to call from one event loop;
    :meth:`renew_leases` is called from a separate thread (schedules: ScheduleVerbs)."""

    #: Whether several processes can share this store (leases then matter across them).
    shared: bool = False

    @abc.abstractmethod
    async def init(self) -> None:
        """Create or migrate the schema; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store may not be used afterwards."""

    @abc.abstractmethod
    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run (without step rows), owned by ``lease_owner`` if given.

        Raises:
            ConcurrentModificationError: a run with this id exists.
        """

    @abc.abstractmethod
    async def apply(self, t: Transition) -> Applied:
        """Apply one transition atomically, or raise and change nothing."""

    @abc.abstractmethod
    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, or None."""

    async def listen(self, wake: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """Call ``wake`` whenever another process may have made a run due (a hint: the
        scheduler polls anyway), until the returned function is awaited; None if this
        store cannot tell (the default)."""
        return None

    async def load_tail(self, run_id: str) -> RunRow | None:
        """The run as a continuation needs it, or None: with its :class:`Snapshot` and only
        the step rows from ``snapshot.at`` on (``steps_from``), when it has a snapshot and its
        cursor is not before it; otherwise as :meth:`load` (all rows, ``steps_from`` 0).

        The default is :meth:`load`: a store that keeps no snapshots is always correct, it
        only reads more. A store that overrides this must also implement
        :meth:`load_steps` and :meth:`read_steps_blocking`.
        """
        return await self.load(run_id)

    async def load_steps(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """The run's step rows with an index below ``before``, in index order."""
        row = await self.load(run_id)
        return () if row is None else tuple(r for r in row.steps if r.index < before)

    def read_steps_blocking(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """:meth:`load_steps`, blocking the calling thread (which may be the event loop's):
        ``ctx.history`` of a run continued from its tail is read this way, once, on first
        use inside a step."""
        raise NotImplementedError(
            f"{type(self).__name__} overrides load_tail but not read_steps_blocking"
        )

    @abc.abstractmethod
    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs matching ``query``, newest first by ``created_at`` (then insertion order)."""

    @abc.abstractmethod
    async def delete(self, run_id: str) -> bool:
        """Delete a run with its step and attempt rows; False if it did not exist.

        Raises:
            RunBusyError: a live lease owns the run (another executor is running it).
        """

    async def list_children(self, parent_id: str) -> list[RunRow]:
        """The runs whose ``parent_id`` is ``parent_id`` (child workflows), oldest first
        (step rows need not be included). The default scans :meth:`list_runs`: correct,
        not fast; the built-in stores use their ``parent_id`` index."""
        found = [r for r in await self.list_runs(ListQuery()) if r.parent_id == parent_id]
        return found[::-1]

    @abc.abstractmethod
    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The run's attempt log (see :class:`AttemptRow`), oldest first, ``seq`` filled in."""

    @abc.abstractmethod
    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease protects.

        That is: status pending, running or rolling_back, and either no owner or a lease
        that expired by the store's clock. Step rows are not included.
        """

    @abc.abstractmethod
    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        """Extend the leases ``owner`` holds (run id -> fence); report the ids it lost and
        the pending cancel/pause requests of the runs it kept.

        Called from a background thread, so it must not use the event loop's connections.
        """

    # -- scheduling (schema 3) ----------------------------------------------------------------

    @abc.abstractmethod
    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        """Insert-or-observe a new run (without step rows), owned by ``lease_owner`` if given.

        If a run with this id, or of this workflow name with this idempotency key (the
        argument, else ``run.idempotency_key``), exists, nothing is written and that run is
        reported with ``created=False`` (the key match wins over the id match). Race-free
        across processes: of concurrent starts with one key exactly one creates the run.
        """

    @abc.abstractmethod
    async def claim_due(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease_seconds: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[RunRow]:
        """Claim up to ``limit`` due runs of these workflows; return them (without step rows)
        in claim order.

        ``limits`` maps workflow names to their concurrency limits: a due run of one of
        them that holds no slot is claimed only while fewer than its limit of runs with
        its name and ``concurrency_key`` hold one (the rules are in
        :mod:`fluxrun.storage._concurrency`; the engine passes ``limits`` only when one of
        its workflows declares a limit, so a store without them works for the others).

        A run is due when no live lease owns it and it is: pending, running or rolling_back
        (unowned, or its lease expired) with no ``run_after`` in the future; suspended with
        ``run_after <= now``; suspended with ``wait_kind == "signal"`` and an unconsumed inbox
        row named ``wait_name``; or unfinished with a pending request. Order: expired leases
        first, then ``priority`` descending, then ``run_after`` (else ``created_at``), then
        insertion. Each claim sets the owner and a lease, raises ``fence``, ``claims`` and
        ``version`` by one (``updated_at`` and ``status`` are left to the claimer's first
        transition), all in one transaction; two claimers never get the same run.
        """

    @abc.abstractmethod
    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        """The earliest ``run_after`` among pending and suspended runs of these workflows
        (possibly in the past), or None: when a scheduler should look again at the latest."""

    @abc.abstractmethod
    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        """Append a signal (``payload``: encoded JSON text) to an unfinished run's inbox.

        The run's row is locked first, so a transition that checks the inbox before
        suspending cannot miss a signal sent meanwhile. The run itself is not changed. A
        ``dedupe_key`` seen before for the run gives ``created=False`` (and the earlier
        row's ``seq``), even when the run has finished since: a sender's retry is answered,
        not refused.

        Raises:
            WorkflowNotFoundError: no run has this id.
            InvalidStateError: the run is finished (see :data:`FINISHED_STATUSES`) and the
                signal is not a repeat.
        """

    @abc.abstractmethod
    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """Every inbox row of the run, consumed or not, by ``seq`` (empty if unknown)."""

    @abc.abstractmethod
    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        """The oldest unconsumed inbox row of the run with this name, or None."""

    @abc.abstractmethod
    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        """Ask whoever drives the run to cancel or pause it; False if the run is finished.

        Idempotent, and a cancel replaces a pending pause (never the reverse); a repeated
        or weaker request leaves the stored one and its reason. The run's version is not
        changed, so its owner's next step commit still applies: the owner learns of the
        request from :meth:`renew_leases` (or a claimer from the run row).

        Raises:
            WorkflowNotFoundError: no run has this id.
        """

    async def external_changes(self) -> int | None:
        """A number that changes whenever another process (or connection) committed to the
        store, read cheaply without a lock (SQLite's ``PRAGMA data_version``); None when the
        store has no such signal (then the scheduler relies on its poll)."""
        return None

    @abc.abstractmethod
    async def counts(self, name: str | None = None) -> dict[str, int]:
        """How many runs (of workflow ``name``, or all) are in each status (absent: 0)."""


def check_transition(run: RunRow, t: Transition, now: dt.datetime) -> None:
    """Raise the error ``t`` gets against ``run``, if any (for stores that check in Python)."""
    error = transition_error(
        run.id, run.name, run.version, run.fence, run.owner, run.lease_until, t, now
    )
    if error is not None:
        raise error


def transition_error(
    run_id: str,
    name: str,
    version: int,
    fence: int,
    owner: str | None,
    lease_until: dt.datetime | None,
    t: Transition,
    now: dt.datetime,
    *,
    live: bool | None = None,
) -> ConcurrentModificationError | None:
    """The error a transition gets against a run in this state, or None if it applies.

    A fenced write whose fence moved gets :class:`LeaseLostError` even if the version moved
    too: the writer lost the run, which is what it must learn (not to retry on a new version).
    ``live`` says whether a live lease holds the run when the store judged that itself
    (SQLite, by its boot clock); None compares ``lease_until`` with ``now``.
    """
    if live is None:
        live = owner is not None and lease_until is not None and lease_until > now
    if t.fence is not None and fence != t.fence:
        return LeaseLostError(
            f"run {run_id!r} was claimed by another executor (fence {fence}, ours {t.fence})",
            workflow_id=run_id,
            workflow_name=name,
        )
    if version != t.expected_version:
        return ConcurrentModificationError(
            f"run {run_id!r} is at version {version}, not {t.expected_version}; "
            "it was changed by someone else",
            workflow_id=run_id,
            workflow_name=name,
        )
    if t.fence is None and live:
        return RunBusyError(
            f"run {run_id!r} is being executed by {owner!r} right now",
            workflow_id=run_id,
            workflow_name=name,
        )
    return None


REQUEST_KINDS: tuple[str, ...] = ("cancel", "pause")


def check_request_kind(kind: object) -> None:
    """Refuse a request kind other than ``"cancel"``/``"pause"`` (nothing is written)."""
    if kind not in REQUEST_KINDS:
        raise InvalidArgumentError(f"a request is 'cancel' or 'pause', got {kind!r}")


def stronger_request(current: str | None, kind: str) -> bool:
    """Whether a request of ``kind`` replaces the pending ``current`` (cancel beats pause)."""
    return current is None or (current == "pause" and kind == "cancel")


def delete_busy_error(run_id: str, name: str | None, owner: str | None) -> RunBusyError:
    """The error :meth:`Store.delete` raises for a run a live lease owns."""
    return RunBusyError(
        f"run {run_id!r} cannot be deleted: it is being executed by {owner!r} right now",
        workflow_id=run_id,
        workflow_name=name,
    )
