"""Push of a real CT with its clinician's RTSTRUCT to a running node (real data, real chain).

The IBSI lung CT phantom (``../shared/data/ibsi_ct_phantom``: a real 60-slice chest CT
with the planning RTSTRUCT ``GTV-1``) is sent by DCMTK ``storescu`` to a node process
running what ``radnode serve`` runs. The job must use the clinician's GTV (its radiomic
voxel volume is that of the reference NIfTI mask shipped with the phantom), record the
agreement of radnode's own tumour, and show the per-model summary in ``radnode status``
and ``/metrics``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radnode.cli.status_cmd import collect_status
from radnode.config import load_settings
from radnode.pipeline.agreement import AgreementStore
from radnode.pipeline.jobs import JobKind, JobState
from radnode.pipeline.queue import QUEUE_FILE, SQLiteJobQueue
from radnode.testing.orthanc import free_port

from node_support import storescu
from pipeline_support import SERVE_ENTRY, StorageSCP, wait_for
from test_clinical_contours import _walk, quick_profiles


def _answers_echo(port: int) -> bool:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


@contextmanager
def running_node(tmp_path: Path, **sections: Any) -> Iterator[tuple[Path, int, int]]:
    """``radnode serve`` on the test's settings in a process: (config file, DICOM port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    config = {
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 2.0, "force_seconds": 120.0},
        "pipeline": {"workers": 1, "job_timeout_seconds": 900, "max_attempts": 1},
        "radiomics": {"profiles": quick_profiles(tmp_path), "parallel": False},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "dashboard": {"enabled": False},
        **sections,
    }
    config_path = tmp_path / "radnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with (tmp_path / "node.log").open("ab") as log:
        node = subprocess.Popen(
            [sys.executable, str(SERVE_ENTRY), "--config", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
    try:
        wait_for(lambda: node.poll() is not None or _answers_echo(port), 60, what="the node to answer C-ECHO")
        assert node.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
        yield config_path, port, metrics_port
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        time.sleep(0.1)


def test_pushed_ct_and_rtstruct_use_the_clinicians_gtv_and_the_summary_is_reported(
    tmp_path: Path, shared_data: Path
) -> None:
    root = shared_data / "ibsi_ct_phantom"
    with running_node(tmp_path) as (config_path, port, metrics_port):
        sent = storescu(port, root / "dicom" / "image", root / "dicom" / "mask")
        assert sent.returncode == 0, sent.stderr[-2000:]

        queue = SQLiteJobQueue(tmp_path / "data" / QUEUE_FILE)
        ct = pydicom.dcmread(next((root / "dicom" / "image").glob("*.dcm")), stop_before_pixels=True)

        def finished() -> object:
            jobs = [j for j in queue.list(limit=10) if j.series_uid == str(ct.SeriesInstanceUID)]
            return jobs[0] if jobs and jobs[0].state in (JobState.DONE, JobState.FAILED) else None

        job = wait_for(finished, 600, interval=1.0, what="the CT's job to finish")
        assert job.state is JobState.DONE, (tmp_path / "node.log").read_text()[-3000:]
        result = json.loads((tmp_path / "data" / "results" / str(job.id) / "result.json").read_text())
        rtstruct = pydicom.dcmread(next((root / "dicom" / "mask").glob("*.dcm")), stop_before_pixels=True)
        assert result["tumour_source"] == "clinician"
        assert result["clinician_contour"]["sop_instance_uid"] == str(rtstruct.SOPInstanceUID)
        assert result["clinician_contour"]["roi_name"] == "GTV-1"
        reference = sitk.ReadImage(str(root / "nifti" / "mask" / "mask.nii.gz"))
        reference_ml = int((sitk.GetArrayFromImage(reference) > 0).sum()) * float(np.prod(reference.GetSpacing())) / 1000.0
        voxel_volume = result["radiomics"]["regions"]["tumour"]["features"]["original_shape_VoxelVolume"] / 1000.0
        assert voxel_volume == pytest.approx(reference_ml, rel=0.02)
        agreement = result["clinician_contour"]["agreement"]
        assert agreement["model_volume_ml"] == pytest.approx(
            next(r["volume_ml"] for r in result["regions"] if r["name"].startswith("Tumour")), rel=1e-3
        )

        # The node recorded the case once the job was done: status and /metrics show it.
        settings = load_settings(config_path)
        model = result["models"]["tumour"]
        summary = wait_for(lambda: collect_status(settings)["contour_agreement"]["models"], 30, what="the agreement summary")
        assert [(m["model"], m["version"], m["cases"]) for m in summary] == [(model["method"], model["version"], 1)]
        assert summary[0]["dice_mean"] == agreement["dice"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        line = f'radnode_contour_agreement_cases{{model="{model["method"]}",version="{model["version"]}"}} 1.0'
        assert line in text
        shown = subprocess.run(
            [sys.executable, "-m", "radnode", "--config", str(config_path), "status"], capture_output=True, text=True, timeout=60
        )
        assert "Tumour contour vs clinician GTV" in shown.stdout and model["method"] in shown.stdout, shown.stdout + shown.stderr


def test_a_clinicians_rtstruct_pushed_after_the_ct_was_processed_gets_its_own_report(
    tmp_path: Path, shared_data: Path
) -> None:
    """Planning after radnode's contours went out: the GTV pushed later drives a new SR."""
    root = shared_data / "ibsi_ct_phantom"
    ct = pydicom.dcmread(next((root / "dicom" / "image").glob("*.dcm")), stop_before_pixels=True)
    rtstruct = pydicom.dcmread(next((root / "dicom" / "mask").glob("*.dcm")), stop_before_pixels=True)
    data = tmp_path / "data"
    with StorageSCP(tmp_path / "tps", ae_title="TPS") as tps, running_node(
        tmp_path, destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps.port}]
    ) as (config_path, port, _):
        queue = SQLiteJobQueue(data / QUEUE_FILE)

        def finished(kind: JobKind) -> Any:
            jobs = [j for j in queue.list(limit=20) if j.kind is kind]
            return jobs[0] if jobs and jobs[0].state in (JobState.DONE, JobState.FAILED) else None

        def log_tail() -> str:
            return (tmp_path / "node.log").read_text()[-4000:]

        # The CT alone: radnode's own tumour, its SEG, RTSTRUCT and SR delivered.
        assert storescu(port, root / "dicom" / "image").returncode == 0
        first = wait_for(lambda: finished(JobKind.PROCESS), 600, interval=1.0, what="the CT's job")
        assert first.state is JobState.DONE and first.series_uid == str(ct.SeriesInstanceUID), log_tail()
        first_result = json.loads((data / "results" / str(first.id) / "result.json").read_text())
        assert first_result["tumour_source"] == "model"
        wait_for(lambda: tps.received == 3, 60, what="SEG, RTSTRUCT and SR at the destination")
        first_sr = str(pydicom.dcmread(data / "results" / str(first.id) / "SR.dcm").SOPInstanceUID)

        # The clinician's structure set arrives afterwards: one clinician-contour job, a new SR.
        assert storescu(port, root / "dicom" / "mask").returncode == 0
        late = wait_for(lambda: finished(JobKind.CLINICIAN_CONTOUR), 600, interval=1.0, what="the clinician-contour job")
        assert late.state is JobState.DONE, log_tail()
        assert late.series_uid == str(rtstruct.SeriesInstanceUID) and late.destinations == first.destinations
        result = json.loads((data / "results" / str(late.id) / "result.json").read_text())
        assert result["input"]["series_instance_uid"] == str(ct.SeriesInstanceUID)
        assert result["tumour_source"] == "clinician" and result["clinician_contour"]["arrived_after_ct"] is True
        assert result["clinician_contour"]["sop_instance_uid"] == str(rtstruct.SOPInstanceUID)
        reference = sitk.ReadImage(str(root / "nifti" / "mask" / "mask.nii.gz"))
        reference_ml = int((sitk.GetArrayFromImage(reference) > 0).sum()) * float(np.prod(reference.GetSpacing())) / 1000.0
        voxel_volume = result["radiomics"]["regions"]["tumour"]["features"]["original_shape_VoxelVolume"] / 1000.0
        assert voxel_volume == pytest.approx(reference_ml, rel=0.02)
        # The agreement is that of the tumour contour the first job sent.
        sent_ml = next(r["volume_ml"] for r in first_result["regions"] if r["name"].startswith("Tumour"))
        assert result["clinician_contour"]["agreement"]["model_volume_ml"] == pytest.approx(sent_ml, rel=1e-3)

        # Only the new SR reaches the destination; SEG and RTSTRUCT are not sent again.
        wait_for(lambda: tps.received >= 4, 60, what="the new SR at the destination")
        late_sr = str(pydicom.dcmread(data / "results" / str(late.id) / "SR.dcm").SOPInstanceUID)
        assert late_sr != first_sr
        received = {p.stem: pydicom.dcmread(p) for p in (tmp_path / "tps").rglob("*.dcm")}
        assert sorted(ds.Modality for ds in received.values()) == ["RTSTRUCT", "SEG", "SR", "SR"]
        texts = [str(v) for v in _walk(received[late_sr], "TextValue")]
        assert any("clinician's contour" in t and str(rtstruct.SOPInstanceUID) in t for t in texts), texts

        # The agreement is recorded once, for this structure set and the CT.
        cases = wait_for(lambda: AgreementStore(data).cases(), 30, what="the agreement row")
        assert [(c["series_uid"], c["rtstruct_uid"], c["job_id"]) for c in cases] == [
            (str(ct.SeriesInstanceUID), str(rtstruct.SOPInstanceUID), late.id)
        ]
        summary = collect_status(load_settings(config_path))["contour_agreement"]["models"]
        assert [m["cases"] for m in summary] == [1]

        # The same structure set pushed again: no new job, nothing more sent.
        assert storescu(port, root / "dicom" / "mask").returncode == 0
        time.sleep(6.0)  # well past series.quiet_seconds
        assert [j.id for j in queue.list(limit=20) if j.kind is JobKind.CLINICIAN_CONTOUR] == [late.id]
        assert tps.received == 4
        assert len(AgreementStore(data).cases()) == 1
