"""PostgreSQL store on psycopg 3 (async, pooled): many processes and machines share one database.

psycopg is an optional dependency (``pip install 'fluxrun[postgres]'``). It is imported only
when a :class:`PostgresStorage` is built, so ``import fluxrun`` works without it.

Every value is a bound parameter; the only SQL built at run time is the choice among fixed
fragments (which columns a transition sets). JSON columns are ``jsonb`` and are read back
as text (``col::text``) so that fluxrun's own codec decodes every backend's values. Leases
are judged by the database clock, never by a worker's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import ConcurrentModificationError, InvalidArgumentError, SchemaVersionError
from ..errors import StorageError as _StorageError
from . import _pg_apply as _apply
from . import _pg_sched as _q
from . import _pg_tail as _tail
from . import _workers as _w
from ._base import (
    FINISHED_STATUSES,
    RECOVERABLE_STATUSES,
    Applied,
    AttemptRow,
    ListQuery,
    Renewed,
    RequestKind,
    RunRow,
    SignalRow,
    SignalSent,
    Started,
    StepRow,
    Store,
    Transition,
    check_request_kind,
    delete_busy_error,
)
from ._children import PgChildren
from ._concurrency import check_limits
from ._group_commit import GroupCommitter, groupable
from ._limits import (
    check_new_run,
    check_transition_numbers,
    page,
    row_limit,
    usable_fences,
)
from ._limits import lease_seconds as clamp_lease
from ._migrations import migrations
from ._pg import (
    ATTEMPT_SELECT,
    NEW_LEASE,
    RUN_SELECT,
    STEP_SELECT,
    UNOWNED,
    attempt_row,
    check_size,
    check_timeout,
    fetchall,
    redact,
    require_psycopg,
    rowcount,
    run_row,
    step_row,
    utc,
)
from ._pg_batch import PgBatches, claim_items
from ._pg_connect import LeaseRenewer, PgPool, transaction
from ._pg_group import PgWrite, flush_writes
from ._pg_limits import claim_limited
from ._pg_listen import Listener, notify
from ._pg_schedules import PostgresSchedules
from ._sched import check_signal
from ._sqlplan import patch_sets
from ._workers import WorkerBeat, WorkerInfo, beat_params, worker_from

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

__all__ = ["PostgresStorage"]


#: Run columns a transition may set (``KEEP`` leaves them).
def _same(value: dt.datetime | None) -> dt.datetime | None:
    return value  # psycopg passes datetimes as timestamptz


#: Key of the transaction-level advisory lock that serialises schema migrations
#: (the bytes of "fluxrun" as a number; advisory locks are per database).
_MIGRATION_LOCK = 28829699412227438
# Batches of step commits written at once (each on a pooled connection of its own).
_WRITERS = 2


class PostgresStorage(PostgresSchedules, PgBatches, PgChildren, Store):
    """Durable store in a PostgreSQL database, shared by any number of processes.

    A step commit is one statement (one round trip, one commit): the run's update is a
    compare-and-set on its version and fence, and the step row is inserted only if it
    applied. Lease renewal runs on a connection of its own, from the engine's renewal
    thread, so a busy event loop cannot make an executor lose its runs.

    Every call is bounded on the client side by ``query_timeout``: getting a pooled
    connection, connecting, and each operation on the server. A server that stops answering
    (down, cut off, or frozen) gives a :class:`~fluxrun.errors.StorageError` naming the
    operation instead of a hang. The store is bound to the event loop that first uses it
    (its pool's connections belong to that loop): use one store per loop/thread.

    Args:
        dsn: A libpq connection string or URL. The store opens its own connection pool on
            :meth:`init` and closes it on :meth:`close`. Unless the DSN sets them, the
            store adds a connect timeout and TCP keepalives derived from ``query_timeout``.
        pool: An open ``psycopg_pool.AsyncConnectionPool`` to use instead of ``dsn``; the
            store never closes it. Its connections may be in any autocommit mode or row
            factory; the store restores what it changes. Lease renewal opens one extra
            connection with the pool's connection settings.
        min_size: Connections the store's own pool keeps open.
        max_size: Most connections the store's own pool opens.
        query_timeout: Seconds (> 0, default 30) that one operation, one connection attempt
            or the wait for a pooled connection may take.
        listen: Whether an engine on this store listens for wake-ups (``LISTEN flux_due``,
            on a connection of its own). False behind a pooler that cannot ``LISTEN``
            (PgBouncer in transaction mode): engines then find work by polling only.

    Raises:
        InvalidArgumentError: both or neither of ``dsn`` and ``pool``, or a bad size or
            timeout.
        StorageError: psycopg is not installed.
    """

    shared = True

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: AsyncConnectionPool[Any] | None = None,
        min_size: int = 1,
        max_size: int = 10,
        query_timeout: float = 30.0,
        listen: bool = True,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise InvalidArgumentError("PostgresStorage needs either a dsn or a pool (not both)")
        if dsn is not None and (not isinstance(dsn, str) or not dsn.strip()):
            raise InvalidArgumentError(
                f"PostgresStorage dsn must be a non-empty str, got {type(dsn).__name__}"
            )
        check_size(min_size, "min_size", 0)
        check_size(max_size, "max_size", max(1, min_size))
        self._timeout = check_timeout(query_timeout)
        require_psycopg()
        from psycopg_pool import AsyncConnectionPool

        if pool is not None and not isinstance(pool, AsyncConnectionPool):
            raise InvalidArgumentError(
                "PostgresStorage pool must be a psycopg_pool.AsyncConnectionPool, got "
                f"{type(pool).__name__}"
            )
        self._dsn = dsn
        self._db = PgPool(repr(self), dsn, pool, min_size, max_size, self._timeout)
        self._renewer = LeaseRenewer(repr(self), self._timeout)
        self._listen = bool(listen)
        # Step commits of runs in flight at once share one statement (see _pg_group).
        self._group: GroupCommitter[PgWrite, Applied] = GroupCommitter(
            self._flush, writers=_WRITERS
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(
        self, what: str, run_id: str | None = None
    ) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection, bounded by ``query_timeout`` (see :class:`PgPool`)."""
        return self._db.connection(what, run_id)

    # -- lifecycle --------------------------------------------------------------------------

    async def init(self) -> None:
        """Connect and apply any missing migration (safe when several processes start at once).

        Raises:
            SchemaVersionError: the database was migrated by a newer fluxrun.
            StorageError: the database cannot be reached or migrated.
        """
        async with self._connection("migration") as conn, transaction(conn):
            # Serialises concurrent init()s: the second waits, then finds the schema current.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS flux_schema (version INTEGER NOT NULL)")
            rows = await fetchall(conn, "SELECT max(version) FROM flux_schema")
            current = rows[0][0] or 0
            known = migrations("postgres")
            if current > len(known):
                raise SchemaVersionError(
                    f"the PostgreSQL database has fluxrun schema version {current}; this "
                    f"fluxrun knows up to {len(known)}. Upgrade fluxrun."
                )
            for m in known[current:]:
                for statement in m.statements:
                    await conn.execute(statement)
                await conn.execute("DELETE FROM flux_schema")
                await conn.execute("INSERT INTO flux_schema (version) VALUES (%s)", (m.version,))

    async def close(self) -> None:
        """Close the store's own pool (never a pool passed in) and the renewal connection.

        Called from another event loop than the store's, it closes the pool on the store's
        loop if that loop still runs, and otherwise only lets go of it.
        """
        await self._db.close()
        self._renewer.close()

    # -- writes -----------------------------------------------------------------------------

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run (its lease, if owned, runs from the database's clock)."""
        from psycopg import errors

        check_new_run(run)
        lease = None if lease_owner is None else clamp_lease(lease_seconds)
        async with self._connection("create", run.id) as conn:
            try:
                await _q.insert_run(conn, run, lease_owner, lease)
            except errors.UniqueViolation as exc:
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} (or its idempotency key) already exists",
                    workflow_id=run.id,
                ) from exc
            if lease_owner is None:
                await notify(conn)  # an unowned run is due for any engine

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition atomically (a compare-and-set on version and fence).

        A transition that changes at most one step row (inserts or replaces it) is one
        statement, so one round trip and one commit, attempts included; one that deletes
        step rows, or inserts one and replaces another, is one explicit transaction.
        """
        check_transition_numbers(t)
        sets = ["version = version + 1", "updated_at = %s"]
        params: list[Any] = [t.updated_at]
        # PostgreSQL refuses two assignments to one column, so a release (which clears the
        # lease) replaces what a claim or renewal in the same transition would set.
        if t.claim is not None:
            sets.append("fence = fence + 1")
        if t.release:
            sets += ["owner = NULL", "lease_until = NULL", "claims = 0"]
        elif t.claim is not None:
            sets += ["owner = %s", "lease_until = " + NEW_LEASE, "claims = claims + 1"]
            params += [t.claim.owner, clamp_lease(t.claim.lease_seconds)]
        elif t.renew_lease is not None:
            sets.append("lease_until = " + NEW_LEASE)
            params.append(clamp_lease(t.renew_lease))
        patched, patch_params = patch_sets(
            t, "%s", _same, "now() + make_interval(secs => %s)", "%s::jsonb"
        )
        sets += patched
        params += patch_params
        owned = "fence = %s" if t.fence is not None else UNOWNED
        where = "id = %s AND version = %s AND " + owned
        params += [t.run_id, t.expected_version]
        if t.fence is not None:
            params.append(t.fence)
        update = "UPDATE flux_runs SET " + ", ".join(sets) + " WHERE " + where
        # Consuming a signal (once per wait) takes the transaction block: its row must be
        # hit exactly once, which one statement cannot make a condition of the run's update.
        simple = (
            t.delete_steps_from is None
            and t.consume_signal is None
            and t.wake is None
            and (t.insert_step is None or t.update_step is None)
        )
        if simple and groupable(t):
            return await self._group.submit(PgWrite(t, update, params))
        return await self._apply(t, update, params, simple)

    async def _flush(self, writes: Sequence[PgWrite]) -> Sequence[Applied | BaseException]:
        """Write a batch of step commits (see :mod:`fluxrun.storage._pg_group`)."""
        if len(writes) == 1:  # alone: the single statement (prepared, once it repeats)
            w = writes[0]
            try:
                return [await self._apply(w.t, w.update, w.params, True)]
            except Exception as exc:
                return [exc]
        try:
            async with self._connection("group commit") as conn:
                outcome = await flush_writes(conn, writes)
        except _StorageError:
            outcome = None  # no connection, or cut off: each write on its own says so
        if outcome is not None:
            return outcome
        # Each on its own now (the batch's connection given back first, so that a pool of
        # one connection serves them too), each error naming its run.
        alone: list[Applied | BaseException] = []
        for w in writes:
            try:
                alone.append(await self._apply(w.t, w.update, w.params, True))
            except Exception as exc:
                alone.append(exc)
        return alone

    async def _apply(self, t: Transition, update: str, params: list[Any], simple: bool) -> Applied:
        async with self._connection("step commit", t.run_id) as conn:
            if simple:
                applied = await _apply.apply_simple(conn, t, update, params)
            else:
                async with transaction(conn):
                    applied = await _apply.apply_block(conn, t, update, params)
            if (
                (t.release and t.status not in FINISHED_STATUSES)
                or (t.fence is None and t.claim is None)
                or t.wake is not None  # a child's end: its parent may be due
            ):
                await notify(conn)  # let go unfinished, or changed by an operator: maybe due
            return applied

    async def delete(self, run_id: str) -> bool:
        """Delete a run unless a live lease (by the database clock) owns it; its step and
        attempt rows go with it (``ON DELETE CASCADE``).

        Raises:
            RunBusyError: a live lease owns the run.
        """
        async with self._connection("delete", run_id) as conn:
            deleted = await rowcount(
                conn, "DELETE FROM flux_runs WHERE id = %s AND " + UNOWNED, (run_id,)
            )
            if deleted:
                return True
            # Nothing deleted: no such run, or a live lease protected it when we tried.
            found = await fetchall(
                conn, "SELECT name, owner FROM flux_runs WHERE id = %s", (run_id,)
            )
        if not found:
            return False
        raise delete_busy_error(run_id, found[0][0], found[0][1])

    # -- reads ------------------------------------------------------------------------------

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, read in one snapshot."""
        async with (
            self._connection("load", run_id) as conn,
            transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ):
            found = await fetchall(
                conn, "SELECT " + RUN_SELECT + " FROM flux_runs WHERE id = %s", (run_id,)
            )
            if not found:
                return None
            steps = await fetchall(
                conn,
                "SELECT " + STEP_SELECT + " FROM flux_steps WHERE run_id = %s ORDER BY idx",
                (run_id,),
            )
        return run_row(found[0], tuple(step_row(s) for s in steps))

    async def listen(self, wake: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """``LISTEN flux_due`` (see :mod:`._pg_listen`) unless made with ``listen=False``."""
        if not self._listen:
            return None

        async def settings() -> tuple[str, dict[str, Any]]:
            await self._db.open()
            assert self._db.renew_settings is not None
            return self._db.renew_settings

        return Listener(settings, wake, name=repr(self)).close

    async def load_tail(self, run_id: str) -> RunRow | None:
        """The run with its snapshot and the step rows from the snapshot on (see
        :meth:`Store.load_tail`), read in one snapshot."""
        async with self._connection("load", run_id) as conn:
            return await _tail.load_tail(conn, run_id)

    async def load_steps(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """The run's step rows below index ``before``."""
        async with self._connection("load", run_id) as conn:
            return await _tail.steps_before(conn, run_id, before)

    def read_steps_blocking(self, run_id: str, before: int) -> tuple[StepRow, ...]:
        """:meth:`load_steps` on the calling thread, over the store's synchronous
        connection (the one lease renewal uses)."""
        self._db.check_open()
        return _tail.read_before(self._renewer, self._db.renew_settings, run_id, before)

    async def list_attempts(self, run_id: str) -> list[AttemptRow]:
        """The run's attempt log, oldest first."""
        async with self._connection("list_attempts", run_id) as conn:
            rows = await fetchall(
                conn,
                "SELECT " + ATTEMPT_SELECT + " FROM flux_attempts WHERE run_id = %s ORDER BY seq",
                (run_id,),
            )
        return [attempt_row(r) for r in rows]

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs matching ``query``, newest first, with their steps, from one snapshot."""
        limit, offset = page(query)
        where: list[str] = []
        params: list[Any] = []
        if query.name is not None:
            where.append("name = %s")
            params.append(query.name)
        if query.statuses is not None:
            if not query.statuses:
                return []
            where.append("status = ANY(%s::text[])")
            params.append([s.value for s in query.statuses])
        sql = "SELECT " + RUN_SELECT + " FROM flux_runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, seq DESC LIMIT %s::bigint OFFSET %s::bigint"
        params += [limit, offset]
        async with (
            self._connection("list") as conn,
            transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ):
            runs = await fetchall(conn, sql, params)
            if not runs:
                return []
            steps = await fetchall(
                conn,
                "SELECT run_id, " + STEP_SELECT + " FROM flux_steps "
                "WHERE run_id = ANY(%s::text[]) ORDER BY run_id, idx",
                ([r[0] for r in runs],),
            )
        by_run: dict[str, list[StepRow]] = {}
        for s in steps:
            by_run.setdefault(s[0], []).append(step_row(s[1:]))
        return [run_row(r, tuple(by_run.get(r[0], ()))) for r in runs]

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease (by the database clock)
        protects, oldest first."""
        limit = row_limit(limit, "limit")
        if not names:
            return []
        async with self._connection("find_recoverable") as conn:
            rows = await fetchall(
                conn,
                "SELECT " + RUN_SELECT + " FROM flux_runs "
                "WHERE name = ANY(%s::text[]) AND status = ANY(%s::text[]) AND "
                + UNOWNED
                + " ORDER BY created_at, seq LIMIT %s::bigint",
                (list(names), list(RECOVERABLE_STATUSES), limit),
            )
        return [run_row(r) for r in rows]

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> Renewed:
        """Extend ``owner``'s leases in one statement; report the runs it lost and the
        pending requests of the rest.

        Runs on the calling thread with a synchronous connection of its own (see
        :class:`LeaseRenewer`), bounded by ``query_timeout``.
        """
        usable, lost = usable_fences(fences)
        if not usable:
            return Renewed(lost, {})
        self._db.check_open()
        settings = self._db.renew_settings
        if settings is None:
            raise _StorageError(f"{self!r} renews leases only after init()")
        seconds = clamp_lease(lease_seconds)
        ids = sorted(usable)
        params = (seconds, ids, [usable[i] for i in ids], owner)
        renewed = self._renewer.renew(settings, params, seconds)
        requested = {k: v for k, v in renewed.items() if v is not None}
        return Renewed(lost | (set(usable) - set(renewed)), requested)

    # -- scheduling (see Store; the SQL is in _pg_sched) --------------------------------------

    async def start(
        self,
        run: RunRow,
        *,
        lease_owner: str | None,
        lease_seconds: float,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
    ) -> Started:
        """Insert-or-observe a run (``INSERT ... ON CONFLICT DO NOTHING``, then read)."""
        check_new_run(run)
        if idempotency_key is not None:
            run = replace(run, idempotency_key=idempotency_key)
        lease = None if lease_owner is None else clamp_lease(lease_seconds)
        async with self._connection("start", run.id) as conn:
            started = await _q.start(conn, run, lease_owner, lease, input_hash)
            if started.created and lease_owner is None:
                await notify(conn)
            return started

    async def claim_due(
        self,
        owner: str,
        names: Sequence[str],
        limit: int,
        lease_seconds: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[RunRow]:
        """Claim due runs in one statement (``FOR NO KEY UPDATE SKIP LOCKED``); then, in a
        transaction each, runs waiting for a free slot of a concurrency limit and batch
        items (see :mod:`fluxrun.storage._pg_limits`)."""
        limit = row_limit(limit, "limit")
        checked = check_limits(limits)
        if not names or not limit:
            return []
        lease = clamp_lease(lease_seconds)
        limited = {n: checked[n] for n in names if n in checked}
        async with self._connection("claim") as conn:
            rows = await _q.claim_due(conn, owner, names, limit, lease, list(limited))
            if limited and len(rows) < limit:
                rows += await claim_limited(
                    conn, owner, list(names), limited, limit - len(rows), lease
                )
            if len(rows) < limit:  # then batch items, within their batches' limits
                rows += await claim_items(conn, owner, names, limit - len(rows), lease, limited)
            return rows

    async def next_due(self, names: Sequence[str]) -> dt.datetime | None:
        """The earliest ``run_after`` among pending and suspended runs of these workflows."""
        if not names:
            return None
        async with self._connection("next_due") as conn:
            return await _q.next_due(conn, names)

    async def send_signal(
        self, run_id: str, name: str, payload: str, dedupe_key: str | None = None
    ) -> SignalSent:
        """Append a signal to an unfinished run's inbox, its row locked first."""
        check_signal(run_id, name, payload, dedupe_key)
        async with self._connection("send_signal", run_id) as conn:
            sent = await _q.send_signal(conn, run_id, name, payload, dedupe_key)
            if sent.created:
                await notify(conn)
            return sent

    async def list_signals(self, run_id: str) -> list[SignalRow]:
        """Every inbox row of the run, by ``seq``."""
        async with self._connection("list_signals", run_id) as conn:
            return await _q.list_signals(conn, run_id)

    async def first_signal(self, run_id: str, name: str) -> SignalRow | None:
        """The oldest unconsumed inbox row of the run with this name, or None."""
        async with self._connection("first_signal", run_id) as conn:
            return await _q.first_signal(conn, run_id, name)

    async def request(self, run_id: str, kind: RequestKind, reason: str | None = None) -> bool:
        """Record a cancel or pause request (see :meth:`Store.request`)."""
        check_request_kind(kind)
        async with self._connection("request", run_id) as conn:
            asked = await _q.request(conn, run_id, kind, reason)
            if asked:
                await notify(conn)
            return asked

    async def counts(self, name: str | None = None) -> dict[str, int]:
        """Runs by status (of workflow ``name``, or all)."""
        async with self._connection("counts") as conn:
            return await _q.counts(conn, name)

    async def record_worker(self, beat: WorkerBeat) -> None:
        """Record a worker's heartbeat, by the database's clock."""
        async with self._connection("record_worker") as conn:
            await conn.execute(_w.PG_RECORD, beat_params(beat))

    async def worker_stopped(self, worker_id: str) -> None:
        """Mark a worker stopped now."""
        async with self._connection("worker_stopped") as conn:
            await conn.execute(_w.PG_STOPPED, (worker_id,))

    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker recorded, the most recent heartbeat first."""
        async with self._connection("list_workers") as conn:
            return [worker_from(r, utc) for r in await fetchall(conn, _w.LIST)]

    def __repr__(self) -> str:
        where = redact(self._dsn) if self._dsn is not None else "pool"
        return f"PostgresStorage({where})"
