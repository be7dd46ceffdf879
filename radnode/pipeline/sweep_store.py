"""Persisted progress of sweep runs (``<data_dir>/sweep.sqlite``) and the one-sweep-at-a-time lock.

A run that is interrupted (node stopped, window over, per-run limit reached) is resumed by
the next sweep over the same range, and items already queued are never fetched again.
All sweep SQL lives here.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

from radnode.node.series_attributes import SeriesAttributes
from radnode.pipeline.archive import SweepError
from radnode.pipeline.sqlite_db import SQLiteDB

SWEEP_DB = "sweep.sqlite"
SWEEP_LOCK = "sweep.lock"


class ItemState(StrEnum):
    """Progress of one series within a sweep run."""

    PLANNED = "planned"
    RETRIEVING = "retrieving"
    QUEUED = "queued"
    FAILED = "failed"


class RunState(StrEnum):
    """State of a sweep run."""

    RUNNING = "running"  # in progress, or interrupted (resumed by the next sweep of its range)
    PARTIAL = "partial"  # stopped by the per-run limit or the window; resumed next time
    DONE = "done"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    date_from   TEXT NOT NULL,
    date_to     TEXT NOT NULL,
    state       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    found       INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    queued      INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE TABLE IF NOT EXISTS items (
    run_id         INTEGER NOT NULL REFERENCES runs (id),
    series_uid     TEXT    NOT NULL,
    study_uid      TEXT    NOT NULL,
    instance_count INTEGER,
    state          TEXT    NOT NULL,
    job_id         INTEGER,
    error          TEXT,
    updated_at     REAL    NOT NULL,
    PRIMARY KEY (run_id, series_uid)
);
"""


class SweepStore:
    """Persisted progress of sweep runs (``<data_dir>/sweep.sqlite``)."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / SWEEP_DB
        self._clock = clock
        self._db = SQLiteDB(self.path, _SCHEMA)

    def open_run(self, date_from: date, date_to: date) -> tuple[int, bool]:
        """Resume the unfinished run over this range, or start one; returns (run id, resumed)."""
        now = self._clock()
        with self._db.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT id FROM runs WHERE date_from = ? AND date_to = ? AND state != ? ORDER BY id DESC LIMIT 1",
                (date_from.isoformat(), date_to.isoformat(), RunState.DONE.value),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE runs SET state = ?, updated_at = ? WHERE id = ?", (RunState.RUNNING.value, now, row["id"])
                )
                conn.execute("COMMIT")
                return int(row["id"]), True
            cursor = conn.execute(
                "INSERT INTO runs (date_from, date_to, state, started_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (date_from.isoformat(), date_to.isoformat(), RunState.RUNNING.value, now, now),
            )
            conn.execute("COMMIT")
            return int(cursor.lastrowid or 0), False

    def plan(self, run_id: int, candidate: SeriesAttributes) -> None:
        """Add a series to a run (kept as it is when the run already has it)."""
        with self._db.connect() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO items (run_id, series_uid, study_uid, instance_count, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, candidate.series_instance_uid, candidate.study_instance_uid, candidate.instance_count, ItemState.PLANNED.value, self._clock()),
            )

    def set_item(self, run_id: int, series_uid: str, state: ItemState, job_id: int | None = None, error: str | None = None) -> None:
        with self._db.connect() as conn:
            conn.execute(
                "UPDATE items SET state = ?, job_id = COALESCE(?, job_id), error = ?, updated_at = ? "
                "WHERE run_id = ? AND series_uid = ?",
                (ItemState(state).value, job_id, error, self._clock(), run_id, series_uid),
            )

    def open_items(self, run_id: int) -> list[dict[str, Any]]:
        """Items still to fetch (planned, or interrupted while retrieving), oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE run_id = ? AND state IN (?, ?) ORDER BY rowid",
                (run_id, ItemState.PLANNED.value, ItemState.RETRIEVING.value),
            ).fetchall()
        return [dict(r) for r in rows]

    def finish_run(self, run_id: int, state: RunState, found: int, skipped: int, error: str | None = None) -> None:
        now = self._clock()
        with self._db.connect() as conn:
            counts = {
                r["state"]: r["n"]
                for r in conn.execute("SELECT state, COUNT(*) AS n FROM items WHERE run_id = ? GROUP BY state", (run_id,))
            }
            conn.execute(
                "UPDATE runs SET state = ?, updated_at = ?, finished_at = ?, found = ?, skipped = ?, queued = ?, "
                "failed = ?, error = ? WHERE id = ?",
                (
                    state.value,
                    now,
                    now if state is RunState.DONE else None,
                    found,
                    skipped,
                    counts.get(ItemState.QUEUED.value, 0),
                    counts.get(ItemState.FAILED.value, 0),
                    error,
                    run_id,
                ),
            )

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """Latest runs first."""
        with self._db.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()]

    def items(self, run_id: int) -> list[dict[str, Any]]:
        with self._db.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM items WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()]


@contextmanager
def sweep_lock(data_dir: Path) -> Iterator[None]:
    """Only one sweep per data folder at a time (the scheduled one, or ``radnode sweep``)."""
    path = Path(data_dir) / SWEEP_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SweepError(f"another sweep is running on {data_dir} (lock {path})") from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
