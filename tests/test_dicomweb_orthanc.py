"""DICOMweb with a real peer: Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``).

* A real CT is sent to the node process (``radnode serve``'s :func:`run_node`, started by
  ``tests/serve_entry.py`` with a fast test chain) by STOW-RS; the series completes, is
  processed, and the SEG, RTSTRUCT and SR reach Orthanc by STOW-RS (a ``type: dicomweb``
  destination), each exactly once.
* A series that is only in Orthanc is found by the sweep with QIDO-RS, fetched with
  WADO-RS through the node's ingest, processed, and its results delivered.
* A delivery whose destination is down waits, and goes out once the peer is back; sent twice
  (a crash between the answer and the record) the archive still holds it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from dicomweb_client import DICOMwebClient

from radnode.config import Settings
from radnode.node.index import NodeIndex
from radnode.node.scp import StorageNode
from radnode.node.storage import INDEX_FILE
from radnode.pipeline.dicomweb_send import DicomWebSender
from radnode.pipeline.dispatch import DispatchSummary, Dispatcher
from radnode.pipeline.jobs import JobSource, JobState
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import open_queue
from radnode.pipeline.service import PipelineService
from radnode.testing.orthanc import OrthancServer, free_port

from node_support import IBSI_SLICES
from pipeline_support import SERVE_ENTRY, chain_ref, copy_ct_series, upload_folder, wait_for, write_result_objects

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TOKEN = "token-of-the-test-ct-scanner"


def orthanc_with_dicomweb(workdir: Path | None = None) -> OrthancServer:
    """Orthanc with the DICOMweb plugin at ``/dicom-web`` (fails, never skips, without the package)."""
    assert DICOMWEB_PLUGIN.is_file(), f"{DICOMWEB_PLUGIN} missing: install the Debian package orthanc-dicomweb"
    return OrthancServer(
        workdir=workdir,
        extra_config={"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
    )


def modalities(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return sorted(s["MainDicomTags"].get("Modality", "") for s in orthanc.study_series(study_uid))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with orthanc_with_dicomweb(tmp_path / "orthanc") as server:
        yield server


def test_stow_into_the_node_process_and_results_back_into_orthanc_by_stow(
    tmp_path: Path, orthanc: OrthancServer, shared_data: Path
) -> None:
    web_port = free_port()
    config = {
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "data")},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
        "destinations": [{"name": "orthanc-web", "type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}],
        "pipeline": {"workers": 1, "job_timeout_seconds": 120},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
        "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": web_port, "tokens": {"CTSCANNER": TOKEN}},
    }
    config_path = tmp_path / "radnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "node.log"
    command = [sys.executable, str(SERVE_ENTRY), "--config", str(config_path), "--chain", chain_ref("results_chain")]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{web_port}/dicomweb"
    try:
        def serving() -> bool:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                return requests.post(f"{url}/studies", timeout=2).status_code == 401
            except requests.ConnectionError:
                return False

        wait_for(serving, 60, 0.2, "the node's DICOMweb port")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        sender = DICOMwebClient(url, session=session)
        datasets = [pydicom.dcmread(p) for p in sorted((shared_data / IBSI_SLICES).glob("*.dcm"))]
        study_uid = str(datasets[0].StudyInstanceUID)
        answer = sender.store_instances(datasets)
        assert len(answer.ReferencedSOPSequence) == len(datasets)

        wait_for(lambda: modalities(orthanc, study_uid) == ["RTSTRUCT", "SEG", "SR"], 90, 0.5, "results in Orthanc")
        outbox = Outbox(tmp_path / "data")
        items = outbox.items()
        assert sorted(i.object_type for i in items) == ["RTSTRUCT", "SEG", "SR"]
        wait_for(lambda: all(i.state is ItemState.SENT for i in outbox.items()), 10, 0.2, "items recorded as sent")
        assert all(i.attempts == 1 for i in outbox.items())
        # Exactly once in the archive, and the CT itself never left radnode.
        assert orthanc.statistics()["CountInstances"] == 3
        (job,) = open_queue(tmp_path / "data").list()
        assert job.state is JobState.DONE and job.source is JobSource.LIVE
    finally:
        process.terminate()
        process.wait(60)


def sweep_settings(tmp_path: Path, orthanc: OrthancServer) -> Settings:
    return Settings(
        storage={"data_dir": str(tmp_path / "data")},
        node={"ae_title": "RADNODE", "host": "127.0.0.1", "port": free_port()},
        series={"quiet_seconds": 1.0, "force_seconds": 60.0},
        pacs={"protocol": "dicomweb", "ae_title": "ORTHANCWEB", "url": f"{orthanc.url}/dicom-web"},
        destinations=[{"name": "orthanc-web", "type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}],
        pipeline={"workers": 1, "job_timeout_seconds": 120},
        metrics={"enabled": False},
    )


def test_sweep_over_qido_and_wado_finds_fetches_and_processes_a_series(
    tmp_path: Path, orthanc: OrthancServer, shared_data: Path
) -> None:
    study_uid, series_uid = copy_ct_series(shared_data / IBSI_SLICES, tmp_path / "archive", "web", study_date="20240315")
    assert upload_folder(orthanc, tmp_path / "archive") == 60
    settings = sweep_settings(tmp_path, orthanc)
    node = StorageNode(settings)
    service = PipelineService(
        settings, completion=node.completion, chain=chain_ref("results_chain"), schedule_completion_checks=False,
        poll_seconds=0.2, heartbeat_seconds=1.0,
    )
    node.start()
    service.start()
    try:
        sweeper = service.sweeper()
        preview = sweeper.run(date(2024, 3, 1), date(2024, 3, 31), dry_run=True)
        assert [(d.candidate.series_instance_uid, d.take) for d in preview.decisions] == [(series_uid, True)]
        assert preview.decisions[0].candidate.instance_count == 60
        assert sweeper.run(date(2023, 1, 1), date(2023, 12, 31), dry_run=True).decisions == []

        report = sweeper.run(date(2024, 3, 1), date(2024, 3, 31))
        assert report.failed == [] and len(report.queued) == 1
        job = service.queue.get(report.queued[0][1])
        assert job.source is JobSource.SWEEP and len(list(job.input_path.glob("*.dcm"))) == 60
        # Through the ingest: indexed, with the archive's AE title as calling AE.
        index = NodeIndex(Path(settings.storage.data_dir) / INDEX_FILE)
        try:
            records = index.series_instances(series_uid)
        finally:
            index.close()
        assert len(records) == 60 and {r.calling_ae for r in records} == {"ORTHANCWEB"}
        assert list((Path(settings.storage.data_dir) / "tmp").iterdir()) == []

        wait_for(lambda: modalities(orthanc, study_uid) == ["CT", "RTSTRUCT", "SEG", "SR"], 90, 0.5, "results in Orthanc")
        second = sweeper.run(date(2024, 3, 1), date(2024, 3, 31))
        assert second.queued == [] and second.failed == []
    finally:
        service.stop()
        node.stop(grace_seconds=5)


def test_a_down_dicomweb_destination_delays_and_a_resend_stays_one_instance(tmp_path: Path, shared_data: Path) -> None:
    source = pydicom.dcmread(sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[0], stop_before_pixels=True)
    objects = write_result_objects(source, tmp_path, ["SEG", "SR"])
    down_url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with orthanc_with_dicomweb(tmp_path / "orthanc") as orthanc:
        settings = Settings(
            storage={"data_dir": str(tmp_path / "data")},
            destinations=[{"name": "web", "type": "dicomweb", "url": down_url}],
            metrics={"enabled": False},
        )
        outbox = Outbox(tmp_path / "data")
        outbox.stage(objects, settings.destinations, job_id=1)
        dispatcher = Dispatcher(outbox, settings)
        first = dispatcher.run_once()
        assert first.sent == 0 and first.unreachable == 2 and first.destinations_down == ["web"]
        assert all(i.state is ItemState.PENDING and i.refusals == 0 for i in outbox.items())

        settings.destinations[0].url = f"{orthanc.url}/dicom-web"
        outbox.retry_now("web")
        second = dispatcher.run_once()
        assert second.sent == 2 and all(i.state is ItemState.SENT for i in outbox.items())
        assert orthanc.statistics()["CountInstances"] == 2
        # The answer lost (a crash before the record): the same objects go again.
        summary = DispatchSummary()
        DicomWebSender(outbox, dispatcher._down).send(settings.destinations[0], outbox.items(), summary)
        assert summary.sent == 2 and summary.refused == 0
        assert orthanc.statistics()["CountInstances"] == 2
