"""The worker pool: ``pipeline.workers`` threads that claim queued jobs and run each attempt
in a child process (:mod:`radnode.pipeline.child`), then record its end in the queue.

The pool owns what a job means to the node: the result folder of each attempt, the job's
lease (renewed while the child runs, released when the node stops), staging each
delivery phase the chain hands over for the outbox (``on_phase``, the only way results
reach it), and the queue transition an outcome becomes (done, retry, failed for good).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from radnode.config import Settings
from radnode.pipeline.child import HEARTBEAT_SECONDS, ChildOutcome, ChildRunner, OutcomeKind, chain_reference
from radnode.pipeline.jobs import FailureReason, Job, JobKind, Phase, PhaseState
from radnode.pipeline.messages import ChainStatus
from radnode.pipeline.queue import JobQueue, LeaseLost

log = logging.getLogger(__name__)

#: Seconds a job's lease lasts without a heartbeat; a node that died longer ago than this
#: has its running jobs recovered by :meth:`JobQueue.recover`.
LEASE_SECONDS = 60.0

#: The chain of each job kind other than PROCESS that a pool may claim (PROCESS runs ``chain``).
KIND_CHAINS: dict[JobKind, str] = {JobKind.CLINICIAN_CONTOUR: "radnode.pipeline.late_contours:run_late_contour_chain"}

#: Called when a phase's objects are on disk: (job, phase, out_dir, the phase's files, as
#: the chain handed them over) -> number of objects staged.
PhaseCallback = Callable[[Job, Phase, Path, list[Path]], int]
#: Called after the queue recorded the end of an attempt: (job as stored, outcome).
FinishedCallback = Callable[[Job, ChildOutcome], None]


class WorkerPool:
    """``pipeline.workers`` threads, each claiming jobs and running them in a child process.

    Parameters
    ----------
    queue
        Where jobs come from and where their outcome goes.
    settings
        Concurrency (``pipeline.workers``) and the per-job timeout come from here.
    results_dir
        ``<results_dir>/<job id>/`` is the chain's output folder (emptied before each attempt).
    chain
        Import reference of the chain function (test hook; see the module docstring).
    on_phase
        Stages a finished phase for dispatch; its return value is the number of objects.
    on_finished
        Told about every attempt's end (metrics, logging).
    lease_seconds, heartbeat_seconds, poll_seconds
        Lease length, heartbeat interval, and idle wait between claims.
    name
        Prefix of the worker ids stored with claimed jobs.
    kinds
        Job kinds this pool claims, in order; the node's own pool adds
        :attr:`JobKind.CLINICIAN_CONTOUR`, which needs the node's index and received files
        (a remote worker has neither, so it keeps the default).
    """

    def __init__(
        self,
        queue: JobQueue,
        settings: Settings,
        results_dir: Path,
        *,
        chain: str | None = None,
        on_phase: PhaseCallback | None = None,
        on_finished: FinishedCallback | None = None,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        poll_seconds: float = 2.0,
        name: str | None = None,
        kinds: tuple[JobKind, ...] = (JobKind.PROCESS,),
    ) -> None:
        if heartbeat_seconds >= lease_seconds:
            raise ValueError(f"heartbeat_seconds ({heartbeat_seconds}) must be shorter than lease_seconds ({lease_seconds})")
        self.queue = queue
        self.settings = settings
        self.results_dir = Path(results_dir)
        self.chain = chain_reference(chain)
        # Claimed in this order (processing a new CT goes before redoing an old one's report).
        self.chains: dict[JobKind, str] = {kind: self.chain if kind is JobKind.PROCESS else KIND_CHAINS[kind] for kind in kinds}
        self.on_phase = on_phase
        self.on_finished = on_finished
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()  # kill running children
        self._no_claims = threading.Event()  # take no new job
        self._wake = threading.Event()
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Number of concurrent jobs (``pipeline.workers``)."""
        return self.settings.pipeline.workers

    def start(self) -> None:
        """Start the worker threads."""
        if self._threads:
            return
        self._stopping.clear()
        self._no_claims.clear()
        for index in range(self.size):
            worker_id = f"{self.name}/w{index}"
            thread = threading.Thread(target=self._loop, args=(worker_id,), name=f"radnode-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("worker pool started: %d worker(s), chain %s", self.size, self.chain)

    def stop(self, timeout: float = 30.0, drain_seconds: float = 0.0) -> None:
        """Stop claiming; let running jobs finish for up to ``drain_seconds``, then kill the
        children that are left and give their jobs back to the queue (attempt not counted)."""
        self._no_claims.set()
        self._wake.set()
        drain_until = time.monotonic() + drain_seconds
        while self.busy() and time.monotonic() < drain_until:
            time.sleep(0.05)
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._threads = []
        log.info("worker pool stopped")

    def wake(self) -> None:
        """Claim now instead of after the idle wait (a job was just enqueued)."""
        self._wake.set()

    def busy(self) -> dict[str, int]:
        """Worker id -> job id currently running."""
        with self._lock:
            return dict(self._busy)

    # -- the worker loop ----------------------------------------------------------------

    def _loop(self, worker_id: str) -> None:
        while not self._no_claims.is_set():
            try:
                job = self._claim(worker_id)
            except Exception:  # a locked or broken database must not end the worker thread
                log.exception("worker %s could not claim a job", worker_id)
                job = None
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            with self._lock:
                self._busy[worker_id] = job.id
            try:
                self.run_job(job, worker_id)
            except Exception:
                log.exception("worker %s: unexpected error around job %d", worker_id, job.id)
            finally:
                with self._lock:
                    self._busy.pop(worker_id, None)

    def _claim(self, worker_id: str) -> Job | None:
        for kind in self.chains:
            job = self.queue.claim(worker_id, self.lease_seconds, kind=kind)
            if job is not None:
                return job
        return None

    def out_dir(self, job: Job) -> Path:
        """The chain's output folder for ``job``."""
        return self.results_dir / str(job.id)

    def run_job(self, job: Job, worker_id: str) -> Job | None:
        """Run one claimed job to the end of this attempt and record the outcome."""
        out_dir = self.out_dir(job)
        try:
            if out_dir.exists():  # leftovers of an earlier attempt must not be mistaken for results
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
        except OSError as exc:  # a full or read-only results volume: this attempt fails, a later one may not
            return self._record(
                job,
                worker_id,
                ChildOutcome(OutcomeKind.RAISED, 0.0, error=f"cannot prepare the result folder {out_dir}: {exc}"),
                reason=FailureReason.EXCEPTION,
                retryable=True,
            )
        if not job.input_path.exists():
            return self._record(
                job,
                worker_id,
                ChildOutcome(OutcomeKind.RAISED, 0.0, error=f"input folder {job.input_path} does not exist"),
                reason=FailureReason.INPUT_MISSING,
                retryable=False,
            )
        staged: set[Phase] = set()
        staging_errors: list[str] = []

        def deliver(phase: Phase, files: list[Path]) -> None:
            if phase in staged:
                staging_errors.append(f"the chain handed over phase {phase.value} twice")
                return
            staged.add(phase)
            try:
                self._deliver_phase(job, phase, out_dir, files)
            except Exception as exc:  # recorded as the attempt's failure below
                staging_errors.append(str(exc))

        def on_progress(stage: str, state: str) -> None:
            log.debug("job %d: stage %s %s", job.id, stage, state)

        def keep_going() -> bool:
            return self.queue.heartbeat(job.id, worker_id, self.lease_seconds)

        runner = ChildRunner(self.chains.get(job.kind, self.chain), self.settings, self.settings.pipeline.job_timeout_seconds, self.heartbeat_seconds)
        outcome = runner.run(job, out_dir, on_progress, deliver, keep_going, self._stopping)
        log.info(
            "job %d series %s: attempt ended (%s%s) after %.1f s",
            job.id, job.series_uid, outcome.kind.value, f", {outcome.status}" if outcome.status else "", outcome.seconds,
        )
        if outcome.kind is OutcomeKind.STOPPED:
            try:
                self.queue.release(job.id, worker_id)
            except LeaseLost:
                pass
            return None
        if outcome.kind is OutcomeKind.CANCELLED:
            return None
        if outcome.kind is OutcomeKind.RESULT and outcome.status is ChainStatus.DONE:
            missing = [phase.value for phase in Phase if phase not in staged]
            if missing:
                staging_errors.append(f"the chain reported done without handing over phase(s) {', '.join(missing)}")
            if staging_errors:
                outcome.error = "; ".join(staging_errors)
                return self._record(job, worker_id, outcome, reason=FailureReason.STAGING_FAILED, retryable=True)
            return self._record(job, worker_id, outcome)
        if outcome.kind is OutcomeKind.RESULT and outcome.status is ChainStatus.REJECTED:
            return self._record(job, worker_id, outcome, reason=FailureReason.QC_REJECTED, retryable=False)
        reason = {
            OutcomeKind.RESULT: FailureReason.CHAIN_ERROR,
            OutcomeKind.RAISED: FailureReason.EXCEPTION,
            OutcomeKind.CRASHED: FailureReason.CRASHED,
            OutcomeKind.TIMEOUT: FailureReason.TIMEOUT,
        }[outcome.kind]
        return self._record(job, worker_id, outcome, reason=reason, retryable=True)

    def _deliver_phase(self, job: Job, phase: Phase, out_dir: Path, files: list[Path]) -> None:
        """Stage one phase's objects for dispatch and mark the phase done."""
        objects = 0
        if self.on_phase is not None:
            try:
                objects = self.on_phase(job, phase, out_dir, files)
            except Exception as exc:
                log.exception("job %d: staging phase %s failed", job.id, phase.value)
                self.queue.set_phase(job.id, phase, PhaseState.FAILED, 0)
                raise RuntimeError(f"staging phase {phase.value} of job {job.id} failed: {exc}") from exc
        self.queue.set_phase(job.id, phase, PhaseState.DONE, objects)
        log.info("job %d series %s: phase %s delivered to the outbox (%d object(s))", job.id, job.series_uid, phase.value, objects)

    def _record(
        self,
        job: Job,
        worker_id: str,
        outcome: ChildOutcome,
        reason: FailureReason | None = None,
        retryable: bool = True,
    ) -> Job | None:
        result = dict(outcome.result)
        result.update({"seconds": round(outcome.seconds, 3), "exitcode": outcome.exitcode, "outcome": outcome.kind.value})
        try:
            if reason is None:
                stored = self.queue.complete(job.id, worker_id, result)
            else:
                stored = self.queue.fail(
                    job.id,
                    worker_id,
                    reason,
                    outcome.error or reason.value,
                    traceback=outcome.traceback,
                    retryable=retryable,
                    result=result,
                )
                if stored.state.value == "failed":
                    for phase in Phase:
                        if stored.phase_state(phase) is PhaseState.PENDING:
                            stored = self.queue.set_phase(job.id, phase, PhaseState.FAILED, 0)
        except LeaseLost as lost:
            log.warning("job %d: outcome not recorded: %s", job.id, lost)
            return None
        if self.on_finished is not None:
            try:
                self.on_finished(stored, outcome)
            except Exception:
                log.exception("job %d: on_finished callback failed", job.id)
        return stored
