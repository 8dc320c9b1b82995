"""Every error fluxrun raises, under one root.

The tree::

    FluxError
    ├── DefinitionError                 a workflow definition is malformed
    │   └── EmptyWorkflowError          ... it has no steps
    ├── InvalidArgumentError            a public call got a bad argument (type, range, name)
    ├── InvalidInputError               workflow input failed validation or cannot be stored
    │   └── SerializationError          a value is not JSON-representable (input, data, payload)
    ├── UnknownWorkflowError            no workflow registered under that name
    ├── WorkflowNotFoundError           no run with that id
    ├── WorkflowNameMismatchError       the run belongs to another workflow
    ├── WorkflowDefinitionChangedError  steps added, removed, renamed or reordered since it started
    ├── WorkflowNotSuspendedError       a signal was sent to a run that is not waiting
    ├── SignalMismatchError             the run waits for another signal name
    ├── StepNotFoundError               no step with that name
    ├── InvalidStepIndexError           step index out of range
    ├── InvalidStateError               the run's status does not allow the operation
    │   └── EngineClosedError           the engine closed while it was driving the run
    ├── CommittedStepError              a completed commit step cannot run again
    ├── StepTimeoutError                an attempt ran past its timeout
    ├── WaitTimeoutError                a wait(name, timeout=...) saw no signal in time
    ├── IdempotencyConflictError        a start reused an idempotency key with another input
    ├── BatchItemNotRunError            a batch item never started: the batch stopped first
    ├── ChildWorkflowError              a child run did not complete (or could not start)
    ├── NonRetryableError               raised by a step to skip its remaining attempts
    ├── CompensationError               a compensation failed after its retries
    ├── ConcurrentModificationError     a write was based on a stale version
    │   ├── RunBusyError                another live executor owns the run
    │   └── LeaseLostError              this executor no longer owns the run
    └── StorageError                    the storage backend failed
        └── SchemaVersionError          the database schema is newer than this fluxrun

Every error carries structured attributes (``workflow_id``, ``workflow_name``, ``step``) so
that callers need not parse messages.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchItemNotRunError",
    "ChildWorkflowError",
    "CommittedStepError",
    "CompensationError",
    "ConcurrentModificationError",
    "DefinitionError",
    "EmptyWorkflowError",
    "EngineClosedError",
    "FluxError",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidInputError",
    "InvalidStateError",
    "InvalidStepIndexError",
    "LeaseLostError",
    "NonRetryableError",
    "RunBusyError",
    "SchemaVersionError",
    "SerializationError",
    "SignalMismatchError",
    "StepNotFoundError",
    "StepTimeoutError",
    "StorageError",
    "UnknownWorkflowError",
    "WaitTimeoutError",
    "WorkflowDefinitionChangedError",
    "WorkflowNameMismatchError",
    "WorkflowNotFoundError",
    "WorkflowNotSuspendedError",
]


class FluxError(Exception):
    """Root of every error fluxrun raises.

    Attributes:
        workflow_id: The run concerned, when there is one.
        workflow_name: The workflow concerned, when there is one.
        step: The step concerned, when there is one.
        details: Extra structured context (validation errors, statuses, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        workflow_id: str | None = None,
        workflow_name: str | None = None,
        step: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.workflow_id = workflow_id
        self.workflow_name = workflow_name
        self.step = step
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes would be lost by the default pickling of exceptions.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def with_run(error: BaseException, run_id: str, workflow_name: str | None = None) -> None:
    """Make a FluxError raised while handling run ``run_id`` name that run.

    Sets ``workflow_id`` (and ``workflow_name``) when missing and prefixes the message with
    the run id when it does not mention it, so a caller that retries knows the run exists.
    """
    if not isinstance(error, FluxError):
        return
    if error.workflow_id is None:
        error.workflow_id = run_id
    if error.workflow_name is None:
        error.workflow_name = workflow_name
    if run_id not in error.message:
        error.message = f"run {run_id!r}: {error.message}"
        error.args = (error.message, *error.args[1:])


def _rebuild(cls: type[FluxError], message: str, state: dict[str, Any]) -> FluxError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class DefinitionError(FluxError, ValueError):
    """A workflow definition is malformed (duplicate step names, bad options, ...)."""


class EmptyWorkflowError(DefinitionError):
    """A workflow was built without any step."""


class InvalidArgumentError(FluxError, ValueError):
    """A public call received an argument of the wrong type or out of range."""


class InvalidInputError(FluxError, ValueError):
    """Workflow input failed validation; nothing was stored."""


class SerializationError(InvalidInputError):
    """A value cannot be stored as JSON (wrong type, NaN, NUL character, too deep, too big)."""


class UnknownWorkflowError(FluxError, LookupError):
    """No workflow is registered under the given name."""


class WorkflowNotFoundError(FluxError, LookupError):
    """No run exists with the given id."""


class WorkflowNameMismatchError(FluxError):
    """The run was started by a workflow with another name."""


class WorkflowDefinitionChangedError(FluxError):
    """The workflow's steps changed since the run started, so continuing it is unsafe."""


class WorkflowNotSuspendedError(FluxError):
    """A signal was sent to a run that is not suspended."""


class SignalMismatchError(FluxError):
    """The run is suspended waiting for a different signal."""


class StepNotFoundError(FluxError, LookupError):
    """No step with the given name exists in the workflow."""


class InvalidStepIndexError(FluxError, IndexError):
    """A step index is outside the workflow's steps."""


class InvalidStateError(FluxError):
    """The run's current status does not allow the requested operation."""


class EngineClosedError(InvalidStateError):
    """The engine was closed while it drove the run; the run was left for another engine.

    The run is released (not owned), so ``recover()`` of any engine continues it at once.
    """


class CommittedStepError(FluxError):
    """A commit step that already completed cannot be executed again."""


class StepTimeoutError(FluxError, TimeoutError):
    """A step attempt exceeded its timeout."""


class WaitTimeoutError(FluxError, TimeoutError):
    """A ``wait(name, timeout=...)`` saw no signal in time; it fails the waiting step (whose
    retries and compensation apply as for any error)."""


class IdempotencyConflictError(FluxError):
    """A start named an idempotency key (or run id) already used by a run of the same
    workflow with a different input; nothing was started."""


class BatchItemNotRunError(FluxError):
    """The error of a batch item that never started: its batch stopped on an earlier item's
    failure (``continue_on_error=False``) or was cancelled first. It is reported, never
    raised; ``workflow_id`` names the item's run for a durable batch (stored ``cancelled``)."""


class ChildWorkflowError(FluxError):
    """A ``.child`` step's child run failed, was rolled back or cancelled (or could not be
    started); it fails the step, whose retries and compensation apply. ``child_id`` names
    the child run and ``child_status`` how it ended (None: it never started)."""

    def __init__(
        self,
        message: str,
        *,
        child_id: str | None = None,
        child_status: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.child_id = child_id
        self.child_status = child_status


class NonRetryableError(FluxError):
    """Raise from a step to fail it at once, without its remaining attempts."""


class CompensationError(FluxError):
    """A compensation still failed after its retries; the rollback stopped there.

    ``original_error`` holds the message of the step failure that started the rollback; the
    compensation's own exception is ``__cause__``.
    """

    def __init__(self, message: str, *, original_error: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.original_error = original_error


class ConcurrentModificationError(FluxError):
    """A write was based on a stale version of the run and was rejected."""


class RunBusyError(ConcurrentModificationError):
    """Another live executor owns the run (its lease has not expired)."""


class LeaseLostError(ConcurrentModificationError):
    """This executor's ownership of the run was taken over; its writes are fenced off."""


class StorageError(FluxError):
    """The storage backend failed; the message names the operation."""


class SchemaVersionError(StorageError):
    """The database was created by a newer fluxrun than this one."""
