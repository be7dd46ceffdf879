"""The persistent job queue: a small interface and its embedded SQLite implementation.

:class:`JobQueue` is the whole contract the worker, the service, the sweep and the CLI use;
a later Celery/Redis or PostgreSQL backend implements the same methods. All SQL of the job
queue lives in this module.

Leases, not locks: a worker *claims* a job for ``lease_seconds`` and renews the lease with
:meth:`JobQueue.heartbeat` while the job runs. A worker that dies stops renewing, and
:meth:`JobQueue.recover` hands its job back to the queue (restart recovery). A worker that
lost its lease (the job was cancelled or recovered meanwhile) learns it from the next
heartbeat and from :class:`LeaseLost`, so a stale worker can never overwrite a newer state.

SQLite runs in WAL mode with ``synchronous=FULL``: readers (``radnode status``) never block
the writer, and a committed state change survives ``kill -9`` and power loss. Each call
opens its own short connection, so one queue object is safe to share between threads and
several processes may use the same file (``radnode serve`` and ``radnode jobs``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from radnode.pipeline.sqlite_db import SQLiteDB, where
from radnode.pipeline.jobs import (
    CANCELLABLE_STATES,
    CLAIMABLE_STATES,
    RETRYABLE_STATES,
    Backoff,
    FailureReason,
    Job,
    JobSource,
    JobKind,
    JobSpec,
    JobState,
    Phase,
    PhaseState,
    initial_phases,
)

log = logging.getLogger(__name__)

#: File name of the embedded queue inside ``<data_dir>``.
QUEUE_FILE = "jobs.sqlite"
#: Seconds a connection waits for another writer before ``database is locked``.

Clock = Callable[[], float]


class QueueError(Exception):
    """Base of the queue's errors."""


class JobNotFound(QueueError, KeyError):
    """No job has the given id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidTransition(QueueError, ValueError):
    """The requested change is not allowed from the job's current state."""


class LeaseLost(QueueError):
    """The worker no longer holds the job (cancelled, recovered, or claimed by another)."""


class JobQueue(ABC):
    """Persistent queue of :class:`~radnode.pipeline.jobs.Job` records."""

    @abstractmethod
    def enqueue(self, spec: JobSpec) -> Job:
        """Add a job in state ``queued``; returns the stored job."""

    @abstractmethod
    def claim(self, worker_id: str, lease_seconds: float, kind: JobKind = JobKind.PROCESS) -> Job | None:
        """Take the next due job of ``kind`` (highest priority, then oldest) and mark it ``running``.

        The attempt counter is incremented here, so an attempt that kills the whole
        node still counts against ``max_attempts``.
        """

    @abstractmethod
    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease; ``False`` when the worker no longer holds the job."""

    @abstractmethod
    def complete(self, job_id: int, worker_id: str, result: dict[str, Any]) -> Job:
        """Mark a running job ``done``; raises :class:`LeaseLost` if not held."""

    @abstractmethod
    def fail(
        self,
        job_id: int,
        worker_id: str,
        reason: FailureReason | str,
        error: str,
        traceback: str | None = None,
        retryable: bool = True,
        result: dict[str, Any] | None = None,
    ) -> Job:
        """Record a failed attempt: ``retrying`` with backoff, or ``failed`` when attempts are
        used up or ``retryable`` is false. Raises :class:`LeaseLost` if not held."""

    @abstractmethod
    def release(self, job_id: int, worker_id: str) -> Job:
        """Give a running job back unchanged (graceful shutdown); the attempt is not counted."""

    @abstractmethod
    def cancel(self, job_id: int) -> Job:
        """Cancel a queued, retrying or running job (a running worker stops at its next heartbeat)."""

    @abstractmethod
    def retry(self, job_id: int) -> Job:
        """Re-queue a failed or cancelled job with a fresh attempt budget."""

    @abstractmethod
    def recover(self, expired_only: bool = True) -> list[Job]:
        """Return ``running`` jobs to the queue: those whose lease expired, or all of them
        (at start, when no worker of this node can be alive)."""

    @abstractmethod
    def set_phase(self, job_id: int, phase: Phase, state: PhaseState, objects: int = 0) -> Job:
        """Record the state of one delivery phase."""

    @abstractmethod
    def get(self, job_id: int) -> Job:
        """Return one job or raise :class:`JobNotFound`."""

    @abstractmethod
    def list(
        self,
        states: Iterable[JobState] | None = None,
        series_uid: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest jobs first, optionally filtered by state and series."""

    @abstractmethod
    def counts(self) -> dict[JobState, int]:
        """Number of jobs in every state (all states present, zeros included)."""

    @abstractmethod
    def latest_for_series(
        self, series_uid: str, pipeline_version: str | None = None, kind: JobKind = JobKind.PROCESS
    ) -> Job | None:
        """The newest job of ``kind`` for a series (and chain version), whatever its state."""

    @abstractmethod
    def oldest_waiting_since(self) -> float | None:
        """Creation time of the oldest claimable job (queue age for metrics)."""

    @abstractmethod
    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        """Attempt history of one job (worker, start, end, outcome, reason, error), oldest first."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid       TEXT    NOT NULL,
    study_uid        TEXT,
    input_path       TEXT    NOT NULL,
    pipeline_version TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    profile          TEXT    NOT NULL,
    destinations     TEXT    NOT NULL,
    instance_count   INTEGER,
    calling_ae       TEXT,
    priority         INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    budget           INTEGER NOT NULL,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    not_before       REAL,
    lease_until      REAL,
    worker_id        TEXT,
    reason           TEXT,
    error            TEXT,
    traceback        TEXT,
    phases           TEXT    NOT NULL,
    result           TEXT    NOT NULL DEFAULT '{}',
    kind             TEXT    NOT NULL DEFAULT 'process'
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (state, priority, created_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs (series_uid, pipeline_version);
CREATE TABLE IF NOT EXISTS job_attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    worker_id   TEXT,
    started_at  REAL    NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    reason      TEXT,
    error       TEXT,
    PRIMARY KEY (job_id, attempt)
);
"""


class SQLiteJobQueue(JobQueue):
    """The embedded default backend: one SQLite file in WAL mode.

    Parameters
    ----------
    path
        Database file (created with its folder if missing), usually
        ``<data_dir>/jobs.sqlite``.
    backoff
        Delay before a failed attempt is retried.
    clock
        Source of "now" in Unix seconds; tests pass a fake clock to expire leases
        without sleeping.
    """

    def __init__(self, path: Path | str, backoff: Backoff | None = None, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.backoff = backoff or Backoff()
        self._clock = clock
        self._db = SQLiteDB(self.path, _SCHEMA)
        with self._db.write() as conn:  # a queue created before jobs had a kind
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "kind" not in columns:
                conn.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'process'")

    @classmethod
    def in_data_dir(cls, data_dir: Path, **kwargs: Any) -> SQLiteJobQueue:
        """Open the queue of a node's data folder."""
        return cls(Path(data_dir) / QUEUE_FILE, **kwargs)

    # -- connection ---------------------------------------------------------------------


    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _row_to_job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            state=JobState(row["state"]),
            series_uid=row["series_uid"],
            study_uid=row["study_uid"],
            input_path=Path(row["input_path"]),
            pipeline_version=row["pipeline_version"],
            priority=row["priority"],
            source=JobSource(row["source"]),
            profile=row["profile"],
            destinations=tuple(json.loads(row["destinations"])),
            instance_count=row["instance_count"],
            calling_ae=row["calling_ae"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            not_before=row["not_before"],
            lease_until=row["lease_until"],
            worker_id=row["worker_id"],
            reason=row["reason"],
            error=row["error"],
            traceback=row["traceback"],
            phases=json.loads(row["phases"]),
            result=json.loads(row["result"]),
            kind=JobKind(row["kind"]),
        )

    def _fetch(self, conn: sqlite3.Connection, job_id: int) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in {self.path}")
        return self._row_to_job(row)

    def _fetch_in(
        self, conn: sqlite3.Connection, job_id: int, allowed: Iterable[JobState], action: str
    ) -> Job:
        """The job, if its state allows ``action``; else ``InvalidTransition`` naming the allowed states."""
        job = self._fetch(conn, job_id)
        if job.state not in allowed:
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only "
                f"{', '.join(sorted(s.value for s in allowed))} jobs can be {action}"
            )
        return job

    def _held(self, conn: sqlite3.Connection, job_id: int, worker_id: str) -> Job:
        job = self._fetch(conn, job_id)
        if job.state is not JobState.RUNNING or job.worker_id != worker_id:
            raise LeaseLost(
                f"job {job_id} is {job.state.value} (worker {job.worker_id!r}); "
                f"worker {worker_id!r} no longer holds it"
            )
        return job

    @staticmethod
    def _unhold(conn: sqlite3.Connection, job_id: int, state: JobState, now: float, **columns: Any) -> None:
        """Move a job out of a worker's hands: new ``state``, lease and worker cleared, and
        the other ``columns`` set (names are this module's constants, never input)."""
        values = {"state": state.value, "updated_at": now, "lease_until": None, "worker_id": None, **columns}
        assignments = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    @staticmethod
    def _close_attempt(
        conn: sqlite3.Connection, job: Job, now: float, outcome: str, reason: str | None, error: str | None
    ) -> None:
        conn.execute(
            "UPDATE job_attempts SET finished_at = ?, outcome = ?, reason = ?, error = ? "
            "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
            (now, outcome, reason, error, job.id, job.attempts),
        )

    # -- JobQueue -----------------------------------------------------------------------

    def enqueue(self, spec: JobSpec) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO jobs (series_uid, study_uid, input_path, pipeline_version, source, profile, "
                "destinations, instance_count, calling_ae, priority, state, attempts, max_attempts, "
                "budget, created_at, updated_at, phases, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
                (
                    spec.series_uid,
                    spec.study_uid,
                    str(spec.input_path),
                    spec.pipeline_version,
                    JobSource(spec.source).value,
                    spec.profile,
                    json.dumps(list(spec.destinations)),
                    spec.instance_count,
                    spec.calling_ae,
                    int(spec.priority),
                    JobState.QUEUED.value,
                    spec.max_attempts,
                    spec.max_attempts,
                    now,
                    now,
                    json.dumps(initial_phases()),
                    JobKind(spec.kind).value,
                ),
            )
            job = self._fetch(conn, int(cursor.lastrowid or 0))
        log.info(
            "job %d (%s) queued for series %s (priority %d, %s)",
            job.id, job.kind.value, job.series_uid, job.priority, job.source.value,
        )
        return job

    def claim(self, worker_id: str, lease_seconds: float, kind: JobKind = JobKind.PROCESS) -> Job | None:
        now = self._clock()
        claimable = tuple(s.value for s in CLAIMABLE_STATES)
        with self._db.write() as conn:
            row = conn.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(claimable))}) AND kind = ? "
                "AND (not_before IS NULL OR not_before <= ?) "
                "ORDER BY priority DESC, created_at ASC, id ASC LIMIT 1",
                (*claimable, JobKind(kind).value, now),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, worker_id = ?, lease_until = ?, "
                "started_at = ?, finished_at = NULL, not_before = NULL, updated_at = ? WHERE id = ?",
                (JobState.RUNNING.value, worker_id, now + lease_seconds, now, now, row["id"]),
            )
            job = self._fetch(conn, row["id"])
            conn.execute(
                "INSERT OR REPLACE INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES (?, ?, ?, ?)",
                (job.id, job.attempts, worker_id, now),
            )
        log.info("job %d claimed by %s for series %s (attempt %d/%d)", job.id, worker_id, job.series_uid, job.attempts, job.max_attempts)
        return job

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        now = self._clock()
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND state = ? AND worker_id = ?",
                (now + lease_seconds, now, job_id, JobState.RUNNING.value, worker_id),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: int, worker_id: str, result: dict[str, Any]) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            job = self._held(conn, job_id, worker_id)
            self._unhold(
                conn, job_id, JobState.DONE, now,
                finished_at=now, reason=None, error=None, traceback=None, result=json.dumps(result, default=str),
            )
            self._close_attempt(conn, job, now, JobState.DONE.value, None, None)
            job = self._fetch(conn, job_id)
        log.info("job %d done for series %s", job.id, job.series_uid)
        return job

    def fail(
        self,
        job_id: int,
        worker_id: str,
        reason: FailureReason | str,
        error: str,
        traceback: str | None = None,
        retryable: bool = True,
        result: dict[str, Any] | None = None,
    ) -> Job:
        now = self._clock()
        reason = str(reason)
        with self._db.write() as conn:
            job = self._held(conn, job_id, worker_id)
            final = not retryable or job.attempts >= job.max_attempts
            state = JobState.FAILED if final else JobState.RETRYING
            not_before = None if final else now + self.backoff.delay(job.attempts)
            self._unhold(
                conn, job_id, state, now,
                finished_at=now, not_before=not_before, reason=reason, error=error, traceback=traceback,
                result=json.dumps(result if result is not None else job.result, default=str),
            )
            self._close_attempt(conn, job, now, state.value, reason, error)
            job = self._fetch(conn, job_id)
        if final:
            log.warning("job %d failed for series %s (%s): %s", job.id, job.series_uid, reason, error)
        else:
            log.warning(
                "job %d attempt %d/%d failed for series %s (%s), retry in %.0f s: %s",
                job.id, job.attempts, job.max_attempts, job.series_uid, reason, (not_before or now) - now, error,
            )
        return job

    def release(self, job_id: int, worker_id: str) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            job = self._held(conn, job_id, worker_id)
            self._unhold(conn, job_id, JobState.QUEUED, now, not_before=None, attempts=max(job.attempts - 1, 0))
            conn.execute("DELETE FROM job_attempts WHERE job_id = ? AND attempt = ?", (job_id, job.attempts))
            job = self._fetch(conn, job_id)
        log.info("job %d released back to the queue (shutdown)", job_id)
        return job

    def cancel(self, job_id: int) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            job = self._fetch_in(conn, job_id, CANCELLABLE_STATES, "cancelled")
            self._unhold(
                conn, job_id, JobState.CANCELLED, now,
                finished_at=now, not_before=None, reason="cancelled", error="cancelled by operator",
            )
            if job.state is JobState.RUNNING:
                self._close_attempt(conn, job, now, JobState.CANCELLED.value, "cancelled", None)
            job = self._fetch(conn, job_id)
        log.info("job %d cancelled", job_id)
        return job

    def retry(self, job_id: int) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            job = self._fetch_in(conn, job_id, RETRYABLE_STATES, "retried")
            # A fresh attempt budget, but the attempt history keeps counting upwards.
            conn.execute(
                "UPDATE jobs SET state = ?, max_attempts = attempts + budget, updated_at = ?, not_before = NULL, "
                "finished_at = NULL, reason = NULL, error = NULL, traceback = NULL WHERE id = ?",
                (JobState.QUEUED.value, now, job_id),
            )
            job = self._fetch(conn, job_id)
        log.info("job %d re-queued by operator", job_id)
        return job

    def recover(self, expired_only: bool = True) -> list[Job]:
        now = self._clock()
        recovered: list[Job] = []
        with self._db.write() as conn:
            query = "SELECT * FROM jobs WHERE state = ?"
            params: tuple[Any, ...] = (JobState.RUNNING.value,)
            if expired_only:
                query += " AND (lease_until IS NULL OR lease_until < ?)"
                params += (now,)
            for row in conn.execute(query, params).fetchall():
                job = self._row_to_job(row)
                final = job.attempts >= job.max_attempts
                state = JobState.FAILED if final else JobState.QUEUED
                error = (
                    f"worker {job.worker_id!r} stopped while running attempt {job.attempts} "
                    "(node restarted or worker lost)"
                )
                self._unhold(
                    conn, job.id, state, now,
                    not_before=None, finished_at=now if final else None, reason=FailureReason.LEASE_EXPIRED.value, error=error,
                )
                self._close_attempt(conn, job, now, state.value, FailureReason.LEASE_EXPIRED.value, error)
                recovered.append(self._fetch(conn, job.id))
        for job in recovered:
            log.warning("job %d for series %s recovered after lost worker: now %s", job.id, job.series_uid, job.state.value)
        return recovered

    def set_phase(self, job_id: int, phase: Phase, state: PhaseState, objects: int = 0) -> Job:
        now = self._clock()
        with self._db.write() as conn:
            job = self._fetch(conn, job_id)
            phases = dict(job.phases)
            phases[Phase(phase).value] = {"state": PhaseState(state).value, "objects": objects, "at": now}
            conn.execute(
                "UPDATE jobs SET phases = ?, updated_at = ? WHERE id = ?", (json.dumps(phases), now, job_id)
            )
            return self._fetch(conn, job_id)

    def get(self, job_id: int) -> Job:
        with self._db.connect() as conn:
            return self._fetch(conn, job_id)

    def list(
        self,
        states: Iterable[JobState] | None = None,
        series_uid: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        found = where(
            {"series_uid": series_uid}, {"state": None if states is None else [JobState(s).value for s in states]}
        )
        if found is None:
            return []
        clause, params = found
        query = f"SELECT * FROM jobs{clause} ORDER BY id DESC LIMIT ?"
        params.append(int(limit))
        with self._db.connect() as conn:
            return [self._row_to_job(r) for r in conn.execute(query, params).fetchall()]

    def counts(self) -> dict[JobState, int]:
        result = {state: 0 for state in JobState}
        with self._db.connect() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                result[JobState(row["state"])] = row["n"]
        return result

    def latest_for_series(
        self, series_uid: str, pipeline_version: str | None = None, kind: JobKind = JobKind.PROCESS
    ) -> Job | None:
        query = "SELECT * FROM jobs WHERE series_uid = ? AND kind = ?"
        params: list[Any] = [series_uid, JobKind(kind).value]
        if pipeline_version is not None:
            query += " AND pipeline_version = ?"
            params.append(pipeline_version)
        query += " ORDER BY id DESC LIMIT 1"
        with self._db.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return self._row_to_job(row) if row is not None else None

    def oldest_waiting_since(self) -> float | None:
        claimable = tuple(s.value for s in CLAIMABLE_STATES)
        with self._db.connect() as conn:
            row = conn.execute(
                f"SELECT MIN(created_at) AS t FROM jobs WHERE state IN ({','.join('?' * len(claimable))})",
                claimable,
            ).fetchone()
        return row["t"] if row is not None else None

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        """Attempt history of one job (timings, outcome, reason), oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM job_attempts WHERE job_id = ? ORDER BY attempt", (job_id,)
            ).fetchall()
        return [dict(r) for r in rows]


def open_queue(data_dir: Path, database_url: str | None = None, **kwargs: Any) -> JobQueue:
    """The node's job queue: PostgreSQL when ``database.url`` is set, else the SQLite file in ``data_dir``.

    ``kwargs`` go to the backend (``backoff`` for both; lanes and prefixes for PostgreSQL).
    """
    if database_url:
        from radnode.pipeline.pg_queue import PostgresJobQueue

        return PostgresJobQueue(database_url, **kwargs)
    return SQLiteJobQueue.in_data_dir(Path(data_dir), **kwargs)
