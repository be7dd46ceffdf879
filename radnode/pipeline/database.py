"""PostgreSQL connections for the shared stores (``database.url``).

Like :class:`~radnode.pipeline.sqlite_db.SQLiteDB`, every operation opens its own short
connection (psycopg 3, autocommit, rows as dicts). That keeps a store safe to share
between threads and, more importantly, makes a PostgreSQL restart harmless: the next
operation simply connects again. Connecting is retried for ``retry_seconds`` with a
short backoff, so a restart of the server (a few seconds) is ridden out inside one
heartbeat interval instead of crashing the node or a worker.

Only *connecting* is retried. A statement whose connection broke mid-way raises
``psycopg.OperationalError`` to the caller; every caller's loop already treats an
exception as "try again next round", and the stores' writes are idempotent.

The schema is applied under a transaction-level advisory lock so several processes
starting at once do not race on ``CREATE TABLE IF NOT EXISTS``; a role without DDL
rights (a worker's least-privilege role) skips it when the tables already exist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

#: How long an operation keeps trying to connect while the server is down or restarting.
RETRY_SECONDS = 30.0
#: Advisory lock key serialising schema changes (any constant shared by all radnode processes).
_SCHEMA_LOCK = 0x7261646E  # "radn"


def is_postgres_url(url: str | None) -> bool:
    """Whether ``url`` selects the PostgreSQL backend."""
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:
        return "postgresql://…"
    return f"postgresql://{parts.get('user', '')}@{parts.get('host', '')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresDB:
    """One PostgreSQL database with a schema applied on open.

    Parameters
    ----------
    url
        libpq URL (``postgresql://user:pw@host:5432/db?sslmode=verify-full``).
    schema
        ``CREATE … IF NOT EXISTS`` statements of the store.
    check_table
        A table of the schema; when it exists already the DDL is skipped (roles without
        ``CREATE`` rights can open the store).
    retry_seconds
        How long connecting is retried before the error reaches the caller.
    """

    def __init__(self, url: str, schema: str, check_table: str, retry_seconds: float = RETRY_SECONDS) -> None:
        if not is_postgres_url(url):
            raise ValueError("PostgresDB needs a postgresql:// URL")
        self.url = url
        self.retry_seconds = retry_seconds
        with self.connect() as conn:
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS ok", (check_table,)).fetchone()["ok"]
            if not exists:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(schema)

    def _open(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("PostgreSQL %s not reachable (%s); retrying in %.1f s", redact(self.url), str(exc).strip()[:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """An autocommit connection whose rows are dicts."""
        conn = self._open()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[Any]:
        """A transaction: committed when the block ends, rolled back on an exception."""
        with self.connect() as conn:
            with conn.transaction():
                yield conn
