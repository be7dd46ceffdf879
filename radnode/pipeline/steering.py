"""Retry and cancel a job: the operator's rules, shared by ``radnode jobs`` and the dashboard.

One place decides what "retry" means (re-queue a failed/cancelled job and re-arm its failed
deliveries; refuse a job with nothing to retry), so the CLI and the web cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from radnode.pipeline.jobs import RETRYABLE_STATES, Job
from radnode.pipeline.outbox import Outbox
from radnode.pipeline.queue import InvalidTransition, JobQueue


class NothingToRetry(InvalidTransition):
    """The job is neither failed nor cancelled and has no failed delivery."""


@dataclass(frozen=True)
class RetryOutcome:
    """What a retry did: the job after it, whether it was re-queued, deliveries re-armed."""

    job: Job
    requeued: bool
    rearmed: int

    def message(self) -> str:
        if self.requeued:
            return f"job {self.job.id} queued again (series {self.job.series_uid}); {self.rearmed} failed delivery(ies) re-armed"
        return f"job {self.job.id} is {self.job.state.value}; {self.rearmed} failed delivery(ies) re-armed"


def retry_job(queue: JobQueue, outbox: Outbox, job_id: int) -> RetryOutcome:
    """Re-arm the job's failed deliveries and re-queue it when failed or cancelled.

    Raises ``JobNotFound`` for an unknown id and :class:`NothingToRetry` when there is nothing to do.
    """
    job = queue.get(job_id)
    rearmed = outbox.rearm(job_id=job.id)
    if job.state in RETRYABLE_STATES:
        return RetryOutcome(queue.retry(job.id), True, rearmed)
    if rearmed:
        return RetryOutcome(job, False, rearmed)
    raise NothingToRetry(
        f"job {job.id} is {job.state.value} with no failed delivery; only "
        f"{', '.join(sorted(s.value for s in RETRYABLE_STATES))} jobs can be retried"
    )


def cancel_job(queue: JobQueue, job_id: int) -> Job:
    """Cancel a queued, retrying or running job (``JobNotFound`` / ``InvalidTransition`` otherwise)."""
    return queue.cancel(job_id)
