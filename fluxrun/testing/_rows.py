"""Rows for the store contract tests: a fixed clock of instants, run and step rows as the
engine builds them."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..storage._base import RunRow, StepRow, Store, Transition

__all__ = [
    "LONG_LEASE",
    "T0",
    "at",
    "canonical_json",
    "canonical_text",
    "make_run",
    "make_step",
    "must_load",
    "norm",
    "t",
    "typed",
]

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


def norm(value: Any) -> Any:
    """A run row, step row or tuple of step rows with its JSON text columns in canonical form.

    A store hands JSON back as text holding the same value, not necessarily the same text:
    PostgreSQL may keep JSON as ``jsonb``, which re-spaces it. :func:`canonical_json` keeps
    everything about the value that the codec distinguishes (types, float bits, the sign of
    zero) except the order of object keys, which ``test_values`` checks on its own.
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(norm(v) for v in value)
    if isinstance(value, StepRow):
        return replace(
            value,
            output=canonical_json(value.output),
            changes=canonical_json(value.changes),
            compensation_changes=canonical_json(value.compensation_changes),
        )
    assert isinstance(value, RunRow)
    return replace(value, input=canonical_text(value.input), steps=norm(value.steps))


def canonical_json(text: str | None) -> str | None:
    """:func:`canonical_text`, passing None through."""
    return None if text is None else canonical_text(text)


def canonical_text(text: str) -> str:
    """A text equal for two JSON texts exactly when they hold the same value (keys sorted)."""
    return repr(typed(json.loads(text), sort_keys=True))


def typed(value: Any, *, sort_keys: bool = False) -> Any:
    """``value`` with every leaf tagged by its type, so that ``1``, ``1.0`` and ``True`` stop
    being equal and ``-0.0`` differs from ``0.0``; object keys keep their order unless
    ``sort_keys``."""
    if isinstance(value, dict):
        items = [(k, typed(v, sort_keys=sort_keys)) for k, v in value.items()]
        if sort_keys:
            items.sort(key=lambda kv: kv[0])
        return ("dict", tuple(items))
    if isinstance(value, list):
        return ("list", tuple(typed(v, sort_keys=sort_keys) for v in value))
    if isinstance(value, tuple):
        return ("tuple", tuple(typed(v, sort_keys=sort_keys) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def t(run_id: str, version: int, **fields: object) -> Transition:
    """A transition stamped with a fixed time after ``T0``."""
    fields.setdefault("updated_at", at(100 + version))
    return Transition(run_id=run_id, expected_version=version, **fields)  # type: ignore[arg-type]


async def must_load(store: Store, run_id: str) -> RunRow:
    row = await store.load(run_id)
    assert row is not None, run_id
    return row
