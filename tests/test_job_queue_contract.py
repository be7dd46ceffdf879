"""One contract for every job-queue backend: the embedded SQLite file and PostgreSQL.

Each test runs once per backend (``queue`` is parametrised) against a real store: a
SQLite file in the test folder, or a fresh database in the throw-away PostgreSQL cluster
of :mod:`pg_support` (missing PostgreSQL fails these tests, it never skips them).
Time is a fake clock where leases and backoff must expire without sleeping; the
dead-worker test uses real time and a real process killed while holding a job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pg_support import BACKENDS, backend_store, pg_cluster  # noqa: F401  (session fixture)
from radnode.pipeline.jobs import Backoff, FailureReason, JobKind, JobSource, JobSpec, JobState, Phase, PhaseState, Priority
from radnode.pipeline.queue import InvalidTransition, JobNotFound, JobQueue, LeaseLost, open_queue



class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(uid: str, tmp_path: Path, **kwargs: Any) -> JobSpec:
    return JobSpec(series_uid=uid, input_path=tmp_path / uid, pipeline_version="1", **kwargs)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, str | None]:
    """(backend, data dir, database URL) of one empty store."""
    return backend_store(request, tmp_path / "data", "q")


@pytest.fixture
def make_queue(store: tuple[str, Path, str | None]) -> Callable[..., JobQueue]:
    """Another queue object on the same store (like another process would open)."""
    _, data_dir, url = store
    return lambda **kwargs: open_queue(data_dir, url, **kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(make_queue: Callable[..., JobQueue], clock: FakeClock) -> JobQueue:
    return make_queue(backoff=Backoff(30, 2, 300), clock=clock)


def test_enqueue_stores_every_field_and_get_rejects_unknown_ids(tmp_path: Path, queue: JobQueue, make_queue: Callable[..., JobQueue]) -> None:
    job = queue.enqueue(spec("1.2.3", tmp_path, study_uid="1.2", destinations=("pacs",), instance_count=60, calling_ae="CT1"))
    again = make_queue().get(job.id)
    assert again.state is JobState.QUEUED and again.attempts == 0
    assert (again.series_uid, again.study_uid, again.calling_ae) == ("1.2.3", "1.2", "CT1")
    assert again.destinations == ("pacs",) and again.instance_count == 60
    assert again.input_path == tmp_path / "1.2.3"
    assert again.phases[Phase.CONTOURS.value]["state"] == PhaseState.PENDING.value
    with pytest.raises(JobNotFound):
        queue.get(job.id + 100)


def test_priorities_then_age_decide_the_claim_order(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    sweep1 = queue.enqueue(spec("1.1", tmp_path, priority=Priority.SWEEP, source=JobSource.SWEEP))
    clock.advance(1)
    manual = queue.enqueue(spec("1.2", tmp_path, priority=Priority.MANUAL, source=JobSource.MANUAL))
    clock.advance(1)
    live1 = queue.enqueue(spec("1.3", tmp_path))
    clock.advance(1)
    live2 = queue.enqueue(spec("1.4", tmp_path))
    order = []
    while (job := queue.claim("w", 60)) is not None:
        order.append(job.id)
    assert order == [live1.id, live2.id, manual.id, sweep1.id]


def test_lease_heartbeat_and_completion(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    queued = queue.enqueue(spec("1.5", tmp_path))
    clock.advance(5)
    job = queue.claim("w1", 60)
    assert job is not None and job.id == queued.id
    assert job.state is JobState.RUNNING and job.attempts == 1 and job.worker_id == "w1"
    assert job.lease_until == pytest.approx(clock.now + 60)
    clock.advance(50)
    assert queue.heartbeat(job.id, "w1", 60)
    assert queue.get(job.id).lease_until == pytest.approx(clock.now + 60)
    assert not queue.heartbeat(job.id, "someone-else", 60)
    clock.advance(20)  # past the first lease, inside the renewed one
    assert queue.recover(expired_only=True) == []
    done = queue.complete(job.id, "w1", {"status": "done", "n": 3})
    assert done.state is JobState.DONE and done.result == {"status": "done", "n": 3}
    assert done.runtime_seconds() == pytest.approx(70)
    assert done.worker_id is None and done.lease_until is None
    assert [(a["attempt"], a["outcome"]) for a in queue.attempts(job.id)] == [(1, "done")]


def test_expired_lease_is_recovered_and_the_stale_worker_cannot_finish(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue(spec("1.6", tmp_path, max_attempts=3))
    queue.claim("old-worker", 30)
    clock.advance(31)
    (recovered,) = queue.recover(expired_only=True)
    assert recovered.id == job.id and recovered.state is JobState.QUEUED
    assert recovered.reason == FailureReason.LEASE_EXPIRED.value
    again = queue.claim("new-worker", 30)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert not queue.heartbeat(job.id, "old-worker", 30)
    with pytest.raises(LeaseLost):
        queue.complete(job.id, "old-worker", {})
    assert queue.complete(job.id, "new-worker", {}).state is JobState.DONE
    assert [a["outcome"] for a in queue.attempts(job.id)] == ["queued", "done"]


def test_lease_expiry_after_the_last_attempt_fails_the_job(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    queue.enqueue(spec("1.7", tmp_path, max_attempts=1))
    queue.claim("w", 30)
    clock.advance(31)
    (recovered,) = queue.recover()
    assert recovered.state is JobState.FAILED and recovered.reason == FailureReason.LEASE_EXPIRED.value
    assert queue.claim("w", 30) is None


def test_failures_retry_with_exponential_backoff_until_attempts_are_used(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
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
    assert [a["outcome"] for a in queue.attempts(job.id)] == ["retrying", "retrying", "failed"]


def test_non_retryable_failure_ends_at_once(tmp_path: Path, queue: JobQueue) -> None:
    job = queue.enqueue(spec("1.9", tmp_path, max_attempts=5))
    queue.claim("w", 60)
    failed = queue.fail(job.id, "w", FailureReason.QC_REJECTED, "too_few_slices", retryable=False)
    assert failed.state is JobState.FAILED and failed.attempts == 1


def test_cancel_queued_and_running_jobs(tmp_path: Path, queue: JobQueue) -> None:
    queued = queue.enqueue(spec("2.1", tmp_path))
    assert queue.cancel(queued.id).state is JobState.CANCELLED
    running = queue.enqueue(spec("2.2", tmp_path))
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.id == running.id  # the cancelled one is not claimable
    assert queue.cancel(running.id).state is JobState.CANCELLED
    assert not queue.heartbeat(running.id, "w", 60)  # the worker learns it at its next heartbeat
    with pytest.raises(LeaseLost):
        queue.fail(running.id, "w", FailureReason.CRASHED, "killed")
    with pytest.raises(InvalidTransition, match="only"):
        queue.cancel(running.id)


def test_operator_retry_grants_a_fresh_budget(tmp_path: Path, queue: JobQueue) -> None:
    job = queue.enqueue(spec("2.3", tmp_path, max_attempts=1))
    queue.claim("w", 60)
    queue.fail(job.id, "w", FailureReason.EXCEPTION, "bug")
    retried = queue.retry(job.id)
    assert retried.state is JobState.QUEUED and retried.error is None and retried.max_attempts == 2
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.attempts == 2
    with pytest.raises(InvalidTransition, match="can be retried"):
        queue.retry(job.id)


def test_release_gives_a_job_back_without_counting_the_attempt(tmp_path: Path, queue: JobQueue) -> None:
    job = queue.enqueue(spec("2.4", tmp_path))
    queue.claim("w", 60)
    released = queue.release(job.id, "w")
    assert released.state is JobState.QUEUED and released.attempts == 0
    assert queue.attempts(job.id) == []


def test_phases_counts_listing_and_latest_job(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    first = queue.enqueue(spec("2.5", tmp_path, max_attempts=1))
    clock.advance(1)
    second = queue.enqueue(spec("2.5", tmp_path))
    forward = queue.enqueue(spec("2.5", tmp_path, kind=JobKind.FORWARD))
    queue.enqueue(spec("2.6", tmp_path))
    assert queue.oldest_waiting_since() == pytest.approx(clock.now - 1)
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.id == first.id
    queue.set_phase(first.id, Phase.CONTOURS, PhaseState.DONE, objects=2)
    failed = queue.fail(first.id, "w", FailureReason.CHAIN_ERROR, "radiomics failed")
    assert failed.phase_state(Phase.CONTOURS) is PhaseState.DONE and failed.phases["contours"]["objects"] == 2
    assert failed.phase_state(Phase.REPORT) is PhaseState.PENDING
    counts = queue.counts()
    assert set(counts) == set(JobState)
    assert (counts[JobState.QUEUED], counts[JobState.FAILED], counts[JobState.RUNNING]) == (3, 1, 0)
    assert [j.id for j in queue.list(series_uid="2.5")] == [forward.id, second.id, first.id]
    assert [j.id for j in queue.list(states=[JobState.FAILED])] == [first.id]
    assert queue.list(states=[]) == []
    assert queue.latest_for_series("2.5").id == second.id  # type: ignore[union-attr]
    assert queue.latest_for_series("2.5", kind=JobKind.FORWARD).id == forward.id  # type: ignore[union-attr]
    assert queue.latest_for_series("2.5", pipeline_version="2") is None
    taken = queue.claim("forwarder", 60, kind=JobKind.FORWARD)
    assert taken is not None and taken.id == forward.id


def _claim_all(make: Callable[[], JobQueue], name: str, out: list[int], lock: threading.Lock) -> None:
    own = make()
    while (job := own.claim(name, 60)) is not None:
        with lock:
            out.append(job.id)


def test_concurrent_claimers_never_get_the_same_job(tmp_path: Path, queue: JobQueue, make_queue: Callable[..., JobQueue]) -> None:
    ids = {queue.enqueue(spec(f"3.{n}", tmp_path)).id for n in range(40)}
    claimed: list[int] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_claim_all, args=(make_queue, f"w{i}", claimed, lock)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


_CLAIM_IN_PROCESS = """
import json, sys
from radnode.pipeline.queue import open_queue
data_dir, url, name = sys.argv[1], sys.argv[2] or None, sys.argv[3]
queue = open_queue(data_dir, url)
got = []
while (job := queue.claim(name, 60)) is not None:
    got.append(job.id)
print(json.dumps(got))
"""


def test_concurrent_processes_never_get_the_same_job(tmp_path: Path, queue: JobQueue, store: tuple[str, Path, str | None]) -> None:
    _, data_dir, url = store
    ids = {queue.enqueue(spec(f"5.{n}", tmp_path)).id for n in range(60)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CLAIM_IN_PROCESS, str(data_dir), url or "", f"p{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    claimed: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        claimed += json.loads(out)
    assert sorted(claimed) == sorted(ids)


_CLAIM_AND_DIE = """
import os, sys
from radnode.pipeline.queue import open_queue
queue = open_queue(sys.argv[1], sys.argv[2] or None)
job = queue.claim("doomed-worker", float(sys.argv[3]))
print(job.id, flush=True)
os._exit(9)  # dies holding the job, like a worker killed with kill -9
"""


def test_dead_worker_job_is_run_again_exactly_once(tmp_path: Path, store: tuple[str, Path, str | None], make_queue: Callable[..., JobQueue]) -> None:
    _, data_dir, url = store
    queue = make_queue(backoff=Backoff(0, 1, 0))  # real time on both backends
    job = queue.enqueue(spec("4.1", tmp_path))
    out = subprocess.run([sys.executable, "-c", _CLAIM_AND_DIE, str(data_dir), url or "", "1.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9 and int(out.stdout.strip()) == job.id
    assert queue.get(job.id).state is JobState.RUNNING
    assert queue.claim("survivor", 60) is None  # still leased
    time.sleep(1.2)
    (recovered,) = queue.recover(expired_only=True)
    assert recovered.id == job.id and recovered.state is JobState.QUEUED
    assert queue.recover(expired_only=True) == []  # recovered once, not again
    again = queue.claim("survivor", 60)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert queue.claim("survivor-2", 60) is None
    queue.complete(job.id, "survivor", {})
    history = queue.attempts(job.id)
    assert [(a["worker_id"], a["outcome"]) for a in history] == [("doomed-worker", "queued"), ("survivor", "done")]


def test_claimed_jobs_count_as_running_and_equal_priorities_go_oldest_first(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    sweep1 = queue.enqueue(spec("6.1", tmp_path, priority=Priority.SWEEP, source=JobSource.SWEEP))
    clock.advance(1)
    sweep2 = queue.enqueue(spec("6.2", tmp_path, priority=Priority.SWEEP, source=JobSource.SWEEP))
    clock.advance(1)
    live = queue.enqueue(spec("6.3", tmp_path))
    order = []
    while (job := queue.claim("w", 60)) is not None:
        order.append(job.id)
    assert order == [live.id, sweep1.id, sweep2.id]
    counts = queue.counts()
    assert (counts[JobState.RUNNING], counts[JobState.QUEUED]) == (3, 0)


def test_attempt_history_records_when_each_attempt_started_and_ended(tmp_path: Path, queue: JobQueue, clock: FakeClock) -> None:
    job = queue.enqueue(spec("6.4", tmp_path))
    clock.advance(5)
    queue.claim("w1", 60)
    clock.advance(12.5)
    done = queue.complete(job.id, "w1", {"status": "done"})
    assert done.runtime_seconds() == pytest.approx(12.5)
    (attempt,) = queue.attempts(job.id)
    assert (attempt["worker_id"], attempt["outcome"]) == ("w1", "done")
    assert attempt["started_at"] == pytest.approx(done.started_at)
    assert attempt["finished_at"] - attempt["started_at"] == pytest.approx(12.5)


def test_a_failed_job_cannot_be_cancelled_and_a_retried_one_runs_to_the_end(tmp_path: Path, queue: JobQueue) -> None:
    job = queue.enqueue(spec("6.5", tmp_path, max_attempts=1))
    queue.claim("w", 60)
    queue.fail(job.id, "w", FailureReason.EXCEPTION, "bug")
    with pytest.raises(InvalidTransition, match="can be cancelled"):
        queue.cancel(job.id)
    queue.retry(job.id)
    assert queue.claim("w", 60) is not None
    assert queue.complete(job.id, "w", {}).state is JobState.DONE
    assert [a["outcome"] for a in queue.attempts(job.id)] == ["failed", "done"]


def test_restart_recovery_takes_back_running_jobs_whose_lease_has_not_expired(
    tmp_path: Path, store: tuple[str, Path, str | None], make_queue: Callable[..., JobQueue]
) -> None:
    _, data_dir, url = store
    queue = make_queue()
    job = queue.enqueue(spec("6.6", tmp_path))
    waiting = queue.enqueue(spec("6.7", tmp_path))
    out = subprocess.run([sys.executable, "-c", _CLAIM_AND_DIE, str(data_dir), url or "", "3600"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9 and int(out.stdout.strip()) == job.id
    restarted = make_queue()
    assert restarted.get(job.id).state is JobState.RUNNING
    assert restarted.recover(expired_only=True) == []  # the hour-long lease still runs
    recovered = restarted.recover(expired_only=False)  # at start: no worker of this node is alive
    assert [j.id for j in recovered] == [job.id]
    assert recovered[0].reason == FailureReason.LEASE_EXPIRED.value and "doomed-worker" in (recovered[0].error or "")
    assert {j.id for j in restarted.list(states=[JobState.QUEUED])} == {job.id, waiting.id}
    again = restarted.claim("new", 60)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert [(a["worker_id"], a["outcome"]) for a in restarted.attempts(job.id)] == [("doomed-worker", "queued"), ("new", None)]
