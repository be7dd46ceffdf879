"""End to end on PostgreSQL: one node process, two ``radnode worker`` processes, Orthanc as PACS.

The node runs no local worker (``pipeline.workers: 0``); each worker has its own scratch
folder and no access to the node's data folder: it fetches its series with C-GET from the
node (whose AE allow-list names it), runs a fast test chain, and hands the results back
through the database; the node's outbox delivers them to Orthanc. Checked: every series
processed once, every result object delivered once; a worker killed with ``kill -9`` in the
middle of a job (its job runs again on the other worker, nothing delivered twice); a
PostgreSQL restart under load (node and workers carry on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node_support import IBSI_SLICES, storescu
from pg_support import PgCluster, pg_cluster  # noqa: F401  (session fixture)
from pipeline_support import ENV_PHASE_GAP, SERVE_ENTRY, chain_ref, copy_ct_series, wait_for
from radnode.pipeline.jobs import JobState
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.pg_shared import SharedState
from radnode.testing.orthanc import OrthancServer, free_port

WORKER_ENTRY = Path(__file__).resolve().parent / "worker_entry.py"
LEASE_SECONDS = 5.0


@dataclass
class Cluster:
    orthanc: OrthancServer
    node: subprocess.Popen[bytes]
    node_port: int
    workers: list[subprocess.Popen[bytes]]
    url: str
    data_dir: Path
    tmp: Path

    def queue(self) -> PostgresJobQueue:
        return PostgresJobQueue(self.url)

    def outbox(self) -> Outbox:
        """The node's outbox: rows in the shared database, files in the node's data folder."""
        return Outbox(self.data_dir, database_url=self.url)

    def start_node(self) -> None:
        log = (self.tmp / "node.log").open("ab")
        self.node = subprocess.Popen(
            [sys.executable, str(SERVE_ENTRY), "--config", str(self.tmp / "node.yaml"), "--chain", chain_ref("results_chain")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.node.poll() is not None or _answers_echo(self.node_port), 60, 0.2, "the node to answer C-ECHO")
        assert self.node.poll() is None, (self.tmp / "node.log").read_text()[-3000:]


def _answers_echo(port: int) -> bool:
    ae = AE(ae_title="E2E")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().get("Status") == 0x0000
    assoc.release()
    return ok


def _start_worker(tmp: Path, config: Path, index: int, phase_gap: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **{ENV_PHASE_GAP: str(phase_gap)})
    log = (tmp / f"worker{index}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, str(WORKER_ENTRY), "--config", str(config), "--scratch", str(tmp / f"scratch{index}"),
         "--queues", "cpu", "--chain", chain_ref("results_chain")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(30)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Cluster]:
    phase_gap = float(getattr(request, "param", 1.0))
    url = pg_cluster.create_database("e2e")
    node_port, pacs_port = free_port(), free_port()
    orthanc = OrthancServer(aet="PACS", workdir=tmp_path / "orthanc", modalities={}, extra_config={"DicomPort": pacs_port})
    data_dir = tmp_path / "node-data"
    node_config = {
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": node_port, "strict": True,
                 "allowed_calling_aes": ["STORESCU", "RADWORKER", "E2E"]},
        "storage": {"data_dir": str(data_dir), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
        "routing": [{"name": "ct", "match": {"modality": ["CT"]}, "action": "process"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "pipeline": {"workers": 0, "job_timeout_seconds": 120, "max_attempts": 3},
        "database": {"url": url, "lease_seconds": LEASE_SECONDS},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node_config))
    worker_config = {  # nothing of the node's: its own (unused) data folder, only the database URL
        "storage": {"data_dir": str(tmp_path / "worker-data")},
        "database": {"url": url, "lease_seconds": LEASE_SECONDS},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
    }
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(worker_config))
    orthanc.start()
    cluster = Cluster(orthanc, None, node_port, [], url, data_dir, tmp_path)  # type: ignore[arg-type]
    try:
        cluster.start_node()
        cluster.workers = [_start_worker(tmp_path, tmp_path / "worker.yaml", i, phase_gap) for i in (1, 2)]
        wait_for(lambda: len(SharedState(url).workers()) >= 2, 60, 0.2, "both workers to register")
        yield cluster
    finally:
        for process in [*cluster.workers, cluster.node]:
            if process is not None:
                _stop(process)
        orthanc.stop()


def send_series(cluster: Cluster, shared_data: Path, count: int) -> tuple[str, list[str]]:
    """Make ``count`` CT series (10 slices each) and C-STORE them to the node; (study, series UIDs)."""
    study = ""
    uids = []
    for n in range(count):
        folder = cluster.tmp / "series" / str(n)
        study, series = copy_ct_series(shared_data / IBSI_SLICES, folder, key=f"scale-{n}", count=10)
        sent = storescu(cluster.node_port, folder)
        assert sent.returncode == 0, sent.stderr
        uids.append(series)
    return study, uids


def result_counts(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series in orthanc.study_series(study_uid):
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def all_done(cluster: Cluster, count: int) -> bool:
    jobs = cluster.queue().list(limit=100)
    return len(jobs) == count and all(j.state is JobState.DONE for j in jobs)


def assert_delivered_once(cluster: Cluster, study: str, count: int) -> None:
    expected = {"SEG": count, "RTSTRUCT": count, "SR": count}
    wait_for(lambda: result_counts(cluster.orthanc, study) == expected, 60, 0.3, f"{expected} in Orthanc")
    items = cluster.outbox().items()
    assert len(items) == 3 * count and {i.state for i in items} == {ItemState.SENT}
    # one success per (object, destination): nothing was sent twice
    assert [i.attempts for i in items] == [1] * len(items)
    assert not (cluster.data_dir / "outbox.sqlite").exists() and all(i.path.parent == cluster.data_dir / "outbox" for i in items)
    time.sleep(1.0)  # nothing more arrives later
    assert result_counts(cluster.orthanc, study) == expected


def test_six_series_processed_once_each_by_two_workers(cluster: Cluster, shared_data: Path) -> None:
    study, _ = send_series(cluster, shared_data, 6)
    wait_for(lambda: all_done(cluster, 6), 180, 0.5, "six jobs done")
    queue = cluster.queue()
    jobs = queue.list(limit=100)
    histories = [queue.attempts(j.id) for j in jobs]
    assert all(len(h) == 1 and h[0]["outcome"] == "done" for h in histories), histories
    processes = {h[0]["worker_id"].split("/")[0] for h in histories}
    assert len(processes) == 2, f"both workers should have worked: {processes}"
    assert_delivered_once(cluster, study, 6)
    # `radnode status` on the node: both workers with host, queues, device, heartbeat; queues empty
    out = subprocess.run(
        [sys.executable, "-m", "radnode", "--config", str(cluster.tmp / "node.yaml"), "status", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    snapshot = json.loads(out.stdout)
    section = snapshot["scaleout"]
    assert {w["worker_id"].split("/")[0] for w in section["workers"]} == processes
    assert all(w["queues"] == "cpu" and w["device"] in ("cpu", "cuda") and not w["lost"] for w in section["workers"])
    assert all(w["host"] == os.uname().nodename for w in section["workers"])
    assert section["queue_depths"] == {} and section["results_waiting_for_node"] == 0
    assert section["node"] == {"ae_title": "RADNODE", "host": "127.0.0.1", "port": cluster.node_port}
    assert snapshot["jobs"]["counts"]["done"] == 6
    (pacs,) = snapshot["destinations"]  # delivery state read from the shared outbox tables
    assert (pacs["state"], pacs["sent"], pacs["pending"]) == ("up", 18, 0)
    # the dashboard reads the same shared queue
    from radnode.config import load_settings
    from radnode.web.data import job_detail, list_jobs

    settings = load_settings(cluster.tmp / "node.yaml")
    assert len(list_jobs(settings)["jobs"]) == 6
    deliveries = job_detail(settings, jobs[0].id)["deliveries"]  # and the same shared outbox
    assert sorted(d["object"] for d in deliveries) == ["RTSTRUCT", "SEG", "SR"] and {d["state"] for d in deliveries} == {"sent"}


@pytest.mark.parametrize("cluster", [6.0], indirect=True)
def test_kill_9_of_a_worker_mid_job_reruns_it_on_the_other_once(cluster: Cluster, shared_data: Path) -> None:
    study, _ = send_series(cluster, shared_data, 2)
    shared = SharedState(cluster.url)

    def victim() -> Any:
        # a running job whose first phase is already handed back: the kill lands in phase two
        with shared._db.connect() as conn:
            return conn.execute(
                "SELECT j.id, j.worker_id FROM jobs j JOIN radnode_results r ON r.job_id = j.id "
                "WHERE j.state = 'running' AND r.phase = 'contours' LIMIT 1"
            ).fetchone()

    row = wait_for(victim, 60, 0.2, "a job in its second phase")
    pid = int(row["worker_id"].split(":")[1].split("/")[0])
    (killed,) = [w for w in cluster.workers if w.pid == pid]
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    wait_for(lambda: all_done(cluster, 2), 120, 0.5, "both jobs done after the kill")
    history = cluster.queue().attempts(row["id"])
    assert [a["outcome"] for a in history] == ["queued", "done"], history
    assert history[0]["reason"] == "lease_expired"
    assert history[1]["worker_id"].split("/")[0] != row["worker_id"].split("/")[0]
    assert_delivered_once(cluster, study, 2)


def test_postgresql_restart_under_load(cluster: Cluster, shared_data: Path, pg_cluster: PgCluster) -> None:
    study, _ = send_series(cluster, shared_data, 4)
    wait_for(lambda: any(j.state is JobState.RUNNING for j in cluster.queue().list()), 60, 0.2, "a running job")
    pg_cluster.restart()
    wait_for(lambda: all_done(cluster, 4), 180, 0.5, "all jobs done after the restart")
    assert cluster.node.poll() is None and all(w.poll() is None for w in cluster.workers)
    expected = {"SEG": 4, "RTSTRUCT": 4, "SR": 4}
    wait_for(lambda: result_counts(cluster.orthanc, study) == expected, 60, 0.3, f"{expected} in Orthanc")
    assert {i.state for i in cluster.outbox().items()} == {ItemState.SENT}


@pytest.mark.parametrize("cluster", [3.0], indirect=True)
def test_kill_9_of_the_node_while_workers_run_loses_and_duplicates_nothing(cluster: Cluster, shared_data: Path) -> None:
    study, _ = send_series(cluster, shared_data, 3)
    wait_for(lambda: any(j.state is JobState.RUNNING for j in cluster.queue().list()), 60, 0.2, "a running job")
    cluster.node.send_signal(signal.SIGKILL)  # workers go on; their hand-backs wait in the database
    cluster.node.wait(30)
    time.sleep(4.0)
    cluster.start_node()
    wait_for(lambda: all_done(cluster, 3), 120, 0.5, "all jobs done after the node restart")
    queue = cluster.queue()
    assert all(len(queue.attempts(j.id)) == 1 for j in queue.list()), "a job ran twice"
    expected = {"SEG": 3, "RTSTRUCT": 3, "SR": 3}
    wait_for(lambda: result_counts(cluster.orthanc, study) == expected, 60, 0.3, f"{expected} in Orthanc")
    wait_for(lambda: {i.state for i in cluster.outbox().items()} == {ItemState.SENT}, 60, 0.3, "every item sent")
    assert len(cluster.outbox().items()) == 9
    assert SharedState(cluster.url).pending_count() == 0
