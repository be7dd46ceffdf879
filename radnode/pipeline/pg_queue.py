"""The job queue on PostgreSQL: the same :class:`~radnode.pipeline.queue.JobQueue`, shared by machines.

Why plain SQL (psycopg 3) rather than a task-queue library such as procrastinate: the
contract radnode's worker, service, sweep, CLI and dashboard use is the ``JobQueue``
interface -- leases renewed by heartbeats, an attempt history, two delivery phases per
job, operator cancel/retry with a fresh budget, "latest job for this series and chain
version". procrastinate models jobs as calls of registered task functions in its own
tables, with its own retry and status vocabulary; fitting the interface onto it would
mean keeping radnode's job table *beside* procrastinate's and synchronising the two. The
one thing a library would add -- safe concurrent claiming -- is a single statement in
PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``. No second broker, one table, the same
states as the SQLite backend, and one contract test suite for both.

Design against the known pitfalls of database queues:

* **claim**: the next due job is picked and updated in one statement with ``FOR UPDATE
  SKIP LOCKED``, so concurrent claimers never block each other nor get the same job;
* **bounded recovery**: :meth:`recover` is one ``UPDATE`` over every running job whose
  lease is older than now -- it never waits for a busy worker (``SKIP LOCKED`` again) and
  its cost does not depend on how many workers are alive. The node runs it every
  recovery interval, so a dead worker's job is queued again at most
  ``lease + interval`` after its last heartbeat;
* **one clock**: by default "now" is the database server's clock, so leases written by
  workers on different machines are compared on one time line (a test passes a fake
  clock instead);
* **at-least-once**: a recovered job runs again; outputs have deterministic UIDs and the
  outbox is keyed by (object, destination), so a re-run delivers nothing twice.

``recover(expired_only=False)`` -- "at start no worker of mine can be alive" -- only
touches jobs whose worker id starts with ``local_prefix`` (the node's own pool): jobs
held by remote workers are theirs until their lease runs out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from radnode.pipeline.database import PostgresDB
from radnode.pipeline.jobs import (
    CANCELLABLE_STATES,
    CLAIMABLE_STATES,
    RETRYABLE_STATES,
    Backoff,
    FailureReason,
    Job,
    JobKind,
    JobSource,
    JobSpec,
    JobState,
    Phase,
    PhaseState,
    initial_phases,
)
from radnode.pipeline.queue import Clock, InvalidTransition, JobNotFound, JobQueue, LeaseLost, SQLiteJobQueue

log = logging.getLogger(__name__)

#: Queue (worker lane) of jobs whose profile has no entry in ``database.profile_queues``.
DEFAULT_QUEUE = "cpu"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    not_before       DOUBLE PRECISION,
    lease_until      DOUBLE PRECISION,
    worker_id        TEXT,
    reason           TEXT,
    error            TEXT,
    traceback        TEXT,
    phases           TEXT    NOT NULL,
    result           TEXT    NOT NULL DEFAULT '{}',
    kind             TEXT    NOT NULL DEFAULT 'process',
    queue            TEXT    NOT NULL DEFAULT 'cpu',
    bundle_sha256    TEXT
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (kind, state, priority DESC, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs (series_uid, pipeline_version);
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lease_until) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS job_attempts (
    job_id      BIGINT  NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    worker_id   TEXT,
    started_at  DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    outcome     TEXT,
    reason      TEXT,
    error       TEXT,
    PRIMARY KEY (job_id, attempt)
);
"""

_NOW = "SELECT extract(epoch FROM clock_timestamp())::double precision AS now"


class PostgresJobQueue(JobQueue):
    """Jobs in one PostgreSQL database, claimed with ``FOR UPDATE SKIP LOCKED``.

    Parameters
    ----------
    url
        ``database.url``.
    backoff
        Delay before a failed attempt is retried.
    clock
        Source of "now"; ``None`` (default) uses the database server's clock.
    queues
        Worker lanes this process claims from (``radnode worker --queues cpu,gpu``);
        ``None`` claims from every lane (the node's own pool).
    profile_queues, default_queue
        Lane of a new job, chosen by its processing profile.
    local_prefix
        Worker-id prefix of this process's own workers (see the module docstring).
    bundle_sha256
        Model bundle checksum stamped on new jobs; workers with another bundle refuse them.
    """

    def __init__(
        self,
        url: str,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        *,
        queues: Sequence[str] | None = None,
        profile_queues: dict[str, str] | None = None,
        default_queue: str = DEFAULT_QUEUE,
        local_prefix: str | None = None,
        bundle_sha256: str | None = None,
    ) -> None:
        self.url = url
        self.backoff = backoff or Backoff()
        self._clock = clock
        self.queues = list(queues) if queues is not None else None
        self.profile_queues = dict(profile_queues or {})
        self.default_queue = default_queue
        self.local_prefix = local_prefix
        self.bundle_sha256 = bundle_sha256
        self._db = PostgresDB(url, _SCHEMA, "jobs")

    def __repr__(self) -> str:
        return f"PostgresJobQueue(queues={self.queues})"

    # -- helpers ------------------------------------------------------------------------

    def _now(self, conn: Any) -> float:
        if self._clock is not None:
            return float(self._clock())
        return float(conn.execute(_NOW).fetchone()["now"])

    _row_to_job = staticmethod(SQLiteJobQueue._row_to_job)

    def _fetch(self, conn: Any, job_id: int, lock: bool = False) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE id = %s" + (" FOR UPDATE" if lock else ""), (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in the PostgreSQL queue")
        return self._row_to_job(row)

    def _fetch_in(self, conn: Any, job_id: int, allowed: Iterable[JobState], action: str) -> Job:
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
        values = {"state": state.value, "updated_at": now, "lease_until": None, "worker_id": None, **columns}
        assignments = ", ".join(f"{name} = %s" for name in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = %s", (*values.values(), job_id))

    @staticmethod
    def _close_attempt(conn: Any, job: Job, now: float, outcome: str, reason: str | None, error: str | None) -> None:
        conn.execute(
            "UPDATE job_attempts SET finished_at = %s, outcome = %s, reason = %s, error = %s "
            "WHERE job_id = %s AND attempt = %s AND finished_at IS NULL",
            (now, outcome, reason, error, job.id, job.attempts),
        )

    def queue_of(self, spec: JobSpec) -> str:
        """The worker lane of a new job (forwards never leave the node)."""
        if JobKind(spec.kind) is JobKind.FORWARD:
            return "node"
        return self.profile_queues.get(spec.profile, self.default_queue)

    def lane(self, job_id: int) -> tuple[str, str | None]:
        """(queue, bundle checksum) stored with a job."""
        with self._db.connect() as conn:
            row = conn.execute("SELECT queue, bundle_sha256 FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in the PostgreSQL queue")
        return row["queue"], row["bundle_sha256"]

    # -- JobQueue -----------------------------------------------------------------------

    def enqueue(self, spec: JobSpec) -> Job:
        with self._db.write() as conn:
            now = self._now(conn)
            row = conn.execute(
                "INSERT INTO jobs (series_uid, study_uid, input_path, pipeline_version, source, profile, "
                "destinations, instance_count, calling_ae, priority, state, attempts, max_attempts, budget, "
                "created_at, updated_at, phases, kind, queue, bundle_sha256) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (
                    spec.series_uid, spec.study_uid, str(spec.input_path), spec.pipeline_version,
                    JobSource(spec.source).value, spec.profile, json.dumps(list(spec.destinations)),
                    spec.instance_count, spec.calling_ae, int(spec.priority), JobState.QUEUED.value,
                    spec.max_attempts, spec.max_attempts, now, now, json.dumps(initial_phases()),
                    JobKind(spec.kind).value, self.queue_of(spec), self.bundle_sha256,
                ),
            ).fetchone()
            job = self._row_to_job(row)
        log.info(
            "job %d (%s) queued for series %s (priority %d, %s, queue %s)",
            job.id, job.kind.value, job.series_uid, job.priority, job.source.value, row["queue"],
        )
        return job

    def claim(self, worker_id: str, lease_seconds: float, kind: JobKind = JobKind.PROCESS) -> Job | None:
        lanes = "" if self.queues is None else " AND queue = ANY(%(queues)s)"
        with self._db.write() as conn:
            now = self._now(conn)
            row = conn.execute(
                "WITH next AS (SELECT id FROM jobs WHERE kind = %(kind)s AND state = ANY(%(claimable)s) "
                f"AND (not_before IS NULL OR not_before <= %(now)s){lanes} "
                "ORDER BY priority DESC, created_at ASC, id ASC LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "UPDATE jobs SET state = %(running)s, attempts = jobs.attempts + 1, worker_id = %(worker)s, "
                "lease_until = %(lease)s, started_at = %(now)s, finished_at = NULL, not_before = NULL, "
                "updated_at = %(now)s FROM next WHERE jobs.id = next.id RETURNING jobs.*",
                {
                    "kind": JobKind(kind).value,
                    "claimable": [s.value for s in CLAIMABLE_STATES],
                    "now": now,
                    "queues": self.queues,
                    "running": JobState.RUNNING.value,
                    "worker": worker_id,
                    "lease": now + lease_seconds,
                },
            ).fetchone()
            if row is None:
                return None
            job = self._row_to_job(row)
            conn.execute(
                "INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (job_id, attempt) DO UPDATE SET worker_id = EXCLUDED.worker_id, "
                "started_at = EXCLUDED.started_at, finished_at = NULL, outcome = NULL, reason = NULL, error = NULL",
                (job.id, job.attempts, worker_id, now),
            )
        log.info("job %d claimed by %s for series %s (attempt %d/%d)", job.id, worker_id, job.series_uid, job.attempts, job.max_attempts)
        return job

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease. While the database cannot be reached the job keeps running
        (``True``): killing finished work helps nobody, and if the lease ran out meanwhile
        the outcome is refused (:class:`LeaseLost`) and the re-run delivers nothing twice."""
        import psycopg

        try:
            with self._db.connect() as conn:
                now = self._now(conn)
                cursor = conn.execute(
                    "UPDATE jobs SET lease_until = %s, updated_at = %s WHERE id = %s AND state = %s AND worker_id = %s",
                    (now + lease_seconds, now, job_id, JobState.RUNNING.value, worker_id),
                )
                return cursor.rowcount == 1
        except psycopg.OperationalError as exc:
            log.warning("job %d: heartbeat not recorded (database unreachable: %s); the job goes on", job_id, str(exc).strip()[:200])
            return True

    def complete(self, job_id: int, worker_id: str, result: dict[str, Any]) -> Job:
        with self._db.write() as conn:
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
        with self._db.write() as conn:
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
        log.warning("job %d attempt %d/%d failed for series %s (%s): now %s: %s",
                    job.id, job.attempts, job.max_attempts, job.series_uid, reason, job.state.value, error)
        return job

    def release(self, job_id: int, worker_id: str) -> Job:
        with self._db.write() as conn:
            now = self._now(conn)
            job = self._held(conn, job_id, worker_id)
            self._unhold(conn, job_id, JobState.QUEUED, now, not_before=None, attempts=max(job.attempts - 1, 0))
            conn.execute("DELETE FROM job_attempts WHERE job_id = %s AND attempt = %s", (job_id, job.attempts))
            job = self._fetch(conn, job_id)
        log.info("job %d released back to the queue", job_id)
        return job

    def cancel(self, job_id: int) -> Job:
        with self._db.write() as conn:
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
        with self._db.write() as conn:
            now = self._now(conn)
            self._fetch_in(conn, job_id, RETRYABLE_STATES, "retried")
            conn.execute(
                "UPDATE jobs SET state = %s, max_attempts = attempts + budget, updated_at = %s, not_before = NULL, "
                "finished_at = NULL, reason = NULL, error = NULL, traceback = NULL WHERE id = %s",
                (JobState.QUEUED.value, now, job_id),
            )
            job = self._fetch(conn, job_id)
        log.info("job %d re-queued by operator", job_id)
        return job

    def recover(self, expired_only: bool = True) -> list[Job]:
        with self._db.write() as conn:
            now = self._now(conn)
            if expired_only:
                condition, params = "(lease_until IS NULL OR lease_until < %s)", [now]
            elif self.local_prefix is not None:
                condition, params = "worker_id LIKE %s", [self.local_prefix.replace("%", r"\%").replace("_", r"\_") + "%"]
            else:
                condition, params = "TRUE", []
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state = %s AND {condition} FOR UPDATE SKIP LOCKED",
                [JobState.RUNNING.value, *params],
            ).fetchall()
            recovered: list[Job] = []
            for row in rows:
                job = self._row_to_job(row)
                final = job.attempts >= job.max_attempts
                state = JobState.FAILED if final else JobState.QUEUED
                error = f"worker {job.worker_id!r} stopped while running attempt {job.attempts} (lease expired or worker lost)"
                self._unhold(
                    conn, job.id, state, now, not_before=None, finished_at=now if final else None,
                    reason=FailureReason.LEASE_EXPIRED.value, error=error,
                )
                self._close_attempt(conn, job, now, state.value, FailureReason.LEASE_EXPIRED.value, error)
                recovered.append(self._fetch(conn, job.id))
        for job in recovered:
            log.warning("job %d for series %s recovered after lost worker: now %s", job.id, job.series_uid, job.state.value)
        return recovered

    def set_phase(self, job_id: int, phase: Phase, state: PhaseState, objects: int = 0) -> Job:
        with self._db.write() as conn:
            now = self._now(conn)
            job = self._fetch(conn, job_id, lock=True)
            phases = dict(job.phases)
            phases[Phase(phase).value] = {"state": PhaseState(state).value, "objects": objects, "at": now}
            conn.execute("UPDATE jobs SET phases = %s, updated_at = %s WHERE id = %s", (json.dumps(phases), now, job_id))
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
        query = "SELECT * FROM jobs WHERE TRUE"
        params: list[Any] = []
        if states is not None:
            values = [JobState(s).value for s in states]
            if not values:
                return []
            query += " AND state = ANY(%s)"
            params.append(values)
        if series_uid is not None:
            query += " AND series_uid = %s"
            params.append(series_uid)
        query += " ORDER BY id DESC LIMIT %s"
        params.append(int(limit))
        with self._db.connect() as conn:
            return [self._row_to_job(r) for r in conn.execute(query, params).fetchall()]

    def counts(self) -> dict[JobState, int]:
        result = {state: 0 for state in JobState}
        with self._db.connect() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                result[JobState(row["state"])] = row["n"]
        return result

    def queue_depths(self) -> dict[str, int]:
        """Claimable jobs per worker lane (``radnode status``)."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT queue, COUNT(*) AS n FROM jobs WHERE state = ANY(%s) GROUP BY queue ORDER BY queue",
                ([s.value for s in CLAIMABLE_STATES],),
            ).fetchall()
        return {r["queue"]: r["n"] for r in rows}

    def latest_for_series(
        self, series_uid: str, pipeline_version: str | None = None, kind: JobKind = JobKind.PROCESS
    ) -> Job | None:
        query = "SELECT * FROM jobs WHERE series_uid = %s AND kind = %s"
        params: list[Any] = [series_uid, JobKind(kind).value]
        if pipeline_version is not None:
            query += " AND pipeline_version = %s"
            params.append(pipeline_version)
        query += " ORDER BY id DESC LIMIT 1"
        with self._db.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return self._row_to_job(row) if row is not None else None

    def oldest_waiting_since(self) -> float | None:
        with self._db.connect() as conn:
            row = conn.execute(
                "SELECT MIN(created_at) AS t FROM jobs WHERE state = ANY(%s)", ([s.value for s in CLAIMABLE_STATES],)
            ).fetchone()
        return row["t"] if row is not None else None

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        with self._db.connect() as conn:
            rows = conn.execute("SELECT * FROM job_attempts WHERE job_id = %s ORDER BY attempt", (job_id,)).fetchall()
        return [dict(r) for r in rows]
