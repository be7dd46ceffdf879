"""``radnode db migrate --to postgresql://…``: an SQLite node's queue, outbox, series index
and audit trail move into PostgreSQL intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pg_support import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)
from pipeline_support import first_header, write_result_objects
from radnode.config import Settings
from radnode.node.audit import AuditLog, read_audit, read_audit_db
from radnode.node.index import InstanceRecord, NodeIndex, SeriesState
from radnode.node.storage import AUDIT_FILE, INDEX_FILE
from radnode.pipeline.jobs import FailureReason, JobKind, JobSpec, JobState, Phase, PhaseState, Priority
from radnode.pipeline.outbox import AttemptOutcome, ItemState, Outbox, ReviewDecision
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.queue import SQLiteJobQueue


def _radnode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radnode", "--config", str(config), *args], capture_output=True, text=True, timeout=120)


def _outbox_with_history(data: Path, shared_data: Path, job_id: int) -> Outbox:
    """An SQLite outbox with a sent, a failed, a pending and a rejected item, attempts and health."""
    header = first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")
    (data.parent / "results").mkdir(parents=True, exist_ok=True)
    files = write_result_objects(header, data.parent / "results", ["SEG", "RTSTRUCT", "SR"])
    destinations = Settings(destinations=[
        {"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 104} for n in ("pacs", "tps")
    ]).destinations
    outbox = Outbox(data, max_attempts=1)
    seg, rtstruct, sr = (outbox.stage([f], destinations[:1], job_id=job_id)[0] for f in files)
    outbox.record(seg, AttemptOutcome.SUCCESS, status=0)
    outbox.record(rtstruct, AttemptOutcome.REFUSED, status=0xA700, error="out of resources")
    outbox.record_destination("pacs", reachable=False, error="connection refused")
    outbox.stage(files[:1], destinations[1:], job_id=job_id, hold=True)
    outbox.decide(ReviewDecision(job_id=job_id, decision="rejected", reviewer="dr.ada", decided_at=1.0, comment="no"))
    assert {i.state for i in outbox.items()} == {ItemState.SENT, ItemState.FAILED, ItemState.PENDING, ItemState.REJECTED}
    assert sr.state is ItemState.PENDING
    return outbox


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


def test_migrate_copies_every_job_and_attempt_and_refuses_a_second_time(pg_url: str, tmp_path: Path, shared_data: Path) -> None:
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
    outbox = _outbox_with_history(data, shared_data, done.id)
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}, "database": {"profile_queues": {"tumour": "gpu"}}}))

    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 0, out.stderr
    assert "migrated 4 job(s), 2 attempt(s) and 4 outbox item(s)" in out.stdout
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

    shared = Outbox(data, database_url=pg_url)
    assert shared.items() == outbox.items() and shared.health() == outbox.health()
    assert shared.reviews() == outbox.reviews()
    assert [shared.attempts(i.id) for i in outbox.items()] == [outbox.attempts(i.id) for i in outbox.items()]
    assert all(i.path.is_file() for i in shared.items())  # the files stay in the node's data folder
    (tmp_path / "v2").mkdir()
    seg = write_result_objects(first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image"), tmp_path / "v2", ["SEG"], version="2")
    (added,) = shared.stage(seg, Settings(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 1}]).destinations)
    assert added.id == max(i.id for i in outbox.items()) + 1  # item ids continue after the migrated ones

    again = _radnode(config, "db", "migrate", "--to", pg_url)
    assert again.returncode == 1 and "already holds a series index" in again.stderr + again.stdout


def test_migrate_refuses_without_a_queue_or_with_a_non_postgres_url(pg_url: str, tmp_path: Path) -> None:
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "empty")}}))
    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "nothing to migrate" in out.stderr + out.stdout
    out = _radnode(config, "db", "migrate", "--to", "sqlite:///x.db")
    assert out.returncode == 2 and "postgresql://" in out.stderr + out.stdout


def test_migrate_refuses_a_target_whose_outbox_holds_rows_before_copying_any_job(
    pg_url: str, tmp_path: Path, shared_data: Path
) -> None:
    data = tmp_path / "data"
    SQLiteJobQueue.in_data_dir(data).enqueue(JobSpec(series_uid="1.1", input_path=tmp_path, pipeline_version="1"))
    other = _outbox_with_history(tmp_path / "other", shared_data, 1)
    Outbox(tmp_path / "other", database_url=pg_url).copy_from(other)  # another node's outbox is there already
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    out = _radnode(config, "db", "migrate", "--to", pg_url)
    assert out.returncode == 1 and "outbox rows" in out.stderr + out.stdout
    assert PostgresJobQueue(pg_url).counts()[JobState.QUEUED] == 0


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
