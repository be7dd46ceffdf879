"""A clinician's RTSTRUCT for the CT: found, read, used for radiomics, compared, summarised.

Plumbing tests use a synthetic chest phantom with a clinician's structure set written by
radnode's own RTSTRUCT writer under another manufacturer's name (the phantom's truth
tumour as the GTV), stored through the node's ingest like a pushed instance; the real
ROI lists come from NSCLC-Radiomics LUNG1-003 (``../shared/data``). The push test on a
running node with real data is in ``test_clinical_contours_node.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from radnode.config import Settings
from radnode.config.loader import settings_from_mapping
from radnode.dicom_io.regions import AlgorithmInfo, Region, RegionKind, WriterOptions
from radnode.dicom_io.rtstruct_read import rasterise_roi, read_rtstruct_rois
from radnode.dicom_io.rtstruct_writer import build_rtstruct
from radnode.dicom_io.series import CTSeries, load_series
from radnode.models.metrics import dice
from radnode.node.ingest import StoreRequest, local_ingestor
from radnode.node.storage import series_dir
from radnode.phantom import generate_phantom
from radnode.pipeline.agreement import AgreementCollector, AgreementStore
from radnode.pipeline.chain import run_chain
from radnode.pipeline.clinical_contours import find_clinician_gtv, select_gtv

from node_support import dataset_bytes
from test_air_conformance import ALLOWED_WARNINGS

CLINIC = WriterOptions(manufacturer="Clinic TPS", series_description_prefix="planning")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, seed=11, slices=48, tumors=1, matrix=256, tumor_types=["solid"])
    return out


@pytest.fixture(scope="module")
def truth(phantom: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "tumor.nii.gz"))) > 0


def quick_profiles(folder: Path) -> dict[str, str]:
    """Radiomics profiles that keep the test short: shape of tumour and ring, first order of the lung."""
    shape = folder / "shape.yaml"
    meta = "radnode: {name: quick, version: 1, description: test}\n"
    shape.write_text(meta + "imageType: {Original: {}}\nfeatureClass: {shape: []}\n")
    first = folder / "firstorder.yaml"
    first.write_text(meta + "imageType: {Original: {}}\nfeatureClass: {firstorder: [Mean]}\n")
    return {"tumour": str(shape), "ring": str(shape), "lung": str(first)}


def settings_for(data_dir: Path, **extra: Any) -> Settings:
    mapping: dict[str, Any] = {
        "storage": {"data_dir": str(data_dir), "min_free_gb": 0.01},
        "radiomics": {"profiles": quick_profiles(data_dir.parent), "parallel": False},
    }
    mapping.update(extra)
    return settings_from_mapping(mapping, source="test")


def clinician_rtstruct(series: CTSeries, mask: np.ndarray, path: Path, name: str = "GTV-1", frame: str | None = None) -> Path:
    """A planning system's structure set: the mask as ROI ``name`` (and a heart), optionally in another frame."""
    regions = [Region.of_kind(RegionKind.TUMOUR, mask, name=name)]
    ds = build_rtstruct(series, regions, AlgorithmInfo(name="planner"), CLINIC)
    if frame is not None:
        for item in ds.ReferencedFrameOfReferenceSequence:
            item.FrameOfReferenceUID = frame
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = frame
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ingest(settings: Settings, files: list[Path]) -> None:
    """Store files through the node's ingest, as the listener does for a push."""
    with local_ingestor(settings) as ingestor:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            outcome = ingestor.ingest(
                StoreRequest(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                             "PLANNER", "127.0.0.1", (dataset_bytes(path),))
            )
            assert outcome.status == 0, outcome


def ct_folder(settings: Settings, series: CTSeries) -> Path:
    return series_dir(Path(settings.storage.data_dir), series.study_instance_uid, series.series_instance_uid)


def test_gtv_is_chosen_by_name_pattern_then_interpreted_type(shared_data: Path) -> None:
    rtstruct = next((shared_data / "nsclc_radiomics" / "LUNG1-003" / "RTSTRUCT").iterdir())
    rois = read_rtstruct_rois(rtstruct)
    names = {r.name for r in rois}
    assert {"GTV-1", "GTV-2", "GTV-3"} <= names
    assert select_gtv(rois, ["GTV-1", "GTV*"]).name == "GTV-1"
    assert select_gtv(rois, ["gtv-2"]).name == "GTV-2"  # case-insensitive
    picked = select_gtv(rois, ["GTV*"])
    gtvs = [r for r in rois if r.name.upper().startswith("GTV")]
    typed = [r for r in gtvs if (r.interpreted_type or "").upper() == "GTV"] or gtvs
    assert picked.number == min(r.number for r in typed)
    assert select_gtv(rois, ["tumour bed", "CTV-9"]) is None


def test_unusable_structure_sets_are_ignored_with_a_logged_reason(
    phantom: Path, truth: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path / "data")
    series = load_series(phantom / "ct")
    no_gtv = clinician_rtstruct(series, truth, tmp_path / "rs" / "heart.dcm", name="Heart")
    other_frame = clinician_rtstruct(series, truth, tmp_path / "rs" / "frame.dcm", frame=generate_uid())
    ours = build_rtstruct(series, [Region.of_kind(RegionKind.TUMOUR, truth, name="GTV-1")], AlgorithmInfo(), WriterOptions())
    ours.save_as(tmp_path / "rs" / "ours.dcm", enforce_file_format=True)
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")) + [no_gtv, other_frame, tmp_path / "rs" / "ours.dcm"])

    caplog.set_level(logging.WARNING, logger="radnode.pipeline.clinical_contours")
    search = find_clinician_gtv(series, settings)
    assert search.contour is None
    reasons = {item["sop_instance_uid"]: item["reason"] for item in search.ignored}
    assert "no ROI matches" in reasons[pydicom.dcmread(no_gtv).SOPInstanceUID] and "'Heart'" in reasons[pydicom.dcmread(no_gtv).SOPInstanceUID]
    assert "Frame of Reference" in reasons[pydicom.dcmread(other_frame).SOPInstanceUID]
    assert "radnode itself" in reasons[str(ours.SOPInstanceUID)]
    assert sum("ignored" in r.getMessage() for r in caplog.records) == 3

    good = clinician_rtstruct(series, truth, tmp_path / "rs" / "good.dcm", name="gtv primary")
    ingest(settings, [good])
    found = find_clinician_gtv(series, settings_for(tmp_path / "data", clinical_contours={"gtv_names": ["GTV*"]}))
    assert found.contour is not None and found.contour.roi_name == "gtv primary"
    assert dice(found.contour.mask, truth) > 0.9


def test_chain_uses_the_clinician_gtv_and_compares_its_own_tumour(phantom: Path, truth: np.ndarray, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data")
    series = load_series(phantom / "ct")
    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")) + [rtstruct])
    out = tmp_path / "out"
    result = run_chain(ct_folder(settings, series), out, settings)
    assert result.status == "done", result.error
    saved = json.loads((out / "result.json").read_text())
    assert saved["tumour_source"] == "clinician"
    clinician = saved["clinician_contour"]
    assert clinician["sop_instance_uid"] == pydicom.dcmread(rtstruct).SOPInstanceUID
    assert clinician["roi_name"] == "GTV-1"

    # Radiomics ran on the clinician's GTV: its voxel volume is the GTV's, not radnode's tumour.
    voxel_ml = float(np.prod(series.image.GetSpacing())) / 1000.0
    truth_ml = int(truth.sum()) * voxel_ml
    features = saved["radiomics"]["regions"]["tumour"]["features"]
    assert features["original_shape_VoxelVolume"] / 1000.0 == pytest.approx(truth_ml, rel=0.05)
    assert clinician["agreement"]["clinician_volume_ml"] == pytest.approx(truth_ml, rel=0.05)

    # The agreement is that of the tumour contour radnode sent (its RTSTRUCT) with the GTV.
    sent = load_series(phantom / "ct")
    model = rasterise_roi(out / "RTSTRUCT.dcm", sent, next(r.name for r in read_rtstruct_rois(out / "RTSTRUCT.dcm") if r.name.startswith("Tumour")))
    gtv = rasterise_roi(rtstruct, sent, "GTV-1")
    assert clinician["agreement"]["dice"] == pytest.approx(dice(model, gtv), abs=0.05)
    assert clinician["agreement"]["volume_ratio"] == pytest.approx(model.sum() / gtv.sum(), rel=0.1)
    assert clinician["model"]["name"] == saved["models"]["tumour"]["method"]

    # The SR says which contour the measurements use and lists the clinician's RTSTRUCT as evidence.
    sr = pydicom.dcmread(out / "SR.dcm")
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert clinician["sop_instance_uid"] in evidence
    texts = [str(v) for v in _walk(sr, "TextValue")]
    assert any("ROI 'GTV-1'" in t and clinician["sop_instance_uid"] in t for t in texts)
    sources = [v for v in _walk(sr, "ConceptCodeSequence") if v.CodeValue in ("CSCLINICIAN", "CSMODEL")]
    assert {s.CodeValue for s in sources} == {"CSCLINICIAN", "CSMODEL"}
    checked = subprocess.run(["dciodvfy", str(out / "SR.dcm")], capture_output=True, text=True, timeout=300, check=False)
    lines = (checked.stdout + checked.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    assert [w for w in lines if w.startswith("Warning") and not any(a in w for a in ALLOWED_WARNINGS)] == []

    # The per-model summary survives a new store object (a restart) and reaches /metrics.
    assert AgreementStore(settings.storage.data_dir).record_result(out / "result.json", job_id=7)
    summary = AgreementStore(settings.storage.data_dir).summary()
    assert [(s.model, s.cases) for s in summary] == [(clinician["model"]["name"], 1)]
    assert summary[0].dice_mean == clinician["agreement"]["dice"]
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(AgreementCollector(Path(settings.storage.data_dir)))
    text = generate_latest(registry).decode()
    assert f'radnode_contour_agreement_cases{{model="{clinician["model"]["name"]}"' in text
    assert "radnode_contour_agreement_dice_bucket" in text


def test_a_ct_without_a_clinician_rtstruct_uses_the_model(phantom: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", radiomics={"enabled": False})
    series = load_series(phantom / "ct")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
    result = run_chain(ct_folder(settings, series), tmp_path / "out", settings)
    assert result.status == "done", result.error
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["tumour_source"] == "model"
    assert saved["clinician_contour"] == {"found": False, "ignored": []}
    assert not AgreementStore(settings.storage.data_dir).record_result(tmp_path / "out" / "result.json")
    sr = pydicom.dcmread(tmp_path / "out" / "SR.dcm")
    assert not [v for v in _walk(sr, "ConceptCodeSequence") if v.CodeValue == "CSCLINICIAN"]


def test_sweep_retrieves_the_clinician_rtstruct_with_the_ct(phantom: Path, truth: np.ndarray, tmp_path: Path) -> None:
    from radnode.pipeline.queue import SQLiteJobQueue
    from radnode.pipeline.sweep import Sweeper
    from radnode.testing.orthanc import OrthancServer, free_port

    series = load_series(phantom / "ct")
    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    study_date = date(int(series.datasets[0].StudyDate[:4]), int(series.datasets[0].StudyDate[4:6]), int(series.datasets[0].StudyDate[6:]))
    port = free_port()
    with OrthancServer(aet="PACS", workdir=tmp_path / "orthanc", modalities={"radnode": ("RADNODE", "127.0.0.1", port)}) as orthanc:
        for path in [*sorted((phantom / "ct").glob("*.dcm")), rtstruct]:
            orthanc.upload(path.read_bytes())
        settings = settings_for(
            tmp_path / "data", pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port, "retrieve": "get"},
            node={"ae_title": "RADNODE", "port": port},
        )
        queue = SQLiteJobQueue(tmp_path / "data" / "queue.sqlite")
        report = Sweeper(settings, queue, "1").run(study_date, study_date)
    assert [uid for uid, _ in report.queued] == [series.series_instance_uid]
    job = queue.get(report.queued[0][1])
    found = find_clinician_gtv(load_series(job.input_path), settings)
    assert found.contour is not None and found.contour.sop_instance_uid == pydicom.dcmread(rtstruct).SOPInstanceUID
    assert dice(found.contour.mask, truth) > 0.9
    # The queued job's chain (the archive is gone by now: no further lookup is needed) uses it.
    offline = settings.model_copy(update={"pacs": None, "radiomics": settings.radiomics.model_copy(update={"enabled": False})})
    result = run_chain(job.input_path, tmp_path / "out", offline)
    assert result.status == "done", result.error
    assert result.tumour_source == "clinician" and result.clinician_contour["roi_name"] == "GTV-1"


def _walk(ds: pydicom.Dataset, keyword: str) -> list[Any]:
    """Every value of ``keyword`` anywhere in the content tree (codes as their first item)."""
    found: list[Any] = []
    for item in ds.get("ContentSequence", []):
        if keyword in item:
            value = item.get(keyword)
            found.append(value[0] if isinstance(value, pydicom.Sequence) else value)
        found.extend(_walk(item, keyword))
    return found


def test_live_ct_asks_the_pacs_for_the_clinician_rtstruct(phantom: Path, truth: np.ndarray, tmp_path: Path) -> None:
    from radnode.testing.orthanc import OrthancServer, free_port

    series = load_series(phantom / "ct")
    rtstruct = clinician_rtstruct(series, truth, tmp_path / "rs" / "gtv.dcm")
    port = free_port()
    with OrthancServer(aet="PACS", workdir=tmp_path / "orthanc", modalities={"radnode": ("RADNODE", "127.0.0.1", port)}) as orthanc:
        orthanc.upload(rtstruct.read_bytes())  # the archive has the plan; the CT arrives live
        settings = settings_for(
            tmp_path / "data", radiomics={"enabled": False}, node={"ae_title": "RADNODE", "port": port},
            pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port, "retrieve": "get"},
        )
        ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
        result = run_chain(ct_folder(settings, series), tmp_path / "out", settings)
    assert result.status == "done", result.error
    assert result.tumour_source == "clinician"
    assert result.clinician_contour["sop_instance_uid"] == pydicom.dcmread(rtstruct).SOPInstanceUID
    assert result.clinician_contour["pacs"]["queried"] and result.clinician_contour["pacs"]["error"] is None


def test_an_unreachable_pacs_never_blocks_the_job(phantom: Path, tmp_path: Path) -> None:
    from radnode.testing.orthanc import free_port

    settings = settings_for(
        tmp_path / "data", radiomics={"enabled": False},
        pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},  # nobody listens
        clinical_contours={"pacs_timeout_seconds": 5},
    )
    series = load_series(phantom / "ct")
    ingest(settings, sorted((phantom / "ct").glob("*.dcm")))
    result = run_chain(ct_folder(settings, series), tmp_path / "out", settings)
    assert result.status == "done", result.error
    assert result.tumour_source == "model"
    pacs = result.clinician_contour["pacs"]
    assert pacs["queried"] and "unreachable" in pacs["error"]
    waited = next(s.seconds for s in result.stages if s.name == "clinician_contour")
    assert waited < 5.5
