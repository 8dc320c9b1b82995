"""The part of a transition's ``UPDATE flux_runs`` that is the same in both SQL dialects:
the ``claims`` rule and the patched columns. Written once here so that SQLite and
PostgreSQL cannot drift apart; each store adds its own lease clauses (SQLite judges leases
by the boot clock, PostgreSQL by the database's) and its own ``WHERE``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from ._base import KEEP, Transition

__all__ = ["PATCHED", "patch_sets"]

PATCHED = (
    "status",
    "current_step",
    "error",
    "completed_at",
    "wait_name",
    "run_after",
    "wait_kind",
    "attempt",
    "definition_version",
    "concurrency_key",
)
"""The run columns a transition sets when they are not ``KEEP``, in this order."""

_TIMES = frozenset({"completed_at", "run_after"})

_CLEAR_REQUEST = ["requested = NULL", "request_reason = NULL"]
# Both CASEs read the row's old value (SQL evaluates every SET against the old row).
_CLEAR_PAUSE = [
    "requested = CASE WHEN requested = 'pause' THEN NULL ELSE requested END",
    "request_reason = CASE WHEN requested = 'pause' THEN NULL ELSE request_reason END",
]


def patch_sets(
    t: Transition,
    placeholder: str,
    time_value: Callable[[dt.datetime | None], Any],
    now_plus: str | None = None,
    json_placeholder: str | None = None,
) -> tuple[list[str], list[Any]]:
    """The SET clauses and their parameters for everything but the version, the update
    time and the lease: ``claims = 1`` when the write records progress (a step outcome
    without a claim or a release: only the current claim counts now), each patched column,
    the clearing of a request, and the snapshot (set, or cleared by a deletion below it).
    ``time_value`` turns a datetime into the dialect's parameter; ``now_plus`` is the
    dialect's "the database's now plus this many seconds" (with ``placeholder``), for a
    ``run_after`` given as a delay (a dialect without one resolves it first:
    :func:`~fluxrun.storage._base.on_store_clock`)."""
    sets: list[str] = []
    params: list[Any] = []
    progress = t.insert_step is not None or t.update_step is not None
    if progress and t.claim is None and not t.release:
        sets.append("claims = 1")
    for column in PATCHED:
        value = getattr(t, column)
        if column == "run_after" and t.run_after_from is not None and value is not None:
            assert now_plus is not None, "resolve the delay with on_store_clock first"
            sets.append(f"run_after = {now_plus}")
            params.append((value - t.run_after_from).total_seconds())
        elif value is not KEEP:
            sets.append(f"{column} = {placeholder}")
            params.append(time_value(value) if column in _TIMES else value)
    if t.requested is not KEEP:
        sets += _CLEAR_REQUEST if t.requested is None else _CLEAR_PAUSE
    if t.step_names is not None:
        sets.append(f"step_names = {json_placeholder or placeholder}")
        params.append(json.dumps(list(t.step_names), ensure_ascii=False))
    if t.snapshot is not None:
        sets += [f"snapshot = {placeholder}", f"snapshot_at = {placeholder}"]
        params += [t.snapshot.text, t.snapshot.at]
    elif t.delete_steps_from is not None:
        # The rows a snapshot stands for are being deleted: it no longer holds.
        sets += [
            f"snapshot = CASE WHEN snapshot_at > {placeholder} THEN NULL ELSE snapshot END",
            f"snapshot_at = CASE WHEN snapshot_at > {placeholder} THEN NULL ELSE snapshot_at END",
        ]
        params += [t.delete_steps_from, t.delete_steps_from]
    return sets, params
