"""An uncertain tumour contour is flagged everywhere a person or a planning system looks:
result.json, the SR (read back, dciodvfy), the RTSTRUCT and SEG, ``radnode status``, the
metrics; and each destination's ``uncertain_contour`` policy (send / hold + release /
skip_tumour) is applied by the real outbox against real Orthanc archives."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage
from typer.testing import CliRunner

from radnode.config import Settings, settings_from_mapping
from radnode.dicom_io import codes
from radnode.dicom_io.rtstruct_writer import REVIEW_LABEL
from radnode.dicom_io.seg_writer import seg_to_masks
from radnode.dicom_io.series import load_series
from radnode.models.quality import UNCERTAIN_TEXT, UNCERTAIN_TEXT_ASCII, QualityCalibration, contour_signals, judge
from radnode.models.tumour import TumourSegmentation
from radnode.phantom import generate_phantom
from radnode.pipeline import chain
from radnode.pipeline.dispatch import Dispatcher
from radnode.pipeline.jobs import JobSpec, Phase
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.review import LUNGS_ONLY_DIR, QUALITY_FILE, stage_phase
from radnode.testing.orthanc import OrthancServer

from pipeline_support import first_header, write_result_objects


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, seed=11, slices=48, tumors=1, matrix=256, tumor_types=["solid"])
    return out


def truth_tumour(phantom: Path, tta_dice: float) -> Any:
    """A stand-in tumour stage: the phantom's true tumour, with a quality verdict whose
    augmentation agreement is ``tta_dice`` (0 = the network contradicted itself)."""

    def find_tumour(series: Any, lungs: Any, settings: Settings) -> TumourSegmentation:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "tumor.nii.gz"))) > 0
        probability = ndimage.gaussian_filter(truth.astype(np.float32), 0.7) * 0.98
        signals = contour_signals(truth, probability, lungs.lungs != 0, chain.zyx_spacing(series), [tta_dice])
        quality = judge(signals, QualityCalibration(threshold=0.6, calibrated=True, model_name="truth", model_version="1"))
        return TumourSegmentation(mask=truth, method="phantom-truth", version="1", demo=True, quality=quality)

    return find_tumour


SETTINGS = {
    "radiomics": {"enabled": False},
    "models": {"classifier_bundles": {}},
    "destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11999},
        {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 11998, "objects": ["RTSTRUCT"],
         "uncertain_contour": "skip_tumour"},
    ],
}


@pytest.fixture(scope="module")
def runs(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real chain with an uncertain and with a certain tumour contour."""
    out: dict[str, Path] = {}
    patch = pytest.MonkeyPatch()
    try:
        for name, agreement in (("uncertain", 0.0), ("certain", 0.97)):
            patch.setattr(chain, "find_tumour", truth_tumour(phantom, agreement))
            folder = tmp_path_factory.mktemp(name)
            result = chain.run_chain(phantom / "ct", folder, settings_from_mapping(SETTINGS))
            assert result.status == "done", result.error
            out[name] = folder
    finally:
        patch.undo()
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: make debian-tools")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def test_result_json_and_the_verdict_file_carry_the_flag(runs: dict[str, Path]) -> None:
    payload = json.loads((runs["uncertain"] / "result.json").read_text())
    assert payload["review"]["required"] is True
    assert payload["review"]["flags"] == [UNCERTAIN_TEXT]
    assert payload["review"]["tumour_quality_score"] < payload["review"]["threshold"] == 0.6
    assert "tta_agreement" in payload["review"]["reasons"]
    assert payload["models"]["tumour"]["quality"]["flag"] == UNCERTAIN_TEXT
    assert any(w.startswith(UNCERTAIN_TEXT) for w in payload["warnings"])
    assert json.loads((runs["uncertain"] / QUALITY_FILE).read_text())["required"] is True
    certain = json.loads((runs["certain"] / "result.json").read_text())
    assert certain["review"]["required"] is False and certain["review"]["flags"] == []
    assert certain["review"]["tumour_quality_score"] >= 0.6


def test_rtstruct_names_and_observes_the_uncertain_tumour(runs: dict[str, Path]) -> None:
    ds = pydicom.dcmread(runs["uncertain"] / "RTSTRUCT.dcm")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    (number,) = [n for n, name in names.items() if name.startswith("Tumour")]
    assert names[number] == "Tumour (uncertain)" and all(len(n) <= 64 for n in names.values())
    (obs,) = [o for o in ds.RTROIObservationsSequence if int(o.ReferencedROINumber) == number]
    assert obs.RTROIInterpretedType == "GTV"  # a TPS still files it as a GTV
    assert obs.ROIObservationLabel == REVIEW_LABEL
    # plain ASCII in the RTSTRUCT (its character set is the source CT's, often the default)
    assert str(obs.ROIObservationDescription).startswith(UNCERTAIN_TEXT_ASCII)
    assert UNCERTAIN_TEXT_ASCII in str(ds.StructureSetDescription) and UNCERTAIN_TEXT_ASCII.isascii()
    assert _dciodvfy_errors(runs["uncertain"] / "RTSTRUCT.dcm") == []
    certain = pydicom.dcmread(runs["certain"] / "RTSTRUCT.dcm")
    assert "Tumour" in {str(r.ROIName) for r in certain.StructureSetROISequence}
    assert all(o.ROIObservationLabel != REVIEW_LABEL for o in certain.RTROIObservationsSequence)


def _content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found += _content_items(item)
    return found


def _coded(items: list[pydicom.Dataset], name: Any) -> list[str]:
    return [
        str(i.ConceptCodeSequence[0].CodeValue) for i in items
        if "ConceptCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue == name.value
    ]


def test_sr_reports_the_uncertain_contour_as_a_finding_on_the_tumour_segment(runs: dict[str, Path]) -> None:
    sr = pydicom.dcmread(runs["uncertain"] / "SR.dcm")
    items = _content_items(sr)
    # TID 1411 group of the tumour segment + top-level qualitative evaluations: both say uncertain.
    assert _coded(items, codes.CONTOUR_QUALITY) == [codes.CONTOUR_UNCERTAIN.value] * 2
    groups = [i for i in items if i.get("ValueType") == "CONTAINER" and any(
        str(c.get("TextValue", "")) == "Tumour (uncertain)" for c in i.get("ContentSequence", []))]
    assert groups and _coded(_content_items(groups[0]), codes.CONTOUR_QUALITY) == [codes.CONTOUR_UNCERTAIN.value]
    scores = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
              if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == codes.CONTOUR_QUALITY_SCORE.value]
    result = json.loads((runs["uncertain"] / "result.json").read_text())
    assert scores == [pytest.approx(result["review"]["tumour_quality_score"], abs=1e-3)]
    assert any(str(i.get("TextValue", "")).startswith(UNCERTAIN_TEXT) for i in items)
    assert _dciodvfy_errors(runs["uncertain"] / "SR.dcm") == []
    certain = _content_items(pydicom.dcmread(runs["certain"] / "SR.dcm"))
    assert _coded(certain, codes.CONTOUR_QUALITY) == [codes.CONTOUR_ACCEPTABLE.value]


def test_seg_label_and_lungs_only_objects(runs: dict[str, Path], phantom: Path) -> None:
    series = load_series(phantom / "ct")
    assert "Tumour (uncertain)" in seg_to_masks(runs["uncertain"] / "SEG.dcm", series)
    lungs_only = runs["uncertain"] / LUNGS_ONLY_DIR
    masks = seg_to_masks(lungs_only / "SEG.dcm", series)
    assert set(masks) == {"Lung right", "Lung left"}
    rt = pydicom.dcmread(lungs_only / "RTSTRUCT.dcm")
    assert {str(r.ROIName) for r in rt.StructureSetROISequence} == {"Lung right", "Lung left"}
    assert "tumour withheld" in str(rt.StructureSetDescription)
    full = pydicom.dcmread(runs["uncertain"] / "RTSTRUCT.dcm", stop_before_pixels=True)
    assert rt.SOPInstanceUID != full.SOPInstanceUID and rt.SeriesInstanceUID != full.SeriesInstanceUID
    assert any("phantom-truth" in str(v) for v in rt.SoftwareVersions)  # names the model it withheld
    for path in (lungs_only / "SEG.dcm", lungs_only / "RTSTRUCT.dcm"):
        assert _dciodvfy_errors(path) == []
    assert not (runs["certain"] / LUNGS_ONLY_DIR).exists()


# --- status and metrics ---------------------------------------------------------------------


def _done_job(queue: SQLiteJobQueue, key: str, review: dict[str, Any], tmp_path: Path) -> int:
    job = queue.enqueue(JobSpec(series_uid=f"2.25.{key}", study_uid="2.25.1", input_path=tmp_path, pipeline_version="1"))
    claimed = queue.claim("w", 60)
    assert claimed is not None and claimed.id == job.id
    queue.complete(job.id, "w", {"status": "done", "review": review})
    return job.id


def test_status_and_metrics_count_uncertain_contours(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from radnode.cli.status_cmd import collect_status
    from radnode.pipeline.service import PipelineCollector

    data = tmp_path / "data"
    queue = SQLiteJobQueue.in_data_dir(data)
    flagged = _done_job(queue, "1", {"required": True, "flags": [UNCERTAIN_TEXT], "tumour_quality_score": 0.41,
                                     "threshold": 0.6, "reasons": ["tta_agreement"]}, tmp_path)
    _done_job(queue, "2", {"required": False, "flags": [], "tumour_quality_score": 0.9, "threshold": 0.6}, tmp_path)
    _done_job(queue, "3", {"required": False, "flags": [], "tumour_quality_score": None}, tmp_path)  # no tumour
    outbox = Outbox(data)
    registry = CollectorRegistry()
    registry.register(PipelineCollector(queue, outbox))
    text = generate_latest(registry).decode()
    assert 'radnode_tumour_contours{quality="uncertain"} 1.0' in text
    assert 'radnode_tumour_contours{quality="acceptable"} 1.0' in text

    settings = Settings(storage={"data_dir": str(data)})
    status = collect_status(settings)
    (row,) = status["jobs"]["review_required"]
    assert row["job_id"] == flagged and row["flag"] == UNCERTAIN_TEXT and row["score"] == 0.41

    from radnode.cli.main import app

    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    shown = CliRunner().invoke(app, ["--config", str(config), "status"])
    assert shown.exit_code == 0, shown.output
    assert "review required" in shown.output and "0.41" in shown.output
    listed = CliRunner().invoke(app, ["--config", str(config), "jobs", "list"])
    assert listed.exit_code == 0 and "uncertain" in listed.output


# --- the destinations' policies with the real outbox and Orthanc ----------------------------


def _destination(name: str, server: OrthancServer, objects: list[str], policy: str) -> dict[str, Any]:
    return {"name": name, "ae_title": server.aet, "host": "127.0.0.1", "port": server.dicom_port,
            "objects": objects, "uncertain_contour": policy}


def _sop_uids(server: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Modality -> SOP Instance UIDs held by the archive for the study."""
    found: dict[str, list[str]] = {}
    for series in server.study_series(study_uid):
        modality = series["MainDicomTags"].get("Modality", "")
        for instance in series["Instances"]:
            tags = server.get(f"/instances/{instance}/simplified-tags")
            found.setdefault(modality, []).append(tags["SOPInstanceUID"])
    return found


def test_send_hold_release_and_skip_tumour_against_orthanc(tmp_path: Path, shared_data: Path) -> None:
    header = first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")
    study = str(header.StudyInstanceUID)
    out = tmp_path / "results" / "1"
    (out / LUNGS_ONLY_DIR).mkdir(parents=True)
    full = {p.stem: p for p in write_result_objects(header, out, ["SEG", "RTSTRUCT", "SR"])}
    lungs = {p.stem: p for p in write_result_objects(header, out / LUNGS_ONLY_DIR, ["SEG", "RTSTRUCT"], version="lungs")}
    (out / QUALITY_FILE).write_text(json.dumps({"required": True, "flags": [UNCERTAIN_TEXT]}))
    uid = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for k, p in full.items()}
    lungs_uid = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for k, p in lungs.items()}

    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="REVIEWED") as held, OrthancServer(aet="TPS") as tps:
        settings = Settings(
            storage={"data_dir": str(tmp_path / "data")},
            destinations=[
                _destination("pacs", pacs, ["SEG", "RTSTRUCT", "SR"], "send"),
                _destination("reviewed", held, ["SEG", "RTSTRUCT", "SR"], "hold"),
                _destination("tps", tps, ["RTSTRUCT", "SR"], "skip_tumour"),
            ],
        )
        outbox = Outbox(tmp_path / "data")
        job = SQLiteJobQueue.in_data_dir(tmp_path / "data").enqueue(
            JobSpec(series_uid="2.25.7", input_path=tmp_path, pipeline_version="1"))
        dispatcher = Dispatcher(outbox, settings)
        for phase, files in ((Phase.CONTOURS, [full["SEG"], full["RTSTRUCT"]]), (Phase.REPORT, [full["SR"]])):
            stage_phase(outbox, files, settings.destinations, out, phase, job_id=job.id, source_series_uid="2.25.7")
            dispatcher.run_once()

        assert _sop_uids(pacs, study) == {"SEG": [uid["SEG"]], "RTSTRUCT": [uid["RTSTRUCT"]], "SR": [uid["SR"]]}
        assert _sop_uids(tps, study) == {"RTSTRUCT": [lungs_uid["RTSTRUCT"]]}  # lungs only, no SR
        assert _sop_uids(held, study) == {}
        assert {i.state for i in outbox.items(destination="reviewed")} == {ItemState.HELD}
        (health,) = [h for h in outbox.health() if h.name == "reviewed"]
        assert health.held == 3 and health.pending == 0

        # A person releases the job with the CLI; it goes out exactly once.
        from radnode.cli.main import app

        config = tmp_path / "radnode.yaml"
        config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")}}))
        released = CliRunner().invoke(app, ["--config", str(config), "jobs", "release", str(job.id)])
        assert released.exit_code == 0, released.output
        assert "3 held delivery(ies) released" in released.output
        again = CliRunner().invoke(app, ["--config", str(config), "jobs", "release", str(job.id)])
        assert again.exit_code == 1
        for _ in range(3):
            dispatcher.run_once()
        assert _sop_uids(held, study) == {"SEG": [uid["SEG"]], "RTSTRUCT": [uid["RTSTRUCT"]], "SR": [uid["SR"]]}
        assert all(i.state is ItemState.SENT and i.attempts == 1 for i in outbox.items(destination="reviewed"))
        assert _sop_uids(pacs, study)["SEG"] == [uid["SEG"]]  # still once


def test_a_certain_contour_goes_to_every_destination_unchanged(tmp_path: Path, shared_data: Path) -> None:
    header = first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")
    out = tmp_path / "results" / "8"
    out.mkdir(parents=True)
    files = write_result_objects(header, out, ["SEG", "RTSTRUCT"])
    (out / QUALITY_FILE).write_text(json.dumps({"required": False, "flags": []}))
    settings = Settings(destinations=[
        {"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 1, "uncertain_contour": "hold"},
        {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": 2, "uncertain_contour": "skip_tumour"},
    ])
    outbox = Outbox(tmp_path / "data")
    items = stage_phase(outbox, files, settings.destinations, out, Phase.CONTOURS, job_id=8)
    assert sorted((i.destination, i.object_type, i.state.value) for i in items) == [
        ("a", "RTSTRUCT", "pending"), ("a", "SEG", "pending"), ("b", "RTSTRUCT", "pending"), ("b", "SEG", "pending"),
    ]
    # An unreadable verdict counts as uncertain: the hold destination waits.
    (out / QUALITY_FILE).write_text("{broken")
    out2 = tmp_path / "results" / "9"
    shutil.copytree(out, out2)
    files2 = write_result_objects(header, out2, ["SEG"], version="2")
    items = stage_phase(outbox, files2, settings.destinations[:1], out2, Phase.CONTOURS, job_id=9)
    assert [i.state for i in items] == [ItemState.HELD]


def test_the_review_note_says_which_rule_flagged_the_contour() -> None:
    tumour = np.zeros((12, 40, 40), dtype=bool)
    tumour[3:9, 12:28, 12:28] = True
    probability = ndimage.gaussian_filter(tumour.astype(np.float32), 0.7) * 0.98
    calibration = QualityCalibration(threshold=0.6, calibrated=True, model_name="m", model_version="1")

    def note(tta_dice: float, competitor: float | None) -> str:
        signals = contour_signals(tumour, probability, np.ones_like(tumour), (1.5, 1.0, 1.0), [tta_dice], competitor)
        quality = judge(signals, calibration)
        assert quality.uncertain
        return chain.review_note(TumourSegmentation(tumour, "m", "1", False, quality=quality), ascii_only=True)

    rival = note(0.95, 0.92)  # a confident contour, but another structure nearly as probable
    assert rival.startswith(UNCERTAIN_TEXT_ASCII) and "another structure 92% as probable" in rival
    assert "<" not in rival  # its score is above the threshold: no false comparison is printed
    low = note(0.0, None)
    assert "< 0.60" in low and "another structure" not in low
    both = note(0.0, 0.6)
    assert "< 0.60" in both and "another structure 60% as probable" in both
