"""PostgreSQL-only parts of the scale-out: worker lanes, the node's own-job recovery, version refusal."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pg_support import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)
from radnode.config.loader import settings_from_mapping
from radnode.pipeline.jobs import FailureReason, JobSpec, JobState, current_pipeline_version
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.remote_worker import VERSION_MISMATCH, RemoteWorkerPool


def spec(uid: str, tmp_path: Path, **kwargs: object) -> JobSpec:
    return JobSpec(series_uid=uid, input_path=tmp_path / uid, pipeline_version=current_pipeline_version(), **kwargs)  # type: ignore[arg-type]


def test_profiles_choose_the_queue_and_workers_claim_only_their_queues(pg_url: str, tmp_path: Path) -> None:
    node = PostgresJobQueue(pg_url, profile_queues={"tumour": "gpu"}, default_queue="cpu")
    gpu_job = node.enqueue(spec("1.1", tmp_path, profile="tumour"))
    cpu_job = node.enqueue(spec("1.2", tmp_path, profile="research"))
    assert node.queue_depths() == {"cpu": 1, "gpu": 1}
    cpu_worker = PostgresJobQueue(pg_url, queues=["cpu"])
    claimed = cpu_worker.claim("cpu-1", 60)
    assert claimed is not None and claimed.id == cpu_job.id
    assert cpu_worker.claim("cpu-1", 60) is None  # the tumour job waits for a GPU worker
    gpu_worker = PostgresJobQueue(pg_url, queues=["cpu", "gpu"])
    taken = gpu_worker.claim("gpu-1", 60)
    assert taken is not None and taken.id == gpu_job.id
    assert node.queue_depths() == {}


def test_node_restart_recovers_only_its_own_jobs(pg_url: str, tmp_path: Path) -> None:
    node = PostgresJobQueue(pg_url, local_prefix="node@host/")
    own = node.enqueue(spec("2.1", tmp_path))
    remote = node.enqueue(spec("2.2", tmp_path))
    node.claim("node@host/w0", 3600)
    node.claim("worker-a:77/w0", 3600)
    recovered = node.recover(expired_only=False)  # at the node's start: its own workers are gone
    assert [j.id for j in recovered] == [own.id]
    assert node.get(remote.id).state is JobState.RUNNING  # the remote worker keeps its job


def _within(seconds: float, call: object) -> object:
    """``call()``'s result, failing the test if it has not returned within ``seconds`` (it waited on a lock)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return out[0]


def test_claim_and_recover_skip_jobs_another_transaction_holds_without_waiting(pg_url: str, tmp_path: Path) -> None:
    clock = [1_000_000.0]
    queue = PostgresJobQueue(pg_url, clock=lambda: clock[0])
    first = queue.enqueue(spec("6.1", tmp_path))
    second = queue.enqueue(spec("6.2", tmp_path))
    with psycopg.connect(pg_url) as other:  # a transaction of another claimer, mid-way on the first job
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        claimed = _within(5, lambda: queue.claim("w", 30))
        assert claimed is not None and claimed.id == second.id  # type: ignore[attr-defined]
        other.rollback()
    assert queue.claim("w", 30).id == first.id  # type: ignore[union-attr]
    clock[0] += 31  # both leases expired
    with psycopg.connect(pg_url) as other:  # a worker's heartbeat holds the first job right now
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        recovered = _within(5, lambda: queue.recover(expired_only=True))
        assert [j.id for j in recovered] == [second.id]  # type: ignore[attr-defined]
        other.rollback()
    (later,) = queue.recover(expired_only=True)  # the next round takes the other one
    assert later.id == first.id and later.reason == FailureReason.LEASE_EXPIRED.value


def test_now_is_the_database_servers_clock_unless_a_clock_is_given(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(pg_url) as conn:
        server_now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::double precision").fetchone()[0]  # type: ignore[index]
    monkeypatch.setattr(time, "time", lambda: 12_345.0)  # this machine's clock is far off
    job = PostgresJobQueue(pg_url).enqueue(spec("7.1", tmp_path))
    assert job.created_at == pytest.approx(server_now, abs=60)
    claimed = PostgresJobQueue(pg_url, clock=lambda: 2_000_000.0).claim("w", 60)
    assert claimed is not None and claimed.lease_until == pytest.approx(2_000_060.0)


def test_an_idle_worker_claims_a_new_job_at_once_not_at_its_next_poll(pg_url: str, tmp_path: Path) -> None:
    settings = settings_from_mapping({"database": {"url": pg_url}, "storage": {"data_dir": str(tmp_path / "d")}}, source="test")
    pool = RemoteWorkerPool(settings, tmp_path / "scratch", ["cpu"], poll_seconds=60)
    claimed: dict[int, float] = {}
    got = threading.Event()

    def run_job(job: Any, worker_id: str) -> None:
        claimed[job.id] = time.monotonic()
        pool.queue.complete(job.id, worker_id, {})
        got.set()

    pool.run_job = run_job  # type: ignore[method-assign]
    node = PostgresJobQueue(pg_url, profile_queues={"tumour": "gpu"})
    pool.start()
    try:
        time.sleep(1.5)  # the worker found nothing and sleeps for its 60 s poll
        assert not claimed
        node.enqueue(spec("8.0", tmp_path, profile="tumour"))  # no lane of this worker: stays asleep
        queued = time.monotonic()
        job = node.enqueue(spec("8.1", tmp_path))
        assert got.wait(10), "the idle worker did not wake on enqueue"
        assert list(claimed) == [job.id]
        print(f"claim {claimed[job.id] - queued:.3f} s after enqueue (poll interval 60 s)")
        assert claimed[job.id] - queued < 3
    finally:
        pool.stop(timeout=10)


def test_worker_refuses_jobs_of_another_version_or_model_checksum(pg_url: str, tmp_path: Path) -> None:
    settings = settings_from_mapping({"database": {"url": pg_url}, "storage": {"data_dir": str(tmp_path / "d")}}, source="test")
    pool = RemoteWorkerPool(settings, tmp_path / "scratch", ["cpu"])
    other_version = PostgresJobQueue(pg_url).enqueue(
        JobSpec(series_uid="3.1", input_path=tmp_path, pipeline_version="0.0-elsewhere")
    )
    other_models = PostgresJobQueue(pg_url, bundle_sha256="f" * 64).enqueue(spec("3.2", tmp_path))
    same = PostgresJobQueue(pg_url, bundle_sha256=pool.bundle_sha256).enqueue(spec("3.3", tmp_path))
    assert "pipeline version" in (pool.refusal(other_version) or "")
    assert "model checksum" in (pool.refusal(other_models) or "")
    assert pool.refusal(same) is None
    claimed = pool.queue.claim("w", 60)
    assert claimed is not None and claimed.id == other_version.id
    stored = pool.run_job(claimed, "w")
    assert stored is not None and stored.state is JobState.RETRYING
    assert stored.reason == VERSION_MISMATCH and "0.0-elsewhere" in (stored.error or "")


def test_heartbeat_while_the_database_is_down_keeps_the_job_and_then_reconnects(pg_cluster: PgCluster, pg_url: str, tmp_path: Path) -> None:
    queue = PostgresJobQueue(pg_url)
    job = queue.enqueue(spec("4.1", tmp_path))
    queue.claim("w", 60)
    queue.store._db.retry_seconds = 0.5  # the PostgresDB under the store: fail fast while the server is down
    pg_cluster.stop()
    try:
        assert queue.heartbeat(job.id, "w", 60) is True  # unreachable: the work goes on
    finally:
        pg_cluster.start()
    assert queue.heartbeat(job.id, "w", 60) is True  # a new connection after the restart
    assert queue.heartbeat(job.id, "someone-else", 60) is False
    assert queue.complete(job.id, "w", {}).state is JobState.DONE


def test_jobs_cli_reads_and_steers_the_shared_queue(pg_url: str, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    import yaml

    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "d")}, "database": {"url": pg_url}}))
    job = PostgresJobQueue(pg_url).enqueue(spec("5.1", tmp_path))

    def radnode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "radnode", "--config", str(config), "jobs", *args],
                              capture_output=True, text=True, timeout=120)

    listed = radnode("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [job.id]
    assert radnode("cancel", str(job.id)).returncode == 0
    assert PostgresJobQueue(pg_url).get(job.id).state is JobState.CANCELLED
