"""Reading and writing :class:`RunRow`/:class:`StepRow`/:class:`AttemptRow` as SQL tuples,
shared by the SQL stores.

Both SQL stores select the columns in the order below; they differ only in how a timestamp
is written and read (integer microseconds in SQLite, ``timestamptz`` in PostgreSQL), which
each passes in.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

from ._base import AttemptRow, RunRow, SignalRow, StepRow

__all__ = [
    "ATTEMPT_COLUMNS",
    "RUN_COLUMNS",
    "SIGNAL_COLUMNS",
    "STEP_COLUMNS",
    "attempt_fields",
    "attempt_from",
    "run_from",
    "signal_from",
    "step_fields",
    "step_from",
]

RUN_COLUMNS = (
    "id",
    "name",
    "definition_version",
    "status",
    "input",
    "step_names",
    "current_step",
    "error",
    "created_at",
    "updated_at",
    "completed_at",
    "version",
    "fence",
    "owner",
    "lease_until",
    "claims",
    "wait_name",
    "run_after",
    "wait_kind",
    "attempt",
    "requested",
    "request_reason",
    "priority",
    "idempotency_key",
    "concurrency_key",
    "parent_id",
)
"""The order in which the stores select a run's columns."""

SIGNAL_COLUMNS = (
    "seq",
    "name",
    "payload",
    "dedupe_key",
    "created_at",
    "consumed_by_step",
    "consumed_at",
)
"""The order in which the stores select an inbox row's columns."""

STEP_COLUMNS = (
    "idx",
    "name",
    "status",
    "started_at",
    "completed_at",
    "suspended_at",
    "compensated_at",
    "waiting_for",
    "duration_ms",
    "output",
    "error",
    "retries",
    "changes",
    "compensation_changes",
    "fence",
    "error_type",
    "traceback",
)
"""The order in which the stores select a step row's columns (``step_fields`` skips idx)."""

ATTEMPT_COLUMNS = (
    "seq",
    "idx",
    "name",
    "attempt",
    "kind",
    "status",
    "started_at",
    "finished_at",
    "duration_ms",
    "error_type",
    "error",
    "traceback",
)
"""The order in which the stores select an attempt's columns (``attempt_fields`` skips seq)."""

Read = Callable[[Any], dt.datetime | None]
Write = Callable[[dt.datetime | None], Any]


def step_fields(s: StepRow, when: Write) -> tuple[Any, ...]:
    """A step row's values in ``STEP_COLUMNS`` order, without ``idx``."""
    return (
        s.name,
        s.status,
        when(s.started_at),
        when(s.completed_at),
        when(s.suspended_at),
        when(s.compensated_at),
        s.waiting_for,
        s.duration_ms,
        s.output,
        s.error,
        s.retries,
        s.changes,
        s.compensation_changes,
        s.fence,
        s.error_type,
        s.traceback,
    )


def step_from(r: Sequence[Any], when: Read) -> StepRow:
    """A step row from values selected in ``STEP_COLUMNS`` order."""
    return StepRow(
        index=r[0],
        name=r[1],
        status=r[2],
        started_at=when(r[3]),
        completed_at=when(r[4]),
        suspended_at=when(r[5]),
        compensated_at=when(r[6]),
        waiting_for=r[7],
        duration_ms=r[8],
        output=r[9],
        error=r[10],
        retries=r[11],
        changes=r[12],
        compensation_changes=r[13],
        fence=r[14],
        error_type=r[15],
        traceback=r[16],
    )


def attempt_fields(a: AttemptRow, when: Write) -> tuple[Any, ...]:
    """An attempt's values in ``ATTEMPT_COLUMNS`` order, without ``seq``."""
    return (
        a.index,
        a.name,
        a.attempt,
        a.kind,
        a.status,
        when(a.started_at),
        when(a.finished_at),
        a.duration_ms,
        a.error_type,
        a.error,
        a.traceback,
    )


def attempt_from(r: Sequence[Any], when: Read) -> AttemptRow:
    """An attempt from values selected in ``ATTEMPT_COLUMNS`` order."""
    return AttemptRow(
        seq=r[0],
        index=r[1],
        name=r[2],
        attempt=r[3],
        kind=r[4],
        status=r[5],
        started_at=when(r[6]),
        finished_at=when(r[7]),
        duration_ms=r[8],
        error_type=r[9],
        error=r[10],
        traceback=r[11],
    )


def run_from(r: Sequence[Any], when: Read, steps: tuple[StepRow, ...] = ()) -> RunRow:
    """A run row from values selected in ``RUN_COLUMNS`` order."""
    created, updated = when(r[8]), when(r[9])
    assert created is not None and updated is not None
    return RunRow(
        id=r[0],
        name=r[1],
        definition_version=r[2],
        status=r[3],
        input=r[4],
        step_names=tuple(json.loads(r[5])),
        current_step=r[6],
        error=r[7],
        created_at=created,
        updated_at=updated,
        completed_at=when(r[10]),
        version=r[11],
        fence=r[12],
        owner=r[13],
        lease_until=when(r[14]),
        claims=r[15],
        wait_name=r[16],
        steps=steps,
        run_after=when(r[17]),
        wait_kind=r[18],
        attempt=r[19],
        requested=r[20],
        request_reason=r[21],
        priority=r[22],
        idempotency_key=r[23],
        concurrency_key=r[24],
        parent_id=r[25],
    )


def signal_from(r: Sequence[Any], when: Read) -> SignalRow:
    """An inbox row from values selected in ``SIGNAL_COLUMNS`` order."""
    created = when(r[4])
    assert created is not None
    return SignalRow(
        seq=r[0],
        name=r[1],
        payload=r[2],
        dedupe_key=r[3],
        created_at=created,
        consumed_by_step=r[5],
        consumed_at=when(r[6]),
    )
