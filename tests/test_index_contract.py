"""The series index and the audit trail behave the same on SQLite and on PostgreSQL.

Every test taking ``open_index`` / ``index_url`` runs once per backend (tests/index_support.py).
The PostgreSQL-only tests stop the session cluster to show that an unreachable database
costs a C-STORE a transient failure status, never the listener, and that nothing of the
audit trail is lost while it is away.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from index_support import index_url, open_index  # noqa: F401  (fixtures)
from node_support import IBSI_SLICES, dataset_bytes
from pg_support import PgCluster, pg_cluster  # noqa: F401  (session fixture)
from radnode.config.model import SeriesSettings
from radnode.node import status
from radnode.node.audit import AuditLog, read_audit, read_audit_db
from radnode.node.completion import SeriesCompletion
from radnode.node.index import POSTGRES_TABLES, InstanceRecord, NodeIndex, SeriesState
from radnode.node.ingest import Ingestor, StoreRequest
from radnode.node.storage import InstanceStore

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
OpenIndex = Callable[..., NodeIndex]


def _record(series: str, sop: str, at: float, sop_class: str = CT_IMAGE_STORAGE, version: int = 1) -> InstanceRecord:
    return InstanceRecord(
        sop, version, series, "1.9", sop_class, "1.2.840.10008.1.2", "CT", "CT1", "127.0.0.1",
        f"x/{sop}_v{version}.dcm", 10, at,
    )


# --- instances ----------------------------------------------------------------------------------


def test_versions_paths_counts_and_study_lookups(open_index: OpenIndex) -> None:
    index = open_index()
    first = index.add_instance(_record("1.1", "1.1.1", 100.0), {"SeriesDescription": "head"}, None)
    assert (first.new_series, first.state, first.instance_count) == (True, SeriesState.RECEIVING, 1)
    again = index.add_instance(_record("1.1", "1.1.1", 101.0, version=2), {}, None)
    assert (again.new_series, again.instance_count) == (False, 1)  # a new version is not a new instance
    index.add_instance(_record("1.1", "1.1.2", 102.0), {}, None)
    index.add_instance(_record("2.1", "2.1.1", 103.0, sop_class=RTSTRUCT), {}, None)
    index.add_instance(_record("2.1", "2.1.1", 104.0, sop_class=RTSTRUCT, version=2), {}, None)

    assert [v.version for v in index.instance_versions("1.1.1")] == [1, 2]
    assert index.instance_versions("9.9") == []
    assert [(r.sop_instance_uid, r.version) for r in index.series_instances("1.1")] == [("1.1.1", 1), ("1.1.1", 2), ("1.1.2", 1)]
    assert index.instance_paths("1.1") == {"x/1.1.1_v1.dcm", "x/1.1.1_v2.dcm", "x/1.1.2_v1.dcm"}
    assert index.file_counts_by_series() == {"1.1": 3, "2.1": 2}
    (rt,) = index.study_instances("1.9", RTSTRUCT)
    assert (rt.sop_instance_uid, rt.version) == ("2.1.1", 2)
    series = index.series("1.1")
    assert series is not None and series.attributes == {"SeriesDescription": "head"} and series.instance_count == 2
    assert index.series("9.9") is None
    index.close()


def test_a_duplicate_row_is_refused_and_rolls_back(open_index: OpenIndex) -> None:
    from radnode.sqlstore import is_integrity_error

    index = open_index()
    index.add_instance(_record("1.1", "1.1.1", 100.0), {}, None)
    with pytest.raises(Exception) as raised:
        index.add_instance(_record("1.1", "1.1.1", 101.0), {}, None)
    assert is_integrity_error(raised.value)
    assert index.series("1.1").instance_count == 1  # the failed transaction left nothing behind
    index.add_instance(_record("1.1", "1.1.2", 102.0), {}, None)  # and the index goes on
    assert index.series("1.1").instance_count == 2


# --- series completion --------------------------------------------------------------------------


def test_completion_quiet_force_expected_update_and_restart(open_index: OpenIndex) -> None:
    index = open_index()
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=10, force_seconds=100))
    seen = []
    completion.subscribe(seen.append)

    # quiet: 3 instances, then silence
    for i in range(3):
        index.add_instance(_record("1.1", f"1.1.{i}", 1000.0 + i), {}, None)
    assert completion.check_due(1011.9) == []
    (event,) = completion.check_due(1012.0)
    assert (event.reason, event.instance_count, event.round) == ("quiet", 3, 1)
    assert index.series("1.1").state is SeriesState.COMPLETE

    # force: an instance every 5 s never leaves 10 s of quiet
    for i in range(21):
        index.add_instance(_record("2.1", f"2.1.{i}", 2000.0 + 5 * i), {}, None)
        events = completion.check_due(2000.0 + 5 * i + 4.9)
        if i < 20:
            assert events == []
    (event,) = events
    assert (event.series_instance_uid, event.reason, event.instance_count) == ("2.1", "force", 21)
    assert index.series("2.1").state is SeriesState.COMPLETE
    assert seen[-1] == event

    # expected count: complete as soon as the 4th of 4 arrives
    for i in range(4):
        change = index.add_instance(_record("3.1", f"3.1.{i}", 3000.0 + i), {}, 4)
        assert change.expected_reached == (i == 3)
    (event,) = completion.check_due(3003.0)
    assert (event.reason, event.expected_count) == ("expected-count", 4)

    # update: a new instance for a complete series opens round 2
    change = index.add_instance(_record("1.1", "1.1.9", 5000.0), {}, None)
    assert (change.state, change.round) == (SeriesState.UPDATED, 2)
    assert completion.mark_processed("1.1") is False  # not complete now
    index.close()

    # restart: a fresh index object on the same store resumes the timers
    index = open_index()
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=10, force_seconds=100))
    (event,) = completion.check_due(5010.0)
    assert (event.series_instance_uid, event.round, event.instance_count, event.is_update) == ("1.1", 2, 4, True)
    assert completion.mark_processed("1.1") is True
    assert index.series("1.1").state is SeriesState.PROCESSED
    assert [e.series_instance_uid for e in completion.pending()] == ["2.1", "3.1"]
    assert [s.series_instance_uid for s in index.series_in_state(SeriesState.PROCESSED, SeriesState.COMPLETE)] == ["2.1", "3.1", "1.1"]


def test_update_ignored_when_configured(open_index: OpenIndex) -> None:
    index = open_index()
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=1, force_seconds=10))
    index.add_instance(_record("1.1", "1.1.1", 100.0), {}, None)
    completion.check_due(200.0)
    change = index.add_instance(_record("1.1", "1.1.2", 300.0), {}, None, on_update="ignore")
    assert change.update_ignored and change.state is SeriesState.COMPLETE
    assert completion.check_due(400.0) == []
    assert index.series("1.1").instance_count == 2


def test_subscriber_failure_does_not_stop_others(open_index: OpenIndex) -> None:
    index = open_index()
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=1, force_seconds=10))
    got = []

    def broken(event: object) -> None:
        raise RuntimeError("pipeline down")

    completion.subscribe(broken)
    completion.subscribe(got.append)
    index.add_instance(_record("1.1", "1.1.1", 100.0), {}, None)
    assert len(completion.check_due(102.0)) == 1 and len(got) == 1


def test_completion_failures_count_per_round_and_clear(open_index: OpenIndex) -> None:
    index = open_index()
    delay = lambda attempts: 10.0 * attempts  # noqa: E731
    one = index.record_completion_failure("1.1", "queue", 1, 100.0, "down", delay)
    two = index.record_completion_failure("1.1", "queue", 1, 110.0, "still down", delay)
    assert (one.attempts, two.attempts, two.first_failed_at, two.next_attempt_at) == (1, 2, 100.0, 130.0)
    index.record_completion_failure("2.1", "queue", 1, 120.0, "down", delay)
    assert [f.series_instance_uid for f in index.completion_failures()] == ["1.1", "2.1"]
    assert [f.series_instance_uid for f in index.completion_failures(due_at=129.0)] == []
    assert [f.series_instance_uid for f in index.completion_failures(due_at=130.0)] == ["1.1", "2.1"]
    fresh = index.record_completion_failure("1.1", "queue", 2, 200.0, "round two", delay)  # a new round starts over
    assert (fresh.attempts, fresh.first_failed_at, fresh.round) == (1, 200.0, 2)
    (stored,) = [f for f in index.completion_failures() if f.series_instance_uid == "1.1"]
    assert stored == fresh
    index.clear_completion_failure("1.1", "queue")
    assert [f.series_instance_uid for f in index.completion_failures()] == ["2.1"]


def test_completion_by_several_processes_completes_each_series_once(open_index: OpenIndex) -> None:
    """Completion processes on one index (``serve --roles``) race: each series is completed by one."""
    setup = open_index()
    for s in range(40):
        for i in range(3):
            setup.add_instance(_record(f"5.{s}", f"5.{s}.{i}", 1000.0 + i), {}, None)
    indexes = [open_index() for _ in range(4)]
    start = threading.Barrier(len(indexes))
    done: list[list[str]] = [[] for _ in indexes]

    def complete(k: int) -> None:
        start.wait()
        for tick in range(5):
            done[k] += [s.series_instance_uid for s, _ in indexes[k].complete_due(2000.0 + tick, 10, 100)]

    threads = [threading.Thread(target=complete, args=(k,)) for k in range(len(indexes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(uid for part in done for uid in part)
    assert sorted(counts) == sorted(f"5.{s}" for s in range(40))
    assert set(counts.values()) == {1}
    assert all(setup.series(f"5.{s}").state is SeriesState.COMPLETE for s in range(40))


# --- audit --------------------------------------------------------------------------------------


def test_audit_records_reach_the_file_and_the_database(index_url: str | None, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", index_url)
    audit.record("instance-stored", sop_instance_uid="1.2.3", calling_ae="CT1", size=10)
    audit.record("series-complete", series_instance_uid="1.2", round=1)
    with pytest.raises(ValueError, match="patient_name"):
        audit.record("instance-stored", patient_name="DOE^JANE")
    if index_url is not None:
        assert audit.flush(30)
    audit.close()
    in_file = read_audit(tmp_path / "audit.jsonl")
    assert [r["event"] for r in in_file] == ["instance-stored", "series-complete"]
    if index_url is not None:
        assert read_audit_db(index_url) == in_file


# --- PostgreSQL away ----------------------------------------------------------------------------


def _ingestor(data: Path, url: str, retry_seconds: float) -> Ingestor:
    store = InstanceStore(data, min_free_gb=0)
    index = NodeIndex(data / "radnode.sqlite", database_url=url, retry_seconds=retry_seconds)
    return Ingestor(store, index, AuditLog(data / "audit.jsonl", url, retry_seconds=0.5))


def _request(path: Path) -> StoreRequest:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return StoreRequest(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), "CT1", "127.0.0.1", (dataset_bytes(path),))


def test_a_restart_of_postgresql_is_ridden_out(pg_cluster: PgCluster, shared_data: Path, tmp_path: Path) -> None:
    url = pg_cluster.create_database("i")
    files = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:3]
    ingestor = _ingestor(tmp_path / "data", url, retry_seconds=30)
    assert ingestor.ingest(_request(files[0])).status == status.SUCCESS
    pg_cluster.restart()  # every kept connection is now broken
    assert ingestor.ingest(_request(files[1])).status == status.SUCCESS
    assert ingestor.index.file_counts_by_series() == {ingestor.index.instance_versions(_request(files[0]).sop_instance_uid)[0].series_instance_uid: 2}
    assert ingestor.audit.flush(30)
    assert [r["event"] for r in read_audit_db(url)] == ["instance-stored", "instance-stored"]


def test_postgresql_down_fails_the_c_store_softly_and_keeps_the_audit(
    pg_cluster: PgCluster, shared_data: Path, tmp_path: Path
) -> None:
    url = pg_cluster.create_database("i")
    data = tmp_path / "data"
    files = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:3]
    ingestor = _ingestor(data, url, retry_seconds=1)
    assert ingestor.ingest(_request(files[0])).status == status.SUCCESS
    pg_cluster.stop()
    try:
        started = time.monotonic()
        outcome = ingestor.ingest(_request(files[1]))  # never raises
        assert (outcome.status, outcome.reason) == (status.OUT_OF_RESOURCES, "index-unavailable")
        assert time.monotonic() - started < 15
        assert len(list((data / "incoming").rglob("*.dcm"))) == 1  # not acknowledged, not kept
        started = time.monotonic()
        ingestor.audit.record("association-accepted", calling_ae="CT1")  # the C-STORE side never waits
        assert time.monotonic() - started < 0.5
        with pytest.raises(psycopg.OperationalError):
            ingestor.index.series_in_state(SeriesState.RECEIVING)
    finally:
        pg_cluster.start()
    assert ingestor.ingest(_request(files[1])).status == status.SUCCESS  # the sender's retry
    assert ingestor.audit.flush(30)
    in_db = [r["event"] for r in read_audit_db(url)]
    assert in_db == [r["event"] for r in read_audit(data / "audit.jsonl")]
    assert in_db == ["instance-stored", "instance-rejected", "association-accepted", "instance-stored"]


def test_postgresql_tables_are_prefixed(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database("i")
    NodeIndex(Path("/nonexistent/index.sqlite"), database_url=url).close()
    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {POSTGRES_TABLES[n] for n in ("meta", "instances", "series", "completion_failures")}
