"""The index of received instances and of series state (all SQL of the node lives here).

Embedded (default) it is one SQLite file; with ``database.url`` its tables live in the
shared PostgreSQL database (``index_*`` tables), so that a listener, a completion process
and the dashboard on any machine see one index. The statements are the same on both
engines (:mod:`radnode.sqlstore`); only how a statement reaches its database differs
(:class:`_SQLiteExecutor`, :class:`_PostgresExecutor`).

SQLite: WAL mode, so readers (the CLI, the pipeline) never block the writer. Series state
changes (completion, processed) commit with ``synchronous=FULL``: the commit returns only
after the WAL is fsync'ed. Instance rows commit with ``storage.index_sync``:

* ``normal`` (default): the commit reaches the WAL in the OS page cache but is not
  fsync'ed, which saves a device flush per instance. It survives ``kill -9`` (the OS
  still has it); after a power loss or kernel crash the last rows may roll back. That
  is safe because the files are the truth: each instance file is fsync'ed, renamed and
  its directory fsync'ed before Success, and at start-up
  :meth:`radnode.node.ingest.Ingestor.recover_orphans` indexes every file under
  ``incoming/`` that has no row. A later FULL commit (or a checkpoint) makes every
  earlier NORMAL commit durable too, so only a suffix can ever be lost.
* ``full``: every instance commit is fsync'ed as well (one more flush per instance).

One connection is shared by the association threads behind a lock; SQLite serialises
writers anyway.

PostgreSQL: every commit is durable (the server's ``synchronous_commit``), whatever
``storage.index_sync`` says: the server may be on another machine, and its crash does not
restart the node, so the start-up reconciliation would not run to repair lost rows. Series
state changes take the store's exclusive write lock (an advisory lock, like SQLite's
``BEGIN IMMEDIATE``), so completion is decided exactly once even when several processes
(``radnode serve --roles``) share the index. See :class:`_PostgresExecutor` for how a
server restart is ridden out.

Series state machine (DICOM has no notion of a complete series, so this is ours)::

    receiving --(quiet / force / expected count)--> complete --(pipeline)--> processed
    complete|processed --(new instance, series.on_update = reprocess)--> updated
    updated --(quiet / force / expected count)--> complete   (next round)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from radnode.sqlstore import Dialect, PortableConnection, postgres_schema

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1

#: ``storage.index_sync`` values and the SQLite ``synchronous`` level each means.
INDEX_SYNC_LEVELS = {"normal": "NORMAL", "full": "FULL"}
#: Level of every commit that is not an instance row (series state changes).
_DURABLE_LEVEL = "FULL"

#: The schema, written for SQLite; ``{name}`` are table and index names (:data:`SQLITE_TABLES`,
#: :data:`POSTGRES_TABLES`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {meta} (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {instances} (
    sop_instance_uid    TEXT    NOT NULL,
    version             INTEGER NOT NULL DEFAULT 1,
    series_instance_uid TEXT    NOT NULL,
    study_instance_uid  TEXT    NOT NULL,
    sop_class_uid       TEXT    NOT NULL,
    transfer_syntax_uid TEXT    NOT NULL,
    modality            TEXT,
    calling_ae          TEXT    NOT NULL,
    peer_address        TEXT    NOT NULL,
    path                TEXT    NOT NULL,
    size                INTEGER NOT NULL,
    received_at         REAL    NOT NULL,
    PRIMARY KEY (sop_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS {instances_by_series} ON {instances} (series_instance_uid);
CREATE TABLE IF NOT EXISTS {series} (
    series_instance_uid TEXT    PRIMARY KEY,
    study_instance_uid  TEXT    NOT NULL,
    modality            TEXT,
    calling_ae          TEXT    NOT NULL,
    state               TEXT    NOT NULL
        CHECK (state IN ('receiving', 'complete', 'processed', 'updated')),
    round               INTEGER NOT NULL DEFAULT 1,
    instance_count      INTEGER NOT NULL DEFAULT 0,
    expected_count      INTEGER,
    completed_count     INTEGER NOT NULL DEFAULT 0,
    first_received_at   REAL    NOT NULL,
    last_received_at    REAL    NOT NULL,
    completed_at        REAL,
    completion_reason   TEXT,
    processed_at        REAL,
    attributes          TEXT    NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS {series_by_state} ON {series} (state);
CREATE TABLE IF NOT EXISTS {completion_failures} (
    series_instance_uid TEXT    NOT NULL,
    subscriber          TEXT    NOT NULL,
    round               INTEGER NOT NULL,
    attempts            INTEGER NOT NULL,
    first_failed_at     REAL    NOT NULL,
    next_attempt_at     REAL    NOT NULL,
    last_error          TEXT,
    PRIMARY KEY (series_instance_uid, subscriber)
);
"""

_NAMES = ("meta", "instances", "instances_by_series", "series", "series_by_state", "completion_failures")
#: Names in the SQLite file (unchanged: the file is the embedded node's layout).
SQLITE_TABLES = {name: name for name in _NAMES}
#: Names in a shared PostgreSQL database, where ``meta`` or ``series`` alone would be
#: ambiguous beside the other stores' tables.
POSTGRES_TABLES = {name: f"index_{name}" for name in _NAMES}


class SeriesState(str, Enum):
    """Where a series is in its life (see the module docstring)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSED = "processed"
    UPDATED = "updated"


#: States in which a series is still collecting instances and its timers run.
OPEN_STATES = (SeriesState.RECEIVING.value, SeriesState.UPDATED.value)


@dataclass(frozen=True)
class InstanceRecord:
    """One stored file of one SOP instance (a differing re-send gets version 2, 3, ...)."""

    sop_instance_uid: str
    version: int
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    calling_ae: str
    peer_address: str
    path: str
    size: int
    received_at: float


@dataclass(frozen=True)
class SeriesRecord:
    """The state row of one series."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    calling_ae: str
    state: SeriesState
    round: int
    instance_count: int
    expected_count: int | None
    completed_count: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    completion_reason: str | None
    processed_at: float | None
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SeriesChange:
    """What indexing one instance did to its series."""

    new_series: bool
    state: SeriesState
    round: int
    instance_count: int
    expected_reached: bool
    update_ignored: bool


_INSTANCE_COLUMNS = (
    "sop_instance_uid, version, series_instance_uid, study_instance_uid, sop_class_uid, "
    "transfer_syntax_uid, modality, calling_ae, peer_address, path, size, received_at"
)
_SERIES_COLUMNS = (
    "series_instance_uid, study_instance_uid, modality, calling_ae, state, round, "
    "instance_count, expected_count, completed_count, first_received_at, last_received_at, "
    "completed_at, completion_reason, processed_at, attributes"
)


@dataclass(frozen=True)
class CompletionFailure:
    """A complete series whose announcement to one subscriber failed and waits for a retry."""

    series_instance_uid: str
    subscriber: str
    round: int
    attempts: int
    first_failed_at: float
    next_attempt_at: float
    last_error: str | None


def _series_from_row(row: tuple[Any, ...]) -> SeriesRecord:
    values = list(row)
    values[4] = SeriesState(values[4])
    values[14] = json.loads(values[14] or "{}")
    return SeriesRecord(*values)


class _Cursor(Protocol):
    """What the index's statements need of a connection (``sqlite3.Cursor`` or :class:`PortableConnection`)."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...


class _SQLiteExecutor:
    """The embedded index: one connection shared behind a lock, ``synchronous`` per commit."""

    dialect = Dialect.SQLITE
    tables = SQLITE_TABLES

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._level = _DURABLE_LEVEL
        self._db.execute(f"PRAGMA synchronous={self._level}")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(schema)

    def describe(self) -> str:
        return str(self._path)

    def read(self, op: Callable[[_Cursor], T]) -> T:
        with self._lock:
            return op(self._db.cursor())

    def write(self, op: Callable[[_Cursor], T], level: str = _DURABLE_LEVEL) -> T:
        with self._lock:
            if level != self._level:  # only outside a transaction (PRAGMA synchronous)
                self._db.execute(f"PRAGMA synchronous={level}")
                self._level = level
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = op(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _PostgresExecutor:
    """The shared index: kept connections, reused, replaced when a server restart broke them.

    Opening a connection costs a round of TCP and authentication (about 3 ms on loopback,
    far more with TLS), 20 times a simple statement, and the listener runs two operations
    per instance: a connection per operation would cap ingest. So connections are kept in a
    small pool (one per concurrently indexing thread, a few idle ones kept).

    A server restart breaks every kept connection, which only shows when one is used. An
    operation whose connection turns out broken is therefore run once more on a new
    connection; opening it retries for :data:`radnode.pipeline.database.RETRY_SECONDS`
    (a restart is ridden out). Safe, because nothing of the first try committed: a
    read has no effect, a write's transaction died with its connection. The one
    exception, a connection lost while the ``COMMIT`` itself was under way (committed or
    not, nobody knows), is not retried but raised, like a server that stays away: the
    caller answers the C-STORE with a failure and the sender sends it again.
    """

    dialect = Dialect.POSTGRESQL
    tables = POSTGRES_TABLES
    #: Idle connections kept for reuse (more are closed when handed back).
    MAX_IDLE = 4

    def __init__(self, url: str, schema: str, retry_seconds: float | None) -> None:
        from radnode.pipeline.database import RETRY_SECONDS, PostgresDB

        self._db = PostgresDB(
            url, postgres_schema(schema), POSTGRES_TABLES["series"],
            RETRY_SECONDS if retry_seconds is None else retry_seconds,
        )
        self._idle: list[tuple[Any, ExitStack]] = []
        self._lock = threading.Lock()
        self._closed = False
        #: The same key as :meth:`radnode.sqlstore.PostgresStore.write` of a store named ``index``.
        self._lock_key = zlib.crc32(b"radnode-store:index")

    def describe(self) -> str:
        from radnode.pipeline.database import redact

        return redact(self._db.url)

    def _take(self) -> tuple[Any, ExitStack]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        from psycopg.rows import tuple_row

        stack = ExitStack()
        conn = stack.enter_context(self._db.connect())
        conn.row_factory = tuple_row
        return conn, stack

    def _give_back(self, kept: tuple[Any, ExitStack]) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.MAX_IDLE and not kept[0].closed:
                self._idle.append(kept)
                return
        kept[1].close()

    def _discard_all_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _conn, stack in idle:
            stack.close()

    def _run(self, op: Callable[[_Cursor], T], write: bool) -> T:
        import psycopg

        for attempt in (1, 2):
            kept = self._take()
            conn, stack = kept
            committing = False
            try:
                if not write:
                    result = op(PortableConnection(conn))
                else:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                        result = op(PortableConnection(conn))
                        committing = True
            except psycopg.Error:
                if not (conn.broken or conn.closed):
                    self._give_back(kept)
                    raise
                stack.close()
                self._discard_all_idle()  # they were opened to the same, gone, server
                if committing or attempt == 2:
                    raise
                LOGGER.warning("PostgreSQL connection of the series index lost; reconnecting")
                continue
            except BaseException:
                self._give_back(kept)
                raise
            self._give_back(kept)
            return result
        raise AssertionError("unreachable")

    def read(self, op: Callable[[_Cursor], T]) -> T:
        return self._run(op, write=False)

    def write(self, op: Callable[[_Cursor], T], level: str = _DURABLE_LEVEL) -> T:
        return self._run(op, write=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._discard_all_idle()


class NodeIndex:
    """The node's index: ``<data_dir>/radnode.sqlite``, or the ``index_*`` tables of ``database.url``.

    Parameters
    ----------
    path
        Database file; created with its schema if missing. Unused with ``database_url``.
    index_sync
        ``storage.index_sync``: how instance rows commit on SQLite (see the module
        docstring); ``full`` unless the caller reconciles files at start-up, as the node does.
    database_url
        ``database.url``: a ``postgresql://`` URL puts the index in that database (the
        schema is created if missing); ``None`` keeps the SQLite file.
    retry_seconds
        PostgreSQL only: how long connecting is retried while the server is away
        (default :data:`radnode.pipeline.database.RETRY_SECONDS`).
    """

    def __init__(
        self,
        path: Path,
        index_sync: Literal["normal", "full"] = "full",
        database_url: str | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        from radnode.pipeline.database import is_postgres_url

        if index_sync not in INDEX_SYNC_LEVELS:
            raise ValueError(f"index_sync {index_sync!r} is not one of {sorted(INDEX_SYNC_LEVELS)}")
        self.path = Path(path)
        self._instance_level = INDEX_SYNC_LEVELS[index_sync]
        self._db: _SQLiteExecutor | _PostgresExecutor
        if is_postgres_url(database_url):
            self._db = _PostgresExecutor(str(database_url), _SCHEMA.format_map(POSTGRES_TABLES), retry_seconds)
        else:
            self._db = _SQLiteExecutor(self.path, _SCHEMA.format_map(SQLITE_TABLES))
        self._sql: dict[str, str] = {}
        self._db.write(
            lambda cur: cur.execute(
                self._q("INSERT INTO {meta} (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING"),
                (str(SCHEMA_VERSION),),
            )
        )

    @property
    def dialect(self) -> Dialect:
        """Which engine holds the index."""
        return self._db.dialect

    def describe(self) -> str:
        """Where the index lives, for logs (no password)."""
        return self._db.describe()

    def _q(self, sql: str) -> str:
        """``sql`` with this backend's table names (cached: the statements are constants)."""
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.format_map(self._db.tables)
        return text

    def close(self) -> None:
        """Close the connection(s) (on SQLite a checkpoint folds the WAL back into the database)."""
        self._db.close()

    # --- instances ------------------------------------------------------------------------

    def _instances(self, where: str, params: tuple[Any, ...]) -> list[InstanceRecord]:
        sql = self._q(f"SELECT {_INSTANCE_COLUMNS} FROM {{instances}} i WHERE {where}")
        rows = self._db.read(lambda cur: cur.execute(sql, params).fetchall())
        return [InstanceRecord(*row) for row in rows]

    def instance_versions(self, sop_instance_uid: str) -> list[InstanceRecord]:
        """All stored versions of one SOP instance, oldest first."""
        return self._instances("sop_instance_uid = ? ORDER BY version", (sop_instance_uid,))

    def series_instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        """Every stored file of a series, in arrival order."""
        return self._instances(
            "series_instance_uid = ? ORDER BY received_at, sop_instance_uid, version", (series_instance_uid,)
        )

    def study_instances(self, study_instance_uid: str, sop_class_uid: str) -> list[InstanceRecord]:
        """The newest version of each instance of one SOP class in a study, newest first
        (the chain looks up a clinician's RT Structure Set for the CT it processes)."""
        return self._instances(
            "study_instance_uid = ? AND sop_class_uid = ? "
            "AND version = (SELECT MAX(version) FROM {instances} j WHERE j.sop_instance_uid = i.sop_instance_uid) "
            "ORDER BY received_at DESC",
            (study_instance_uid, sop_class_uid),
        )

    def instance_paths(self, series_instance_uid: str) -> set[str]:
        """Relative paths of the indexed files of a series."""
        sql = self._q("SELECT path FROM {instances} WHERE series_instance_uid = ?")
        rows = self._db.read(lambda cur: cur.execute(sql, (series_instance_uid,)).fetchall())
        return {row[0] for row in rows}

    def file_counts_by_series(self) -> dict[str, int]:
        """Number of indexed files per series (for start-up reconciliation)."""
        sql = self._q("SELECT series_instance_uid, COUNT(*) FROM {instances} GROUP BY series_instance_uid")
        rows = self._db.read(lambda cur: cur.execute(sql).fetchall())
        return {row[0]: int(row[1]) for row in rows}

    def add_instance(
        self,
        record: InstanceRecord,
        attributes: dict[str, Any],
        expected_count: int | None,
        on_update: Literal["reprocess", "ignore"] = "reprocess",
    ) -> SeriesChange:
        """Index one stored file and advance its series, in one transaction.

        A new SOP Instance UID raises the series' instance count; a new version of a
        known one does not (the count is of distinct instances). An instance for a
        complete or processed series opens a new ``updated`` round, unless
        ``on_update`` is ``ignore``.
        """
        return self._db.write(
            lambda cur: self._add_instance(cur, record, attributes, expected_count, on_update), self._instance_level
        )

    def _add_instance(
        self,
        cur: _Cursor,
        record: InstanceRecord,
        attributes: dict[str, Any],
        expected_count: int | None,
        on_update: Literal["reprocess", "ignore"],
    ) -> SeriesChange:
        now = record.received_at
        q = self._q
        known = cur.execute(
            q("SELECT 1 FROM {instances} WHERE sop_instance_uid = ? LIMIT 1"), (record.sop_instance_uid,)
        ).fetchone()
        cur.execute(
            q(f"INSERT INTO {{instances}} ({_INSTANCE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"),
            (
                record.sop_instance_uid,
                record.version,
                record.series_instance_uid,
                record.study_instance_uid,
                record.sop_class_uid,
                record.transfer_syntax_uid,
                record.modality,
                record.calling_ae,
                record.peer_address,
                record.path,
                record.size,
                record.received_at,
            ),
        )
        added = 0 if known else 1
        row = cur.execute(
            q(
                "SELECT state, round, instance_count, expected_count, completed_count "
                "FROM {series} WHERE series_instance_uid = ?"
            ),
            (record.series_instance_uid,),
        ).fetchone()
        if row is None:
            cur.execute(
                q(
                    "INSERT INTO {series} (series_instance_uid, study_instance_uid, modality, calling_ae, "
                    "state, round, instance_count, expected_count, completed_count, first_received_at, "
                    "last_received_at, attributes) VALUES (?,?,?,?,?,1,?,?,0,?,?,?)"
                ),
                (
                    record.series_instance_uid,
                    record.study_instance_uid,
                    record.modality,
                    record.calling_ae,
                    SeriesState.RECEIVING.value,
                    added,
                    expected_count,
                    now,
                    now,
                    json.dumps(attributes, default=str),
                ),
            )
            state, round_, count, expected, completed = SeriesState.RECEIVING, 1, added, expected_count, 0
            return SeriesChange(True, state, round_, count, _reached(state, count, expected, completed), False)
        state = SeriesState(row[0])
        round_, count, expected, completed = row[1], row[2] + added, row[3], row[4]
        if expected is None:
            expected = expected_count
        ignored = False
        if state in (SeriesState.COMPLETE, SeriesState.PROCESSED):
            if on_update == "reprocess":
                state, round_ = SeriesState.UPDATED, round_ + 1
                cur.execute(
                    q(
                        "UPDATE {series} SET state = ?, round = ?, instance_count = ?, expected_count = ?, "
                        "first_received_at = ?, last_received_at = ? WHERE series_instance_uid = ?"
                    ),
                    (state.value, round_, count, expected, now, now, record.series_instance_uid),
                )
            else:
                ignored = True
                cur.execute(
                    q("UPDATE {series} SET instance_count = ?, expected_count = ? WHERE series_instance_uid = ?"),
                    (count, expected, record.series_instance_uid),
                )
        else:
            cur.execute(
                q(
                    "UPDATE {series} SET instance_count = ?, expected_count = ?, last_received_at = ? "
                    "WHERE series_instance_uid = ?"
                ),
                (count, expected, now, record.series_instance_uid),
            )
        return SeriesChange(False, state, round_, count, _reached(state, count, expected, completed), ignored)

    # --- series ---------------------------------------------------------------------------

    def series(self, series_instance_uid: str) -> SeriesRecord | None:
        """The state row of one series, or ``None``."""
        sql = self._q(f"SELECT {_SERIES_COLUMNS} FROM {{series}} WHERE series_instance_uid = ?")
        row = self._db.read(lambda cur: cur.execute(sql, (series_instance_uid,)).fetchone())
        return _series_from_row(row) if row else None

    def series_in_state(self, *states: SeriesState) -> list[SeriesRecord]:
        """All series in any of ``states``, oldest activity first."""
        marks = ",".join("?" for _ in states)
        sql = self._q(f"SELECT {_SERIES_COLUMNS} FROM {{series}} WHERE state IN ({marks}) ORDER BY last_received_at")
        rows = self._db.read(lambda cur: cur.execute(sql, [s.value for s in states]).fetchall())
        return [_series_from_row(row) for row in rows]

    def complete_due(self, now: float, quiet_seconds: float, force_seconds: float) -> list[tuple[SeriesRecord, str]]:
        """Mark every open series that is due as complete; return them with the reason.

        Reasons: ``expected-count`` (the data's expected count reached in this round),
        ``quiet`` (no new instance for ``quiet_seconds``), ``force`` (the round has been
        open ``force_seconds``). The rows and their new state commit together, under the
        exclusive write lock: of several processes completing on one index, each due
        series is completed (and announced) by exactly one.
        """
        return self._db.write(lambda cur: self._complete_due(cur, now, quiet_seconds, force_seconds))

    def _complete_due(
        self, cur: _Cursor, now: float, quiet_seconds: float, force_seconds: float
    ) -> list[tuple[SeriesRecord, str]]:
        done: list[tuple[SeriesRecord, str]] = []
        rows = cur.execute(
            self._q(
                f"SELECT {_SERIES_COLUMNS} FROM {{series}} WHERE state IN (?, ?) AND ("
                " (expected_count IS NOT NULL AND instance_count >= expected_count"
                "  AND completed_count < expected_count)"
                " OR last_received_at + ? <= ? OR first_received_at + ? <= ?)"
            ),
            (*OPEN_STATES, quiet_seconds, now, force_seconds, now),
        ).fetchall()
        for row in rows:
            series = _series_from_row(row)
            if _reached(series.state, series.instance_count, series.expected_count, series.completed_count):
                reason = "expected-count"
            elif series.last_received_at + quiet_seconds <= now:
                reason = "quiet"
            else:
                reason = "force"
            cur.execute(
                self._q(
                    "UPDATE {series} SET state = ?, completed_at = ?, completion_reason = ?, "
                    "completed_count = instance_count WHERE series_instance_uid = ?"
                ),
                (SeriesState.COMPLETE.value, now, reason, series.series_instance_uid),
            )
            done.append((self._reread(cur, series.series_instance_uid), reason))
        return done

    def mark_processed(self, series_instance_uid: str, now: float) -> bool:
        """Record that the pipeline finished a complete series; False if it was not complete."""
        sql = self._q("UPDATE {series} SET state = ?, processed_at = ? WHERE series_instance_uid = ? AND state = ?")
        params = (SeriesState.PROCESSED.value, now, series_instance_uid, SeriesState.COMPLETE.value)
        return bool(self._db.write(lambda cur: cur.execute(sql, params).rowcount == 1))

    # --- completion failures --------------------------------------------------------------

    def record_completion_failure(
        self, series_instance_uid: str, subscriber: str, round_: int, now: float, error: str, delay: Callable[[int], float]
    ) -> CompletionFailure:
        """Count one more failed announcement; the next try is ``now + delay(attempts)``."""

        def op(cur: _Cursor) -> CompletionFailure:
            row = cur.execute(
                self._q(
                    "SELECT attempts, first_failed_at, round FROM {completion_failures} "
                    "WHERE series_instance_uid = ? AND subscriber = ?"
                ),
                (series_instance_uid, subscriber),
            ).fetchone()
            attempts, first = (row[0] + 1, row[1]) if row and row[2] == round_ else (1, now)
            failure = CompletionFailure(
                series_instance_uid, subscriber, round_, attempts, first, now + delay(attempts), error
            )
            cur.execute(
                self._q(
                    "INSERT INTO {completion_failures} (series_instance_uid, subscriber, round, attempts, "
                    "first_failed_at, next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (series_instance_uid, subscriber) DO UPDATE SET round = excluded.round, "
                    "attempts = excluded.attempts, first_failed_at = excluded.first_failed_at, "
                    "next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error"
                ),
                (series_instance_uid, subscriber, round_, attempts, first, failure.next_attempt_at, error),
            )
            return failure

        return self._db.write(op)

    def clear_completion_failure(self, series_instance_uid: str, subscriber: str) -> None:
        """Forget a failure (the announcement succeeded, or the series moved on)."""
        sql = self._q("DELETE FROM {completion_failures} WHERE series_instance_uid = ? AND subscriber = ?")
        self._db.write(lambda cur: cur.execute(sql, (series_instance_uid, subscriber)))

    def completion_failures(self, due_at: float | None = None) -> list[CompletionFailure]:
        """Failed announcements (all, or those due at ``due_at``), oldest failure first."""
        query = "SELECT series_instance_uid, subscriber, round, attempts, first_failed_at, next_attempt_at, last_error FROM {completion_failures}"
        params: tuple[Any, ...] = ()
        if due_at is not None:
            query += " WHERE next_attempt_at <= ?"
            params = (due_at,)
        sql = self._q(query + " ORDER BY first_failed_at")
        rows = self._db.read(lambda cur: cur.execute(sql, params).fetchall())
        return [CompletionFailure(*row) for row in rows]

    def _reread(self, cur: _Cursor, series_instance_uid: str) -> SeriesRecord:
        row = cur.execute(
            self._q(f"SELECT {_SERIES_COLUMNS} FROM {{series}} WHERE series_instance_uid = ?"), (series_instance_uid,)
        ).fetchone()
        return _series_from_row(row)


def _reached(state: SeriesState, count: int, expected: int | None, completed: int) -> bool:
    """True when an open series reached its expected count during the current round."""
    return (
        state.value in OPEN_STATES
        and expected is not None
        and count >= expected
        and completed < expected
    )


def open_existing_index(data_dir: Path | str, database_url: str | None) -> NodeIndex | None:
    """The node's index for a reader (status, dashboard, pipeline), or ``None`` when there is none yet.

    On SQLite "none yet" means no file: a reader must not create an empty index in a folder
    where no node ever received. A PostgreSQL index is always there to open (its schema is
    created when missing, which an empty index is).
    """
    from radnode.node.storage import INDEX_FILE
    from radnode.pipeline.database import is_postgres_url

    path = Path(data_dir) / INDEX_FILE
    if not is_postgres_url(database_url) and not path.exists():
        return None
    return NodeIndex(path, database_url=database_url)


def postgres_index_store(database_url: str) -> Any:
    """The index's tables at ``database_url`` as a :class:`radnode.sqlstore.PostgresStore` (schema
    created when missing), for bulk work such as ``radnode db migrate``; its :meth:`write`
    excludes every :class:`NodeIndex` writer of the same database."""
    from radnode.sqlstore import PostgresStore

    return PostgresStore(database_url, _SCHEMA.format_map(POSTGRES_TABLES), POSTGRES_TABLES["series"], "index")
