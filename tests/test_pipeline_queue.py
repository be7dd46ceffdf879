"""What only the embedded SQLite job queue has: its WAL file, and queue files of older nodes.

Everything a queue does (claim order, leases, retries with backoff, cancel, restart
recovery) is the contract of :mod:`test_job_queue_contract`, run on SQLite and
PostgreSQL alike; this file keeps the SQLite file itself and the job vocabulary.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from radnode.pipeline.jobs import Backoff, JobKind, JobSpec, Phase, PhaseState, JobState, Priority, phase_of
from radnode.pipeline.queue import JobNotFound, SQLiteJobQueue


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


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


def test_backoff_is_capped() -> None:
    backoff = Backoff(base_seconds=10, factor=3, max_seconds=100)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 50, 10_000)] == [10, 30, 90, 100, 100, 100]
    with pytest.raises(ValueError, match="factor"):
        Backoff(factor=0.5)


def test_phase_vocabulary() -> None:
    assert phase_of("SEG") is Phase.CONTOURS and phase_of("RTSTRUCT") is Phase.CONTOURS
    assert phase_of("SR") is Phase.REPORT


def test_forward_and_process_jobs_are_claimed_apart_and_old_queues_gain_the_kind(tmp_path: Path) -> None:
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
