"""Concurrency limits in PostgreSQL's claim (the rules: :mod:`fluxrun.storage._concurrency`).

Many workers claim at once, each in its own transaction under READ COMMITTED, so a count
of the slots held can be stale by the time the claim commits. Each group (workflow and key)
is therefore counted and claimed under a transaction-scoped advisory lock on the group: a
claimer takes it with ``pg_try_advisory_xact_lock`` (a group another claimer is filling
now is skipped, as ``SKIP LOCKED`` skips a locked row), counts in a statement that starts
after the lock is held (so it sees every claim committed under the lock before), claims,
and commits, which releases the lock. Runs only stop holding slots without the lock, which
can only make a count too high for a moment, never too low.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._base import FINISHED_STATUSES, RunRow
from ._concurrency import HOLDS_LIMIT_SQL, NEEDS_SLOT_SQL
from ._pg import NEW_LEASE, RUN_SELECT, fetchall, run_row
from ._pg_connect import transaction
from ._pg_sched import DUE_WHERE

if TYPE_CHECKING:
    import psycopg

__all__ = ["admit_items", "claim_limited", "group_lock"]

_HELD = (
    "SELECT count(*) FROM flux_runs AS h WHERE h.name = {name} AND h.concurrency_key = {key} "
    "AND h.status IN ('pending', 'running', 'rolling_back', 'suspended', 'paused') AND "
    + HOLDS_LIMIT_SQL
)
# The groups with runs waiting for a slot and (by a count that may be stale) a free one,
# the most urgent first.
_GROUPS = (
    "SELECT c.name, c.k FROM (SELECT name, concurrency_key AS k, max(priority) AS p, "
    "min(coalesce(run_after, created_at)) AS t FROM flux_runs WHERE "
    + DUE_WHERE
    + " AND name = ANY(%(limited)s::text[]) AND "
    + NEEDS_SLOT_SQL
    + " GROUP BY 1, 2) AS c JOIN unnest(%(limited)s::text[], %(limits)s::integer[]) "
    "AS l(name, lim) ON l.name = c.name "
    "WHERE (" + _HELD.format(name="c.name", key="c.k") + ") < l.lim "
    "ORDER BY c.p DESC, c.t LIMIT %(want)s"
)
# One group's runs that fit in its free slots (counted now, under the group's lock).
_PICK = (
    "SELECT id FROM flux_runs WHERE "
    + DUE_WHERE
    + " AND name = %(name)s AND concurrency_key = %(key)s AND "
    + NEEDS_SLOT_SQL
    + " ORDER BY priority DESC, coalesce(run_after, created_at), seq "
    "LIMIT least(%(want)s::bigint, greatest(0, %(lim)s::bigint - ("
    + _HELD.format(name="%(name)s", key="%(key)s")
    + "))) FOR NO KEY UPDATE SKIP LOCKED"
)
_FREE = (
    "SELECT greatest(0, %(lim)s::bigint - (" + _HELD.format(name="%(name)s", key="%(key)s") + "))"
)
_CLAIM_IDS = (
    "UPDATE flux_runs SET owner = %s, lease_until = " + NEW_LEASE + ", fence = fence + 1, "
    "claims = claims + 1, version = version + 1 WHERE id = ANY(%s::text[]) "
    "RETURNING " + RUN_SELECT
)


async def group_lock(conn: psycopg.AsyncConnection[Any], name: str, key: str) -> bool:
    """Try to take the group's advisory lock for the rest of the transaction."""
    rows = await fetchall(
        conn,
        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
        ("fluxrun:limit:" + name + "\x1f" + key,),
    )
    return bool(rows[0][0])


async def claim_limited(
    conn: psycopg.AsyncConnection[Any],
    owner: str,
    names: list[str],
    limits: Mapping[str, int],
    want: int,
    lease: float,
) -> list[RunRow]:
    """Claim up to ``want`` due runs of ``limits``' workflows that need a slot, into free
    slots, in one transaction (see the module)."""
    params: dict[str, Any] = {
        "names": names,
        "finished": list(FINISHED_STATUSES),
        "limited": list(limits),
        "limits": list(limits.values()),
        "want": want,
    }
    picked: list[str] = []
    async with transaction(conn):
        for name, key in await fetchall(conn, _GROUPS, params):
            if not await group_lock(conn, name, key):
                continue
            left = want - len(picked)
            rows = await fetchall(
                conn, _PICK, {**params, "name": name, "key": key, "want": left, "lim": limits[name]}
            )
            picked += [r[0] for r in rows]
            if len(picked) >= want:
                break
        if not picked:
            return []
        claimed = await fetchall(conn, _CLAIM_IDS, (owner, lease, picked))
    by_id = {r[0]: run_row(r) for r in claimed}
    return [by_id[i] for i in picked if i in by_id]


async def admit_items(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    limit: int,
    items: list[tuple[str, str | None]],
    free: dict[tuple[str, str], int],
) -> list[str]:
    """Of a batch's next items (id, key) of a limited workflow, those that fit in free
    slots (inside the batch claim's transaction; ``free`` keeps the groups' counts across
    the batches of one claim, -1 for a group another claimer holds)."""
    admitted: list[str] = []
    for run_id, key in items:
        if key is None:
            admitted.append(run_id)
            continue
        group = (name, key)
        if group not in free:
            if not await group_lock(conn, name, key):
                free[group] = -1
            else:
                rows = await fetchall(conn, _FREE, {"name": name, "key": key, "lim": limit})
                free[group] = rows[0][0]
        if free[group] > 0:
            free[group] -= 1
            admitted.append(run_id)
    return admitted
