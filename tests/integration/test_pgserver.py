"""The throwaway PostgreSQL server fixtures from tests/conftest.py work as promised."""

from __future__ import annotations

import psycopg
import pytest

_seen_fresh_dbs: list[str] = []


def test_postgres_dsn_serves_queries_with_fsync_on(postgres_dsn: str) -> None:
    assert postgres_dsn.startswith("postgresql://fluxrun@127.0.0.1:")
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_setting('fsync')").fetchone() == ("on",)
        assert conn.execute("SELECT current_database()").fetchone() == ("fluxrun",)
        assert conn.execute("SELECT current_setting('max_connections')").fetchone() == ("200",)


@pytest.mark.parametrize("round_", [1, 2])
def test_fresh_pg_dsn_is_a_new_empty_database(
    round_: int, fresh_pg_dsn: str, postgres_dsn: str
) -> None:
    with psycopg.connect(fresh_pg_dsn) as conn:
        (dbname,) = conn.execute("SELECT current_database()").fetchone() or ("",)
        assert dbname.startswith("t_")
        (tables,) = conn.execute(
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone() or (None,)
        assert tables == 0
        # Leave something behind: the next round must not see it.
        conn.execute("CREATE TABLE leftover (id int)")

    assert dbname not in _seen_fresh_dbs
    if round_ == 2:
        assert len(_seen_fresh_dbs) == 1, "round 1 did not run first"
        with psycopg.connect(postgres_dsn) as conn:
            (still_there,) = conn.execute(
                "SELECT count(*) FROM pg_database WHERE datname = %s", (_seen_fresh_dbs[0],)
            ).fetchone() or (None,)
        assert still_there == 0, "the previous test's database was not dropped"
    _seen_fresh_dbs.append(dbname)
