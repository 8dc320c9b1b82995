"""Helpers of :mod:`fluxrun.storage.postgres`: SQL fragments, row conversion, connection
settings, and the client-side bound on a query (so a frozen server cannot hang a caller).

psycopg is imported inside the functions that need it, so importing this module does not
require it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from ..errors import StorageError as _StorageError
from ._base import AttemptRow, RunRow, StepRow, Transition
from ._rows import ATTEMPT_COLUMNS, attempt_fields, attempt_from, run_from, step_fields, step_from

if TYPE_CHECKING:
    import psycopg

_INSTALL_HINT = "PostgresStorage needs psycopg 3 and psycopg-pool: pip install 'fluxrun[postgres]'"

# The orders of storage/_rows.py (RUN_COLUMNS, STEP_COLUMNS), with JSON read back as text.
RUN_SELECT = (
    "id, name, definition_version, status, input::text, step_names::text, current_step, error, "
    "created_at, updated_at, completed_at, version, fence, owner, lease_until, claims, wait_name, "
    "run_after, wait_kind, attempt, requested, request_reason, priority, idempotency_key, "
    "concurrency_key, parent_id"
)
STEP_SELECT = (
    "idx, name, status, started_at, completed_at, suspended_at, compensated_at, waiting_for, "
    "duration_ms, output::text, error, retries, changes::text, compensation_changes::text, "
    "fence, error_type, traceback"
)
ATTEMPT_SELECT = ", ".join(ATTEMPT_COLUMNS)
# The columns a step row's content is written to (all but its key, run_id and idx).
_STEP_FIELDS = (
    "name, status, started_at, completed_at, suspended_at, compensated_at, waiting_for, "
    "duration_ms, output, error, retries, changes, compensation_changes, fence, error_type, "
    "traceback"
)
# Explicit types: in INSERT ... SELECT (used to make the insert conditional on the run's
# compare-and-set) PostgreSQL cannot infer parameter types from the target columns.
_STEP_FIELD_VALUES = (
    "%s::text, %s::text, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::timestamptz, "
    "%s::text, %s::double precision, %s::jsonb, %s::text, %s::integer, %s::jsonb, %s::jsonb, "
    "%s::bigint, %s::text, %s::text"
)
STEP_TARGET = "run_id, idx, " + _STEP_FIELDS
STEP_VALUES = "%s::text, %s::integer, " + _STEP_FIELD_VALUES
SET_STEP = "UPDATE flux_steps SET (" + _STEP_FIELDS + ") = (SELECT " + _STEP_FIELD_VALUES + ")"
NEW_LEASE = "clock_timestamp() + make_interval(secs => %s::double precision)"
UNOWNED = "(owner IS NULL OR lease_until IS NULL OR lease_until <= now())"
RENEW = (
    "UPDATE flux_runs AS r SET lease_until = " + NEW_LEASE + " "
    "FROM unnest(%s::text[], %s::bigint[]) AS h(id, fence) "
    "WHERE r.id = h.id AND r.fence = h.fence AND r.owner = %s RETURNING r.id, r.requested"
)
# Appends a transition's attempts, numbered on from the run's last one; the transition's
# compare-and-set holds the run's row lock, so no other writer numbers attempts meanwhile.
# {source} is "u, " inside the one-statement commit (insert only if the run's update applied).
_INSERT_ATTEMPTS = (
    "INSERT INTO flux_attempts (run_id, " + ATTEMPT_SELECT + ") "
    "SELECT %s::text, coalesce((SELECT max(seq) FROM flux_attempts WHERE run_id = %s::text), 0) "
    "+ x.ord, x.idx, x.name, x.attempt, x.kind, x.status, x.started_at, x.finished_at, "
    "x.duration_ms, x.error_type, x.error, x.traceback FROM {source}"
    "unnest(%s::integer[], %s::text[], %s::integer[], %s::text[], %s::text[], "
    "%s::timestamptz[], %s::timestamptz[], %s::double precision[], %s::text[], %s::text[], "
    "%s::text[]) WITH ORDINALITY AS x(idx, name, attempt, kind, status, started_at, "
    "finished_at, duration_ms, error_type, error, traceback, ord)"
)
INSERT_ATTEMPTS_AFTER_UPDATE = _INSERT_ATTEMPTS.format(source="u, ")
INSERT_ATTEMPTS = _INSERT_ATTEMPTS.format(source="")


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """psycopg returns timestamptz in the session's time zone; the engine works in UTC."""
    return None if value is None else value.astimezone(dt.UTC)


def _same(value: dt.datetime | None) -> dt.datetime | None:
    return value


def step_params(s: StepRow) -> tuple[Any, ...]:
    """A step row's values for ``_STEP_FIELDS``."""
    return step_fields(s, _same)


def step_values(run_id: str, s: StepRow) -> tuple[Any, ...]:
    """A step row's values for ``STEP_TARGET``."""
    return (run_id, s.index, *step_params(s))


def step_row(r: Sequence[Any]) -> StepRow:
    return step_from(r, utc)


def run_row(r: Sequence[Any], steps: tuple[StepRow, ...] = ()) -> RunRow:
    return run_from(r, utc, steps)


def attempt_row(r: Sequence[Any]) -> AttemptRow:
    return attempt_from(r, utc)


def attempt_params(t: Transition) -> list[Any]:
    """The parameters of ``INSERT_ATTEMPTS``: the run id twice, then one array per column."""
    rows = [attempt_fields(a, _same) for a in t.attempts]
    columns = [list(c) for c in zip(*rows, strict=True)]
    # One element type per array: psycopg picks the array's type from its first element.
    columns[7] = [None if d is None else float(d) for d in columns[7]]
    return [t.run_id, t.run_id, *columns]


def require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise _StorageError(_INSTALL_HINT) from exc


def check_size(value: object, what: str, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise InvalidArgumentError(
            f"PostgresStorage {what} must be an int >= {minimum}, got {value!r}"
        )
    return value


def check_timeout(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgumentError(
            f"PostgresStorage query_timeout must be a finite number of seconds > 0, got {value!r}"
        )
    return float(value)


async def fetchall(
    conn: psycopg.AsyncConnection[Any],
    query: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
) -> list[tuple[Any, ...]]:
    from psycopg.rows import tuple_row

    # An explicit row factory: a pool passed in may hand out connections with dict rows.
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall() if cur.description is not None else []


async def rowcount(
    conn: psycopg.AsyncConnection[Any], query: str, params: Sequence[Any] = ()
) -> int:
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return cur.rowcount


def bounded_conninfo(conninfo: str, timeout: float) -> str:
    """``conninfo`` with client-side bounds it does not set itself: a connect timeout, TCP
    keepalives and (libpq >= 12) a TCP user timeout, so a dead server or a cut network is
    noticed. A stopped server process is not (its kernel still answers TCP): the store's
    own query timer covers that."""
    from psycopg import pq
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    given = conninfo_to_dict(conninfo)
    seconds = max(2, math.ceil(timeout))  # libpq's connect_timeout: whole seconds, >= 2
    extra: dict[str, Any] = {
        "connect_timeout": seconds,
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": max(1, seconds // 3),
        "keepalives_count": 3,
    }
    if pq.version() >= 120000:
        # Not below 5 s: a lost packet is retransmitted within that on a healthy network.
        extra["tcp_user_timeout"] = math.ceil(max(timeout, 5.0) * 1000)
    missing = {k: v for k, v in extra.items() if k not in given}
    return make_conninfo(conninfo, **missing) if missing else conninfo


def shutdown_socket(conn: psycopg.BaseConnection[Any]) -> bool:
    """Cut a connection's socket so that whoever waits on it gets an error at once.

    Cancelling the query instead would ask the server, which a stopped server never answers;
    a shut-down socket makes libpq report the connection lost, and the pool drops it.
    Returns False when the socket could not be reached.
    """
    try:
        fd = conn.pgconn.socket
        sock = socket.socket(fileno=os.dup(fd))
    except Exception:  # closed connection, or a platform without dup() of sockets
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.close()
    return True


class Deadline:
    """Cuts a pooled connection once ``seconds`` have passed (see :func:`shutdown_socket`).

    When the socket cannot be cut it cancels the task instead, and psycopg cancels the query
    itself (which it bounds on its own).
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
        self.fired = False
        self.cancelled = False
        self._conn = conn
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        if not shutdown_socket(self._conn) and self._task is not None:
            self.cancelled = True
            self._task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()


def describe(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return f"[{state}] {exc}" if state else f"{type(exc).__name__}: {exc}"


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
    except Exception:  # an unparsable DSN is shown as a placeholder
        return "<dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def about(run_id: str | None) -> str:
    """`` of run 'id'`` for messages about one run, else nothing."""
    return "" if run_id is None else f" of run {run_id!r}"
