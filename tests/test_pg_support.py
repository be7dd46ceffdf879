"""The throw-away PostgreSQL of the tests: it starts, serves, restarts and keeps data."""

from __future__ import annotations

import psycopg

from pg_support import PgCluster, find_pg_bin, pg_cluster, pg_url  # noqa: F401  (fixtures)


def test_newest_postgresql_binaries_are_found() -> None:
    bin_dir = find_pg_bin()
    assert (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()


def test_cluster_serves_a_fresh_database_and_survives_a_restart(pg_cluster: PgCluster, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
        assert conn.execute("SELECT current_database()").fetchone()[0] == pg_url.rsplit("/", 1)[1]
    pg_cluster.restart()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
