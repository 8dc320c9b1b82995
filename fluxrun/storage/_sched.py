"""Checks and errors of the scheduling verbs (signals, requests), shared by every store."""

from __future__ import annotations

import json

from ..errors import (
    ConcurrentModificationError,
    InvalidArgumentError,
    InvalidStateError,
    WorkflowNotFoundError,
)

__all__ = ["check_signal", "finished_error", "not_found_error", "unconsumable_error"]


def _no_constant(text: str) -> object:
    raise ValueError(f"{text} is not JSON")


def check_signal(run_id: str, name: str, payload: str, dedupe_key: str | None) -> None:
    """Refuse a signal no store can keep the same way (before anything is written).

    The payload must be strict JSON text (no NaN/Infinity: SQLite's ``json_valid`` and
    PostgreSQL's ``jsonb`` refuse them), so every store accepts and refuses the same ones.
    """
    if not isinstance(name, str) or not isinstance(payload, str):
        raise InvalidArgumentError(
            f"run {run_id!r}: a signal has a str name and JSON text payload", workflow_id=run_id
        )
    if dedupe_key is not None and not isinstance(dedupe_key, str):
        raise InvalidArgumentError(
            f"run {run_id!r}: a dedupe key is a str, got {dedupe_key!r}", workflow_id=run_id
        )
    try:
        json.loads(payload, parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"run {run_id!r}: a signal payload must be JSON text: {exc}", workflow_id=run_id
        ) from exc


def not_found_error(run_id: str) -> WorkflowNotFoundError:
    return WorkflowNotFoundError(f"no run has id {run_id!r}", workflow_id=run_id)


def finished_error(run_id: str, name: str | None, status: str) -> InvalidStateError:
    return InvalidStateError(
        f"run {run_id!r} is {status}: a finished run takes no signal",
        workflow_id=run_id,
        workflow_name=name,
    )


def unconsumable_error(run_id: str, seq: int) -> ConcurrentModificationError:
    return ConcurrentModificationError(
        f"signal {seq} of run {run_id!r} does not exist or was consumed already",
        workflow_id=run_id,
    )
