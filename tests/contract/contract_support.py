"""Shared helpers of the storage conformance suite: opening each backend, building rows,
reading a database's schema from outside the store, and comparing rows across backends.

Every helper works the same for the three backends, so a test written with them runs
unchanged against MemoryStorage, SQLiteStorage and PostgresStorage.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from typing import Any

from fluxrun._codec import decode
from fluxrun.storage._base import RunRow, Store
from fluxrun.storage.memory import MemoryStorage
from fluxrun.storage.sqlite import SQLiteStorage
from fluxrun.testing._rows import (
    LONG_LEASE,
    T0,
    at,
    canonical_json,
    canonical_text,
    make_run,
    make_step,
    norm,
    typed,
)

# The row builders live in fluxrun.testing (the importable kit); the suite uses them here too.
__all__ = [
    "LONG_LEASE",
    "T0",
    "Backend",
    "at",
    "canonical_json",
    "canonical_text",
    "make_run",
    "make_step",
    "norm",
    "open_store",
    "typed",
]


async def open_store(kind: str, location: str | None) -> Store:
    """A new, initialised store of ``kind`` (``location``: SQLite path or PostgreSQL DSN)."""
    store: Store
    if kind == "memory":
        store = MemoryStorage()
    elif kind == "sqlite":
        assert location is not None
        store = SQLiteStorage(location)
    elif kind == "postgres":
        assert location is not None
        # Imported here so that the memory and SQLite runs do not depend on the module.
        from fluxrun.storage.postgres import PostgresStorage

        store = PostgresStorage(location)
    else:
        raise ValueError(kind)
    await store.init()
    return store


def schema_of(kind: str, location: str | None) -> list[tuple[Any, ...]] | None:
    """The database schema as rows, read through a connection of its own (None for memory).

    SQLite: every ``sqlite_master`` row. PostgreSQL: every table of the database's own
    schemas, every column of the ``flux_*`` tables and every index on them.
    """
    if kind == "memory":
        return None
    assert location is not None
    if kind == "sqlite":
        with sqlite3.connect(location) as conn:
            rows = conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()
        conn.close()
        return [tuple(r) for r in rows]
    import psycopg

    with psycopg.connect(location, autocommit=True) as pg:
        tables = pg.execute(
            "SELECT 'table', table_schema, table_name, table_type "
            "FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
            "ORDER BY 2, 3"
        ).fetchall()
        columns = pg.execute(
            "SELECT 'column', table_name, column_name, data_type, is_nullable, "
            "column_default, ordinal_position "
            "FROM information_schema.columns WHERE table_name LIKE 'flux\\_%' "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()
        indexes = pg.execute(
            "SELECT 'index', tablename, indexname, indexdef FROM pg_indexes "
            "WHERE tablename LIKE 'flux\\_%' ORDER BY tablename, indexname"
        ).fetchall()
    return [tuple(r) for r in (*tables, *columns, *indexes)]


@dataclass(frozen=True)
class Backend:
    """The store a test got: its kind, the store, and its file or DSN."""

    kind: str
    store: Store
    location: str | None

    def schema(self) -> list[tuple[Any, ...]] | None:
        """The schema as rows, read through a connection of its own (None for memory)."""
        return schema_of(self.kind, self.location)


@dataclass(frozen=True)
class Seen:
    """A run row made comparable across backends (see :func:`seen`)."""

    row: RunRow
    has_lease: bool


def seen(row: RunRow | None) -> Seen | None:
    """``row`` as :func:`norm` gives it, and with only whether a lease is set.

    ``lease_until`` is computed by each store from its own clock (Python's for memory and
    SQLite, the database server's for PostgreSQL), so its value cannot be compared.
    """
    if row is None:
        return None
    return Seen(row=replace(norm(row), lease_until=None), has_lease=row.lease_until is not None)


def same_value(a: Any, b: Any) -> bool:
    """Equality of decoded values that also checks types, key order and the sign of zero."""
    return bool(typed(a) == typed(b))


def decoded(text: str | None) -> Any:
    """The codec's reading of a stored JSON text."""
    return None if text is None else decode(text)
