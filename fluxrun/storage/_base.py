"""The store protocol: what the engine asks of a backend, and the rows it exchanges.

A run is one row (:class:`RunRow`) plus one row per step that has an outcome
(:class:`StepRow`). Never-reached steps have no row; the engine shows them as ``pending``.
``ctx.data`` is not stored whole: each step row holds the changes the step made to it
(``changes``), so a step costs in proportion to what it changed, and the data as it was
before any step can be rebuilt by replaying the changes of the rows before it.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._records import WorkflowStatus
from ..errors import ConcurrentModificationError, LeaseLostError, RunBusyError

__all__ = [
    "KEEP",
    "RECOVERABLE_STATUSES",
    "Applied",
    "AttemptRow",
    "Claim",
    "Keep",
    "ListQuery",
    "RunRow",
    "StepRow",
    "Store",
    "Transition",
    "check_transition",
    "delete_busy_error",
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


@dataclass(frozen=True, slots=True)
class Claim:
    """Take ownership of an unowned (or expired) run as part of a transition."""

    owner: str
    lease_seconds: float


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


RECOVERABLE_STATUSES: tuple[str, ...] = (
    WorkflowStatus.PENDING.value,
    WorkflowStatus.RUNNING.value,
    WorkflowStatus.ROLLING_BACK.value,
)
"""Statuses of runs that stopped half-way and that recovery continues."""


class Store(abc.ABC):
    """A backend the engine runs on. Every method is safe to call from one event loop;
    :meth:`renew_leases` is called from a separate thread."""

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
    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> set[str]:
        """Extend the leases ``owner`` holds (run id -> fence); return the ids it lost.

        Called from a background thread, so it must not use the event loop's connections.
        """


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
) -> ConcurrentModificationError | None:
    """The error a transition gets against a run in this state, or None if it applies.

    A fenced write whose fence moved gets :class:`LeaseLostError` even if the version moved
    too: the writer lost the run, which is what it must learn (not to retry on a new version).
    """
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
    if t.fence is None and owner is not None and lease_until is not None and lease_until > now:
        return RunBusyError(
            f"run {run_id!r} is being executed by {owner!r} right now",
            workflow_id=run_id,
            workflow_name=name,
        )
    return None


def delete_busy_error(run_id: str, name: str | None, owner: str | None) -> RunBusyError:
    """The error :meth:`Store.delete` raises for a run a live lease owns."""
    return RunBusyError(
        f"run {run_id!r} cannot be deleted: it is being executed by {owner!r} right now",
        workflow_id=run_id,
        workflow_name=name,
    )
