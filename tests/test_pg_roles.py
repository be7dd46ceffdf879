"""Least privilege on PostgreSQL: ``radnode db init`` as the owner; the node's role cannot drop
or create tables; the worker's role can claim, finish and hand back, but not enqueue or delete,
and cannot read or write the outbox."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from pg_support import PgCluster, pg_cluster  # noqa: F401  (session fixture)
from pipeline_support import first_header, write_result_objects
from radnode.config import Settings
from radnode.node.audit import AuditLog, read_audit_db
from radnode.node.index import InstanceRecord, NodeIndex
from radnode.pipeline.jobs import JobSpec, current_pipeline_version
from radnode.pipeline.outbox import AttemptOutcome, ItemState, Outbox
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.pg_shared import SharedState


def test_node_and_worker_roles_get_least_privilege(pg_cluster: PgCluster, tmp_path: Path, shared_data: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    owner, node_role, worker_role, db = (f"{n}_{suffix}" for n in ("radnode_owner", "radnode_node", "radnode_worker", "radnode"))
    with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
        for role in (owner, node_role, worker_role):
            admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{owner}"')
    out = subprocess.run(
        [sys.executable, "-m", "radnode", "db", "init", "--url", pg_cluster.url(db, owner),
         "--node-role", node_role, "--worker-role", worker_role],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout

    node_url, worker_url = pg_cluster.url(db, node_role), pg_cluster.url(db, worker_role)
    node = PostgresJobQueue(node_url)
    job = node.enqueue(JobSpec(series_uid="1.2", input_path=tmp_path, pipeline_version=current_pipeline_version()))
    SharedState(node_url).register_node("RADNODE", "RADNODE", "127.0.0.1", 11112, "1", None)
    (tmp_path / "results").mkdir()
    seg = write_result_objects(first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image"), tmp_path / "results", ["SEG"])
    outbox = Outbox(tmp_path / "data", database_url=node_url)
    (item,) = outbox.stage(seg, Settings(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 1}]).destinations)
    outbox.record_destination("pacs", reachable=True)
    assert outbox.record(item, AttemptOutcome.SUCCESS, status=0).state is ItemState.SENT
    with psycopg.connect(node_url, autocommit=True) as conn:
        for statement in (
            "DROP TABLE jobs", "ALTER TABLE jobs ADD COLUMN x int", "CREATE TABLE evil (v int)", "TRUNCATE jobs",
            "DROP TABLE outbox_items",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)

    # The series index and the audit trail: the node writes both; the audit only grows.
    index = NodeIndex(tmp_path / "unused.sqlite", database_url=node_url)
    index.add_instance(InstanceRecord("1.2.1", 1, "1.2", "1.9", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2", "CT", "CT1", "127.0.0.1", "x.dcm", 1, 1.0), {}, None)
    assert [s.series_instance_uid for s, _ in index.complete_due(100.0, 10, 100)] == ["1.2"]
    audit = AuditLog(tmp_path / "audit.jsonl", node_url)
    audit.record("instance-stored", sop_instance_uid="1.2.1")
    assert audit.flush(30)
    audit.close()
    assert [r["event"] for r in read_audit_db(node_url)] == ["instance-stored"]
    with psycopg.connect(node_url, autocommit=True) as conn:
        for statement in ("UPDATE audit_events SET event = 'x'", "DELETE FROM audit_events", "DROP TABLE index_series"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)

    worker = PostgresJobQueue(worker_url, queues=["cpu"])
    shared = SharedState(worker_url)
    claimed = worker.claim("w1", 60)
    assert claimed is not None and claimed.id == job.id
    assert worker.heartbeat(job.id, "w1", 60)
    shared.worker_beat("w1", "host", ["cpu"], "cpu", "1", None, job.id)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "SEG.dcm").write_bytes(b"x")
    shared.hand_back(job.id, "contours", "w1", tmp_path / "out", [tmp_path / "out" / "SEG.dcm"])
    assert shared.node() is not None
    assert worker.complete(job.id, "w1", {}).state.value == "done"
    with psycopg.connect(worker_url, autocommit=True) as conn:
        for statement in (
            "INSERT INTO jobs (series_uid) VALUES ('x')", "DELETE FROM jobs", "UPDATE radnode_nodes SET port = 1",
            "DROP TABLE radnode_results", "SELECT * FROM outbox_items", "UPDATE outbox_destinations SET state = 'up'",
            "DROP TABLE radnode_results", "SELECT * FROM index_series", "SELECT * FROM audit_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert len(SharedState(node_url).pending_results()) == 1
