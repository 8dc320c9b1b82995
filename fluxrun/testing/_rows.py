"""Rows for the store contract tests: a fixed clock of instants, run and step rows as the
engine builds them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from ..storage._base import RunRow, StepRow

__all__ = ["LONG_LEASE", "T0", "at", "make_run", "make_step"]

#: A fixed instant with a non-zero microsecond part: every backend must keep microseconds.
T0 = dt.datetime(2024, 5, 17, 8, 30, 0, 123456, tzinfo=dt.UTC)

#: Long enough that no lease taken by a test expires while the test runs.
LONG_LEASE = 3600.0


def at(seconds: float) -> dt.datetime:
    """``T0`` plus ``seconds``."""
    return T0 + dt.timedelta(seconds=seconds)


def make_run(
    run_id: str,
    *,
    name: str = "wf",
    status: str = "pending",
    created: float = 0.0,
    input: str = "{}",
    step_names: Sequence[str] = ("a", "b", "c"),
    version: int = 1,
    fence: int = 1,
    **fields: Any,
) -> RunRow:
    """A run row as the engine builds it before :meth:`Store.create`."""
    return RunRow(
        id=run_id,
        name=name,
        status=status,
        input=input,
        step_names=tuple(step_names),
        current_step=fields.pop("current_step", 0),
        created_at=at(created),
        updated_at=fields.pop("updated_at", at(created)),
        version=version,
        fence=fence,
        **fields,
    )


def make_step(index: int, *, fence: int = 1, **fields: Any) -> StepRow:
    """A recorded step outcome with every timestamp filled in."""
    base: dict[str, Any] = {
        "name": f"s{index}",
        "status": "completed",
        "started_at": at(10 + index),
        "completed_at": at(10.5 + index),
        "duration_ms": 500.25,
        "output": None,
        "retries": 0,
        "changes": '{"set":{},"del":[]}',
        "fence": fence,
    }
    base.update(fields)
    return StepRow(index=index, **base)
