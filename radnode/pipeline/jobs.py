"""The job model: what one unit of pipeline work is, and the states it moves through.

A job processes one received CT series with the chain of :mod:`radnode.pipeline.chain`
(:attr:`JobKind.PROCESS`), forwards it unchanged (:attr:`JobKind.FORWARD`, see
:mod:`radnode.pipeline.forward`), or redoes the clinician-contour part of a processed CT for
a clinician's RT Structure Set that arrived later (:attr:`JobKind.CLINICIAN_CONTOUR`, see
:mod:`radnode.pipeline.late_contours`); every kind moves through the same states::

    queued ──claim──> running ──> done
      ^                  │
      │                  ├──> retrying ──(backoff elapsed)──> claimed again
      │                  ├──> failed      (QC rejection, or attempts used up)
      └──── retry ───────┴──> cancelled   (operator)

A job delivers in *phases* ("contours first"): SEG and RTSTRUCT are dispatched
as soon as segmentation is done (:attr:`Phase.CONTOURS`), the SR follows when radiomics
and inference finish (:attr:`Phase.REPORT`). Each phase has its own state in the job, and
a failure in a later phase never withdraws what an earlier phase already delivered.

This module holds plain data and rules (no SQL, no processes) so the queue backends, the
worker, the CLI and the tests share one vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

from radnode.config import ResultObject
from radnode.pipeline.version import PIPELINE_VERSION


class JobState(StrEnum):
    """Life-cycle states of a job (stored as these strings)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States in which a job still has work ahead of it.
ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRYING})
#: States a worker may claim a job from.
CLAIMABLE_STATES: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RETRYING})
#: States an operator may re-queue with ``radnode jobs retry``.
RETRYABLE_STATES: frozenset[JobState] = frozenset({JobState.FAILED, JobState.CANCELLED})
#: States an operator may cancel.
CANCELLABLE_STATES: frozenset[JobState] = ACTIVE_STATES


class Priority(IntEnum):
    """Claim order: a higher value is claimed first (live routing before the nightly sweep)."""

    SWEEP = 10
    MANUAL = 50
    LIVE = 100


class JobSource(StrEnum):
    """Who asked for the job."""

    LIVE = "live"  # a series completed at the listener and a routing rule said "process"
    SWEEP = "sweep"  # the nightly sweep retrieved a series that was never processed
    MANUAL = "manual"  # an operator or a test enqueued it


class JobKind(StrEnum):
    """What a job does with its series.

    Each kind has its own workers, so a long processing job never holds up a forward.
    """

    PROCESS = "process"  # run the chain (worker pool, child process)
    FORWARD = "forward"  # stage the received files unchanged for delivery (forwarder thread)
    #: a clinician's RT Structure Set arrived after its CT was processed: redo the
    #: clinician-contour part for that CT (node's worker pool; see radnode.pipeline.late_contours)
    CLINICIAN_CONTOUR = "clinician_contour"


class FailureReason(StrEnum):
    """Stable, machine-readable reasons for a failed attempt (stored and shown in ``status``)."""

    QC_REJECTED = "qc_rejected"  # the series is not usable; retrying cannot help
    CHAIN_ERROR = "chain_error"  # the chain caught an exception and reported ``failed``
    EXCEPTION = "exception"  # an exception escaped the chain function in the worker process
    CRASHED = "crashed"  # the worker process died (signal, os._exit, out-of-memory killer)
    TIMEOUT = "timeout"  # pipeline.job_timeout_seconds elapsed; the process was killed
    LEASE_EXPIRED = "lease_expired"  # the node stopped while the job ran (restart recovery)
    INPUT_MISSING = "input_missing"  # the input folder is gone (retention, manual deletion)
    STAGING_FAILED = "staging_failed"  # results could not be copied to the outbox


class Phase(StrEnum):
    """Delivery phases of a job, in the order they complete."""

    CONTOURS = "contours"
    REPORT = "report"


class PhaseState(StrEnum):
    """State of one delivery phase."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


#: Which result objects each phase delivers.
PHASE_OBJECTS: dict[Phase, tuple[ResultObject, ...]] = {
    Phase.CONTOURS: (ResultObject.SEG, ResultObject.RTSTRUCT),
    Phase.REPORT: (ResultObject.SR,),
}


def phase_of(obj: ResultObject | str) -> Phase:
    """Return the phase that delivers result object ``obj``."""
    obj = ResultObject(obj)
    for phase, objects in PHASE_OBJECTS.items():
        if obj in objects:
            return phase
    raise ValueError(f"result object {obj.value!r} belongs to no delivery phase")


def current_pipeline_version() -> str:
    """The version of the processing chain, part of the "already processed" key."""
    return PIPELINE_VERSION


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``min(max_seconds, base_seconds * factor ** (attempt - 1))``.

    Parameters
    ----------
    base_seconds
        Delay after the first failed attempt.
    factor
        Growth per further attempt.
    max_seconds
        Upper bound of a single delay, so a long outage is retried at a steady pace.
    """

    base_seconds: float = 30.0
    factor: float = 2.0
    max_seconds: float = 900.0

    def __post_init__(self) -> None:
        if self.base_seconds < 0 or self.max_seconds < 0:
            raise ValueError("backoff delays must not be negative")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        # Cap the exponent: a float overflow after weeks of retries must not crash the loop.
        return float(min(self.max_seconds, self.base_seconds * self.factor ** min(exponent, 64)))


@dataclass(frozen=True)
class JobSpec:
    """What to enqueue: everything a worker needs to run the chain on one series.

    Parameters
    ----------
    series_uid, study_uid
        Series and Study Instance UIDs of the input (PS3.3 C.7.3.1, C.7.2.1).
    input_path
        Folder holding the series' instances.
    pipeline_version
        Version of the chain the job is meant for; with ``series_uid`` the key of the
        "already processed" check.
    priority, source
        Claim order and origin (live routing, sweep, manual).
    profile
        Processing profile named by the routing rule.
    destinations
        Destination names for the results; empty means every configured destination.
    instance_count
        Instances in the series when it was queued (a later, larger count is an update).
    calling_ae
        AE title that sent the series (routing and audit).
    max_attempts
        Attempts before the job ends ``failed``.
    kind
        Process the series (default), or forward it unchanged.
    """

    series_uid: str
    input_path: Path
    pipeline_version: str
    study_uid: str | None = None
    priority: int = Priority.LIVE
    source: JobSource = JobSource.LIVE
    profile: str = "default"
    destinations: tuple[str, ...] = ()
    instance_count: int | None = None
    calling_ae: str | None = None
    max_attempts: int = 3
    kind: JobKind = JobKind.PROCESS

    def __post_init__(self) -> None:
        if not self.series_uid:
            raise ValueError("JobSpec.series_uid must be a non-empty SeriesInstanceUID")
        if self.max_attempts < 1:
            raise ValueError(f"JobSpec.max_attempts must be >= 1, got {self.max_attempts}")


def initial_phases() -> dict[str, dict[str, Any]]:
    """Phase records of a new job: every phase pending, no objects yet."""
    return {phase.value: {"state": PhaseState.PENDING.value, "objects": 0, "at": None} for phase in Phase}


@dataclass
class Job:
    """A job as stored by a :class:`~radnode.pipeline.queue.JobQueue` (times are Unix seconds)."""

    id: int
    state: JobState
    series_uid: str
    input_path: Path
    pipeline_version: str
    priority: int
    source: JobSource
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    study_uid: str | None = None
    profile: str = "default"
    destinations: tuple[str, ...] = ()
    instance_count: int | None = None
    calling_ae: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    lease_until: float | None = None
    worker_id: str | None = None
    reason: str | None = None
    error: str | None = None
    traceback: str | None = None
    phases: dict[str, dict[str, Any]] = field(default_factory=initial_phases)
    result: dict[str, Any] = field(default_factory=dict)
    kind: JobKind = JobKind.PROCESS

    @property
    def active(self) -> bool:
        """Whether the job still has work ahead of it."""
        return self.state in ACTIVE_STATES

    def phase_state(self, phase: Phase | str) -> PhaseState:
        """State of one delivery phase."""
        record = self.phases.get(Phase(phase).value) or {}
        return PhaseState(record.get("state", PhaseState.PENDING.value))

    def runtime_seconds(self) -> float | None:
        """Wall time of the latest attempt, when it has finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``radnode jobs list --json``)."""
        data = {k: v for k, v in vars(self).items()}
        data["state"] = self.state.value
        data["source"] = self.source.value
        data["kind"] = self.kind.value
        data["input_path"] = str(self.input_path)
        data["destinations"] = list(self.destinations)
        return json.loads(json.dumps(data, default=str))
