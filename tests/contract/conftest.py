"""Fixtures of the storage conformance suite.

``store`` is parametrized over the three backends; every test that takes it runs against
MemoryStorage, SQLiteStorage on a temporary file and PostgresStorage on a fresh database.
``backend`` tells a test which one it got and where it lives (to read the schema from
outside the store).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from contract_support import open_store, schema_of

from fluxrun.storage._base import Store


@dataclass(frozen=True)
class Backend:
    """The store a test got: its kind, the store, and its file or DSN."""

    kind: str
    store: Store
    location: str | None

    def schema(self) -> list[tuple[Any, ...]] | None:
        """The schema as rows, read through a connection of its own (None for memory)."""
        return schema_of(self.kind, self.location)


_BACKEND = pytest.StashKey[Backend]()


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A new, initialised, empty store of each backend."""
    kind: str = request.param
    location: str | None = None
    if kind == "sqlite":
        location = str(tmp_path / "contract.db")
    elif kind == "postgres":
        # Only this parameter needs the PostgreSQL server.
        location = request.getfixturevalue("fresh_pg_dsn")
    opened = await open_store(kind, location)
    request.node.stash[_BACKEND] = Backend(kind, opened, location)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def backend(store: Store, request: pytest.FixtureRequest) -> Backend:
    """Which backend ``store`` is."""
    return request.node.stash[_BACKEND]
