"""The SQLite file under each pipeline store (jobs, outbox, sweep progress).

One short-lived connection per operation keeps the stores safe to use from several
threads and processes; WAL lets readers (``radnode status``) run beside the node, and
``synchronous=FULL`` makes a committed state change survive a power cut, which is what
"nothing queued is lost" needs.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from radnode.sqlstore import Dialect

log = logging.getLogger(__name__)

#: How long a writer waits for another writer's transaction before giving up.
BUSY_TIMEOUT_SECONDS = 30.0


def in_clause(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    """``" AND column IN (?, …)"`` and its parameters, for filters built from optional arguments."""
    return f" AND {column} IN ({','.join('?' * len(values))})", list(values)


def where(equal: Mapping[str, Any], within: Mapping[str, Iterable[Any] | None]) -> tuple[str, list[Any]] | None:
    """The ``WHERE`` clause of a listing filtered by optional arguments, and its parameters.

    A column in ``equal`` whose value is not None must equal it; a column in ``within``
    whose values are given must be one of them. ``None`` when a ``within`` set is empty:
    nothing can match, so the caller returns an empty list without asking the database.
    """
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in equal.items():
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    for column, values in within.items():
        if values is None:
            continue
        values = list(values)
        if not values:
            return None
        clause, values = in_clause(column, values)
        conditions.append(clause.removeprefix(" AND "))
        params += values
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


class SQLiteDB:
    """A WAL-mode SQLite file with its schema applied on open (the embedded :class:`~radnode.sqlstore.SQLStore`)."""

    dialect = Dialect.SQLITE

    def __init__(self, path: Path | str, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s could not switch to WAL (mode %s)", self.path, mode)
            conn.executescript(schema)

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode with rows addressable by column name."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (``BEGIN IMMEDIATE``) so read-then-update is atomic."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    #: SQLite has one writer at a time anyway: a plain transaction is the exclusive one.
    transaction = write
