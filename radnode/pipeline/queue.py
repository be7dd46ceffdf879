"""The persistent job queue: a small interface and its one SQL implementation.

:class:`JobQueue` is the whole contract the worker, the service, the sweep and the CLI use.
:class:`SQLJobQueue` implements it once, in the portable SQL of :mod:`radnode.sqlstore`,
for both backends: :class:`SQLiteJobQueue` (the embedded default, one file in the data
folder) and :class:`~radnode.pipeline.pg_queue.PostgresJobQueue` (shared by machines,
which adds worker lanes). All SQL of the job queue lives in this module.

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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from radnode.pipeline.sqlite_db import SQLiteDB, in_clause, where
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
from radnode.sqlstore import Dialect

log = logging.getLogger(__name__)

#: File name of the embedded queue inside ``<data_dir>``.
QUEUE_FILE = "jobs.sqlite"

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


#: Tables of the job queue, written for SQLite (PostgreSQL gets them translated by
#: :func:`radnode.sqlstore.postgres_schema`).
SCHEMA = """
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


class SQLJobQueue(JobQueue):
    """The job queue written once, in the portable SQL of :mod:`radnode.sqlstore`.

    Both backends run these statements; the store's dialect decides the few things that
    differ:

    * **row locks** -- on PostgreSQL the claim picks and updates the next due job in one
      statement with ``FOR UPDATE SKIP LOCKED`` (concurrent claimers never block each
      other nor get the same job), and read-then-update transitions lock their row with
      ``FOR UPDATE``. SQLite has no row locks and needs none: every write transaction is
      ``BEGIN IMMEDIATE``, which excludes all other writers of the file;
    * **now** -- with no ``clock`` given, "now" is the database's clock
      (:attr:`radnode.sqlstore.Dialect.now`), so leases written by workers on different
      machines are compared on one time line.

    :meth:`recover` is one ``UPDATE`` over every running job whose lease is older than now
    (skipping rows a busy worker holds locked this instant), so its cost does not grow
    with the number of live workers and it never waits for one.

    Parameters
    ----------
    store
        A :class:`radnode.sqlstore.SQLStore` holding :data:`SCHEMA` (and, on PostgreSQL,
        any extra columns a subclass fills through :meth:`_lane_columns`).
    backoff
        Delay before a failed attempt is retried.
    clock
        Source of "now" in Unix seconds; ``None`` asks the database. Tests pass a fake
        clock to expire leases without sleeping.
    local_prefix
        Worker-id prefix of this process's own workers: ``recover(expired_only=False)``
        ("at start no worker of mine can be alive") only takes back their jobs, so jobs
        held by other machines' workers stay theirs until their lease runs out. ``None``
        takes back every running job.
    """

    def __init__(
        self, store: Any, backoff: Backoff | None = None, clock: Clock | None = None, local_prefix: str | None = None
    ) -> None:
        self.store = store
        self.backoff = backoff or Backoff()
        self._clock = clock
        self.local_prefix = local_prefix
        row_locks = store.dialect is Dialect.POSTGRESQL
        self._for_update = " FOR UPDATE" if row_locks else ""
        self._skip_locked = " FOR UPDATE SKIP LOCKED" if row_locks else ""

    # -- hooks of a backend with worker lanes -------------------------------------------

    def _lane_columns(self, spec: JobSpec) -> dict[str, Any]:
        """Extra columns stored with a new job (none in the plain schema)."""
        return {}

    def _claim_filter(self) -> tuple[str, list[Any]]:
        """Extra ``AND …`` condition of the claim, and its parameters (none: every job is claimable)."""
        return "", []

    def _announce(self, conn: Any, job_ids: Sequence[int]) -> None:
        """Tell idle workers elsewhere that these jobs can be claimed now, when ``conn`` commits.

        Nothing to do for a queue whose workers all live in this process: the node wakes
        its own pool when it enqueues.
        """

    # -- helpers ------------------------------------------------------------------------

    def _now(self, conn: Any) -> float:
        if self._clock is not None:
            return float(self._clock())
        return float(conn.execute(f"SELECT {self.store.dialect.now} AS now").fetchone()["now"])

    @staticmethod
    def _row_to_job(row: Any) -> Job:
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

    def _fetch(self, conn: Any, job_id: int, lock: bool = False) -> Job:
        """One job; ``lock`` holds its row until the transaction ends (read-then-update)."""
        row = conn.execute("SELECT * FROM jobs WHERE id = ?" + (self._for_update if lock else ""), (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in {self.store.describe()}")
        return self._row_to_job(row)

    def _fetch_in(self, conn: Any, job_id: int, allowed: Iterable[JobState], action: str) -> Job:
        """The job, if its state allows ``action``; else ``InvalidTransition`` naming the allowed states."""
        job = self._fetch(conn, job_id, lock=True)
        if job.state not in allowed:
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only "
                f"{', '.join(sorted(s.value for s in allowed))} jobs can be {action}"
            )
        return job

    def _held(self, conn: Any, job_id: int, worker_id: str) -> Job:
        job = self._fetch(conn, job_id, lock=True)
        if job.state is not JobState.RUNNING or job.worker_id != worker_id:
            raise LeaseLost(
                f"job {job_id} is {job.state.value} (worker {job.worker_id!r}); "
                f"worker {worker_id!r} no longer holds it"
            )
        return job

    @staticmethod
    def _unhold(conn: Any, job_id: int, state: JobState, now: float, **columns: Any) -> None:
        """Move a job out of a worker's hands: new ``state``, lease and worker cleared, and
        the other ``columns`` set (names are this module's constants, never input)."""
        values = {"state": state.value, "updated_at": now, "lease_until": None, "worker_id": None, **columns}
        assignments = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    @staticmethod
    def _close_attempt(conn: Any, job: Job, now: float, outcome: str, reason: str | None, error: str | None) -> None:
        conn.execute(
            "UPDATE job_attempts SET finished_at = ?, outcome = ?, reason = ?, error = ? "
            "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
            (now, outcome, reason, error, job.id, job.attempts),
        )

    # -- JobQueue -----------------------------------------------------------------------

    def enqueue(self, spec: JobSpec) -> Job:
        with self.store.transaction() as conn:
            now = self._now(conn)
            values = {
                "series_uid": spec.series_uid,
                "study_uid": spec.study_uid,
                "input_path": str(spec.input_path),
                "pipeline_version": spec.pipeline_version,
                "source": JobSource(spec.source).value,
                "profile": spec.profile,
                "destinations": json.dumps(list(spec.destinations)),
                "instance_count": spec.instance_count,
                "calling_ae": spec.calling_ae,
                "priority": int(spec.priority),
                "state": JobState.QUEUED.value,
                "attempts": 0,
                "max_attempts": spec.max_attempts,
                "budget": spec.max_attempts,
                "created_at": now,
                "updated_at": now,
                "phases": json.dumps(initial_phases()),
                "kind": JobKind(spec.kind).value,
                **self._lane_columns(spec),
            }
            (row,) = conn.execute(
                f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))}) RETURNING *",
                tuple(values.values()),
            ).fetchall()
            self._announce(conn, [row["id"]])
        job = self._row_to_job(row)
        log.info(
            "job %d (%s) queued for series %s (priority %d, %s)",
            job.id, job.kind.value, job.series_uid, job.priority, job.source.value,
        )
        return job

    def claim(self, worker_id: str, lease_seconds: float, kind: JobKind = JobKind.PROCESS) -> Job | None:
        claimable, claimable_params = in_clause("state", sorted(s.value for s in CLAIMABLE_STATES))
        lanes, lane_params = self._claim_filter()
        with self.store.transaction() as conn:
            now = self._now(conn)
            rows = conn.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, worker_id = ?, lease_until = ?, "
                "started_at = ?, finished_at = NULL, not_before = NULL, updated_at = ? "
                f"WHERE id = (SELECT id FROM jobs WHERE kind = ?{claimable}{lanes} "
                "AND (not_before IS NULL OR not_before <= ?) "
                f"ORDER BY priority DESC, created_at ASC, id ASC LIMIT 1{self._skip_locked}) RETURNING *",
                (
                    JobState.RUNNING.value, worker_id, now + lease_seconds, now, now,
                    JobKind(kind).value, *claimable_params, *lane_params, now,
                ),
            ).fetchall()
            if not rows:
                return None
            job = self._row_to_job(rows[0])
            # A recovered attempt number can be claimed again only after a release; start it afresh.
            conn.execute(
                "INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job_id, attempt) DO UPDATE SET worker_id = excluded.worker_id, "
                "started_at = excluded.started_at, finished_at = NULL, outcome = NULL, reason = NULL, error = NULL",
                (job.id, job.attempts, worker_id, now),
            )
        log.info("job %d claimed by %s for series %s (attempt %d/%d)", job.id, worker_id, job.series_uid, job.attempts, job.max_attempts)
        return job

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        with self.store.transaction() as conn:
            now = self._now(conn)
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND state = ? AND worker_id = ?",
                (now + lease_seconds, now, job_id, JobState.RUNNING.value, worker_id),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: int, worker_id: str, result: dict[str, Any]) -> Job:
        with self.store.transaction() as conn:
            now = self._now(conn)
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
        reason = str(reason)
        with self.store.transaction() as conn:
            now = self._now(conn)
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
        with self.store.transaction() as conn:
            now = self._now(conn)
            job = self._held(conn, job_id, worker_id)
            self._unhold(conn, job_id, JobState.QUEUED, now, not_before=None, attempts=max(job.attempts - 1, 0))
            conn.execute("DELETE FROM job_attempts WHERE job_id = ? AND attempt = ?", (job_id, job.attempts))
            self._announce(conn, [job_id])
            job = self._fetch(conn, job_id)
        log.info("job %d released back to the queue (shutdown)", job_id)
        return job

    def cancel(self, job_id: int) -> Job:
        with self.store.transaction() as conn:
            now = self._now(conn)
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
        with self.store.transaction() as conn:
            now = self._now(conn)
            self._fetch_in(conn, job_id, RETRYABLE_STATES, "retried")
            # A fresh attempt budget, but the attempt history keeps counting upwards.
            conn.execute(
                "UPDATE jobs SET state = ?, max_attempts = attempts + budget, updated_at = ?, not_before = NULL, "
                "finished_at = NULL, reason = NULL, error = NULL, traceback = NULL WHERE id = ?",
                (JobState.QUEUED.value, now, job_id),
            )
            self._announce(conn, [job_id])
            job = self._fetch(conn, job_id)
        log.info("job %d re-queued by operator", job_id)
        return job

    def recover(self, expired_only: bool = True) -> list[Job]:
        reason = FailureReason.LEASE_EXPIRED.value
        with self.store.transaction() as conn:
            now = self._now(conn)
            if expired_only:
                condition, params = " AND (lease_until IS NULL OR lease_until < ?)", [now]
            elif self.local_prefix is not None:  # substr, not LIKE: no wildcards to escape, case-sensitive on both
                condition, params = " AND substr(worker_id, 1, ?) = ?", [len(self.local_prefix), self.local_prefix]
            else:
                condition, params = "", []
            # One statement for every lost job; the SET expressions read the row as it was.
            rows = conn.execute(
                "UPDATE jobs SET "
                "state = CASE WHEN attempts >= max_attempts THEN ? ELSE ? END, "
                "finished_at = CASE WHEN attempts >= max_attempts THEN ? ELSE NULL END, "
                "error = 'worker ''' || COALESCE(worker_id, '') || ''' stopped while running attempt ' "
                "|| attempts || ' (node restarted, lease expired or worker lost)', "
                "reason = ?, updated_at = ?, lease_until = NULL, worker_id = NULL, not_before = NULL "
                f"WHERE id IN (SELECT id FROM jobs WHERE state = ?{condition}{self._skip_locked}) RETURNING *",
                (JobState.FAILED.value, JobState.QUEUED.value, now, reason, now, JobState.RUNNING.value, *params),
            ).fetchall()
            recovered = sorted((self._row_to_job(row) for row in rows), key=lambda job: job.id)
            if recovered:
                conn.executemany(
                    "UPDATE job_attempts SET finished_at = ?, outcome = ?, reason = ?, error = ? "
                    "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                    [(now, job.state.value, reason, job.error, job.id, job.attempts) for job in recovered],
                )
                self._announce(conn, [job.id for job in recovered if job.state is JobState.QUEUED])
        for job in recovered:
            log.warning("job %d for series %s recovered after lost worker: now %s", job.id, job.series_uid, job.state.value)
        return recovered

    def set_phase(self, job_id: int, phase: Phase, state: PhaseState, objects: int = 0) -> Job:
        with self.store.transaction() as conn:
            now = self._now(conn)
            job = self._fetch(conn, job_id, lock=True)
            phases = dict(job.phases)
            phases[Phase(phase).value] = {"state": PhaseState(state).value, "objects": objects, "at": now}
            conn.execute("UPDATE jobs SET phases = ?, updated_at = ? WHERE id = ?", (json.dumps(phases), now, job_id))
            return self._fetch(conn, job_id)

    def get(self, job_id: int) -> Job:
        with self.store.connect() as conn:
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
        params.append(int(limit))
        with self.store.connect() as conn:
            rows = conn.execute(f"SELECT * FROM jobs{clause} ORDER BY id DESC LIMIT ?", params).fetchall()
        return [self._row_to_job(r) for r in rows]

    def counts(self) -> dict[JobState, int]:
        result = {state: 0 for state in JobState}
        with self.store.connect() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall():
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
        with self.store.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return self._row_to_job(row) if row is not None else None

    def oldest_waiting_since(self) -> float | None:
        claimable, params = in_clause("state", sorted(s.value for s in CLAIMABLE_STATES))
        with self.store.connect() as conn:
            row = conn.execute(f"SELECT MIN(created_at) AS t FROM jobs WHERE TRUE{claimable}", params).fetchone()
        return row["t"] if row is not None else None

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        with self.store.connect() as conn:
            rows = conn.execute("SELECT * FROM job_attempts WHERE job_id = ? ORDER BY attempt", (job_id,)).fetchall()
        return [dict(r) for r in rows]


class SQLiteJobQueue(SQLJobQueue):
    """The embedded default backend: one SQLite file in WAL mode.

    Parameters
    ----------
    path
        Database file (created with its folder if missing), usually
        ``<data_dir>/jobs.sqlite``.
    backoff
        Delay before a failed attempt is retried.
    clock
        Source of "now" in Unix seconds (this machine's clock: one node, one time line);
        tests pass a fake clock to expire leases without sleeping.
    """

    def __init__(self, path: Path | str, backoff: Backoff | None = None, clock: Clock = time.time) -> None:
        self.path = Path(path)
        store = SQLiteDB(self.path, SCHEMA)
        with store.write() as conn:  # a queue created before jobs had a kind
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "kind" not in columns:
                conn.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'process'")
        super().__init__(store, backoff, clock)

    @classmethod
    def in_data_dir(cls, data_dir: Path, **kwargs: Any) -> SQLiteJobQueue:
        """Open the queue of a node's data folder."""
        return cls(Path(data_dir) / QUEUE_FILE, **kwargs)


def open_queue(data_dir: Path, database_url: str | None = None, **kwargs: Any) -> JobQueue:
    """The node's job queue: PostgreSQL when ``database.url`` is set, else the SQLite file in ``data_dir``.

    ``kwargs`` go to the backend (``backoff`` for both; lanes and prefixes for PostgreSQL).
    """
    if database_url:
        from radnode.pipeline.pg_queue import PostgresJobQueue

        return PostgresJobQueue(database_url, **kwargs)
    return SQLiteJobQueue.in_data_dir(Path(data_dir), **kwargs)
