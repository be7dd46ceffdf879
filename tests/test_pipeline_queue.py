"""The SQLite job queue: claim order, leases, retries with backoff, cancel, restart recovery.

Every test uses a real database file; time is a fake clock so leases and backoff expire
without sleeping.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from radnode.pipeline.jobs import (
    Backoff,
    FailureReason,
    JobSource,
    JobSpec,
    JobState,
    Phase,
    PhaseState,
    Priority,
    phase_of,
)
from radnode.pipeline.queue import InvalidTransition, JobNotFound, LeaseLost, SQLiteJobQueue


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(uid: str, tmp_path: Path, **kwargs: object) -> JobSpec:
    return JobSpec(series_uid=uid, input_path=tmp_path / uid, pipeline_version="1", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(tmp_path: Path, clock: FakeClock) -> SQLiteJobQueue:
    return SQLiteJobQueue(tmp_path / "jobs.sqlite", backoff=Backoff(30, 2, 300), clock=clock)


def test_database_is_a_wal_file_and_survives_reopen(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    job = queue.enqueue(spec("1.2.3", tmp_path, study_uid="1.2", destinations=("pacs",), instance_count=60))
    with sqlite3.connect(tmp_path / "jobs.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = SQLiteJobQueue(tmp_path / "jobs.sqlite", clock=clock)
    again = reopened.get(job.id)
    assert again.state is JobState.QUEUED
    assert again.series_uid == "1.2.3" and again.study_uid == "1.2"
    assert again.destinations == ("pacs",) and again.instance_count == 60
    assert again.phases[Phase.CONTOURS.value]["state"] == PhaseState.PENDING.value
    with pytest.raises(JobNotFound):
        reopened.get(job.id + 100)


def test_live_jobs_are_claimed_before_older_sweep_jobs(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    sweep1 = queue.enqueue(spec("1.1", tmp_path, priority=Priority.SWEEP, source=JobSource.SWEEP))
    clock.advance(1)
    sweep2 = queue.enqueue(spec("1.2", tmp_path, priority=Priority.SWEEP, source=JobSource.SWEEP))
    clock.advance(1)
    live1 = queue.enqueue(spec("1.3", tmp_path))
    clock.advance(1)
    live2 = queue.enqueue(spec("1.4", tmp_path))
    order = []
    while (job := queue.claim("w", 60)) is not None:
        order.append(job.id)
    assert order == [live1.id, live2.id, sweep1.id, sweep2.id]
    assert queue.counts()[JobState.RUNNING] == 4


def test_claim_starts_an_attempt_and_completion_records_timings(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    queued = queue.enqueue(spec("1.5", tmp_path))
    clock.advance(5)
    job = queue.claim("w1", 60)
    assert job is not None and job.id == queued.id
    assert job.state is JobState.RUNNING and job.attempts == 1 and job.worker_id == "w1"
    assert job.lease_until == pytest.approx(clock.now + 60)
    clock.advance(12.5)
    done = queue.complete(job.id, "w1", {"status": "done"})
    assert done.state is JobState.DONE and done.result == {"status": "done"}
    assert done.runtime_seconds() == pytest.approx(12.5)
    history = queue.attempts(job.id)
    assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "done")]
    assert history[0]["finished_at"] - history[0]["started_at"] == pytest.approx(12.5)


def test_expired_lease_is_recovered_and_the_stale_worker_cannot_finish(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    job = queue.enqueue(spec("1.6", tmp_path, max_attempts=3))
    queue.claim("old-worker", 30)
    clock.advance(10)
    assert queue.heartbeat(job.id, "old-worker", 30)  # lease renewed to now + 30
    clock.advance(25)
    assert queue.recover(expired_only=True) == []  # not expired yet thanks to the heartbeat
    clock.advance(10)
    recovered = queue.recover(expired_only=True)
    assert [j.id for j in recovered] == [job.id]
    assert recovered[0].state is JobState.QUEUED and recovered[0].reason == FailureReason.LEASE_EXPIRED.value
    again = queue.claim("new-worker", 30)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert not queue.heartbeat(job.id, "old-worker", 30)
    with pytest.raises(LeaseLost):
        queue.complete(job.id, "old-worker", {})
    assert queue.complete(job.id, "new-worker", {}).state is JobState.DONE


def test_lease_expiry_after_the_last_attempt_fails_the_job(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    queue.enqueue(spec("1.7", tmp_path, max_attempts=1))
    queue.claim("w", 30)
    clock.advance(31)
    (recovered,) = queue.recover()
    assert recovered.state is JobState.FAILED and recovered.reason == FailureReason.LEASE_EXPIRED.value
    assert queue.claim("w", 30) is None


def test_failures_retry_with_exponential_backoff_until_attempts_are_used(tmp_path: Path, queue: SQLiteJobQueue, clock: FakeClock) -> None:
    job = queue.enqueue(spec("1.8", tmp_path, max_attempts=3))
    delays = []
    for attempt in (1, 2):
        claimed = queue.claim("w", 60)
        assert claimed is not None and claimed.attempts == attempt
        failed = queue.fail(job.id, "w", FailureReason.CRASHED, "boom", traceback="tb")
        assert failed.state is JobState.RETRYING and failed.error == "boom" and failed.traceback == "tb"
        assert failed.not_before is not None
        delays.append(failed.not_before - clock.now)
        assert queue.claim("w", 60) is None  # not due yet
        clock.advance(delays[-1] - 0.5)
        assert queue.claim("w", 60) is None
        clock.advance(1)
    assert delays == [30.0, 60.0]
    last = queue.claim("w", 60)
    assert last is not None and last.attempts == 3
    final = queue.fail(job.id, "w", FailureReason.TIMEOUT, "too slow")
    assert final.state is JobState.FAILED and final.reason == "timeout" and final.not_before is None
    outcomes = [a["outcome"] for a in queue.attempts(job.id)]
    assert outcomes == ["retrying", "retrying", "failed"]


def test_non_retryable_failure_ends_at_once(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    job = queue.enqueue(spec("1.9", tmp_path, max_attempts=5))
    queue.claim("w", 60)
    failed = queue.fail(job.id, "w", FailureReason.QC_REJECTED, "too_few_slices", retryable=False)
    assert failed.state is JobState.FAILED and failed.attempts == 1


def test_backoff_is_capped() -> None:
    backoff = Backoff(base_seconds=10, factor=3, max_seconds=100)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 50, 10_000)] == [10, 30, 90, 100, 100, 100]
    with pytest.raises(ValueError, match="factor"):
        Backoff(factor=0.5)


def test_cancel_queued_and_running_jobs(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    queued = queue.enqueue(spec("2.1", tmp_path))
    assert queue.cancel(queued.id).state is JobState.CANCELLED
    running = queue.enqueue(spec("2.2", tmp_path))
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.id == running.id  # the cancelled one is not claimable
    cancelled = queue.cancel(running.id)
    assert cancelled.state is JobState.CANCELLED
    assert not queue.heartbeat(running.id, "w", 60)  # the worker learns it at its next heartbeat
    with pytest.raises(LeaseLost):
        queue.fail(running.id, "w", FailureReason.CRASHED, "killed")
    with pytest.raises(InvalidTransition, match="only"):
        queue.cancel(running.id)


def test_operator_retry_grants_a_fresh_budget(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    job = queue.enqueue(spec("2.3", tmp_path, max_attempts=1))
    queue.claim("w", 60)
    queue.fail(job.id, "w", FailureReason.EXCEPTION, "bug")
    with pytest.raises(InvalidTransition):
        queue.cancel(job.id)
    retried = queue.retry(job.id)
    assert retried.state is JobState.QUEUED and retried.error is None and retried.max_attempts == 2
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.attempts == 2
    with pytest.raises(InvalidTransition, match="can be retried"):
        queue.retry(job.id)
    assert queue.complete(job.id, "w", {}).state is JobState.DONE


def test_release_gives_a_job_back_without_counting_the_attempt(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    job = queue.enqueue(spec("2.4", tmp_path))
    queue.claim("w", 60)
    released = queue.release(job.id, "w")
    assert released.state is JobState.QUEUED and released.attempts == 0
    assert queue.attempts(job.id) == []


def test_phase_one_stays_delivered_when_phase_two_fails(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    job = queue.enqueue(spec("2.5", tmp_path, max_attempts=1))
    queue.claim("w", 60)
    queue.set_phase(job.id, Phase.CONTOURS, PhaseState.DONE, objects=2)
    failed = queue.fail(job.id, "w", FailureReason.CHAIN_ERROR, "radiomics failed")
    assert failed.state is JobState.FAILED
    assert failed.phase_state(Phase.CONTOURS) is PhaseState.DONE
    assert failed.phases[Phase.CONTOURS.value]["objects"] == 2
    assert failed.phase_state(Phase.REPORT) is PhaseState.PENDING


def test_phase_vocabulary() -> None:
    assert phase_of("SEG") is Phase.CONTOURS and phase_of("RTSTRUCT") is Phase.CONTOURS
    assert phase_of("SR") is Phase.REPORT


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path: Path, queue: SQLiteJobQueue) -> None:
    ids = {queue.enqueue(spec(f"3.{n}", tmp_path)).id for n in range(30)}
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        own = SQLiteJobQueue(queue.path)  # its own connections, like another process would have
        while (job := own.claim(name, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


_CLAIM_AND_DIE = """
import os, sys
from radnode.pipeline.queue import SQLiteJobQueue
queue = SQLiteJobQueue(sys.argv[1])
job = queue.claim("doomed-process", 3600)
print(job.id, flush=True)
os._exit(0)  # dies holding the job, like a node killed with kill -9
"""


def test_restart_requeues_jobs_of_a_dead_process(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite"
    first = SQLiteJobQueue(db)
    job = first.enqueue(spec("4.1", tmp_path))
    waiting = first.enqueue(spec("4.2", tmp_path))
    out = subprocess.run([sys.executable, "-c", _CLAIM_AND_DIE, str(db)], capture_output=True, text=True, check=True, timeout=60)
    assert int(out.stdout.strip()) == job.id
    restarted = SQLiteJobQueue(db)
    assert restarted.get(job.id).state is JobState.RUNNING  # the lease (1 h) has not expired
    assert restarted.recover(expired_only=True) == []
    recovered = restarted.recover(expired_only=False)  # at start: no worker of ours is alive
    assert [j.id for j in recovered] == [job.id]
    assert {j.id for j in restarted.list(states=[JobState.QUEUED])} == {job.id, waiting.id}
    again = restarted.claim("new", 60)
    assert again is not None and again.id == job.id and again.attempts == 2


def test_forward_and_process_jobs_are_claimed_apart_and_old_queues_gain_the_kind(tmp_path: Path) -> None:
    from radnode.pipeline.jobs import JobKind

    path = tmp_path / "jobs.sqlite"
    queue = SQLiteJobQueue(path)
    old = queue.enqueue(JobSpec(series_uid="1.2.1", input_path=tmp_path, pipeline_version="1"))
    # A queue file written before jobs had a kind: the column is added, old rows are processing jobs.
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN kind")
    queue = SQLiteJobQueue(path)
    assert queue.get(old.id).kind is JobKind.PROCESS
    forward = queue.enqueue(
        JobSpec(series_uid="1.2.2", input_path=tmp_path, pipeline_version="1", priority=Priority.LIVE + 1, kind=JobKind.FORWARD)
    )
    # Processing workers never take a forward job (even one of higher priority), and the
    # forwarder never takes a processing one.
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.id == old.id
    assert queue.claim("w", 60) is None
    taken = queue.claim("forwarder", 60, kind=JobKind.FORWARD)
    assert taken is not None and taken.id == forward.id and taken.kind is JobKind.FORWARD
    # "Already processed" checks see processing jobs only, unless asked for forwards.
    assert queue.latest_for_series("1.2.2") is None
    assert queue.latest_for_series("1.2.2", kind=JobKind.FORWARD).id == forward.id  # type: ignore[union-attr]
