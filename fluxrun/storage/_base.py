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
from dataclasses import dataclass, field
from typing import Literal

from .._records import WorkflowStatus
from ..errors import (
    ConcurrentModificationError,
    InvalidArgumentError,
    LeaseLostError,
    RunBusyError,
)
from ._batch import BatchStore
from ._schedules import ScheduleVerbs
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
    "check_request_kind",
    "check_transition",
    "delete_busy_error",
    "stronger_request",
    "transition_error",
]


class Keep:
    """Sentinel type: leave this column as it is."""

    _instance: Keep | None = None

    def __new__(cls) -> Keep:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


@dataclass(frozen=True, slots=True)
class StepRow:
    """The recorded outcome of one step of a run (its history entry).

    ``output`` is encoded JSON text or None. ``changes`` is encoded JSON text of
    ``{"set": {key: value, ...}, "del": [key, ...]}``: what the step did to ``ctx.data``.
    ``compensation_changes`` is the same for what its compensation did. ``fence`` is the
    claim that wrote the row.
    """

    index: int
    name: str
    status: str
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    suspended_at: dt.datetime | None = None
    compensated_at: dt.datetime | None = None
    waiting_for: str | None = None
    duration_ms: float | None = None
    output: str | None = None
    error: str | None = None
    retries: int = 0
    changes: str | None = None
    compensation_changes: str | None = None
    fence: int = 0
    error_type: str | None = None
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One finished attempt of a step or of its compensation, kept for ``engine.attempts``.

    The *final* forward attempt of a step whose row is still in ``flux_steps`` is not stored
    here (the step row is that attempt); every other attempt is: retried failures, each
    compensation attempt, and the rows a ``resume``/``retry_step`` replaced. ``kind`` is
    ``"step"`` or ``"compensation"``; ``status`` a :class:`StepStatus` value (``failed``,
    ``completed``, ``suspended``, ``skipped``, ``compensated``). ``seq`` is assigned by the
    store (insertion order within the run); writers leave it 0.
    """

    index: int
    name: str
    attempt: int
    kind: str
    status: str
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    duration_ms: float | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    seq: int = 0


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run as stored, with its recorded step rows ordered by index.

    ``input`` is encoded JSON text; ``step_names`` is the definition's step list when the run
    started (used to refuse continuing a run whose workflow changed shape). ``owner``,
    ``fence`` and ``lease_until`` describe the current lease (``lease_until`` by the store's
    clock). ``claims`` counts claims since the run last recorded progress or released cleanly.

    Scheduling columns (schema 3): ``run_after`` is when a waiting run becomes due (store
    clock; None: no timer), ``wait_kind`` what it waits for (``"signal"``, ``"sleep"``,
    ``"backoff"``, ...; a signal wait names its signal in ``wait_name``), ``attempt`` the
    durable attempt number of the current step, ``requested`` a pending ``"cancel"`` or
    ``"pause"`` (with ``request_reason``), ``priority`` the claim order (higher first), and
    ``idempotency_key`` the key the run was started with (unique per workflow name).
    """

    id: str
    name: str
    status: str
    input: str
    step_names: tuple[str, ...]
    current_step: int
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int
    fence: int
    definition_version: str | None = None
    error: str | None = None
    completed_at: dt.datetime | None = None
    owner: str | None = None
    lease_until: dt.datetime | None = None
    claims: int = 0
    wait_name: str | None = None
    steps: tuple[StepRow, ...] = ()
    run_after: dt.datetime | None = None
    wait_kind: str | None = None
    attempt: int = 0
    requested: str | None = None
    request_reason: str | None = None
    priority: int = 0
    idempotency_key: str | None = None
    snapshot: Snapshot | None = None
    steps_from: int = 0
    """Only :meth:`Store.load_tail` sets these: the run's snapshot, and the first index
    whose row ``steps`` holds (the rows before it were left out; 0: all rows are there)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """``ctx.data`` and ``ctx.signals`` as they were when step ``at`` started: ``text`` is
    the codec's JSON ``{"data": {...}, "signals": {...}}``. Written when a run stops to wait
    (suspended, paused), so continuing it needs only the step rows from ``at`` on."""

    text: str
    at: int


@dataclass(frozen=True, slots=True)
class Claim:
    """Take ownership of an unowned (or expired) run as part of a transition."""

    owner: str
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class SignalRef:
    """Which inbox row a transition consumes (by its ``seq``), and the step consuming it."""

    seq: int
    step: int


@dataclass(frozen=True, slots=True)
class Transition:
    """One atomic, conditional change to a run.

    Applies only if the run's version equals ``expected_version`` and:

    * with ``fence`` set: the run's fence still equals it (else ``LeaseLostError``);
    * with ``claim`` set: the run is not owned by a live lease (else ``RunBusyError``); the
      run gets the new owner, ``fence + 1``, a fresh lease and ``claims + 1``;
    * with neither: the run is not owned by a live lease (else ``RunBusyError``).

    Then, in one transaction: the run columns are updated (``KEEP`` leaves one alone);
    rows ``>= delete_steps_from`` are deleted except those in ``keep_steps``; ``insert_step``
    is inserted (a row already at that index makes the whole transition fail with
    ``ConcurrentModificationError``: a step result is recorded once); ``update_step``
    replaces the row at its index (which must exist); ``attempts`` are appended to the run's
    attempt log (in the order given). ``renew_lease`` extends an owned lease;
    ``release`` clears owner and lease and sets ``claims`` to 0; recording a step outcome
    (progress: ``insert_step`` or ``update_step`` without a ``claim``) sets it to 1 (the
    current claim), so ``claims`` counts the claims since the run last moved forward.
    ``version`` rises by one.

    Scheduling patches (``KEEP`` by default, so a plain step commit writes none of them):
    ``run_after``, ``wait_kind``, ``attempt``, and ``requested`` (``None``: clear a pending
    request and its reason; ``"pause"``: clear it only if it is a pause, so a cancel asked
    meanwhile survives). ``consume_signal`` marks that inbox row of the run
    consumed (``consumed_by_step``, ``consumed_at = updated_at``) in the same transaction;
    if it does not exist or was consumed already the whole transition fails with
    ``ConcurrentModificationError``: a signal is consumed exactly once.

    ``run_after_from``: ``run_after`` is a delay, not an instant: the run becomes due
    ``run_after - run_after_from`` after the store's own now (so a writer's clock never makes
    a timer early or late by the store's).

    ``step_names`` (with ``definition_version``) records the steps of a run that was started
    by workflow name alone (a :class:`~fluxrun.FluxClient`), once an engine that has the
    workflow takes it.

    ``snapshot`` replaces the run's :class:`Snapshot`. Without one, a ``delete_steps_from``
    below the stored snapshot's ``at`` clears it (the rows it stands for are gone).
    """

    run_id: str
    expected_version: int
    updated_at: dt.datetime
    fence: int | None = None
    claim: Claim | None = None
    status: str | Keep = KEEP
    current_step: int | Keep = KEEP
    error: str | Keep | None = KEEP
    completed_at: dt.datetime | Keep | None = KEEP
    wait_name: str | Keep | None = KEEP
    insert_step: StepRow | None = None
    update_step: StepRow | None = None
    delete_steps_from: int | None = None
    keep_steps: tuple[int, ...] = ()
    renew_lease: float | None = None
    release: bool = False
    attempts: tuple[AttemptRow, ...] = ()
    run_after: dt.datetime | Keep | None = KEEP
    wait_kind: str | Keep | None = KEEP
    attempt: int | Keep = KEEP
    requested: Keep | Literal["pause"] | None = KEEP
    consume_signal: SignalRef | None = None
    snapshot: Snapshot | None = None
    run_after_from: dt.datetime | None = None
    step_names: tuple[str, ...] | None = None
    definition_version: str | Keep | None = KEEP


@dataclass(frozen=True, slots=True)
class Applied:
    """What a transition left: the run's new version and fence."""

    version: int
    fence: int


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated listing request: exact name, any of the statuses, newest first, paged."""

    name: str | None = None
    statuses: tuple[WorkflowStatus, ...] | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    """What :meth:`Store.start` found: the run's id, whether this call created it, and the
    ``input_hash`` stored with the run (the existing run's when ``created`` is False)."""

    run_id: str
    created: bool
    input_hash: str | None = None


@dataclass(frozen=True, slots=True)
class SignalRow:
    """One row of a run's signal inbox. ``seq`` is the insertion order within the run (from
    1); ``payload`` encoded JSON text; ``created_at`` by the store's clock;
    ``consumed_by_step``/``consumed_at`` are None until a transition consumes it."""

    seq: int
    name: str
    payload: str
    dedupe_key: str | None
    created_at: dt.datetime
    consumed_by_step: int | None = None
    consumed_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SignalSent:
    """What :meth:`Store.send_signal` did: the inbox row's ``seq``, and False in ``created``
    when the dedupe key was seen before for that run (``seq`` is then the earlier row's)."""

    seq: int
    created: bool


@dataclass(frozen=True, slots=True)
class Renewed:
    """What :meth:`Store.renew_leases` found: the runs the owner lost, and for the runs it
    still holds, the pending request of each that has one (run id -> ``"cancel"``/``"pause"``)."""

    lost: set[str] = field(default_factory=set)
    requested: dict[str, str] = field(default_factory=dict)


RequestKind = Literal["cancel", "pause"]

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
        self, owner: str, names: Sequence[str], limit: int, lease_seconds: float
    ) -> list[RunRow]:
        """Claim up to ``limit`` due runs of these workflows; return them (without step rows)
        in claim order.

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
