"""Forwarding as queued jobs: a routing rule's ``forward`` stages the received files unchanged.

A forward used to run on the completion thread and copy the whole series there, with no
retry or timeout, so one large series held up every other completion. Now routing only
enqueues a :attr:`~radnode.pipeline.jobs.JobKind.FORWARD` job; this module's thread
claims such jobs (never processing ones, so a long chain run cannot delay a forward) and
stages the series' files into the outbox (hard links where possible: the received bytes,
never decoded or re-encoded). Delivery, per destination with its own backoff, is then
the outbox's and the dispatcher's job, exactly as for processing results.

A failed attempt (the series folder is gone, the outbox cannot be written, the time
limit ``pipeline.job_timeout_seconds`` is exceeded) goes back to the queue's retry and
backoff like a processing job; a node that stops mid-job has it re-queued at start.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from radnode.config import Destination
from radnode.pipeline.background import BackgroundLoop
from radnode.pipeline.jobs import FailureReason, Job, JobKind
from radnode.pipeline.outbox import Outbox
from radnode.pipeline.queue import JobQueue, LeaseLost

log = logging.getLogger(__name__)

#: Worker id under which the forwarder claims jobs.
FORWARDER_ID = "forwarder"


class ForwardTimeout(Exception):
    """Staging took longer than the job time limit."""


class Forwarder(BackgroundLoop):
    """Claims forward jobs and stages their series for the job's destinations.

    Parameters
    ----------
    queue, outbox
        Where jobs come from and where the files go.
    destinations
        The destinations of a job (its rule's, or every configured one).
    on_staged
        Called after items were staged (wakes the dispatcher).
    on_finished
        Called with every job that ended an attempt (done, retrying or failed).
    timeout_seconds, lease_seconds, poll_seconds
        Time limit of one attempt, job lease, idle wait between claims.
    """

    thread_name = "radnode-forward"

    def __init__(
        self,
        queue: JobQueue,
        outbox: Outbox,
        destinations: Callable[[Job], list[Destination]],
        on_staged: Callable[[], None] = lambda: None,
        on_finished: Callable[[Job], None] = lambda job: None,
        timeout_seconds: float = 1800.0,
        lease_seconds: float = 120.0,
        poll_seconds: float = 2.0,
    ) -> None:
        super().__init__()
        self.queue = queue
        self.outbox = outbox
        self.destinations = destinations
        self.on_staged = on_staged
        self.on_finished = on_finished
        self.timeout_seconds = timeout_seconds
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds

    def round(self) -> float:
        """Claim and run one job; when none was due, sleep ``poll_seconds`` (or until woken)."""
        try:
            worked = self.run_once()
        except Exception:  # a locked or broken database must not end the thread
            log.exception("forwarder round failed")
            worked = False
        return 0.0 if worked else self.poll_seconds

    def run_once(self) -> bool:
        """Claim and run one forward job; False when none was due."""
        job = self.queue.claim(FORWARDER_ID, self.lease_seconds, kind=JobKind.FORWARD)
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: Job) -> Job | None:
        """Stage one claimed job's files; record the attempt's outcome in the queue."""
        started = time.monotonic()
        try:
            staged = self._stage(job, started)
        except LeaseLost:
            log.warning("forward job %d was cancelled or recovered while staging", job.id)
            return None
        except FileNotFoundError as exc:
            return self._fail(job, FailureReason.INPUT_MISSING, str(exc), retryable=True)
        except ForwardTimeout as exc:
            return self._fail(job, FailureReason.TIMEOUT, str(exc), retryable=True)
        except Exception as exc:
            return self._fail(
                job, FailureReason.STAGING_FAILED, f"{type(exc).__name__}: {exc}", True, traceback.format_exc()
            )
        try:
            done = self.queue.complete(job.id, FORWARDER_ID, {"staged_items": staged, "seconds": time.monotonic() - started})
        except LeaseLost:
            return None
        log.info("series %s forwarded (job %d): %d item(s) staged", job.series_uid, job.id, staged)
        self._finished(done)
        return done

    def _stage(self, job: Job, started: float) -> int:
        folder = Path(job.input_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"input folder {folder} of series {job.series_uid} is gone")
        files = sorted(folder.glob("*.dcm"))
        destinations = self.destinations(job)
        staged = 0
        last_beat = time.monotonic()
        for path in files:
            if time.monotonic() - started > self.timeout_seconds:
                raise ForwardTimeout(
                    f"staging {len(files)} file(s) took over {self.timeout_seconds:.0f} s ({staged} item(s) staged)"
                )
            if time.monotonic() - last_beat > self.lease_seconds / 4:
                if not self.queue.heartbeat(job.id, FORWARDER_ID, self.lease_seconds):
                    raise LeaseLost(f"job {job.id} is no longer held by the forwarder")
                last_beat = time.monotonic()
            items = self.outbox.stage(
                [path], destinations, job_id=job.id, source_series_uid=job.series_uid, result_objects_only=False
            )
            staged += len(items)
            if items:
                self.on_staged()
        return staged

    def _fail(self, job: Job, reason: FailureReason, error: str, retryable: bool, tb: str | None = None) -> Job | None:
        try:
            failed = self.queue.fail(job.id, FORWARDER_ID, reason, error, traceback=tb, retryable=retryable)
        except LeaseLost:
            return None
        self._finished(failed)
        return failed

    def _finished(self, job: Job) -> None:
        try:
            self.on_finished(job)
        except Exception:
            log.exception("forward job %d: finished-callback failed", job.id)
