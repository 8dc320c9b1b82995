"""The public names of fluxrun (SPEC §1) are a contract: lock them."""

from __future__ import annotations

import importlib

import pytest

import fluxrun

EXPECTED_ALL = [
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

# SPEC §1: the import block, plus Workflow (§1.1).
SPEC_NAMES = [
    "FluxEngine",
    "create_workflow",
    "WorkflowBuilder",
    "WorkflowDefinition",
    "StepDefinition",
    "WorkflowContext",
    "wait",
    "Flux",
    "FluxResult",
    "WorkflowState",
    "StepExecution",
    "WorkflowFilter",
    "WorkflowDescriptor",
    "StepDescriptor",
    "WorkflowStatus",
    "StepStatus",
    "RetryPolicy",
    "FluxTraceEvent",
    "FluxTraceSink",
    "FluxLogger",
    "MemoryStorage",
    "SQLiteStorage",
    "PostgresStorage",
    "WorkflowStorage",
    "JsonFileTraceSink",
    "FluxError",
    "Workflow",
]

# SPEC §1.6: the errors there must be at least.
SPEC_ERRORS = [
    "InvalidInputError",
    "EmptyWorkflowError",
    "DefinitionError",
    "WorkflowNotFoundError",
    "WorkflowNameMismatchError",
    "WorkflowDefinitionChangedError",
    "WorkflowNotSuspendedError",
    "SignalMismatchError",
    "StepNotFoundError",
    "InvalidStepIndexError",
    "StepTimeoutError",
    "CommittedStepError",
    "NonRetryableError",
    "ConcurrentModificationError",
    "StorageError",
]


def test_all_is_sorted_and_exact() -> None:
    assert fluxrun.__all__ == sorted(fluxrun.__all__)
    assert fluxrun.__all__ == EXPECTED_ALL


def test_every_name_in_all_resolves() -> None:
    for name in fluxrun.__all__:
        assert getattr(fluxrun, name) is not None, name


@pytest.mark.parametrize("name", SPEC_NAMES + SPEC_ERRORS)
def test_spec_name_imports_from_root(name: str) -> None:
    module = importlib.import_module("fluxrun")
    assert name in module.__all__
    namespace: dict[str, object] = {}
    exec(f"from fluxrun import {name}", namespace)
    assert namespace[name] is getattr(fluxrun, name)


@pytest.mark.parametrize("name", SPEC_ERRORS)
def test_spec_errors_derive_from_flux_error(name: str) -> None:
    cls = getattr(fluxrun, name)
    assert isinstance(cls, type)
    assert issubclass(cls, fluxrun.FluxError)


def test_every_exported_error_derives_from_flux_error() -> None:
    for name in fluxrun.__all__:
        obj = getattr(fluxrun, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, fluxrun.FluxError), name


def test_error_tree_shape() -> None:
    assert issubclass(fluxrun.EmptyWorkflowError, fluxrun.DefinitionError)
    assert issubclass(fluxrun.SerializationError, fluxrun.InvalidInputError)
    assert issubclass(fluxrun.RunBusyError, fluxrun.ConcurrentModificationError)
    assert issubclass(fluxrun.LeaseLostError, fluxrun.ConcurrentModificationError)
    assert issubclass(fluxrun.SchemaVersionError, fluxrun.StorageError)


def test_flux_wait_is_wait() -> None:
    assert fluxrun.Flux.wait("go") == fluxrun.wait("go")


def test_status_enums_have_the_spec_values() -> None:
    assert [s.value for s in fluxrun.WorkflowStatus] == [
        "pending",
        "running",
        "paused",
        "completed",
        "failed",
        "suspended",
        "rolling_back",
        "rolled_back",
        "compensation_failed",
        "cancelled",
    ]
    assert [s.value for s in fluxrun.StepStatus] == [
        "pending",
        "running",
        "completed",
        "failed",
        "skipped",
        "suspended",
        "compensating",
        "compensated",
    ]
