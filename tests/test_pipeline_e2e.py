"""End to end: Orthanc sends a CT series to a radnode node process (listener + pipeline),
results come back into Orthanc's study exactly once -- also when the node is killed with
``kill -9`` while a job runs or while a delivery is pending, and when Orthanc is down
while results are ready. Bad series end as failed jobs with their QC reason.

The node process runs what ``radnode serve`` runs (:func:`radnode.cli.serve_cmd.run_node`,
started by the test-only entry point ``tests/serve_entry.py``); the chain is the real one,
with pauses a test can set (``pipeline_support.slow_real_chain``), so the SEG, RTSTRUCT and
SR are radnode's own.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radnode.cli.status_cmd import collect_status
from radnode.config import load_settings
from radnode.pipeline.jobs import JobState
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.testing.orthanc import OrthancServer, free_port

from radnode.web.users import UserStore
from web_support import PASSWORD, http_login
from pipeline_support import ENV_PHASE_GAP, ENV_START_DELAY, SERVE_ENTRY, chain_ref, copy_ct_series, upload_folder, wait_for

#: The node under test: ``radnode serve``'s node with the slowed real chain (``{config}`` is
#: replaced by the YAML path).
NODE_COMMAND = [sys.executable, str(SERVE_ENTRY), "--config", "{config}", "--chain", chain_ref("slow_real_chain")]


class NodeProcess:
    """A node process on a config file; start, SIGTERM, kill -9, restart."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config = config
        self.log = log
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def _answers_echo(self) -> bool:
        ae = AE(ae_title="E2E")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 2
        assoc = ae.associate("127.0.0.1", self.port, ae_title="RADNODE")
        if not assoc.is_established:
            return False
        ok = assoc.send_c_echo().get("Status") == 0x0000
        assoc.release()
        return ok

    def start(self, phase_gap: float = 0.0, start_delay: float = 0.0) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        env[ENV_PHASE_GAP] = str(phase_gap)
        env[ENV_START_DELAY] = str(start_delay)
        command = [part.replace("{config}", str(self.config)) for part in NODE_COMMAND]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not self._answers_echo():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"node did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture
def node_setup(tmp_path: Path) -> Iterator[tuple[OrthancServer, NodeProcess, Path]]:
    node_port = free_port()
    pacs_port = free_port()
    orthanc = OrthancServer(
        aet="PACS",
        workdir=tmp_path / "orthanc",
        modalities={"radnode": ("RADNODE", "127.0.0.1", node_port)},
        extra_config={"DicomPort": pacs_port},
    )
    config = {
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": node_port},
        "storage": {"data_dir": str(tmp_path / "data")},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "pipeline": {"workers": 1, "job_timeout_seconds": 120, "max_attempts": 3},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "dashboard": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
    }
    config_path = tmp_path / "radnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    node = NodeProcess(config_path, tmp_path / "node.log", node_port)
    orthanc.start()
    try:
        yield orthanc, node, config_path
    finally:
        node.kill()
        orthanc.stop()


def job_processes(parent: int) -> list[int]:
    """Pids of the job processes (spawned workers) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


def send_to_radnode(orthanc: OrthancServer, series_uid: str) -> None:
    """Ask Orthanc to C-STORE one of its series to radnode (REST ``/modalities/radnode/store``)."""
    (hit,) = [h for h in orthanc.lookup(series_uid) if h["Type"] == "Series"]
    orthanc.request("POST", "/modalities/radnode/store", hit["ID"].encode(), "text/plain", timeout=120)


def result_counts(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series in orthanc.study_series(study_uid):
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def test_results_reach_orthanc_once_even_after_kill_9_during_a_job(
    node_setup: tuple[OrthancServer, NodeProcess, Path], shared_data: Path, tmp_path: Path
) -> None:
    orthanc, node, config_path = node_setup
    ct = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    header = pydicom.dcmread(next(ct.glob("*.dcm")), stop_before_pixels=True)
    study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    assert upload_folder(orthanc, ct) == 60
    node.start(phase_gap=6.0)  # a long radiomics phase: the kill lands in it

    t0 = time.monotonic()
    send_to_radnode(orthanc, series_uid)
    wait_for(lambda: {"SEG", "RTSTRUCT"} <= set(result_counts(orthanc, study_uid)), 60, 0.1, "contours in Orthanc")
    contours_latency = time.monotonic() - t0
    assert "SR" not in result_counts(orthanc, study_uid)
    assert node.process is not None
    (child,) = job_processes(node.process.pid)
    node.kill()  # kill -9 while the job is in its second phase
    # The job process dies with the node (no orphan writing into the result folder).
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "State:\tZ" in Path(f"/proc/{child}/status").read_text(), 2, 0.05, "the orphaned job process to die")

    settings = load_settings(config_path)
    data_dir = Path(settings.storage.data_dir).resolve()
    (job,) = SQLiteJobQueue.in_data_dir(data_dir).list()
    assert job.state is JobState.RUNNING  # what a crash leaves behind

    node.start(phase_gap=0.0)
    wait_for(lambda: "SR" in result_counts(orthanc, study_uid), 60, 0.2, "the SR after the restart")
    assert result_counts(orthanc, study_uid) == {"CT": 60, "SEG": 1, "RTSTRUCT": 1, "SR": 1}
    queue = SQLiteJobQueue.in_data_dir(data_dir)
    wait_for(lambda: queue.list()[0].state is JobState.DONE, 30, 0.1, "the job to be recorded done")
    (job,) = queue.list()
    assert job.attempts == 2
    outbox = Outbox(data_dir)
    for item in outbox.items():
        successes = [a for a in outbox.attempts(item.id) if a["outcome"] == "success"]
        assert item.state is ItemState.SENT and len(successes) == 1, (item.object_type, outbox.attempts(item.id))
    # The node's HTTP endpoint reports the pipeline too: health and job metrics.
    metrics_url = f"http://127.0.0.1:{settings.metrics.port}"
    with urllib.request.urlopen(f"{metrics_url}/healthz", timeout=5) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok"
    assert health["pipeline"]["ok"] is True and health["pipeline"]["jobs"]["done"] == 1
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    assert "radnode_job_duration_seconds" in exposition
    # The dashboard in the same process shows the job, with the overlays the worker rendered.
    UserStore(data_dir).add("op", "operator", PASSWORD)
    dashboard = f"http://127.0.0.1:{settings.dashboard.port}/"
    browser = http_login(dashboard, "op")
    detail = json.loads(browser.open(f"{dashboard}api/jobs/{job.id}", timeout=10).read())
    assert detail["result"]["status"] == "done" and detail["overlays"] == ["axial.png", "coronal.png", "sagittal.png", "grid.png"]
    assert browser.open(f"{dashboard}jobs/{job.id}/overlays/axial.png", timeout=10).read()[:4] == b"\x89PNG"
    page = browser.open(f"{dashboard}jobs/{job.id}", timeout=10).read().decode()
    assert "Result: done" in page and "Lung right" in page and "radnode-lungmask-classical" in page
    assert node.terminate() == 0  # graceful SIGTERM
    print(f"\ncontours in Orthanc {contours_latency:.1f} s after Orthanc's C-STORE to radnode returned")


def test_results_wait_while_orthanc_is_down_and_survive_kill_9_with_dispatch_pending(
    node_setup: tuple[OrthancServer, NodeProcess, Path], shared_data: Path, tmp_path: Path
) -> None:
    orthanc, node, config_path = node_setup
    study_uid, series_uid = copy_ct_series(shared_data / "ibsi_ct_phantom" / "dicom" / "image", tmp_path / "ct", "e2e-down", count=30)
    upload_folder(orthanc, tmp_path / "ct")
    node.start(start_delay=4.5)  # results are ready only after Orthanc is down
    send_to_radnode(orthanc, series_uid)
    orthanc.stop()  # the archive goes down before any result is ready

    data_dir = Path(load_settings(config_path).storage.data_dir).resolve()
    staged_early = Outbox(data_dir).items() if (data_dir / "outbox.sqlite").exists() else []
    assert staged_early == [], "results were ready before Orthanc had stopped; raise start_delay"

    def waiting_items() -> list[object]:
        if not (data_dir / "outbox.sqlite").exists():
            return []
        items = Outbox(data_dir).items(states=[ItemState.PENDING])
        return items if len(items) == 3 and all(i.attempts >= 1 for i in items) else []

    wait_for(waiting_items, 60, 0.2, "three results waiting in the outbox after a failed attempt")
    node.kill()  # kill -9 with deliveries pending

    orthanc.start()  # same DICOM port, same storage
    assert "SEG" not in result_counts(orthanc, study_uid)
    node.start()
    wait_for(lambda: {"SEG", "RTSTRUCT", "SR"} <= set(result_counts(orthanc, study_uid)), 60, 0.2, "results after restart")
    assert result_counts(orthanc, study_uid) == {"CT": 30, "SEG": 1, "RTSTRUCT": 1, "SR": 1}
    health = {d["name"]: d for d in collect_status(load_settings(config_path))["destinations"]}
    assert health["pacs"]["sent"] == 3 and health["pacs"]["pending"] == 0


def test_bad_series_fail_with_their_qc_reason_and_the_node_carries_on(
    node_setup: tuple[OrthancServer, NodeProcess, Path], shared_data: Path, tmp_path: Path
) -> None:
    orthanc, node, config_path = node_setup
    source = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    # Mixed geometry: one slice of a 25-slice series has another pixel spacing.
    _study, mixed_uid = copy_ct_series(source, tmp_path / "mixed", "e2e-mixed", count=25, new_study=True)
    odd = sorted((tmp_path / "mixed").glob("*.dcm"))[12]
    ds = pydicom.dcmread(odd)
    ds.PixelSpacing = [1.5, 1.5]
    ds.save_as(odd)
    # Too few slices for the QC, but enough for the routing rule (min_instances 20)? No:
    # a 22-slice series whose middle slices are missing leaves a gap.
    _study, gap_uid = copy_ct_series(source, tmp_path / "gap", "e2e-gap", count=30, new_study=True)
    for path in sorted((tmp_path / "gap").glob("*.dcm"))[10:18]:
        path.unlink()
    for folder in ("mixed", "gap"):
        upload_folder(orthanc, tmp_path / folder)
    node.start()
    send_to_radnode(orthanc, mixed_uid)
    send_to_radnode(orthanc, gap_uid)
    settings = load_settings(config_path)
    queue = SQLiteJobQueue.in_data_dir(Path(settings.storage.data_dir).resolve())
    wait_for(lambda: len(queue.list(states=[JobState.FAILED])) == 2, 90, 0.3, "both bad series to fail")
    jobs = {j.series_uid: j for j in queue.list()}
    assert jobs[mixed_uid].reason == "qc_rejected" and "inconsistent_pixel_grid" in (jobs[mixed_uid].error or "")
    assert jobs[gap_uid].reason == "qc_rejected" and "missing_slices" in (jobs[gap_uid].error or "")
    assert all(j.attempts == 1 for j in jobs.values())  # a QC rejection is not retried
    status = collect_status(settings)
    assert {j["reason"] for j in status["jobs"]["recent"]} == {"qc_rejected"}
    # The node still answers.
    ae = AE(ae_title="TEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="RADNODE")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
