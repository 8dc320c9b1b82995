"""Turning stored rows into records: history entries, ``ctx.data`` replay, run states."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from ._children import child_of
from ._codec import decode, encode, object_text, revive
from ._input import InputSpec
from ._records import StepExecution, StepStatus, WorkflowState, WorkflowStatus
from .storage._base import RunRow, StepRow

__all__ = [
    "apply_changes",
    "changes_text",
    "entry",
    "history",
    "read_snapshot",
    "replay_data",
    "snapshot_text",
    "to_state",
]


def entry(row: StepRow) -> StepExecution:
    """The history entry of a recorded step (a child step waits on its child's outcome
    signal: the entry names the child instead)."""
    child = child_of(row.waiting_for)
    return StepExecution(
        name=row.name,
        status=StepStatus(row.status),
        started_at=row.started_at,
        completed_at=row.completed_at,
        suspended_at=row.suspended_at,
        compensated_at=row.compensated_at,
        waiting_for=row.waiting_for if child is None else None,
        duration_ms=row.duration_ms,
        output=None if row.output is None else decode(row.output),
        error=row.error,
        retries=row.retries,
        error_type=row.error_type,
        traceback=row.traceback,
        child_id=child,
    )


def history(
    step_names: Iterable[str], rows: Iterable[StepRow], wake_at: dt.datetime | None = None
) -> tuple[StepExecution, ...]:
    """One entry per step: recorded ones from their rows, the others ``pending``; a
    suspended step shows ``wake_at`` (the run's timer)."""
    by_index = {r.index: r for r in rows}
    return tuple(
        _with_wake(entry(by_index[i]), wake_at) if i in by_index else StepExecution(name=name)
        for i, name in enumerate(step_names)
    )


def _with_wake(e: StepExecution, wake_at: dt.datetime | None) -> StepExecution:
    if wake_at is None or e.status is not StepStatus.SUSPENDED:
        return e
    return dataclasses.replace(e, wake_at=wake_at)


def changes_text(sets: dict[str, str], dels: Iterable[str]) -> str:
    """Compose the ``changes`` JSON of a step from already-encoded values.

    ``set`` holds the user's keys, so it is written as the codec writes any dict (a ``$flux``
    key among them makes it the escaped pair form), never read back as a tagged value.
    """
    deleted = json.dumps(list(dels), ensure_ascii=False)
    return '{"set":' + object_text(sets) + ',"del":' + deleted + "}"


def apply_changes(data: dict[str, Any], changes: str | None) -> None:
    """Apply one step's recorded changes to ``data`` in place."""
    if changes is None:
        return
    try:
        decoded = decode(changes)
        sets = decoded["set"]
    except ValueError:
        sets = None
    if type(sets) is not dict:
        # Written before changes_text escaped a top-level "$flux" key, so decoding took the
        # user's keys for a tag: read ``set`` as plain keys, reviving only their values.
        decoded = json.loads(changes)
        sets = {k: revive(v) for k, v in decoded["set"].items()}
    data.update(sets)
    for key in decoded["del"]:
        data.pop(key, None)


def replay_data(
    rows: Iterable[StepRow], *, before: int | None = None, onto: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``ctx.data`` rebuilt from step changes.

    With ``before``, the data as it was when step ``before`` started (forward changes of
    the rows before it). Without, the data now: every forward change in step order, then the
    compensations' changes in the order they ran (reverse step order). ``onto``: the data
    the rows start from (a snapshot's; changed in place), else empty.
    """
    ordered = sorted(rows, key=lambda r: r.index)
    data: dict[str, Any] = {} if onto is None else onto
    for r in ordered:
        if before is not None and r.index >= before:
            break
        apply_changes(data, r.changes)
    if before is None:
        for r in reversed(ordered):
            apply_changes(data, r.compensation_changes)
    return data


def snapshot_text(data: dict[str, str], signals: dict[str, Any]) -> str:
    """A :class:`~fluxrun.storage.Snapshot`'s text: ``data`` already encoded per key (what
    :class:`~fluxrun._data.TrackedData` keeps), ``signals`` as ``ctx.signals`` holds them."""
    encoded = {
        k: encode(v, what=f"ctx.signals[{k!r}]", max_size=1 << 62) for k, v in signals.items()
    }
    return '{"data":' + object_text(data) + ',"signals":' + object_text(encoded) + "}"


def read_snapshot(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ctx.data`` and ``ctx.signals`` from a snapshot's text."""
    decoded = decode(text)
    return decoded["data"], decoded["signals"]


def revive_input(text: str, spec: InputSpec | None) -> Any:
    """The run's input as the steps see it."""
    plain = decode(text)
    return plain if spec is None else spec.revive(plain)


def to_state(row: RunRow, spec: InputSpec | None) -> WorkflowState:
    """The public record of a stored run."""
    return WorkflowState(
        id=row.id,
        name=row.name,
        status=WorkflowStatus(row.status),
        input=revive_input(row.input, spec),
        data=replay_data(row.steps),
        current_step=row.current_step,
        history=history(row.step_names, row.steps, row.run_after),
        created_at=row.created_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
        error=row.error,
        version=row.version,
        definition_version=row.definition_version,
        wake_at=row.run_after
        if row.status in (WorkflowStatus.SUSPENDED.value, WorkflowStatus.PENDING.value)
        else None,
        parent_id=row.parent_id,
    )
