"""A clinician's RTSTRUCT that arrives after its CT was processed: which job, and what it sends.

The synthetic chest phantom and the planner's structure set of ``test_clinical_contours``
are stored through the node's ingest; the decision (:func:`late_contour_job`) runs on a
real node index and SQLite queue, the job's chain on the stored files. The push of the
real IBSI CT and its GTV to a running node is in ``test_clinical_contours_node.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radnode.config import Settings
from radnode.dicom_io.regions import AlgorithmInfo, Region, RegionKind, WriterOptions
from radnode.dicom_io.rtstruct_writer import build_rtstruct
from radnode.dicom_io.series import CTSeries, load_series
from radnode.node.completion import SeriesCompleted
from radnode.node.index import NodeIndex
from radnode.node.storage import INDEX_FILE
from radnode.pipeline import chain, late_contours
from radnode.pipeline.chain import run_chain
from radnode.pipeline.jobs import JobKind, JobSpec, JobState
from radnode.pipeline.late_contours import late_contour_job, run_late_contour_chain
from radnode.pipeline.queue import SQLiteJobQueue

import test_clinical_contours as base
from test_clinical_contours import clinician_rtstruct, ct_folder, ingest, settings_for

phantom, truth = base.phantom, base.truth  # the same module-scoped fixtures


def _event(index: NodeIndex, series_uid: str) -> tuple[SeriesCompleted, Any]:
    event = SeriesCompleted.from_record(index.series(series_uid))
    return event, event.attributes


def _processed(queue: SQLiteJobQueue, settings: Settings, series: CTSeries, result: dict[str, Any] | None = None) -> int:
    """A done processing job of the CT (with ``result`` as its result.json), as the node leaves it."""
    job = queue.enqueue(JobSpec(
        series_uid=series.series_instance_uid, study_uid=series.study_instance_uid, input_path=ct_folder(settings, series),
        pipeline_version="1", profile="lung", destinations=("TPS",), instance_count=len(series.datasets),
    ))
    queue.claim("w", 60)
    queue.complete(job.id, "w", {})
    folder = Path(settings.storage.data_dir) / "results" / str(job.id)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result or {"status": "done", "clinician_contour": {"found": False}}))
    return job.id


def _decide(settings: Settings, queue: SQLiteJobQueue, series_uid: str) -> JobSpec | None:
    data_dir = Path(settings.storage.data_dir)
    index = NodeIndex(data_dir / INDEX_FILE)
    try:
        event, attributes = _event(index, series_uid)
        return late_contour_job(event, attributes, settings, queue, index, data_dir / "results", "1")
    finally:
        index.close()


def test_a_late_structure_set_queues_one_job_only_for_a_processed_ct(
    phantom: Path, truth: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path / "data")
    series = load_series(phantom / "ct")
    queue = SQLiteJobQueue(tmp_path / "data" / "queue.sqlite")
    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    rs = pydicom.dcmread(rtstruct)
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")) + [rtstruct])
    caplog.set_level(logging.INFO, logger="radnode.pipeline.late_contours")

    # The CT is held but radnode never processed it: logged and skipped.
    assert _decide(settings, queue, str(rs.SeriesInstanceUID)) is None
    assert "never processed" in caplog.text
    # Its job is queued: that job finds the structure set in the index itself.
    waiting = queue.enqueue(JobSpec(series_uid=series.series_instance_uid, input_path=ct_folder(settings, series), pipeline_version="1"))
    assert _decide(settings, queue, str(rs.SeriesInstanceUID)) is None
    assert "has not run yet" in caplog.text
    queue.cancel(waiting.id)

    # Processed: a clinician-contour job on the RTSTRUCT series, for the CT job's destinations.
    _processed(queue, settings, series)
    spec = _decide(settings, queue, str(rs.SeriesInstanceUID))
    assert spec is not None and spec.kind is JobKind.CLINICIAN_CONTOUR
    assert spec.series_uid == str(rs.SeriesInstanceUID) and spec.input_path == rtstruct_folder(settings, rs)
    assert (spec.profile, spec.destinations) == ("lung", ("TPS",))
    queue.enqueue(spec)
    # The same series announced again (a replay, a retry): nothing new.
    assert _decide(settings, queue, str(rs.SeriesInstanceUID)) is None
    assert len([j for j in queue.list(limit=20) if j.kind is JobKind.CLINICIAN_CONTOUR]) == 1


def rtstruct_folder(settings: Settings, rs: pydicom.Dataset) -> Path:
    return Path(settings.storage.data_dir) / "incoming" / str(rs.StudyInstanceUID) / str(rs.SeriesInstanceUID)


def test_structure_sets_that_give_no_job_are_skipped_without_error(
    phantom: Path, truth: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path / "data")
    series = load_series(phantom / "ct")
    queue = SQLiteJobQueue(tmp_path / "data" / "queue.sqlite")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
    caplog.set_level(logging.INFO, logger="radnode.pipeline.late_contours")

    # radnode's own RTSTRUCT coming back never triggers anything.
    ours = build_rtstruct(series, [Region.of_kind(RegionKind.TUMOUR, truth, name="GTV-1")], AlgorithmInfo(), WriterOptions())
    ours.save_as(tmp_path / "ours.dcm", enforce_file_format=True)
    # A structure set of a CT the node never saw (another study and Frame of Reference).
    stranger = clinician_rtstruct(series, truth, tmp_path / "rs" / "stranger.dcm", frame=generate_uid())
    other = pydicom.dcmread(stranger)
    other.StudyInstanceUID = generate_uid()
    other.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    other.save_as(stranger, enforce_file_format=True)
    # A structure set without a GTV-like ROI.
    heart = clinician_rtstruct(series, truth, tmp_path / "rs" / "heart.dcm", name="Heart")
    ingest(settings, [tmp_path / "ours.dcm", stranger, heart])
    first = _processed(queue, settings, series)

    for path in (tmp_path / "ours.dcm", stranger, heart):
        assert _decide(settings, queue, str(pydicom.dcmread(path).SeriesInstanceUID)) is None
    assert "none of which the node holds" in caplog.text
    assert "no ROI matches" in caplog.text

    # The CT's job already measured on this very structure set (pushed with the CT): nothing to redo.
    used = clinician_rtstruct(series, truth, tmp_path / "rs" / "used.dcm")
    ingest(settings, [used])
    uid = str(pydicom.dcmread(used).SOPInstanceUID)
    (Path(settings.storage.data_dir) / "results" / str(first) / "result.json").write_text(
        json.dumps({"status": "done", "clinician_contour": {"found": True, "sop_instance_uid": uid}})
    )
    assert _decide(settings, queue, str(pydicom.dcmread(used).SeriesInstanceUID)) is None
    assert "already used it" in caplog.text
    assert not [j for j in queue.list(limit=20) if j.kind is JobKind.CLINICIAN_CONTOUR]
    assert queue.get(first).state is JobState.DONE


def test_the_late_job_sends_a_new_sr_on_the_clinicians_gtv_and_not_the_contours_again(
    phantom: Path, truth: np.ndarray, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "data")
    series = load_series(phantom / "ct")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
    first = run_chain(ct_folder(settings, series), tmp_path / "first", settings)
    assert first.status == "done" and first.tumour_source == "model", first.error

    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    rs = pydicom.dcmread(rtstruct)
    ingest(settings, [rtstruct])
    handed: list[tuple[str, dict[str, Path]]] = []
    late = run_late_contour_chain(rtstruct_folder(settings, rs), tmp_path / "late", settings, on_phase=lambda p, f: handed.append((p, f)))
    assert late.status == "done", late.error
    assert [(phase, sorted(files)) for phase, files in handed] == [("contours", []), ("report", ["SR"])]
    saved = json.loads((tmp_path / "late" / "result.json").read_text())
    assert saved["input"]["series_instance_uid"] == series.series_instance_uid
    assert saved["tumour_source"] == "clinician" and saved["clinician_contour"]["arrived_after_ct"] is True
    assert saved["clinician_contour"]["sop_instance_uid"] == str(rs.SOPInstanceUID)
    # The agreement is that of the tumour contour the first job sent.
    sent_ml = next(r["volume_ml"] for r in first.regions if r["name"].startswith("Tumour"))
    assert saved["clinician_contour"]["agreement"]["model_volume_ml"] == pytest.approx(sent_ml, rel=1e-3)
    assert saved["clinician_contour"]["agreement"]["clinician_volume_ml"] == pytest.approx(
        int(truth.sum()) * float(np.prod(series.image.GetSpacing())) / 1000.0, rel=0.05
    )

    # The SEG the SR references is the one already sent; the SR itself is a new object.
    assert pydicom.dcmread(tmp_path / "late" / "SEG.dcm").SOPInstanceUID == pydicom.dcmread(tmp_path / "first" / "SEG.dcm").SOPInstanceUID
    first_sr, late_sr = pydicom.dcmread(tmp_path / "first" / "SR.dcm"), pydicom.dcmread(tmp_path / "late" / "SR.dcm")
    assert late_sr.SOPInstanceUID != first_sr.SOPInstanceUID
    # ... and deterministic: the job that finds the same structure set with the CT writes the same SR.
    together = run_chain(ct_folder(settings, series), tmp_path / "together", settings)
    assert together.tumour_source == "clinician"
    assert pydicom.dcmread(tmp_path / "together" / "SR.dcm").SOPInstanceUID == late_sr.SOPInstanceUID


def test_a_late_structure_set_without_a_usable_gtv_ends_done_with_nothing_to_send(
    phantom: Path, truth: np.ndarray, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "data", radiomics={"enabled": False})
    series = load_series(phantom / "ct")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    rs = pydicom.dcmread(rtstruct)
    ingest(settings, [rtstruct])
    handed: list[tuple[str, dict[str, Path]]] = []
    # The structure set passes the cheap check at queue time (a GTV-1 ROI); its contours then lie
    # 5 m above the CT, so the ROI does not fit it.
    ds = pydicom.dcmread(rtstruct)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        data = [float(v) for v in contour.ContourData]
        contour.ContourData = [v + 5000.0 if i % 3 == 2 else v for i, v in enumerate(data)]
    ds.save_as(rtstruct_folder(settings, rs) / next(p.name for p in rtstruct_folder(settings, rs).iterdir()), enforce_file_format=True)
    late = run_late_contour_chain(rtstruct_folder(settings, rs), tmp_path / "late", settings, on_phase=lambda p, f: handed.append((p, f)))
    assert late.status == "done", late.error
    assert handed == [("contours", {}), ("report", {})]
    assert late.tumour_source == "model" and late.clinician_contour["found"] is False
    assert any("nothing to send" in w for w in late.warnings)


def test_the_result_file_name_is_the_chains() -> None:
    assert late_contours.RESULT_FILE == chain.RESULT_FILE
