"""Child workflows (SPEC §7): what a ``.child`` step is, and the names and payloads that
connect a child run to its parent.

A child step's handler computes the child's input and returns a :class:`ChildMarker`; the
driver (:mod:`fluxrun._child_runs`) then starts the child run and suspends the parent on the
signal :func:`child_signal` names. The child's end (completed, failed, rolled back,
compensation failed, cancelled) puts that signal, with :func:`outcome_text` as its payload,
into the parent's inbox in the same store transaction as the child's last write
(:class:`~fluxrun.storage.Wake`). So the wait is an ordinary durable signal wait; these
names keep child waits apart from the signals users send.

This module holds no engine machinery, so the definitions and the stores' records can
import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from ._codec import decode, encode, validate_text
from .errors import DefinitionError, InvalidArgumentError, SerializationError

if TYPE_CHECKING:
    from ._context import WorkflowContext

__all__ = [
    "CHILD_PREFIX",
    "ChildMarker",
    "ChildOutcome",
    "ChildSpec",
    "check_signal_name",
    "child_handler",
    "child_id",
    "child_of",
    "child_signal",
    "child_spec",
    "flow_name",
    "is_child_signal",
    "is_user_signal",
    "outcome_text",
    "read_outcome",
]

CHILD_PREFIX = "flux:child:"
"""Signal names starting with this are reserved: they carry child runs' outcomes."""

_UNLIMITED = 1 << 62  # the child's data was stored already, key by key, within the limit


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What a ``.child`` step starts: ``flow`` (a builder, ``Workflow``, definition or the
    name of a registered workflow) with the input ``input(ctx)`` gives (None: no input)."""

    flow: Any
    input: Callable[[WorkflowContext], Any] | None


@dataclass(frozen=True, slots=True)
class ChildMarker:
    """What a child step's handler returns: start a run of ``flow`` with ``input``."""

    flow: Any
    input: Any


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """How a child run ended, as its parent's inbox got it."""

    child_id: str
    workflow: str
    status: str
    data: Any
    error: str | None

    @property
    def completed(self) -> bool:
        """Whether the child completed (else it failed, rolled back or was cancelled)."""
        return self.status == "completed"


def flow_name(flow: Any) -> str:
    """The workflow name ``flow`` stands for (builders, definitions and names all have one)."""
    return flow if isinstance(flow, str) else str(getattr(flow, "name", "?"))


def child_spec(workflow: str, step: object, flow: object, input: object) -> ChildSpec:
    """Check a ``.child`` step's ``flow`` and ``input``.

    Raises:
        DefinitionError: ``flow`` is not a workflow or a valid name; ``input`` is not
            callable.
    """
    where = f"child step {step!r} of workflow {workflow!r}"
    if isinstance(flow, str):
        try:
            validate_text(flow, f"{where}: the child workflow's name", max_length=200)
        except SerializationError as exc:
            raise DefinitionError(exc.message, workflow_name=workflow) from None
    elif not callable(getattr(flow, "build", None)):
        raise DefinitionError(
            f"{where}: flow must be a workflow (builder, Workflow, definition or registered "
            f"name), got {type(flow).__name__}",
            workflow_name=workflow,
        )
    if input is not None and not callable(input):
        raise DefinitionError(
            f"{where}: input must be a function of ctx (or None), got {input!r}",
            workflow_name=workflow,
        )
    return ChildSpec(flow, input)


def child_handler(spec: ChildSpec) -> Callable[[WorkflowContext], Any]:
    """The handler of a child step: one attempt computes the child's input. It is async so
    that it runs on the event loop (an input function is expected to be cheap)."""

    async def start_child(ctx: WorkflowContext) -> ChildMarker:
        value = None if spec.input is None else spec.input(ctx)
        if inspect.isawaitable(value):
            value = await value
        return ChildMarker(spec.flow, value)

    return start_child


def child_id(parent_id: str, step: str, ordinal: int) -> str:
    """The id of the child run that the ``ordinal``-th try (from 1, counted over the run's
    whole life: retries and resumes alike) of step ``step`` starts. The same try after a
    crash gets the same id, so the start is idempotent; every new try gets a new one."""
    base = f"{parent_id}:{step}"
    return base if ordinal == 1 else f"{base}:{ordinal}"


def child_signal(child: str) -> str:
    """The signal that carries child run ``child``'s outcome to its parent."""
    return CHILD_PREFIX + child


def is_child_signal(name: str | None) -> bool:
    """Whether ``name`` is a child outcome's signal (a parent waiting for a child)."""
    return name is not None and name.startswith(CHILD_PREFIX)


def check_signal_name(name: str) -> str:
    """Refuse a user's signal with a reserved name (it would pose as a child's outcome)."""
    if name.startswith(CHILD_PREFIX):
        raise InvalidArgumentError(
            f"signal names starting with {CHILD_PREFIX!r} are reserved for child runs' "
            f"outcomes, got {name!r}"
        )
    return name


def is_user_signal(name: str | None) -> TypeGuard[str]:
    """Whether ``name`` is a signal a user sent (not None, not a child's outcome)."""
    return name is not None and not name.startswith(CHILD_PREFIX)


def child_of(name: str | None) -> str | None:
    """The child run id a child outcome's signal names, else None."""
    if name is None or not name.startswith(CHILD_PREFIX):
        return None
    return name[len(CHILD_PREFIX) :]


def outcome_text(
    child: str, workflow: str, status: str, data: dict[str, Any] | None, error: str | None
) -> str:
    """The payload of a child's outcome signal (``data`` is kept for a completed child only)."""
    if status != "completed":
        data = None
    return encode(
        {"child": child, "workflow": workflow, "status": status, "data": data, "error": error},
        what=f"the outcome of child run {child!r}",
        max_size=_UNLIMITED,
    )


def read_outcome(payload: str, child: str) -> ChildOutcome:
    """The outcome in a child signal's payload; a payload that is not one (a user sent a
    signal with a reserved name) reads as a failure saying so."""
    try:
        got = decode(payload)
        return ChildOutcome(
            child_id=str(got["child"]),
            workflow=str(got["workflow"]),
            status=str(got["status"]),
            data=got.get("data"),
            error=got.get("error"),
        )
    except (ValueError, KeyError, TypeError):
        return ChildOutcome(child, "?", "failed", None, "malformed child outcome signal")
