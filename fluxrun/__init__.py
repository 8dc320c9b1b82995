"""fluxrun: durable workflows for Python.

Define ordered steps with retries, timeouts, conditions, compensations and waits for
signals; run them durably on embedded SQLite (or PostgreSQL, or in memory).
"""

from __future__ import annotations

from ._batches import BatchHandle, BatchItemResult, BatchProgress, BatchResult
from ._client import FluxClient
from ._context import Flux, SleepMarker, WaitMarker, WorkflowContext, sleep, sleep_until, wait
from ._control import RunHandle
from ._definition import (
    StepDefinition,
    StepDescriptor,
    Workflow,
    WorkflowBuilder,
    WorkflowDefinition,
    WorkflowDescriptor,
    create_workflow,
)
from ._engine import FluxEngine
from ._records import (
    FluxResult,
    StepAttempt,
    StepExecution,
    StepStatus,
    WorkflowFilter,
    WorkflowState,
    WorkflowStatus,
)
from ._retry import RetryPolicy
from ._schedules import ScheduleInfo
from ._sync import SyncFluxEngine
from ._trace import FluxLogger, FluxTraceEvent, FluxTraceSink
from ._whole_state_storage import WorkflowStorage
from .errors import (
    BatchItemNotRunError,
    ChildWorkflowError,
    CommittedStepError,
    CompensationError,
    ConcurrentModificationError,
    DefinitionError,
    EmptyWorkflowError,
    EngineClosedError,
    FluxError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidInputError,
    InvalidStateError,
    InvalidStepIndexError,
    LeaseLostError,
    NonRetryableError,
    RunBusyError,
    SchemaVersionError,
    SerializationError,
    SignalMismatchError,
    StepNotFoundError,
    StepTimeoutError,
    StorageError,
    UnknownWorkflowError,
    WaitTimeoutError,
    WorkflowDefinitionChangedError,
    WorkflowNameMismatchError,
    WorkflowNotFoundError,
    WorkflowNotSuspendedError,
)
from .storage._workers import WorkerInfo
from .storage.memory import MemoryStorage
from .storage.postgres import PostgresStorage
from .storage.sqlite import SQLiteStorage
from .trace.jsonfile import JsonFileTraceSink

__version__ = "0.1.0"

# No NullHandler on purpose: an application that configures no logging still sees fluxrun's
# warnings and errors (a failing hook, a failed step) on stderr through logging.lastResort.


def _publish(names: list[str]) -> None:
    # Public objects show their public path in reprs, tracebacks and pickles ("fluxrun.X"
    # rather than "fluxrun._engine.X"); the private module layout stays free to change.
    for name in names:
        obj = globals()[name]
        if isinstance(obj, type) or callable(obj):
            obj.__module__ = __name__


__all__ = [
    "BatchHandle",
    "BatchItemNotRunError",
    "BatchItemResult",
    "BatchProgress",
    "BatchResult",
    "ChildWorkflowError",
    "CommittedStepError",
    "CompensationError",
    "ConcurrentModificationError",
    "DefinitionError",
    "EmptyWorkflowError",
    "EngineClosedError",
    "Flux",
    "FluxClient",
    "FluxEngine",
    "FluxError",
    "FluxLogger",
    "FluxResult",
    "FluxTraceEvent",
    "FluxTraceSink",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidInputError",
    "InvalidStateError",
    "InvalidStepIndexError",
    "JsonFileTraceSink",
    "LeaseLostError",
    "MemoryStorage",
    "NonRetryableError",
    "PostgresStorage",
    "RetryPolicy",
    "RunBusyError",
    "RunHandle",
    "SQLiteStorage",
    "ScheduleInfo",
    "SchemaVersionError",
    "SerializationError",
    "SignalMismatchError",
    "SleepMarker",
    "StepAttempt",
    "StepDefinition",
    "StepDescriptor",
    "StepExecution",
    "StepNotFoundError",
    "StepStatus",
    "StepTimeoutError",
    "StorageError",
    "SyncFluxEngine",
    "UnknownWorkflowError",
    "WaitMarker",
    "WaitTimeoutError",
    "WorkerInfo",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowDefinitionChangedError",
    "WorkflowDescriptor",
    "WorkflowFilter",
    "WorkflowNameMismatchError",
    "WorkflowNotFoundError",
    "WorkflowNotSuspendedError",
    "WorkflowState",
    "WorkflowStatus",
    "WorkflowStorage",
    "__version__",
    "create_workflow",
    "sleep",
    "sleep_until",
    "wait",
]

_publish(__all__)
