"""The SQLite index of received instances and of series state (all SQL of the node lives here).

WAL mode, so readers (the CLI, the pipeline) never block the writer. Series state
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

Series state machine (DICOM has no notion of a complete series, so this is ours)::

    receiving --(quiet / force / expected count)--> complete --(pipeline)--> processed
    complete|processed --(new instance, series.on_update = reprocess)--> updated
    updated --(quiet / force / expected count)--> complete   (next round)
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1

#: ``storage.index_sync`` values and the SQLite ``synchronous`` level each means.
INDEX_SYNC_LEVELS = {"normal": "NORMAL", "full": "FULL"}
#: Level of every commit that is not an instance row (series state changes).
_DURABLE_LEVEL = "FULL"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
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
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
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
    attributes          TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS series_by_state ON series (state);
CREATE TABLE IF NOT EXISTS completion_failures (
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


class NodeIndex:
    """The node's SQLite database (``<data_dir>/radnode.sqlite``).

    Parameters
    ----------
    path
        Database file; created with its schema if missing.
    index_sync
        ``storage.index_sync``: how instance rows commit (see the module docstring);
        ``full`` unless the caller reconciles files at start-up, as the node does.
    """

    def __init__(self, path: Path, index_sync: Literal["normal", "full"] = "full") -> None:
        if index_sync not in INDEX_SYNC_LEVELS:
            raise ValueError(f"index_sync {index_sync!r} is not one of {sorted(INDEX_SYNC_LEVELS)}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._instance_level = INDEX_SYNC_LEVELS[index_sync]
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._level = _DURABLE_LEVEL
        self._db.execute(f"PRAGMA synchronous={self._level}")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL back into the database)."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, level: str = _DURABLE_LEVEL) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if level != self._level:  # only outside a transaction (PRAGMA synchronous)
                self._db.execute(f"PRAGMA synchronous={level}")
                self._level = level
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # --- instances ------------------------------------------------------------------------

    def instance_versions(self, sop_instance_uid: str) -> list[InstanceRecord]:
        """All stored versions of one SOP instance, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ? ORDER BY version",
                (sop_instance_uid,),
            ).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def series_instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        """Every stored file of a series, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE series_instance_uid = ? "
                "ORDER BY received_at, sop_instance_uid, version",
                (series_instance_uid,),
            ).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def study_instances(self, study_instance_uid: str, sop_class_uid: str) -> list[InstanceRecord]:
        """The newest version of each instance of one SOP class in a study, newest first
        (the chain looks up a clinician's RT Structure Set for the CT it processes)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances i WHERE study_instance_uid = ? AND sop_class_uid = ? "
                "AND version = (SELECT MAX(version) FROM instances j WHERE j.sop_instance_uid = i.sop_instance_uid) "
                "ORDER BY received_at DESC",
                (study_instance_uid, sop_class_uid),
            ).fetchall()
        return [InstanceRecord(*row) for row in rows]

    def instance_paths(self, series_instance_uid: str) -> set[str]:
        """Relative paths of the indexed files of a series."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE series_instance_uid = ?", (series_instance_uid,)
            ).fetchall()
        return {row[0] for row in rows}

    def file_counts_by_series(self) -> dict[str, int]:
        """Number of indexed files per series (for start-up reconciliation)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT series_instance_uid, COUNT(*) FROM instances GROUP BY series_instance_uid"
            ).fetchall()
        return dict(rows)

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
        now = record.received_at
        with self._transaction(self._instance_level) as cur:
            known = cur.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ? LIMIT 1", (record.sop_instance_uid,)
            ).fetchone()
            cur.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
                "SELECT state, round, instance_count, expected_count, completed_count "
                "FROM series WHERE series_instance_uid = ?",
                (record.series_instance_uid,),
            ).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, calling_ae, "
                    "state, round, instance_count, expected_count, completed_count, first_received_at, "
                    "last_received_at, attributes) VALUES (?,?,?,?,?,1,?,?,0,?,?,?)",
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
                return SeriesChange(
                    True, state, round_, count, _reached(state, count, expected, completed), False
                )
            state = SeriesState(row[0])
            round_, count, expected, completed = row[1], row[2] + added, row[3], row[4]
            if expected is None:
                expected = expected_count
            ignored = False
            if state in (SeriesState.COMPLETE, SeriesState.PROCESSED):
                if on_update == "reprocess":
                    state, round_ = SeriesState.UPDATED, round_ + 1
                    cur.execute(
                        "UPDATE series SET state = ?, round = ?, instance_count = ?, expected_count = ?, "
                        "first_received_at = ?, last_received_at = ? WHERE series_instance_uid = ?",
                        (state.value, round_, count, expected, now, now, record.series_instance_uid),
                    )
                else:
                    ignored = True
                    cur.execute(
                        "UPDATE series SET instance_count = ?, expected_count = ? WHERE series_instance_uid = ?",
                        (count, expected, record.series_instance_uid),
                    )
            else:
                cur.execute(
                    "UPDATE series SET instance_count = ?, expected_count = ?, last_received_at = ? "
                    "WHERE series_instance_uid = ?",
                    (count, expected, now, record.series_instance_uid),
                )
            return SeriesChange(
                False, state, round_, count, _reached(state, count, expected, completed), ignored
            )

    # --- series ---------------------------------------------------------------------------

    def series(self, series_instance_uid: str) -> SeriesRecord | None:
        """The state row of one series, or ``None``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_instance_uid = ?",
                (series_instance_uid,),
            ).fetchone()
        return _series_from_row(row) if row else None

    def series_in_state(self, *states: SeriesState) -> list[SeriesRecord]:
        """All series in any of ``states``, oldest activity first."""
        marks = ",".join("?" for _ in states)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE state IN ({marks}) ORDER BY last_received_at",
                [s.value for s in states],
            ).fetchall()
        return [_series_from_row(row) for row in rows]

    def complete_due(self, now: float, quiet_seconds: float, force_seconds: float) -> list[tuple[SeriesRecord, str]]:
        """Mark every open series that is due as complete; return them with the reason.

        Reasons: ``expected-count`` (the data's expected count reached in this round),
        ``quiet`` (no new instance for ``quiet_seconds``), ``force`` (the round has been
        open ``force_seconds``). The rows and their new state commit together.
        """
        done: list[tuple[SeriesRecord, str]] = []
        with self._transaction() as cur:
            rows = cur.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE state IN (?, ?) AND ("
                " (expected_count IS NOT NULL AND instance_count >= expected_count"
                "  AND completed_count < expected_count)"
                " OR last_received_at + ? <= ? OR first_received_at + ? <= ?)",
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
                    "UPDATE series SET state = ?, completed_at = ?, completion_reason = ?, "
                    "completed_count = instance_count WHERE series_instance_uid = ?",
                    (SeriesState.COMPLETE.value, now, reason, series.series_instance_uid),
                )
                done.append((self._reread(cur, series.series_instance_uid), reason))
        return done

    def mark_processed(self, series_instance_uid: str, now: float) -> bool:
        """Record that the pipeline finished a complete series; False if it was not complete."""
        with self._transaction() as cur:
            cur.execute(
                "UPDATE series SET state = ?, processed_at = ? WHERE series_instance_uid = ? AND state = ?",
                (SeriesState.PROCESSED.value, now, series_instance_uid, SeriesState.COMPLETE.value),
            )
            return cur.rowcount == 1

    # --- completion failures --------------------------------------------------------------

    def record_completion_failure(
        self, series_instance_uid: str, subscriber: str, round_: int, now: float, error: str, delay: Callable[[int], float]
    ) -> CompletionFailure:
        """Count one more failed announcement; the next try is ``now + delay(attempts)``."""
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT attempts, first_failed_at, round FROM completion_failures "
                "WHERE series_instance_uid = ? AND subscriber = ?",
                (series_instance_uid, subscriber),
            ).fetchone()
            attempts, first = (row[0] + 1, row[1]) if row and row[2] == round_ else (1, now)
            failure = CompletionFailure(
                series_instance_uid, subscriber, round_, attempts, first, now + delay(attempts), error
            )
            cur.execute(
                "INSERT OR REPLACE INTO completion_failures (series_instance_uid, subscriber, round, attempts, "
                "first_failed_at, next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (series_instance_uid, subscriber, round_, attempts, first, failure.next_attempt_at, error),
            )
        return failure

    def clear_completion_failure(self, series_instance_uid: str, subscriber: str) -> None:
        """Forget a failure (the announcement succeeded, or the series moved on)."""
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM completion_failures WHERE series_instance_uid = ? AND subscriber = ?",
                (series_instance_uid, subscriber),
            )

    def completion_failures(self, due_at: float | None = None) -> list[CompletionFailure]:
        """Failed announcements (all, or those due at ``due_at``), oldest failure first."""
        query = "SELECT * FROM completion_failures"
        params: tuple[Any, ...] = ()
        if due_at is not None:
            query += " WHERE next_attempt_at <= ?"
            params = (due_at,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY first_failed_at", params).fetchall()
        return [CompletionFailure(*row) for row in rows]

    @staticmethod
    def _reread(cur: sqlite3.Cursor, series_instance_uid: str) -> SeriesRecord:
        row = cur.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_instance_uid = ?", (series_instance_uid,)
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
