"""Starting runs and asking things of them: ``start`` (idempotent), the signal inbox,
cancel, pause and unpause, and :class:`RunHandle`. These only write rows (and wake the
local scheduler); the scheduler, or the caller through ``execute``, drives the runs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from ._children import check_signal_name
from ._codec import decode, encode, input_hash
from ._concurrency import concurrency_key
from ._context import MAX_WAIT_SECONDS
from ._definition import WorkflowDefinition
from ._driver import utcnow
from ._options import naming, text_arg
from ._records import FluxResult, WorkflowState, WorkflowStatus
from ._registry import FlowLike, Registry
from ._retry import seconds
from ._runtime import Runtime
from ._scheduler import Scheduler
from ._state import to_state
from .errors import (
    DefinitionError,
    IdempotencyConflictError,
    InvalidArgumentError,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
)
from .storage._base import RunRow, Store

__all__ = [
    "NewRun",
    "RunControl",
    "RunHandle",
    "check_priority",
    "opt_text",
    "prepare_run",
    "request_run",
    "send_signal",
    "start_run",
]


@dataclass(frozen=True, slots=True)
class NewRun:
    """A validated new run, before it is stored."""

    row: RunRow
    typed: Any
    plain: Any
    input_hash: str


def prepare_run(
    rt: Runtime,
    definition: WorkflowDefinition,
    input: Any,
    *,
    run_id: str | None,
    idempotency_key: str | None,
    delay: float | None,
    priority: int = 0,
) -> NewRun:
    """Validate and encode a new run's input; nothing is stored.

    Raises:
        InvalidInputError: the input failed validation or cannot be stored.
        InvalidArgumentError: ``delay`` is longer than 100 years.
    """
    if delay is not None and delay > MAX_WAIT_SECONDS:
        raise InvalidArgumentError(f"delay must be at most 100 years, got {delay:g} seconds")
    spec = definition.input_spec
    typed = input if spec is None else spec.validate(input, definition.name)
    plain = typed if spec is None else spec.to_plain(typed)
    input_text = encode(plain, what="input", max_size=rt.settings.max_value_size)
    plain = decode(input_text)
    if spec is None:
        typed = plain
    now = utcnow()
    row = RunRow(
        id=run_id if run_id is not None else str(uuid.uuid4()),
        name=definition.name,
        status=WorkflowStatus.PENDING.value,
        input=input_text,
        step_names=definition.step_names,
        current_step=0,
        created_at=now,
        updated_at=now,
        version=1,
        fence=1,
        definition_version=definition.version,
        run_after=None if not delay else rt.settings.clock.now() + dt.timedelta(seconds=delay),
        idempotency_key=idempotency_key,
        priority=priority,
        concurrency_key=None
        if definition.concurrency is None
        else concurrency_key(definition.concurrency, typed, definition.name),
    )
    hashed = input_hash(input_text) if run_id is not None or idempotency_key else ""
    return NewRun(row=row, typed=typed, plain=plain, input_hash=hashed)


async def start_run(rt: Runtime, new: NewRun, *, own: bool) -> tuple[str, bool]:
    """Store ``new`` (owned by this engine when ``own``) unless a run with its id or
    idempotency key exists; return the run's id and whether it was created here.

    Raises:
        IdempotencyConflictError: that run exists with another input.
        WorkflowNameMismatchError: a run with this id belongs to another workflow.
    """
    row = new.row
    owner = rt.settings.owner if own else None
    if not new.input_hash:
        await rt.store.create(row, lease_owner=owner, lease_seconds=rt.settings.lease_seconds)
        return row.id, True
    started = await rt.store.start(
        row,
        lease_owner=owner,
        lease_seconds=rt.settings.lease_seconds,
        idempotency_key=row.idempotency_key,
        input_hash=new.input_hash,
    )
    if started.created:
        return started.run_id, True
    existing = await rt.store.load(started.run_id)
    if existing is not None and existing.name != row.name:
        raise WorkflowNameMismatchError(
            f"run {started.run_id!r} exists and belongs to workflow {existing.name!r}, not "
            f"{row.name!r}",
            workflow_id=started.run_id,
            workflow_name=row.name,
        )
    if started.input_hash is not None and started.input_hash != new.input_hash:
        by = (
            f"idempotency key {row.idempotency_key!r}"
            if row.idempotency_key is not None
            else f"id {row.id!r}"
        )
        raise IdempotencyConflictError(
            f"a run of {row.name!r} with {by} exists ({started.run_id!r}) with a different "
            "input; nothing was started",
            workflow_id=started.run_id,
            workflow_name=row.name,
        )
    return started.run_id, False


async def send_signal(
    rt: Runtime, run_id: str, name: str, payload: Any, dedupe_key: str | None
) -> bool:
    """Put a signal in a run's inbox; False if ``dedupe_key`` was seen for that run."""
    text = encode(payload, what=f"payload of signal {name!r}", max_size=rt.settings.max_value_size)
    sent = await rt.store.send_signal(run_id, name, text, dedupe_key)
    if sent.created:
        rt.on_idle()  # the run may be due now, and this process may be the one to drive it
    return sent.created


async def request_run(rt: Runtime, run_id: str, kind: str, reason: str | None) -> bool:
    """Ask for a cancel or pause of a run; False if the run is already finished."""
    if kind == "pause":
        row = await rt.store.load(run_id)
        if row is not None and row.status == WorkflowStatus.PAUSED.value:
            # Paused already: a stored request would only make the run due (a claim that
            # changes nothing, and races an unpause).
            return True
    asked = await rt.store.request(run_id, kind, reason)  # type: ignore[arg-type]
    if asked:
        # The driver here (if any) acts at once; otherwise a claimer sees it in the row.
        if not rt.interrupt(run_id, kind, reason):
            rt.on_idle()
    return asked


class RunHandle:
    """A run started (or found) by ``start`` or ``handle``: wait for its result, read it.

    ``await handle.result(timeout=None)`` returns once the run is finished (``completed``,
    ``failed``, ``rolled_back``, ``compensation_failed``, ``cancelled``) or needs something
    from outside (suspended on a signal, ``paused``), whichever process drives it; it waits
    through sleeps and retry backoffs.
    """

    __slots__ = ("_engine", "created", "id")

    def __init__(self, engine: RunControl, run_id: str, *, created: bool = False) -> None:
        self._engine = engine
        self.id = run_id
        self.created = created

    async def result(self, timeout: float | dt.timedelta | None = None) -> FluxResult:
        """Wait for the run's result (see the class docstring).

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the run goes on).
            WorkflowNotFoundError: the run does not exist (or was deleted).
        """
        if isinstance(timeout, dt.timedelta):
            timeout = timeout.total_seconds()
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise InvalidArgumentError(
                f"result timeout must be seconds >= 0 or None, got {timeout!r}"
            )
        return await self._engine._runtime.wait_result(self.id, timeout)

    async def state(self) -> WorkflowState:
        """The run as stored now."""
        engine = self._engine
        row = await engine._store.load(self.id)
        if row is None:
            raise WorkflowNotFoundError(f"Workflow not found: {self.id}", workflow_id=self.id)
        return to_state(row, engine._registry.input_spec(row.name))

    async def send_signal(
        self, name: str, payload: Any = None, *, dedupe_key: str | None = None
    ) -> bool:
        """``engine.send_signal`` for this run."""
        return await self._engine.send_signal(self.id, name, payload, dedupe_key=dedupe_key)

    async def cancel(self, *, reason: str | None = None) -> bool:
        """``engine.cancel`` for this run."""
        return await self._engine.cancel(self.id, reason=reason)

    def __repr__(self) -> str:
        return f"RunHandle(id={self.id!r})"


def check_priority(priority: object) -> int:
    """A run's priority: an int in the 32-bit range (higher is claimed first)."""
    if type(priority) is not int or not -(2**31) <= priority < 2**31:
        raise InvalidArgumentError(
            f"priority must be an int between -2**31 and 2**31 - 1, got {priority!r}"
        )
    return priority


def opt_text(value: str | None, what: str) -> str | None:
    """An optional text argument, checked like :func:`text_arg` when given."""
    return None if value is None else text_arg(value, what)


class RunControl:
    """The engine's calls that start runs and ask things of them without driving them:
    the scheduler (or ``execute``) does the driving."""

    _runtime: Runtime
    _registry: Registry
    _scheduler: Scheduler
    _store: Store

    async def _ensure_ready(self) -> None:
        raise NotImplementedError

    async def start(
        self,
        flow: FlowLike,
        input: Any = None,
        *,
        id: str | None = None,
        idempotency_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        priority: int = 0,
    ) -> RunHandle:
        """Store a new run and return at once; the scheduler drives it (in this process,
        unless another engine claims it first). Among due runs, a higher ``priority`` is
        claimed first (by any engine on the store).

        Two starts of one workflow with the same ``idempotency_key`` (or the same ``id``),
        from any processes at once, make one run: the second gets a handle to the first
        (``handle.created`` is False). ``delay`` (seconds or timedelta) makes the run due
        that much later.

        Raises:
            InvalidInputError: the input failed validation or cannot be stored.
            IdempotencyConflictError: the key (or id) is taken by a run with another input.
        """
        definition = self._registry.adopt(flow)
        priority = check_priority(priority)
        wait = None
        if delay is not None:
            try:
                wait = seconds(delay, "delay", allow_zero=True)
            except DefinitionError as exc:
                raise InvalidArgumentError(exc.message) from None
        new = prepare_run(
            self._runtime,
            definition,
            input,
            run_id=opt_text(id, "id"),
            idempotency_key=opt_text(idempotency_key, "idempotency_key"),
            delay=wait,
            priority=priority,
        )
        await self._ensure_ready()
        with naming(new.row.id, definition.name):
            run_id, created = await start_run(self._runtime, new, own=False)
        if created:
            self._scheduler.wake()
        return RunHandle(self, run_id, created=created)

    def handle(self, run_id: str) -> RunHandle:
        """A handle on an existing run (by id), to wait for its result."""
        return RunHandle(self, text_arg(run_id, "run id"))

    async def send_signal(
        self, run_id: str, name: str, payload: Any = None, *, dedupe_key: str | None = None
    ) -> bool:
        """Put a signal in a run's inbox; the run takes it when it waits for ``name`` (at
        once if it waits now). Signals of one name are taken oldest first, each by one
        wait. Returns False when ``dedupe_key`` was already used for this run.

        Raises:
            WorkflowNotFoundError: no run has this id.
            InvalidStateError: the run is finished.
            InvalidInputError: the payload cannot be stored.
            InvalidArgumentError: ``name`` starts with ``"flux:child:"`` (reserved).
        """
        run_id = text_arg(run_id, "run id")
        name = check_signal_name(text_arg(name, "signal name"))
        dedupe = opt_text(dedupe_key, "dedupe_key")
        await self._ensure_ready()
        with naming(run_id, None):
            return await send_signal(self._runtime, run_id, name, payload, dedupe)

    async def cancel(self, run_id: str, *, reason: str | None = None) -> bool:
        """Cancel a run: a running async step is interrupted at once (a sync one at its
        end), the completed steps are compensated (rule 11, the pivot rule applies) and the
        run ends ``cancelled`` with ``reason``. Works whoever drives the run, and on
        suspended, sleeping and paused runs; idempotent. False if the run had finished.

        Raises:
            WorkflowNotFoundError: no run has this id.
        """
        run_id = text_arg(run_id, "run id")
        why = opt_text(reason, "reason")
        await self._ensure_ready()
        with naming(run_id, None):
            return await request_run(self._runtime, run_id, "cancel", why)

    async def pause(self, run_id: str) -> bool:
        """Stop a run at its next step boundary and mark it ``paused`` (a waiting run at
        once); idempotent. False if the run had finished.

        Raises:
            WorkflowNotFoundError: no run has this id.
        """
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        with naming(run_id, None):
            return await request_run(self._runtime, run_id, "pause", None)

    async def unpause(self, run_id: str) -> bool:
        """Make a paused run due again: it continues where it stopped (a waiting run goes
        back to waiting). False if it was not paused.

        Raises:
            WorkflowNotFoundError: no run has this id.
        """
        run_id = text_arg(run_id, "run id")
        await self._ensure_ready()
        with naming(run_id, None):
            row = await self._store.load(run_id)
            if row is None:
                raise WorkflowNotFoundError(f"Workflow not found: {run_id}", workflow_id=run_id)
            return await self._runtime.unpause(row)
