"""Shared pytest fixtures for the fluxrun test suite.

PostgreSQL
----------
``postgres_dsn`` (session) starts one throwaway PostgreSQL server for the whole session (see
``tests/_pgserver.py``) and yields the DSN of its ``fluxrun`` database, e.g.
``postgresql://fluxrun@127.0.0.1:54321/fluxrun``. ``fresh_pg_dsn`` (function) yields the DSN of a
new, empty database on that server, dropped after the test. Tests using either fixture get the
``postgres`` marker automatically, so ``pytest -m "not postgres"`` deselects them.

The DSN is a plain string, so e2e tests can hand it to subprocesses (argv or environment).

When the server cannot be started the tests using it are skipped, or fail when the environment
variable ``FLUXRUN_REQUIRE_POSTGRES=1`` is set (``scripts/test`` and CI set it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from _pgserver import PostgresServer, PostgresServerError

REQUIRE_POSTGRES_ENV = "FLUXRUN_REQUIRE_POSTGRES"
POSTGRES_FIXTURES = frozenset({"postgres_dsn", "fresh_pg_dsn", "postgres_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if POSTGRES_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's throwaway PostgreSQL server (prefer `postgres_dsn` / `fresh_pg_dsn`)."""
    try:
        server = PostgresServer.start()
    except PostgresServerError as exc:
        reason = f"cannot start the throwaway PostgreSQL server: {exc}"
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason}\n({REQUIRE_POSTGRES_ENV}=1, so this is an error)")
        pytest.skip(f"{reason}\n(set {REQUIRE_POSTGRES_ENV}=1 to make this an error)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """DSN of the session-wide ``fluxrun`` database; tests sharing it must not collide."""
    return postgres_server.dsn


@pytest.fixture
def fresh_pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """DSN of a new, empty database for this test only; dropped afterwards."""
    import psycopg

    dbname = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        yield postgres_server.dsn_for(dbname)
    finally:
        with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
