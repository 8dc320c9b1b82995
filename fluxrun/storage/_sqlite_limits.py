"""Concurrency limits in SQLite's claim (the rules: :mod:`fluxrun.storage._concurrency`).

The claim holds SQLite's write lock from its first count to its last update, so counting
the slots held and taking the free ones cannot race another claimer.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from ._concurrency import HOLDS_LIMIT_SQL, NEEDS_SLOT_SQL

__all__ = ["LIMITED_SKIP", "Slots"]

LIMITED_SKIP = " AND NOT (name IN (SELECT value FROM json_each(?)) AND " + NEEDS_SLOT_SQL + ")"
"""Leaves the runs that need a free slot to :meth:`Slots.claimable`."""

# The unfinished statuses of the partial index flux_runs_limit, which the counts use.
_HELD = (
    "SELECT count(*) FROM flux_runs AS h WHERE h.name = {name} AND h.concurrency_key = {key} "
    "AND h.status IN ('pending', 'running', 'rolling_back', 'suspended', 'paused') AND "
    + HOLDS_LIMIT_SQL
)
_ORDER = " ORDER BY priority DESC, coalesce(run_after, created_at), rowid LIMIT ?"


class Slots:
    """The free slots per workflow and key during one claim (the write lock held)."""

    def __init__(self, conn: sqlite3.Connection, limits: Mapping[str, int]) -> None:
        self._conn = conn
        self._limits = limits
        self._free: dict[tuple[str, str], int] = {}

    def _left(self, name: str, key: str) -> int:
        group = (name, key)
        if group not in self._free:
            held = self._conn.execute(_HELD.format(name="?", key="?"), group).fetchone()[0]
            self._free[group] = max(0, self._limits[name] - held)
        return self._free[group]

    def admit(self, name: str, key: str | None) -> bool:
        """Whether a batch item of ``name`` with ``key`` may be claimed; takes its slot."""
        if name not in self._limits or key is None:
            return True
        if self._left(name, key) <= 0:
            return False
        self._free[(name, key)] -= 1
        return True

    def claimable(self, where: str, args: tuple[Any, ...], want: int) -> list[str]:
        """Up to ``want`` due runs that need a slot and fit in a free one, by group (the
        groups with the most urgent runs first), each group's in claim order. ``where``
        (with ``args``) is the claim's due rule."""
        limited = json.dumps(list(self._limits))
        groups = self._conn.execute(
            "SELECT c.name, c.k FROM (SELECT name, concurrency_key AS k, max(priority) AS p, "
            "min(coalesce(run_after, created_at)) AS t FROM flux_runs WHERE "
            + where
            + " AND name IN (SELECT value FROM json_each(?)) AND "
            + NEEDS_SLOT_SQL
            + " GROUP BY name, concurrency_key) AS c JOIN json_each(?) AS l ON l.key = c.name "
            "WHERE (" + _HELD.format(name="c.name", key="c.k") + ") < l.value "
            "ORDER BY c.p DESC, c.t LIMIT ?",
            (*args, limited, json.dumps(dict(self._limits)), want),
        ).fetchall()
        ids: list[str] = []
        for name, key in groups:
            n = min(self._left(name, key), want - len(ids))
            if n <= 0:
                continue
            rows = self._conn.execute(
                "SELECT id FROM flux_runs WHERE "
                + where
                + " AND name = ? AND concurrency_key = ? AND "
                + NEEDS_SLOT_SQL
                + _ORDER,
                (*args, name, key, n),
            ).fetchall()
            self._free[(name, key)] -= len(rows)
            ids += [r[0] for r in rows]
            if len(ids) >= want:
                break
        return ids
