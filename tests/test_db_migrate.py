"""``radnode db migrate --to postgresql://…``: an SQLite node's queue moves into PostgreSQL intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pg_support import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)
from radnode.pipeline.jobs import FailureReason, JobKind, JobSpec, JobState, Phase, PhaseState, Priority
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.queue import SQLiteJobQueue


def _radnode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radnode", "--config", str(config), *args], capture_output=True, text=True, timeout=120)


def test_migrate_copies_every_job_and_attempt_and_refuses_a_second_time(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    sqlite = SQLiteJobQueue.in_data_dir(data)
    spec = dict(input_path=tmp_path, pipeline_version="1")
    done = sqlite.enqueue(JobSpec(series_uid="1.1", destinations=("pacs",), instance_count=60, **spec))  # type: ignore[arg-type]
    sqlite.claim("old", 60)
    sqlite.set_phase(done.id, Phase.CONTOURS, PhaseState.DONE, 2)
    sqlite.complete(done.id, "old", {"outputs": {"SEG": "SEG.dcm"}})
    failed = sqlite.enqueue(JobSpec(series_uid="1.2", max_attempts=1, profile="tumour", **spec))  # type: ignore[arg-type]
    sqlite.claim("old", 60)
    sqlite.fail(failed.id, "old", FailureReason.CHAIN_ERROR, "boom")
    waiting = sqlite.enqueue(JobSpec(series_uid="1.3", priority=Priority.SWEEP, **spec))  # type: ignore[arg-type]
    forward = sqlite.enqueue(JobSpec(series_uid="1.4", kind=JobKind.FORWARD, **spec))  # type: ignore[arg-type]
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}, "database": {"profile_queues": {"tumour": "gpu"}}}))

    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 0, out.stderr
    assert "migrated 4 job(s) and 2 attempt(s)" in out.stdout

    pg = PostgresJobQueue(pg_url)
    for job in (done, failed, waiting, forward):
        assert pg.get(job.id).to_dict() == sqlite.get(job.id).to_dict()
        assert pg.attempts(job.id) == sqlite.attempts(job.id)
    assert pg.lane(failed.id)[0] == "gpu" and pg.lane(waiting.id)[0] == "cpu" and pg.lane(forward.id)[0] == "node"
    assert pg.counts() == sqlite.counts()
    newer = pg.enqueue(JobSpec(series_uid="1.5", **spec))  # type: ignore[arg-type]
    assert newer.id == forward.id + 1  # ids continue after the migrated ones
    claimed = pg.claim("w", 60)
    assert claimed is not None and claimed.id in (waiting.id, newer.id)

    again = _radnode(config, "db", "migrate", "--to", pg_url)
    assert again.returncode == 1 and "already holds jobs" in again.stderr + again.stdout


def test_migrate_refuses_without_a_queue_or_with_a_non_postgres_url(pg_url: str, tmp_path: Path) -> None:
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "empty")}}))
    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "nothing to migrate" in out.stderr + out.stdout
    out = _radnode(config, "db", "migrate", "--to", "sqlite:///x.db")
    assert out.returncode == 2 and "postgresql://" in out.stderr + out.stdout


def test_migrate_refuses_while_the_node_runs(pg_url: str, tmp_path: Path) -> None:
    from radnode.service.roles import PIPELINE_ROLES, RoleLocks

    data = tmp_path / "data"
    SQLiteJobQueue.in_data_dir(data).enqueue(JobSpec(series_uid="1.1", input_path=tmp_path, pipeline_version="1"))
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    locks = RoleLocks(data)
    locks.acquire(PIPELINE_ROLES)  # what a running node holds
    try:
        out = _radnode(config, "db", "migrate", "--to", pg_url)
    finally:
        locks.release()
    assert out.returncode == 1 and "stop it first" in out.stderr + out.stdout
    assert PostgresJobQueue(pg_url).counts()[JobState.QUEUED] == 0
