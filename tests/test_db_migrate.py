"""``radnode db migrate --to postgresql://…``: an SQLite node's queue, series index and audit
trail move into PostgreSQL intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pg_support import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)
from radnode.node.audit import AuditLog, read_audit, read_audit_db
from radnode.node.index import InstanceRecord, NodeIndex, SeriesState
from radnode.node.storage import AUDIT_FILE, INDEX_FILE
from radnode.pipeline.jobs import FailureReason, JobKind, JobSpec, JobState, Phase, PhaseState, Priority
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.queue import SQLiteJobQueue


def _radnode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radnode", "--config", str(config), *args], capture_output=True, text=True, timeout=120)


def _record(series: str, sop: str, at: float, version: int = 1) -> InstanceRecord:
    return InstanceRecord(sop, version, series, "1.9", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2", "CT", "CT1", "127.0.0.1", f"x/{sop}_{version}.dcm", 10, at)


def _index_and_audit(data: Path) -> None:
    """A node's index with series in every state, a version, a failed announcement; and its audit file."""
    index = NodeIndex(data / INDEX_FILE)
    for series, count, at in (("1.1", 3, 100.0), ("1.2", 2, 100.0), ("1.3", 1, 500.0)):
        for i in range(count):
            index.add_instance(_record(series, f"{series}.{i}", at + i), {"Modality": "CT"}, None)
    index.add_instance(_record("1.1", "1.1.0", 103.0, version=2), {}, None)
    index.complete_due(200.0, 10, 100)  # 1.1 and 1.2 complete, 1.3 still receiving
    index.mark_processed("1.2", 210.0)
    index.record_completion_failure("1.1", "queue", 1, 220.0, "down", lambda n: 5.0)
    index.close()
    audit = AuditLog(data / AUDIT_FILE)
    audit.record("instance-stored", sop_instance_uid="1.1.0", size=10)
    audit.record("series-complete", series_instance_uid="1.1", round=1)
    audit.close()


def test_migrate_copies_every_job_and_attempt_and_refuses_a_second_time(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _index_and_audit(data)
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
    assert "migrated 3 series, 7 instance row(s), 1 completion failure(s) and 2 audit record(s)" in out.stdout

    before, after = NodeIndex(data / INDEX_FILE), NodeIndex(tmp_path / "unused.sqlite", database_url=pg_url)
    for state in SeriesState:
        assert after.series_in_state(state) == before.series_in_state(state)
    assert [s.state for s in after.series_in_state(*SeriesState)] == [SeriesState.PROCESSED, SeriesState.COMPLETE, SeriesState.RECEIVING]
    for series in ("1.1", "1.2", "1.3"):
        assert after.series_instances(series) == before.series_instances(series)
    assert after.completion_failures() == before.completion_failures()
    assert read_audit_db(pg_url) == read_audit(data / AUDIT_FILE)
    # the migrated index carries on: 1.3 completes on the PostgreSQL side
    assert [s.series_instance_uid for s, _ in after.complete_due(1000.0, 10, 100)] == ["1.3"]

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
    assert again.returncode == 1 and "already holds a series index" in again.stderr + again.stdout


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


def test_migrate_refuses_a_target_that_holds_an_index_before_copying_anything(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _index_and_audit(data)
    SQLiteJobQueue.in_data_dir(data).enqueue(JobSpec(series_uid="1.1", input_path=tmp_path, pipeline_version="1"))
    NodeIndex(tmp_path / "unused.sqlite", database_url=pg_url).add_instance(_record("9.1", "9.1.1", 1.0), {}, None)
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "already holds a series index" in out.stderr + out.stdout
    assert PostgresJobQueue(pg_url).counts()[JobState.QUEUED] == 0
    assert read_audit_db(pg_url) == []
