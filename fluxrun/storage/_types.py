"""The rows and transitions a :class:`~fluxrun.storage._base.Store` exchanges with the
engine: a run (:class:`RunRow`), its step rows (:class:`StepRow`), attempt log rows, inbox
rows, and the one conditional write of a run (:class:`Transition`). Plain frozen records:
every store reads and writes them the same way."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from .._records import WorkflowStatus

__all__ = [
    "KEEP",
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
    "Transition",
    "Wake",
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
    ``concurrency_key`` (schema 9/8): the group of a workflow's concurrency limit the run
    counts in (``""`` for a limit without a key; None: no limit, or not computed yet).
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
    concurrency_key: str | None = None
    parent_id: str | None = None
    """The run that started this one as its child (``.child`` steps), or None."""
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
class Wake:
    """A signal a transition appends to another run's inbox in the same transaction: a
    child run's end, for its parent. Applied only if run ``run_id`` exists and is not
    finished; otherwise it is dropped and the transition applies all the same."""

    run_id: str
    name: str
    payload: str
    """Encoded JSON text."""


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
    workflow takes it. ``concurrency_key`` records the group of a limited workflow's run
    whose key was not known when it was stored (started by name, by a schedule).

    ``snapshot`` replaces the run's :class:`Snapshot`. Without one, a ``delete_steps_from``
    below the stored snapshot's ``at`` clears it (the rows it stands for are gone).

    ``wake`` appends a signal to another run's inbox (see :class:`Wake`) if, and only if,
    the transition applies; a store that can tell other processes that a run became due
    (PostgreSQL's ``NOTIFY``) does so after it.
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
    concurrency_key: str | Keep | None = KEEP
    wake: Wake | None = None


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
