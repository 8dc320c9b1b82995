"""Fixtures of the storage conformance suite.

``store`` is parametrized over the three backends; every test that takes it runs against
MemoryStorage, SQLiteStorage on a temporary file and PostgresStorage on a fresh database.
``backend`` tells a test which one it got and where it lives (to read the schema from
outside the store). ``engines`` opens engines on one new store of each backend (the
scheduling tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from contract_support import Backend, open_store
from sched_support import Engines

from fluxrun.storage._base import Store

_BACKEND = pytest.StashKey[Backend]()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
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
    found: Backend = request.node.stash[_BACKEND]
    return found


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engines(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engines]:
    """Engines on one new store of each backend (see :class:`sched_support.Engines`)."""
    kind: str = request.param
    location: str | None = None
    if kind == "sqlite":
        location = str(tmp_path / "sched.db")
    elif kind == "postgres":
        location = request.getfixturevalue("fresh_pg_dsn")
    made = Engines(kind, location)
    try:
        yield made
    finally:
        await made.close_all()
