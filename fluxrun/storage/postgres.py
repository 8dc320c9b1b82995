"""PostgreSQL store on psycopg 3 (async, pooled): many processes and machines share one database.

psycopg is an optional dependency (``pip install 'fluxrun[postgres]'``). It is imported only
when a :class:`PostgresStorage` is built, so ``import fluxrun`` works without it.

Every value is a bound parameter; the only SQL built at run time is the choice among fixed
fragments (which columns a transition sets). JSON columns are ``jsonb`` and are read back
as text (``col::text``) so that fluxrun's own codec decodes every backend's values. Leases
are judged by the database clock, never by a worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..errors import ConcurrentModificationError, InvalidArgumentError, SchemaVersionError
from ..errors import StorageError as _StorageError
from ._base import (
    KEEP,
    RECOVERABLE_STATUSES,
    Applied,
    ListQuery,
    RunRow,
    StepRow,
    Store,
    Transition,
    transition_error,
)
from ._migrations import migrations
from ._rows import run_from, step_fields, step_from

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

__all__ = ["PostgresStorage"]

#: Key of the transaction-level advisory lock that serialises schema migrations
#: (the bytes of "fluxrun" as a number; advisory locks are per database).
_MIGRATION_LOCK = 28829699412227438

_INSTALL_HINT = "PostgresStorage needs psycopg 3 and psycopg-pool: pip install 'fluxrun[postgres]'"

#: Connection options of ``psycopg.connect`` (not libpq parameters) that the lease-renewal
#: connection must not inherit from a pool's settings: it sets its own.
_CONNECTION_OPTIONS = ("autocommit", "row_factory", "cursor_factory", "context")

# The orders of storage/_rows.py (RUN_COLUMNS, STEP_COLUMNS), with JSON read back as text.
_RUN_COLUMNS = (
    "id, name, definition_version, status, input::text, step_names::text, current_step, error, "
    "created_at, updated_at, completed_at, version, fence, owner, lease_until, claims, wait_name"
)
_STEP_COLUMNS = (
    "idx, name, status, started_at, completed_at, suspended_at, compensated_at, waiting_for, "
    "duration_ms, output::text, error, retries, changes::text, compensation_changes::text, fence"
)
# The columns a step row's content is written to (all but its key, run_id and idx).
_STEP_FIELDS = (
    "name, status, started_at, completed_at, suspended_at, compensated_at, waiting_for, "
    "duration_ms, output, error, retries, changes, compensation_changes, fence"
)
# Explicit types: in INSERT ... SELECT (used to make the insert conditional on the run's
# compare-and-set) PostgreSQL cannot infer parameter types from the target columns.
_STEP_FIELD_VALUES = (
    "%s::text, %s::text, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::timestamptz, "
    "%s::text, %s::double precision, %s::jsonb, %s::text, %s::integer, %s::jsonb, %s::jsonb, "
    "%s::bigint"
)
_STEP_TARGET = "run_id, idx, " + _STEP_FIELDS
_STEP_VALUES = "%s::text, %s::integer, " + _STEP_FIELD_VALUES
_SET_STEP = "UPDATE flux_steps SET (" + _STEP_FIELDS + ") = (SELECT " + _STEP_FIELD_VALUES + ")"
_INSERT_RUN = (
    "INSERT INTO flux_runs (id, name, definition_version, status, input, step_names, "
    "current_step, error, created_at, updated_at, completed_at, version, fence, owner, "
    "lease_until, claims, wait_name) VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, "
    "%s, %s, %s, %s, %s, %s, {lease}, %s, %s)"
)
_NEW_LEASE = "clock_timestamp() + make_interval(secs => %s::double precision)"
_UNOWNED = "(owner IS NULL OR lease_until IS NULL OR lease_until <= now())"
_RENEW = (
    "UPDATE flux_runs AS r SET lease_until = " + _NEW_LEASE + " "
    "FROM unnest(%s::text[], %s::bigint[]) AS h(id, fence) "
    "WHERE r.id = h.id AND r.fence = h.fence AND r.owner = %s RETURNING r.id"
)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # psycopg returns timestamptz in the session's time zone; the engine works in UTC.
    return None if value is None else value.astimezone(dt.UTC)


def _same(value: dt.datetime | None) -> dt.datetime | None:
    return value


def _step_fields(s: StepRow) -> tuple[Any, ...]:
    return step_fields(s, _same)


def _step_values(run_id: str, s: StepRow) -> tuple[Any, ...]:
    return (run_id, s.index, *_step_fields(s))


def _step_row(r: Sequence[Any]) -> StepRow:
    return step_from(r, _utc)


def _run_row(r: Sequence[Any], steps: tuple[StepRow, ...] = ()) -> RunRow:
    return run_from(r, _utc, steps)


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise _StorageError(_INSTALL_HINT) from exc


def _size(value: object, what: str, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise InvalidArgumentError(
            f"PostgresStorage {what} must be an int >= {minimum}, got {value!r}"
        )
    return value


async def _fetchall(
    conn: psycopg.AsyncConnection[Any], query: str, params: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    from psycopg.rows import tuple_row

    # An explicit row factory: a pool passed in may hand out connections with dict rows.
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall() if cur.description is not None else []


async def _rowcount(
    conn: psycopg.AsyncConnection[Any], query: str, params: Sequence[Any] = ()
) -> int:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return cur.rowcount


class PostgresStorage(Store):
    """Durable store in a PostgreSQL database, shared by any number of processes.

    A step commit is one statement (one round trip, one commit): the run's update is a
    compare-and-set on its version and fence, and the step row is inserted only if it
    applied. Lease renewal runs on a connection of its own, from the engine's renewal
    thread, so a busy event loop cannot make an executor lose its runs.

    Args:
        dsn: A libpq connection string or URL. The store opens its own connection pool on
            :meth:`init` and closes it on :meth:`close`.
        pool: An open ``psycopg_pool.AsyncConnectionPool`` to use instead of ``dsn``; the
            store never closes it. Its connections may be in any autocommit mode or row
            factory; the store restores what it changes. Lease renewal opens one extra
            connection with the pool's connection settings.
        min_size: Connections the store's own pool keeps open.
        max_size: Most connections the store's own pool opens.

    Raises:
        InvalidArgumentError: both or neither of ``dsn`` and ``pool``, or a bad size.
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
    ) -> None:
        if (dsn is None) == (pool is None):
            raise InvalidArgumentError("PostgresStorage needs either a dsn or a pool (not both)")
        if dsn is not None and (not isinstance(dsn, str) or not dsn.strip()):
            raise InvalidArgumentError(
                f"PostgresStorage dsn must be a non-empty str, got {type(dsn).__name__}"
            )
        _size(min_size, "min_size", 0)
        _size(max_size, "max_size", max(1, min_size))
        _require_psycopg()
        from psycopg_pool import AsyncConnectionPool

        if pool is not None and not isinstance(pool, AsyncConnectionPool):
            raise InvalidArgumentError(
                "PostgresStorage pool must be a psycopg_pool.AsyncConnectionPool, got "
                f"{type(pool).__name__}"
            )
        self._dsn = dsn
        self._pool: AsyncConnectionPool[Any] | None = pool
        self._own_pool = pool is None
        self._min_size = min_size
        self._max_size = max_size
        self._closed = False
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        # Settings of the lease-renewal connection, resolved by init() (a pool's conninfo
        # may be a coroutine function, which the renewal thread cannot await).
        self._renew_conninfo: str | None = None
        self._renew_options: dict[str, Any] = {}
        self._renew_conn: psycopg.Connection[Any] | None = None
        self._renew_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise _StorageError(f"{self!r} is closed")

    async def _open(self) -> AsyncConnectionPool[Any]:
        """The pool, opened on first use (our own) or checked (one passed in)."""
        self._check_open()
        if self._opened and self._pool is not None:
            return self._pool
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            self._check_open()
            if not self._opened:
                await self._open_once()
        assert self._pool is not None
        return self._pool

    async def _open_once(self) -> None:
        _require_psycopg()
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        if self._pool is None:
            dsn = self._dsn or ""
            # One direct connection first: a wrong DSN fails at once with the server's own
            # message, where the pool would keep retrying in the background until a timeout.
            try:
                probe = await psycopg.AsyncConnection.connect(dsn)
                await probe.close()
            except psycopg.Error as exc:
                raise _StorageError(
                    f"cannot connect to PostgreSQL ({_redact(dsn)}): {exc}"
                ) from exc
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                self._dsn or "",
                min_size=self._min_size,
                max_size=self._max_size,
                # Autocommit: a single-statement write is its own transaction, so a step
                # commit is one round trip; multi-statement work opens explicit blocks.
                kwargs={"autocommit": True},
                open=False,
                name="fluxrun",
            )
            try:
                await pool.open(wait=True)
            except psycopg.Error as exc:
                await pool.close()
                raise _StorageError(
                    f"cannot connect to PostgreSQL ({_redact(dsn)}): {exc}"
                ) from exc
            self._pool = pool
            self._renew_conninfo = _with_connect_timeout(dsn)
        else:
            if self._pool.closed:
                raise _StorageError(
                    "the pool given to PostgresStorage is closed or not open yet; open it first"
                )
            await self._resolve_renew_settings(self._pool)
        self._opened = True

    async def _resolve_renew_settings(self, pool: AsyncConnectionPool[Any]) -> None:
        conninfo: Any = pool.conninfo
        if callable(conninfo):
            conninfo = conninfo()
            if inspect.isawaitable(conninfo):
                conninfo = await conninfo
        kwargs: Any = pool.kwargs or {}
        if callable(kwargs):
            kwargs = kwargs()
            if inspect.isawaitable(kwargs):
                kwargs = await kwargs
        from psycopg.conninfo import make_conninfo

        params = {k: v for k, v in dict(kwargs).items() if k not in _CONNECTION_OPTIONS}
        options = {k: params.pop(k) for k in ("prepare_threshold",) if k in params}
        self._renew_conninfo = _with_connect_timeout(make_conninfo(str(conninfo or ""), **params))
        self._renew_options = options

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in autocommit mode; psycopg errors become StorageError."""
        import psycopg

        pool = await self._open()
        try:
            async with pool.connection() as conn:
                restore = not conn.autocommit
                if restore:
                    await conn.set_autocommit(True)
                try:
                    yield conn
                finally:
                    if restore and not conn.closed:
                        await self._rollback(conn)
                        await conn.set_autocommit(False)
        except (psycopg.Error, UnicodeEncodeError) as exc:
            raise _StorageError(f"PostgreSQL {what} failed: {_describe(exc)}") from exc

    @staticmethod
    async def _rollback(conn: psycopg.AsyncConnection[Any]) -> None:
        """Best effort: a connection that cannot roll back is broken, and the pool drops it."""
        import psycopg
        from psycopg.pq import TransactionStatus

        status = conn.info.transaction_status
        if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")

    @asynccontextmanager
    async def _transaction(
        self, conn: psycopg.AsyncConnection[Any], begin: str = "BEGIN"
    ) -> AsyncIterator[None]:
        """An explicit transaction block on an autocommit connection."""
        await conn.execute(begin)
        try:
            yield
        except BaseException:
            if not conn.closed:
                await self._rollback(conn)
            raise
        await conn.execute("COMMIT")

    # -- lifecycle --------------------------------------------------------------------------

    async def init(self) -> None:
        """Connect and apply any missing migration (safe when several processes start at once).

        Raises:
            SchemaVersionError: the database was migrated by a newer fluxrun.
            StorageError: the database cannot be reached or migrated.
        """
        async with self._connection("migration") as conn, self._transaction(conn):
            # Serialises concurrent init()s: the second waits, then finds the schema current.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS flux_schema (version INTEGER NOT NULL)")
            rows = await _fetchall(conn, "SELECT max(version) FROM flux_schema")
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
        """Close the store's own pool (never a pool passed in) and the renewal connection."""
        if self._closed:
            return
        self._closed = True
        if self._own_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
        with self._renew_lock:
            if self._renew_conn is not None:
                self._renew_conn.close()
                self._renew_conn = None

    # -- writes -----------------------------------------------------------------------------

    async def create(self, run: RunRow, *, lease_owner: str | None, lease_seconds: float) -> None:
        """Insert a new run (its lease, if owned, runs from the database's clock)."""
        from psycopg import errors

        lease = "NULL" if lease_owner is None else _NEW_LEASE
        params: list[Any] = [
            run.id,
            run.name,
            run.definition_version,
            run.status,
            run.input,
            json.dumps(list(run.step_names)),
            run.current_step,
            run.error,
            run.created_at,
            run.updated_at,
            run.completed_at,
            run.version,
            run.fence,
            lease_owner,
        ]
        if lease_owner is not None:
            params.append(float(lease_seconds))
        params += [1 if lease_owner else 0, run.wait_name]
        async with self._connection("create") as conn:
            try:
                await conn.execute(_INSERT_RUN.format(lease=lease), params)
            except errors.UniqueViolation as exc:
                raise ConcurrentModificationError(
                    f"a run with id {run.id!r} already exists", workflow_id=run.id
                ) from exc

    async def apply(self, t: Transition) -> Applied:
        """Apply one transition atomically (a compare-and-set on version and fence).

        A transition that changes at most one step row (inserts or replaces it) is one
        statement, so one round trip and one commit; one that deletes step rows, or inserts
        one and replaces another, is one explicit transaction.
        """
        sets = ["version = version + 1", "updated_at = %s"]
        params: list[Any] = [t.updated_at]
        # PostgreSQL refuses two assignments to one column, so a release (which clears the
        # lease) replaces what a claim or renewal in the same transition would set.
        if t.claim is not None:
            sets.append("fence = fence + 1")
        if t.release:
            sets += ["owner = NULL", "lease_until = NULL", "claims = 0"]
        elif t.claim is not None:
            sets += ["owner = %s", "lease_until = " + _NEW_LEASE, "claims = claims + 1"]
            params += [t.claim.owner, float(t.claim.lease_seconds)]
        elif t.renew_lease is not None:
            sets.append("lease_until = " + _NEW_LEASE)
            params.append(float(t.renew_lease))
        if t.insert_step is not None and t.claim is None and not t.release:
            sets.append("claims = 1")  # progress: only the current claim counts now
        for column in ("status", "current_step", "error", "completed_at", "wait_name"):
            value = getattr(t, column)
            if value is not KEEP:
                sets.append(column + " = %s")
                params.append(value)
        owned = "fence = %s" if t.fence is not None else _UNOWNED
        where = "id = %s AND version = %s AND " + owned
        params += [t.run_id, t.expected_version]
        if t.fence is not None:
            params.append(t.fence)
        update = "UPDATE flux_runs SET " + ", ".join(sets) + " WHERE " + where
        simple = t.delete_steps_from is None and (t.insert_step is None or t.update_step is None)
        async with self._connection("step commit") as conn:
            if simple:
                return await self._apply_simple(conn, t, update, params)
            async with self._transaction(conn):
                return await self._apply_block(conn, t, update, params)

    async def _apply_simple(
        self, conn: psycopg.AsyncConnection[Any], t: Transition, update: str, params: list[Any]
    ) -> Applied:
        """One statement: the run's compare-and-set, and the step row written only if it
        applied (an autocommit statement is atomic, so a failing part undoes the rest)."""
        from psycopg import errors

        if t.insert_step is not None:
            # A row already at that index fails the whole statement with a unique violation.
            query = (
                "WITH u AS (" + update + " RETURNING version, fence), "
                "i AS (INSERT INTO flux_steps (" + _STEP_TARGET + ") "
                "SELECT " + _STEP_VALUES + " FROM u) SELECT version, fence FROM u"
            )
            params = params + list(_step_values(t.run_id, t.insert_step))
        elif t.update_step is not None:
            # The run is updated only if the step row exists, so the row update always hits.
            query = (
                "WITH u AS (" + update + " AND EXISTS (SELECT 1 FROM flux_steps "
                "WHERE run_id = %s AND idx = %s) RETURNING version, fence), "
                "s AS (" + _SET_STEP + " FROM u WHERE run_id = %s AND idx = %s) "
                "SELECT version, fence FROM u"
            )
            index = t.update_step.index
            params = [
                *params,
                t.run_id,
                index,
                *_step_fields(t.update_step),
                t.run_id,
                index,
            ]
        else:
            query = update + " RETURNING version, fence"
        try:
            rows = await _fetchall(conn, query, params)
        except errors.UniqueViolation as exc:
            raise self._recorded(t) from exc
        if not rows:
            raise await self._diagnose(conn, t)
        return Applied(version=rows[0][0], fence=rows[0][1])

    async def _apply_block(
        self, conn: psycopg.AsyncConnection[Any], t: Transition, update: str, params: list[Any]
    ) -> Applied:
        """The parts in order (run, deletion, insertion, replacement), as in every store;
        the caller's transaction block undoes them all if one fails."""
        from psycopg import errors

        rows = await _fetchall(conn, update + " RETURNING version, fence", params)
        if not rows:
            raise await self._diagnose(conn, t)
        if t.delete_steps_from is not None:
            await conn.execute(
                "DELETE FROM flux_steps WHERE run_id = %s AND idx >= %s "
                "AND NOT (idx = ANY(%s::integer[]))",
                (t.run_id, t.delete_steps_from, list(t.keep_steps)),
            )
        if t.insert_step is not None:
            try:
                await conn.execute(
                    "INSERT INTO flux_steps (" + _STEP_TARGET + ") VALUES (" + _STEP_VALUES + ")",
                    _step_values(t.run_id, t.insert_step),
                )
            except errors.UniqueViolation as exc:
                raise self._recorded(t) from exc
        if t.update_step is not None:
            index = t.update_step.index
            changed = await _rowcount(
                conn,
                _SET_STEP + " WHERE run_id = %s AND idx = %s",
                (*_step_fields(t.update_step), t.run_id, index),
            )
            if changed != 1:
                raise self._unrecorded(t.run_id, index)
        return Applied(version=rows[0][0], fence=rows[0][1])

    @staticmethod
    def _recorded(t: Transition) -> ConcurrentModificationError:
        index = t.insert_step.index if t.insert_step is not None else -1
        return ConcurrentModificationError(
            f"step {index} of run {t.run_id!r} is already recorded", workflow_id=t.run_id
        )

    @staticmethod
    def _unrecorded(run_id: str, index: int) -> ConcurrentModificationError:
        return ConcurrentModificationError(
            f"step {index} of run {run_id!r} has no recorded outcome", workflow_id=run_id
        )

    async def _diagnose(
        self, conn: psycopg.AsyncConnection[Any], t: Transition
    ) -> ConcurrentModificationError:
        """Why a compare-and-set matched no row: the same error the reference model raises."""
        index = None if t.update_step is None else t.update_step.index
        rows = await _fetchall(
            conn,
            "SELECT name, version, fence, owner, lease_until, now(), "
            "EXISTS (SELECT 1 FROM flux_steps WHERE run_id = %s AND idx = %s) "
            "FROM flux_runs WHERE id = %s",
            (t.run_id, index, t.run_id),
        )
        if not rows:
            return ConcurrentModificationError(
                f"run {t.run_id!r} no longer exists", workflow_id=t.run_id
            )
        name, version, fence, owner, lease_until, now, step_exists = rows[0]
        error = transition_error(t.run_id, name, version, fence, owner, lease_until, t, now)
        if error is None and index is not None and not step_exists:
            error = self._unrecorded(t.run_id, index)
        return error or ConcurrentModificationError(
            f"run {t.run_id!r} changed while being written", workflow_id=t.run_id
        )

    async def delete(self, run_id: str) -> bool:
        """Delete a run; its step rows go with it (``ON DELETE CASCADE``)."""
        async with self._connection("delete") as conn:
            return await _rowcount(conn, "DELETE FROM flux_runs WHERE id = %s", (run_id,)) > 0

    # -- reads ------------------------------------------------------------------------------

    async def load(self, run_id: str) -> RunRow | None:
        """The run with its step rows, read in one snapshot."""
        async with (
            self._connection("load") as conn,
            self._transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ):
            found = await _fetchall(
                conn, "SELECT " + _RUN_COLUMNS + " FROM flux_runs WHERE id = %s", (run_id,)
            )
            if not found:
                return None
            steps = await _fetchall(
                conn,
                "SELECT " + _STEP_COLUMNS + " FROM flux_steps WHERE run_id = %s ORDER BY idx",
                (run_id,),
            )
        return _run_row(found[0], tuple(_step_row(s) for s in steps))

    async def list_runs(self, query: ListQuery) -> list[RunRow]:
        """Runs matching ``query``, newest first, with their steps, from one snapshot."""
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
        sql = "SELECT " + _RUN_COLUMNS + " FROM flux_runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, seq DESC LIMIT %s OFFSET %s"
        params += [query.limit, query.offset]
        async with (
            self._connection("list") as conn,
            self._transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ):
            runs = await _fetchall(conn, sql, params)
            if not runs:
                return []
            steps = await _fetchall(
                conn,
                "SELECT run_id, " + _STEP_COLUMNS + " FROM flux_steps "
                "WHERE run_id = ANY(%s::text[]) ORDER BY run_id, idx",
                ([r[0] for r in runs],),
            )
        by_run: dict[str, list[StepRow]] = {}
        for s in steps:
            by_run.setdefault(s[0], []).append(_step_row(s[1:]))
        return [_run_row(r, tuple(by_run.get(r[0], ()))) for r in runs]

    async def find_recoverable(self, names: Sequence[str], limit: int) -> list[RunRow]:
        """Unfinished runs of these workflows that no live lease (by the database clock)
        protects, oldest first."""
        if not names:
            return []
        async with self._connection("find_recoverable") as conn:
            rows = await _fetchall(
                conn,
                "SELECT " + _RUN_COLUMNS + " FROM flux_runs "
                "WHERE name = ANY(%s::text[]) AND status = ANY(%s::text[]) AND "
                + _UNOWNED
                + " ORDER BY created_at, seq LIMIT %s",
                (list(names), list(RECOVERABLE_STATUSES), limit),
            )
        return [_run_row(r) for r in rows]

    def renew_leases(self, owner: str, fences: Mapping[str, int], lease_seconds: float) -> set[str]:
        """Extend ``owner``'s leases in one statement; return the runs it lost.

        Runs on the calling thread with a synchronous connection of its own, reconnecting
        once when the previous connection was broken (a server restart, a network cut).
        """
        if not fences:
            return set()
        import psycopg

        ids = sorted(fences)
        params = (float(lease_seconds), ids, [fences[i] for i in ids], owner)
        with self._renew_lock:
            self._check_open()
            if self._renew_conninfo is None:
                raise _StorageError(f"{self!r} renews leases only after init()")
            for attempt in range(2):
                reused = self._renew_conn is not None
                try:
                    conn = self._renew_connection()
                    with conn.cursor() as cur:
                        # A renewal stuck behind a lock past the lease is worthless anyway.
                        timeout_ms = max(1000, int(lease_seconds * 1000))
                        cur.execute(
                            "SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),)
                        )
                        cur.execute(_RENEW, params)
                        renewed = {r[0] for r in cur.fetchall()}
                    conn.commit()
                    return set(fences) - renewed
                except psycopg.Error as exc:
                    self._drop_renew_connection()
                    if isinstance(exc, psycopg.OperationalError) and reused and attempt == 0:
                        continue  # the kept connection had gone stale: try a fresh one once
                    raise _StorageError(
                        f"PostgreSQL lease renewal failed: {_describe(exc)}"
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _renew_connection(self) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.rows import tuple_row

        conn = self._renew_conn
        if conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(
                self._renew_conninfo or "",
                autocommit=False,
                row_factory=tuple_row,
                **self._renew_options,
            )
            self._renew_conn = conn
        return conn

    def _drop_renew_connection(self) -> None:
        conn, self._renew_conn = self._renew_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already failing; the next call reconnects
                pass

    def __repr__(self) -> str:
        where = _redact(self._dsn) if self._dsn is not None else "pool"
        return f"PostgresStorage({where})"


def _with_connect_timeout(conninfo: str) -> str:
    """``conninfo`` with a connect timeout (10 s) unless it sets one: the renewal thread
    must not hang on an unreachable server."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if "connect_timeout" in conninfo_to_dict(conninfo):
        return conninfo
    return make_conninfo(conninfo, connect_timeout=10)


def _describe(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return f"[{state}] {exc}" if state else f"{type(exc).__name__}: {exc}"


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
    except Exception:  # an unparsable DSN is shown as a placeholder
        return "<dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)
