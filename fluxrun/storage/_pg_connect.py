"""Connections of :class:`~fluxrun.storage.postgres.PostgresStorage`: the async pool it runs
on and the synchronous connection lease renewal uses, each bounded on the client side.

Every wait is bounded by the store's ``query_timeout``: getting a pooled connection, a
connection attempt (``connect_timeout``), and each operation on a connection, after which
the connection's socket is cut (:class:`Deadline`). TCP keepalives and a TCP user timeout
catch a dead server or a cut network; a *stopped* server (SIGSTOP, a hung VM) still has a
kernel that answers TCP, so only the client's own timer notices it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..errors import StorageError as _StorageError
from ._pg import RENEW, Deadline, about, bounded_conninfo, describe, redact, shutdown_socket

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

__all__ = ["LeaseRenewer", "PgPool", "rollback", "transaction"]

#: Connection options of ``psycopg.connect`` (not libpq parameters) that the lease-renewal
#: connection must not inherit from a pool's settings: it sets its own.
_CONNECTION_OPTIONS = ("autocommit", "row_factory", "cursor_factory", "context")

_WRONG_LOOP = (
    "PostgresStorage is bound to the event loop that first used it; create one store per "
    "event loop/thread"
)


class PgPool:
    """The store's async pool: opened on first use, bound to the loop that opened it."""

    def __init__(
        self,
        name: str,
        dsn: str | None,
        pool: AsyncConnectionPool[Any] | None,
        min_size: int,
        max_size: int,
        timeout: float,
    ) -> None:
        self._name = name
        self._dsn = dsn
        self.pool = pool
        self._own_pool = pool is None
        self._min_size = min_size
        self._max_size = max_size
        self.timeout = timeout
        self.closed = False
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Settings for the lease-renewal connection, known once opened (a pool's conninfo
        #: may be a coroutine function, which the renewal thread cannot await).
        self.renew_settings: tuple[str, dict[str, Any]] | None = None

    def check_open(self) -> None:
        if self.closed:
            raise _StorageError(f"{self._name} is closed")

    def _check_loop(self) -> None:
        # A pool's connections and tasks belong to the loop that opened it; awaiting them
        # from another loop would hang forever, so refuse at once.
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise _StorageError(_WRONG_LOOP)

    async def open(self) -> AsyncConnectionPool[Any]:
        """The pool, opened on first use (our own) or checked (one passed in)."""
        self.check_open()
        self._check_loop()
        if self._opened and self.pool is not None:
            return self.pool
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            self.check_open()
            if not self._opened:
                await self._open_once()
        assert self.pool is not None
        return self.pool

    async def _open_once(self) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        if self.pool is None:
            dsn = self._dsn or ""
            # One direct connection first: a wrong DSN fails at once with the server's own
            # message, where the pool would keep retrying in the background until a timeout.
            try:
                conninfo = bounded_conninfo(dsn, self.timeout)
                async with asyncio.timeout(self.timeout + 1):
                    probe = await psycopg.AsyncConnection.connect(conninfo)
                    await probe.close()
            except (psycopg.Error, TimeoutError) as exc:
                raise _StorageError(
                    f"cannot connect to PostgreSQL ({redact(dsn)}): {describe(exc)}"
                ) from exc
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                conninfo,
                min_size=self._min_size,
                max_size=self._max_size,
                # Autocommit: a single-statement write is its own transaction, so a step
                # commit is one round trip; multi-statement work opens explicit blocks.
                kwargs={"autocommit": True},
                open=False,
                name="fluxrun",
                timeout=self.timeout,
            )
            try:
                await pool.open(wait=True, timeout=self.timeout)
            except psycopg.Error as exc:
                await pool.close()
                raise _StorageError(
                    f"cannot connect to PostgreSQL ({redact(dsn)}): {describe(exc)}"
                ) from exc
            self.pool = pool
            self.renew_settings = (conninfo, {})
        else:
            if self.pool.closed:
                raise _StorageError(
                    "the pool given to PostgresStorage is closed or not open yet; open it first"
                )
            self.renew_settings = await self._renew_settings_of(self.pool)
        self._opened = True

    async def _renew_settings_of(
        self, pool: AsyncConnectionPool[Any]
    ) -> tuple[str, dict[str, Any]]:
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
        return bounded_conninfo(make_conninfo(str(conninfo or ""), **params), self.timeout), options

    @asynccontextmanager
    async def connection(
        self, what: str, run_id: str | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection in autocommit mode, cut off after the timeout; psycopg
        errors become StorageError naming ``what`` (and the run, if given)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            pool = await self.open()
        except _StorageError as exc:
            if run_id is None or run_id in exc.message:
                raise
            raise _StorageError(
                f"PostgreSQL {what}{about(run_id)} failed: {exc.message}", workflow_id=run_id
            ) from exc
        deadline: Deadline | None = None
        try:
            async with pool.connection(timeout=self.timeout) as conn:
                deadline = Deadline(conn, self.timeout)
                try:
                    restore = not conn.autocommit
                    if restore:
                        await conn.set_autocommit(True)
                    try:
                        yield conn
                    finally:
                        if restore and not conn.closed:
                            await rollback(conn)
                            await conn.set_autocommit(False)
                finally:
                    deadline.cancel()
        except PoolTimeout as exc:
            raise _StorageError(
                f"PostgreSQL {what}{about(run_id)} failed: no connection within "
                f"query_timeout={self.timeout:g}s (the server may be down or overloaded, "
                f"or the pool exhausted): {exc}",
                workflow_id=run_id,
            ) from exc
        except (psycopg.Error, UnicodeEncodeError, asyncio.CancelledError) as exc:
            if deadline is not None and deadline.fired:
                if isinstance(exc, asyncio.CancelledError):
                    # Our own cancellation (used when the socket could not be cut) becomes
                    # the error; anyone else's cancellation goes on.
                    task = asyncio.current_task()
                    if not deadline.cancelled or task is None or task.uncancel() > 0:
                        raise
                raise _StorageError(
                    f"PostgreSQL {what}{about(run_id)} got no answer within "
                    f"query_timeout={self.timeout:g}s (the server may be down, frozen or "
                    "cut off); its outcome is unknown",
                    workflow_id=run_id,
                ) from exc
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _StorageError(
                f"PostgreSQL {what}{about(run_id)} failed: {describe(exc)}", workflow_id=run_id
            ) from exc

    async def close(self) -> None:
        """Close our own pool (never one passed in). From another loop than the pool's, it
        is closed on its own loop if that still runs, and otherwise only let go of."""
        if self.closed:
            return
        self.closed = True
        pool, self.pool = (self.pool, None) if self._own_pool else (None, self.pool)
        if pool is None:
            return
        home = self._loop
        if home is None or home is asyncio.get_running_loop():
            await pool.close(timeout=self.timeout)
        elif home.is_running():
            done = asyncio.run_coroutine_threadsafe(pool.close(timeout=self.timeout), home)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(done), self.timeout + 1)


async def rollback(conn: psycopg.AsyncConnection[Any]) -> None:
    """Best effort: a connection that cannot roll back is broken, and the pool drops it."""
    import psycopg
    from psycopg.pq import TransactionStatus

    status = conn.info.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await conn.execute("ROLLBACK")


@asynccontextmanager
async def transaction(
    conn: psycopg.AsyncConnection[Any], begin: str = "BEGIN"
) -> AsyncIterator[None]:
    """An explicit transaction block on an autocommit connection."""
    await conn.execute(begin)
    try:
        yield
    except BaseException:
        if not conn.closed:
            await rollback(conn)
        raise
    await conn.execute("COMMIT")


class _Cutter:
    """Cuts a renewal connection's socket after the timeout (from a timer thread)."""

    def __init__(self, conn: psycopg.Connection[Any], seconds: float) -> None:
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True  # set first: the renewal thread wakes as soon as the socket is cut
        shutdown_socket(self._conn)

    def cancel(self) -> None:
        self._timer.cancel()


class LeaseRenewer:
    """The synchronous connection lease renewal uses, from the engine's renewal thread, so
    that a busy event loop cannot make an executor lose its runs."""

    def __init__(self, name: str, timeout: float) -> None:
        self._name = name
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        self.conn: psycopg.Connection[Any] | None = None

    def renew(
        self, settings: tuple[str, dict[str, Any]], params: Sequence[Any], seconds: float
    ) -> dict[str, str | None]:
        """Run the renewal statement; the ids it renewed, each with its pending request (or
        None). Reconnects once when the kept connection was broken (a server restart, a
        network cut); a renewal that gets no answer within the timeout is cut off
        (StorageError)."""
        import psycopg

        with self._lock:
            if self._closed:  # checked under the lock: a renewal never reopens after close
                raise _StorageError(f"{self._name} is closed")
            for attempt in range(2):
                reused = self.conn is not None
                cutter: _Cutter | None = None
                try:
                    conn = self._connection(settings)
                    cutter = _Cutter(conn, self._timeout)
                    with conn.cursor() as cur:
                        # A renewal stuck behind a lock past the lease is worthless anyway.
                        timeout_ms = max(1000, int(min(seconds, self._timeout) * 1000))
                        cur.execute(
                            "SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),)
                        )
                        cur.execute(RENEW, params)
                        renewed = {r[0]: r[1] for r in cur.fetchall()}
                    conn.commit()
                    return renewed
                except psycopg.Error as exc:
                    self._drop()
                    if cutter is not None and cutter.fired:
                        raise _StorageError(
                            "PostgreSQL lease renewal got no answer within "
                            f"query_timeout={self._timeout:g}s (the server may be down, frozen "
                            "or cut off)"
                        ) from exc
                    if isinstance(exc, psycopg.OperationalError) and reused and attempt == 0:
                        continue  # the kept connection had gone stale: try a fresh one once
                    raise _StorageError(
                        f"PostgreSQL lease renewal failed: {describe(exc)}"
                    ) from exc
                finally:
                    if cutter is not None:
                        cutter.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(
        self, settings: tuple[str, dict[str, Any]], query: str, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run one read on this synchronous connection (a read that cannot await: see
        :meth:`Store.read_steps_blocking`), bounded by the timeout like a renewal."""
        import psycopg

        with self._lock:
            if self._closed:
                raise _StorageError(f"{self._name} is closed")
            cutter: _Cutter | None = None
            try:
                conn = self._connection(settings)
                cutter = _Cutter(conn, self._timeout)
                with conn.cursor() as cur:
                    cur.execute(query, params)
                    rows = cur.fetchall()
                conn.commit()
                return rows
            except psycopg.Error as exc:
                self._drop()
                raise _StorageError(f"PostgreSQL read failed: {describe(exc)}") from exc
            finally:
                if cutter is not None:
                    cutter.cancel()

    def _connection(self, settings: tuple[str, dict[str, Any]]) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.rows import tuple_row

        conn = self.conn
        if conn is None or conn.closed or conn.broken:
            # connect_timeout (in the conninfo) bounds the connection attempt.
            conninfo, options = settings
            conn = psycopg.connect(conninfo, autocommit=False, row_factory=tuple_row, **options)
            self.conn = conn
        return conn

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already failing; the next call reconnects
                pass

    def close(self) -> None:
        """Close the renewal connection; later renewals are refused."""
        with self._lock:
            self._closed = True
            self._drop()
