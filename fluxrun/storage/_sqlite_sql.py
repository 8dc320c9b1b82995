"""Helpers of :mod:`fluxrun.storage.sqlite`: SQL text, value conversion, and the scheduling
verbs as plain functions over a connection (the store runs them with its locking).

Every function here that writes opens its own ``BEGIN IMMEDIATE`` transaction: SQLite has
one writer per database, so inside it nothing else changes what was read, and a claim, a
start or a signal needs no row locks of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..errors import ConcurrentModificationError
from ._base import (
    FINISHED_STATUSES,
    Applied,
    RunRow,
    SignalRow,
    SignalSent,
    Snapshot,
    Started,
    StepRow,
    Transition,
    transition_error,
)
from ._batch import GATED_SQL
from ._children import sqlite_wake
from ._rows import (
    ATTEMPT_COLUMNS,
    RUN_COLUMNS,
    SIGNAL_COLUMNS,
    STEP_COLUMNS,
    attempt_fields,
    run_from,
    signal_from,
    step_fields,
    step_from,
)
from ._sched import finished_error, not_found_error, unconsumable_error
from ._sqlite_lease import CLAIM_LEASE, MAX_MICROS, RELEASE_LEASE, RENEW_LEASE, LeaseClock
from ._sqlite_limits import LIMITED_SKIP, Slots
from ._sqlplan import patch_sets

__all__ = [
    "INSERT_ATTEMPT",
    "INSERT_STEP",
    "MAX_MICROS",
    "RUN_SELECT",
    "STEP_SELECT",
    "UPDATE_STEP",
    "apply",
    "claim_due",
    "counts",
    "duplicate",
    "first_signal",
    "from_micros",
    "insert_run",
    "list_signals",
    "load_tail",
    "next_due",
    "request",
    "run_row",
    "run_values",
    "send_signal",
    "start",
    "step_row",
    "step_values",
    "steps_before",
    "to_micros",
    "update_statement",
]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)

RUN_SELECT = ", ".join(RUN_COLUMNS)
STEP_SELECT = ", ".join(STEP_COLUMNS)
_SIGNAL_SELECT = ", ".join(SIGNAL_COLUMNS)
INSERT_STEP = (
    "INSERT INTO flux_steps (run_id, " + STEP_SELECT + ") "
    "VALUES (?, " + ", ".join("?" * len(STEP_COLUMNS)) + ")"
)
UPDATE_STEP = (
    "UPDATE flux_steps SET "
    + ", ".join(c + " = ?" for c in STEP_COLUMNS[1:])
    + " WHERE run_id = ? AND idx = ?"
)
# seq is the next number within the run; the transition holds the write lock, so no race.
INSERT_ATTEMPT = (
    "INSERT INTO flux_attempts (run_id, " + ", ".join(ATTEMPT_COLUMNS) + ") VALUES (?, "
    "(SELECT coalesce(max(seq), 0) + 1 FROM flux_attempts WHERE run_id = ?), "
    + ", ".join("?" * (len(ATTEMPT_COLUMNS) - 1))
    + ")"
)
# ON CONFLICT DO NOTHING covers only uniqueness (the id, the idempotency key): a CHECK on
# JSON text still fails the insert.
_INSERT_RUN = (
    "INSERT INTO flux_runs ("
    + RUN_SELECT
    + ", input_hash, lease_boot, lease_boot_until, lease_boot_fence) VALUES ("
    + ", ".join("?" * (len(RUN_COLUMNS) + 4))
    + ")"
)
_CONSUME = (
    "UPDATE flux_signals SET consumed_by_step = ?, consumed_at = ? "
    "WHERE run_id = ? AND seq = ? AND consumed_by_step IS NULL"
)
_FINISHED = "('" + "', '".join(FINISHED_STATUSES) + "')"
# The due rule of Store.claim_due, in the order of MemoryStorage's RunEntry.due. It follows the
# names and the lease rule (see _sqlite_lease); parameters: the wall clock now twice (timers
# are wall-clock instants), the limit.
_DUE = (
    " AND status NOT IN " + _FINISHED + " AND (requested IS NOT NULL"
    " OR (status IN ('pending', 'running', 'rolling_back')"
    " AND (run_after IS NULL OR run_after <= ?))"
    " OR (status = 'suspended' AND (run_after <= ? OR (wait_kind = 'signal' AND EXISTS ("
    "SELECT 1 FROM flux_signals AS s WHERE s.run_id = flux_runs.id"
    " AND s.name = flux_runs.wait_name AND s.consumed_by_step IS NULL)))))"
    " AND NOT " + GATED_SQL
)
_DUE_ORDER = (
    " ORDER BY owner IS NULL, priority DESC, coalesce(run_after, created_at), rowid LIMIT ?"
)
_CLAIM = (
    "UPDATE flux_runs SET owner = ?, "
    + CLAIM_LEASE
    + ", fence = fence + 1, claims = claims + 1, version = version + 1 "
    "WHERE id IN (SELECT value FROM json_each(?)) RETURNING " + RUN_SELECT
)


def apply(conn: sqlite3.Connection, t: Transition, clock: LeaseClock) -> Applied:
    """Apply one transition in one ``BEGIN IMMEDIATE`` transaction (see :class:`Transition`)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        applied = write(conn, t, clock)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return applied


def update_statement(t: Transition, clock: LeaseClock, now: Any) -> tuple[str, list[Any]]:
    """The run's ``UPDATE`` for ``t`` (a compare-and-set on version, and fence or lease)
    with its parameters; ``now`` is the clocks' reading when ``t`` needs one."""
    sets = ["version = version + 1", "updated_at = ?"]
    params: list[Any] = [to_micros(t.updated_at)]
    where = ["id = ?", "version = ?"]
    wparams: list[Any] = [t.run_id, t.expected_version]
    if t.fence is not None:
        where.append("fence = ?")
        wparams.append(t.fence)
    else:
        assert now is not None
        expired, expired_params = clock.expired(now)
        where.append(expired)
        wparams += expired_params
    if t.claim is not None:
        assert now is not None
        # CLAIM_LEASE reads the fence before "fence = fence + 1" applies (one UPDATE).
        sets += ["fence = fence + 1", "owner = ?", CLAIM_LEASE, "claims = claims + 1"]
        params += [t.claim.owner, *clock.lease(now, t.claim.lease_seconds)]
    elif t.renew_lease is not None:
        assert now is not None
        sets.append(RENEW_LEASE)
        params += clock.lease(now, t.renew_lease)
    if t.release:
        # The rightmost assignment of a column wins: this undoes a claim of the same write.
        sets += ["owner = NULL", RELEASE_LEASE, "claims = 0"]
    patched, patch_params = patch_sets(t, "?", to_micros)
    sets += patched
    params += patch_params
    update = "UPDATE flux_runs SET " + ", ".join(sets) + " WHERE " + " AND ".join(where)
    return update, params + wparams


def write(conn: sqlite3.Connection, t: Transition, clock: LeaseClock) -> Applied:
    """The writes of one transition, inside the caller's transaction (see :func:`apply`);
    raises, with its writes to be undone by the caller, if it does not apply."""
    # The clocks are read once the write lock is held, so waiting for it cannot shorten a
    # lease written here; a plain step commit (fenced, no claim or renewal) reads none.
    now = None
    if t.fence is None or t.claim is not None or t.renew_lease is not None:
        now = clock.now()
    update, params = update_statement(t, clock, now)
    row: tuple[int, int] | None
    if t.fence is not None and t.claim is None:
        # The usual step commit: the new version and fence are known, and SQLite's
        # RETURNING (which goes through a temporary table) would cost a fifth of it.
        applied = conn.execute(update, params).rowcount == 1
        row = (t.expected_version + 1, t.fence) if applied else None
    else:
        row = conn.execute(update + " RETURNING version, fence", params).fetchone()
    if row is None:
        raise _diagnose(conn, t, clock)
    if t.consume_signal is not None:
        c = t.consume_signal
        consumed = conn.execute(
            _CONSUME, (c.step, to_micros(t.updated_at), t.run_id, c.seq)
        ).rowcount
        if consumed != 1:
            raise unconsumable_error(t.run_id, c.seq)
    if t.delete_steps_from is not None:
        keep = ",".join("?" * len(t.keep_steps))
        conn.execute(
            "DELETE FROM flux_steps WHERE run_id = ? AND idx >= ?"
            + (f" AND idx NOT IN ({keep})" if keep else ""),
            (t.run_id, t.delete_steps_from, *t.keep_steps),
        )
    if t.insert_step is not None:
        s = t.insert_step
        try:
            conn.execute(INSERT_STEP, (t.run_id, s.index, *step_values(s)))
        except sqlite3.IntegrityError as exc:
            if not duplicate(exc):
                raise
            raise ConcurrentModificationError(
                f"step {s.index} of run {t.run_id!r} is already recorded",
                workflow_id=t.run_id,
            ) from exc
    if t.update_step is not None:
        s = t.update_step
        cur = conn.execute(UPDATE_STEP, (*step_values(s), t.run_id, s.index))
        if cur.rowcount != 1:
            raise ConcurrentModificationError(
                f"step {s.index} of run {t.run_id!r} has no recorded outcome",
                workflow_id=t.run_id,
            )
    if t.attempts:
        conn.executemany(
            INSERT_ATTEMPT,
            [(t.run_id, t.run_id, *attempt_fields(a, to_micros)) for a in t.attempts],
        )
    if t.wake is not None:
        sqlite_wake(conn, t.wake, clock.wall_us())
    return Applied(version=row[0], fence=row[1])


def _diagnose(
    conn: sqlite3.Connection, t: Transition, clock: LeaseClock
) -> ConcurrentModificationError:
    now = clock.now()
    expired, params = clock.expired(now)
    found = conn.execute(
        "SELECT name, version, fence, owner, lease_until, NOT "
        + expired
        + " FROM flux_runs WHERE id = ?",
        (*params, t.run_id),
    ).fetchone()
    if found is None:
        return ConcurrentModificationError(
            f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
        )
    error = transition_error(
        t.run_id,
        found[0],
        found[1],
        found[2],
        found[3],
        from_micros(found[4]),
        t,
        from_micros(now.wall),  # type: ignore[arg-type]
        live=bool(found[5]),  # by the boot clock where there is one
    )
    return error or ConcurrentModificationError(
        f"run {t.run_id!r} changed while being written", workflow_id=t.run_id
    )


def to_micros(value: dt.datetime | None) -> int | None:
    """A UTC datetime as integer microseconds since the epoch (exact, unlike a float)."""
    return None if value is None else (value - _EPOCH) // _MICRO


def from_micros(value: int | None) -> dt.datetime | None:
    """Inverse of :func:`to_micros`."""
    return None if value is None else _EPOCH + dt.timedelta(microseconds=value)


def step_values(s: StepRow) -> tuple[Any, ...]:
    return step_fields(s, to_micros)


def step_row(r: tuple[Any, ...]) -> StepRow:
    return step_from(r, from_micros)


def run_row(r: tuple[Any, ...], steps: tuple[StepRow, ...] = ()) -> RunRow:
    return run_from(r, from_micros, steps)


def duplicate(exc: sqlite3.IntegrityError) -> bool:
    """Whether a constraint failure is a duplicate key (not, say, a CHECK on JSON text)."""
    return getattr(exc, "sqlite_errorcode", None) in (
        1555,  # SQLITE_CONSTRAINT_PRIMARYKEY
        2067,  # SQLITE_CONSTRAINT_UNIQUE
    )


def run_values(run: RunRow, owner: str | None, until: int | None) -> tuple[Any, ...]:
    """A new run's values in ``RUN_COLUMNS`` order, owned by ``owner`` until ``until``
    (microseconds; None: unowned)."""
    return (
        run.id,
        run.name,
        run.definition_version,
        run.status,
        run.input,
        json.dumps(list(run.step_names)),
        run.current_step,
        run.error,
        to_micros(run.created_at),
        to_micros(run.updated_at),
        to_micros(run.completed_at),
        run.version,
        run.fence,
        owner,
        until,
        1 if owner else 0,
        run.wait_name,
        to_micros(run.run_after),
        run.wait_kind,
        run.attempt,
        run.requested,
        run.request_reason,
        run.priority,
        run.idempotency_key,
        run.concurrency_key,
        run.parent_id,
    )


def insert_run(
    conn: sqlite3.Connection,
    run: RunRow,
    owner: str | None,
    lease: tuple[int, str | None, int | None] | None,
    *,
    input_hash: str | None = None,
    or_nothing: bool = False,
) -> bool:
    """Insert ``run`` owned by ``owner`` with ``lease`` (see :meth:`LeaseClock.lease`); with
    ``or_nothing``, False when its id or key is taken."""
    sql = _INSERT_RUN + (" ON CONFLICT DO NOTHING" if or_nothing else "")
    until, boot, boot_until = (None, None, None) if lease is None else lease
    cur = conn.execute(
        sql,
        (
            *run_values(run, owner, until),
            input_hash,
            boot,
            boot_until,
            None if lease is None else run.fence,
        ),
    )
    return cur.rowcount == 1


def start(
    conn: sqlite3.Connection,
    run: RunRow,
    owner: str | None,
    lease_seconds: float,
    clock: LeaseClock,
    input_hash: str | None,
) -> Started:
    """Insert-or-observe ``run`` (its ``idempotency_key`` already chosen), leased to
    ``owner`` (if any) for ``lease_seconds``."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    lease = None if owner is None else clock.lease(clock.now(), lease_seconds)
    if insert_run(conn, run, owner, lease, input_hash=input_hash, or_nothing=True):
        conn.execute("COMMIT")
        return Started(run.id, True, input_hash)
    # Taken: the write lock is held, so the run that took it is there to read. A key match
    # wins over an id match (the caller asked for that key).
    found = conn.execute(
        "SELECT id, input_hash FROM flux_runs WHERE (name = ? AND idempotency_key = ?) "
        "OR id = ? ORDER BY id = ? LIMIT 1",
        (run.name, run.idempotency_key, run.id, run.id),
    ).fetchone()
    conn.execute("ROLLBACK")
    assert found is not None
    return Started(found[0], False, found[1])


def claim_due(
    conn: sqlite3.Connection,
    owner: str,
    names: Sequence[str],
    limit: int,
    clock: LeaseClock,
    lease_seconds: float,
    more: Callable[[sqlite3.Connection, Sequence[str], int, int, Slots | None], list[str]]
    | None = None,
    limits: Mapping[str, int] | None = None,
) -> list[RunRow]:
    """Claim the due runs in one ``BEGIN IMMEDIATE`` transaction, in claim order: those
    outside any concurrency limit (or holding a slot), then those of ``limits`` that fit
    in free slots; ``more`` adds ids to claim after them (the batch items, within their
    batches' limits and ``limits``)."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    now = clock.now()  # with the write lock held: a wait for it cannot shorten the leases
    expired, params = clock.expired(now)
    limited = {n: limits[n] for n in names if n in limits} if limits else {}
    where = "name IN (SELECT value FROM json_each(?)) AND " + expired + _DUE
    args = (json.dumps(list(names)), *params, now.wall, now.wall)
    skip, skip_args = (LIMITED_SKIP, (json.dumps(list(limited)),)) if limited else ("", ())
    selected = conn.execute(
        "SELECT id FROM flux_runs WHERE " + where + skip + _DUE_ORDER, (*args, *skip_args, limit)
    )
    ids = [r[0] for r in selected.fetchall()]
    slots = Slots(conn, limited) if limited else None
    if slots is not None and len(ids) < limit:
        ids += slots.claimable(where, args, limit - len(ids))
    if len(ids) < limit and more is not None:
        ids += more(conn, names, limit - len(ids), now.wall, slots)
    if not ids:
        conn.execute("COMMIT")  # a batch may have been stopped
        return []
    lease = clock.lease(now, lease_seconds)
    claimed = conn.execute(_CLAIM, (owner, *lease, json.dumps(ids)))
    rows = claimed.fetchall()
    conn.execute("COMMIT")
    # RETURNING gives no order; the selection's order is the claim order.
    by_id = {r[0]: run_row(r) for r in rows}
    return [by_id[i] for i in ids]


def next_due(conn: sqlite3.Connection, names: Sequence[str]) -> dt.datetime | None:
    found = conn.execute(
        "SELECT min(run_after) FROM flux_runs WHERE name IN (SELECT value FROM json_each(?)) "
        "AND status IN ('pending', 'suspended') AND run_after IS NOT NULL",
        (json.dumps(list(names)),),
    ).fetchone()
    return from_micros(found[0])


def send_signal(
    conn: sqlite3.Connection,
    run_id: str,
    name: str,
    payload: str,
    dedupe_key: str | None,
    now: int,
) -> SignalSent:
    """Append an inbox row; the write lock is taken first, so a transition that checks the
    inbox before suspending runs entirely before or after this."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    run = conn.execute("SELECT name, status FROM flux_runs WHERE id = ?", (run_id,)).fetchone()
    if run is None:
        conn.execute("ROLLBACK")
        raise not_found_error(run_id)
    if dedupe_key is not None:
        # A repeat is answered as such even when the run has finished since (a retry).
        seen = conn.execute(
            "SELECT seq FROM flux_signals WHERE run_id = ? AND dedupe_key = ?",
            (run_id, dedupe_key),
        ).fetchone()
        if seen is not None:
            conn.execute("ROLLBACK")
            return SignalSent(seen[0], False)
    if run[1] in FINISHED_STATUSES:
        conn.execute("ROLLBACK")
        raise finished_error(run_id, run[0], run[1])
    seq: int = conn.execute(
        "INSERT INTO flux_signals (run_id, seq, name, payload, dedupe_key, created_at) "
        "VALUES (?, (SELECT coalesce(max(seq), 0) + 1 FROM flux_signals WHERE run_id = ?), "
        "?, ?, ?, ?) RETURNING seq",
        (run_id, run_id, name, payload, dedupe_key, now),
    ).fetchone()[0]
    conn.execute("COMMIT")
    return SignalSent(seq, True)


def list_signals(conn: sqlite3.Connection, run_id: str) -> list[SignalRow]:
    rows = conn.execute(
        "SELECT " + _SIGNAL_SELECT + " FROM flux_signals WHERE run_id = ? ORDER BY seq", (run_id,)
    ).fetchall()
    return [signal_from(r, from_micros) for r in rows]


def first_signal(conn: sqlite3.Connection, run_id: str, name: str) -> SignalRow | None:
    r = conn.execute(
        "SELECT " + _SIGNAL_SELECT + " FROM flux_signals WHERE run_id = ? AND name = ? "
        "AND consumed_by_step IS NULL ORDER BY seq LIMIT 1",
        (run_id, name),
    ).fetchone()
    return None if r is None else signal_from(r, from_micros)


def request(conn: sqlite3.Connection, run_id: str, kind: str, reason: str | None) -> bool:
    """Set a request unless the run is finished; a cancel replaces a pause, never the reverse."""
    conn.execute("BEGIN IMMEDIATE")  # the caller's guard rolls back on an error
    run = conn.execute("SELECT status FROM flux_runs WHERE id = ?", (run_id,)).fetchone()
    if run is None:
        conn.execute("ROLLBACK")
        raise not_found_error(run_id)
    if run[0] in FINISHED_STATUSES:
        conn.execute("ROLLBACK")
        return False
    conn.execute(
        "UPDATE flux_runs SET requested = ?, request_reason = ? WHERE id = ? "
        "AND (requested IS NULL OR (requested = 'pause' AND ? = 'cancel'))",
        (kind, reason, run_id, kind),
    )
    conn.execute("COMMIT")
    return True


def counts(conn: sqlite3.Connection, name: str | None) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM flux_runs WHERE ? IS NULL OR name = ? GROUP BY status",
        (name, name),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def load_tail(conn: sqlite3.Connection, run_id: str) -> RunRow | None:
    """:meth:`Store.load_tail` in one read transaction."""
    conn.execute("BEGIN")
    try:
        r = conn.execute(
            "SELECT " + RUN_SELECT + ", snapshot, snapshot_at FROM flux_runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if r is None:
            return None
        text, at = r[-2], r[-1]
        current_step = r[6]
        start = 0 if text is None or at is None or current_step < at else at
        rows = conn.execute(
            "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = ? AND idx >= ? ORDER BY idx",
            (run_id, start),
        ).fetchall()
        row = run_row(r, tuple(step_row(s) for s in rows))
        if start == 0:
            return row
        return replace(row, snapshot=Snapshot(text=text, at=at), steps_from=at)
    finally:
        conn.execute("COMMIT")


def steps_before(conn: sqlite3.Connection, run_id: str, before: int) -> tuple[StepRow, ...]:
    """A run's step rows below index ``before``, in index order."""
    rows = conn.execute(
        "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = ? AND idx < ? ORDER BY idx",
        (run_id, before),
    ).fetchall()
    return tuple(step_row(s) for s in rows)
