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
* **one implementation**: the statements are those of
  :class:`~radnode.pipeline.queue.SQLJobQueue`, shared with the embedded SQLite queue;
  this module adds only what a shared queue has beyond it (worker lanes, the model
  bundle a job was queued for, riding out a database restart during a heartbeat);
* **at-least-once**: a recovered job runs again; outputs have deterministic UIDs and the
  outbox is keyed by (object, destination), so a re-run delivers nothing twice.

``recover(expired_only=False)`` -- "at start no worker of mine can be alive" -- only
touches jobs whose worker id starts with ``local_prefix`` (the node's own pool): jobs
held by remote workers are theirs until their lease runs out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from radnode.pipeline.jobs import CLAIMABLE_STATES, Backoff, JobKind, JobSpec
from radnode.pipeline.queue import SCHEMA, Clock, JobNotFound, SQLJobQueue
from radnode.pipeline.sqlite_db import in_clause
from radnode.sqlstore import PostgresStore

log = logging.getLogger(__name__)

#: Queue (worker lane) of jobs whose profile has no entry in ``database.profile_queues``.
DEFAULT_QUEUE = "cpu"
#: Channel on which the queue tells idle workers that a job can be claimed (payload: its lane).
WORK_CHANNEL = "radnode_jobs"
#: Seconds between reconnection attempts of a listener whose database went away.
LISTEN_RETRY_SECONDS = 5.0

#: The queue's tables (translated for PostgreSQL by the store) and what a shared queue
#: adds: the worker lane and model bundle of each job, and an index for :meth:`recover`.
_SCHEMA = SCHEMA + f"""
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS queue TEXT NOT NULL DEFAULT '{DEFAULT_QUEUE}';
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS bundle_sha256 TEXT;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (lease_until) WHERE state = 'running';
"""


class PostgresJobQueue(SQLJobQueue):
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
        super().__init__(PostgresStore(url, _SCHEMA, "jobs", "jobs"), backoff, clock, local_prefix)
        self.url = url
        self.queues = list(queues) if queues is not None else None
        self.profile_queues = dict(profile_queues or {})
        self.default_queue = default_queue
        self.bundle_sha256 = bundle_sha256

    def __repr__(self) -> str:
        return f"PostgresJobQueue(queues={self.queues})"

    # -- lanes --------------------------------------------------------------------------

    def queue_of(self, spec: JobSpec) -> str:
        """The worker lane of a new job (forwards never leave the node)."""
        if JobKind(spec.kind) is JobKind.FORWARD:
            return "node"
        return self.profile_queues.get(spec.profile, self.default_queue)

    def _lane_columns(self, spec: JobSpec) -> dict[str, Any]:
        return {"queue": self.queue_of(spec), "bundle_sha256": self.bundle_sha256}

    def _claim_filter(self) -> tuple[str, list[Any]]:
        if self.queues is None:
            return "", []
        if not self.queues:  # a worker of no lane claims nothing
            return " AND FALSE", []
        return in_clause("queue", self.queues)

    def _announce(self, conn: Any, job_ids: Sequence[int]) -> None:
        # Sent when the transaction commits (never for a rolled-back change); one per lane.
        if job_ids:
            ids, params = in_clause("id", list(job_ids))
            conn.execute(f"SELECT pg_notify(?, queue) FROM jobs WHERE TRUE{ids}", [WORK_CHANNEL, *params]).fetchall()

    def listen(self, on_work: Callable[[str | None], None], stop: threading.Event) -> None:
        """Call ``on_work(lane)`` whenever a job becomes claimable, until ``stop`` is set.

        Blocks (run it in a thread). Idle workers wake at once instead of finding the job
        at their next poll, which can then be rare. After (re)connecting, ``on_work(None)``
        is called once: announcements sent while no connection listened are lost, so the
        worker should look. A lost database is retried every :data:`LISTEN_RETRY_SECONDS`;
        the worker's poll covers the gap.
        """
        import psycopg

        while not stop.is_set():
            try:
                with self.store.connect() as conn:
                    conn.execute(f"LISTEN {WORK_CHANNEL}")
                    on_work(None)
                    while not stop.is_set():
                        for note in conn.raw.notifies(timeout=1.0):
                            on_work(note.payload)
            except psycopg.OperationalError as exc:
                log.warning("not listening for new jobs (database unreachable: %s); polling meanwhile", str(exc).strip()[:200])
                stop.wait(LISTEN_RETRY_SECONDS)

    def lane(self, job_id: int) -> tuple[str, str | None]:
        """(queue, bundle checksum) stored with a job."""
        with self.store.connect() as conn:
            row = conn.execute("SELECT queue, bundle_sha256 FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id} in {self.store.describe()}")
        return row["queue"], row["bundle_sha256"]

    def queue_depths(self) -> dict[str, int]:
        """Claimable jobs per worker lane (``radnode status``)."""
        claimable, params = in_clause("state", sorted(s.value for s in CLAIMABLE_STATES))
        with self.store.connect() as conn:
            rows = conn.execute(
                f"SELECT queue, COUNT(*) AS n FROM jobs WHERE TRUE{claimable} GROUP BY queue ORDER BY queue", params
            ).fetchall()
        return {r["queue"]: r["n"] for r in rows}

    # -- JobQueue -----------------------------------------------------------------------

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease. While the database cannot be reached the job keeps running
        (``True``): killing finished work helps nobody, and if the lease ran out meanwhile
        the outcome is refused (:class:`~radnode.pipeline.queue.LeaseLost`) and the re-run
        delivers nothing twice."""
        import psycopg

        try:
            return super().heartbeat(job_id, worker_id, lease_seconds)
        except psycopg.OperationalError as exc:
            log.warning("job %d: heartbeat not recorded (database unreachable: %s); the job goes on", job_id, str(exc).strip()[:200])
            return True
