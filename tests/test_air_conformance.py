"""IHE AI Results (AIR) points checked on every object the chain writes.

The chain runs once, as a hospital install would out of the box (the bundled DEMO tumour
model and the DEMO EGFR classifier), on a synthetic chest with one solid tumour. Each
test reads the written files back and checks one AIR point (docs/conformance.md lists
them with where each is met); the expected values come from result.json, the bundles
on disk and the SEG itself, never from constants.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from radnode.config import settings_from_mapping
from radnode.dicom_io import codes
from radnode.dicom_io.provenance import (
    IHE_SCHEME,
    PROCESSING_ALGORITHM,
    algorithm_device_uid,
    algorithm_items,
)
from radnode.dicom_io.seg_writer import seg_to_masks
from radnode.dicom_io.series import load_series
from radnode.dicom_io.sr_writer import classifier_algorithm
from radnode.dicom_io.uids import is_valid_uid
from radnode.models.bundle import read_bundle_meta
from radnode.models.classifiers.bundle import bundle_checksum, load_classifier_bundle
from radnode.models.mutation import predict_endpoints
from radnode.models.tumour import DEMO_BUNDLE_PATH, TumourSegmentation
from radnode.phantom import generate_phantom
from radnode.pipeline import chain
from radnode.pipeline.chain import run_chain

OBJECTS = ("SEG", "RTSTRUCT", "SR")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: Concept name of TID 1500 row 4 (DCM 121058).
PROCEDURE_REPORTED = "121058"
#: The shipped DEMO EGFR classifier (the default ``models.classifier_bundles``).
DEMO_CLASSIFIER = Path(chain.__file__).parents[1] / "models" / "classifiers" / "demo" / "egfr-demo"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, seed=11, slices=48, tumors=1, matrix=256, tumor_types=["solid"])
    return out


@pytest.fixture(scope="module")
def run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("air")
    settings = settings_from_mapping({"models": {"device": "cpu"}, "radiomics": {"parallel": False}})
    result = run_chain(phantom / "ct", out, settings)
    assert result.status == "done", result.error
    payload = json.loads((out / "result.json").read_text())
    # The points below need a tumour and a prediction; say so if the demo model missed it.
    assert payload["models"]["tumour"]["voxels"] > 0, "the demo model found no tumour on the phantom"
    assert payload["mutations"]["predictions"], payload["mutations"]
    return {
        "out": out,
        "result": payload,
        "series": load_series(phantom / "ct"),
        **{name: pydicom.dcmread(out / f"{name}.dcm") for name in OBJECTS},
    }


def _algorithms_by_name(ds: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {str(item.ManufacturerModelName): item for item in algorithm_items(ds)}


def _expected_algorithms(result: dict[str, Any], name: str) -> dict[str, str]:
    """Model name -> version of every algorithm behind one object, from result.json."""
    models = result["models"]
    expected = {
        models["lung_mask"]["method"]: models["lung_mask"]["version"],
        models["tumour"]["method"]: models["tumour"]["version"],
    }
    if name == "SR":
        engine = result["radiomics"]["engine"]
        expected[engine["name"]] = str(engine["version"])
        for prediction in result["mutations"]["predictions"]:
            expected[prediction["classifier_name"]] = prediction["classifier_version"]
    return expected


# --- provenance: Contributing Equipment -------------------------------------------------------


@pytest.mark.parametrize("name", OBJECTS)
def test_each_algorithm_is_contributing_equipment(run: dict[str, Any], name: str) -> None:
    ds = run[name]
    items = _algorithms_by_name(ds)
    expected = _expected_algorithms(run["result"], name)
    assert {model: str(item.SoftwareVersions) for model, item in items.items()} == expected
    for model, item in items.items():
        [purpose] = item.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            PROCESSING_ALGORITHM.value, IHE_SCHEME, PROCESSING_ALGORITHM.meaning
        ), model
        assert str(item.Manufacturer).strip(), model
        assert is_valid_uid(str(item.DeviceUID)), model
    # Every algorithm has its own Device UID, and the private scheme is declared.
    assert len({str(i.DeviceUID) for i in items.values()}) == len(items)
    declared = {str(i.CodingSchemeDesignator) for i in ds.CodingSchemeIdentificationSequence}
    assert IHE_SCHEME in declared


def test_an_algorithm_has_one_device_uid_in_every_object(run: dict[str, Any]) -> None:
    uids = [
        {model: str(item.DeviceUID) for model, item in _algorithms_by_name(run[name]).items()}
        for name in OBJECTS
    ]
    for model, uid in uids[0].items():
        assert uids[1][model] == uid and uids[2][model] == uid, model


def test_device_uids_come_from_the_bundle_checksums(run: dict[str, Any]) -> None:
    tumour = run["result"]["models"]["tumour"]
    meta = read_bundle_meta(DEMO_BUNDLE_PATH)
    assert (tumour["method"], tumour["version"]) == (meta.name, meta.version)
    seg_items = _algorithms_by_name(run["SEG"])
    assert str(seg_items[meta.name].DeviceUID) == algorithm_device_uid(meta.checksum)
    classifier = load_classifier_bundle(DEMO_CLASSIFIER)
    [prediction] = run["result"]["mutations"]["predictions"]
    sr_items = _algorithms_by_name(run["SR"])
    assert str(sr_items[prediction["classifier_name"]].DeviceUID) == algorithm_device_uid(bundle_checksum(classifier))


def test_device_uid_changes_when_the_segmentation_bundle_changes(
    run: dict[str, Any], phantom: Path, tmp_path: Path
) -> None:
    """Same name and version, other content (as with a retrained bundle): another Device
    UID, and therefore other SEG/RTSTRUCT UIDs."""
    changed = tmp_path / "raseg-changed"
    shutil.copytree(DEMO_BUNDLE_PATH, changed)
    document = json.loads((changed / "bundle.json").read_text())
    document["training_data"] += " (retrained)"
    (changed / "bundle.json").write_text(json.dumps(document))
    original, other = read_bundle_meta(DEMO_BUNDLE_PATH), read_bundle_meta(changed)
    assert (original.name, original.version) == (other.name, other.version)
    assert original.checksum != other.checksum

    settings = settings_from_mapping({})
    series = chain.load_and_check(phantom / "ct", settings)
    lungs = chain.find_lungs(series)
    # "Tumour", or "Tumour (uncertain)" when the contour quality score flags it
    mask = next(m for name, m in seg_to_masks(run["out"] / "SEG.dcm", series).items() if name.startswith("Tumour"))
    options = chain.WriterOptions.from_settings(settings.output, pipeline_version=chain.PIPELINE_VERSION)
    written: dict[str, pydicom.Dataset] = {}
    for label, meta in (("original", original), ("changed", other)):
        tumour = TumourSegmentation(mask=mask, method=meta.name, version=meta.version, demo=meta.demo,
                                    checksum=meta.checksum)
        regions = chain.writer_regions(lungs, chain.make_regions(series, lungs, tumour, settings))
        out = tmp_path / label
        out.mkdir()
        files, _ = chain.write_contours(series, regions, chain.algorithm_info(tumour), options, out)
        written[label] = pydicom.dcmread(files["SEG"], stop_before_pixels=True)
    uid = {k: str(_algorithms_by_name(ds)[original.name].DeviceUID) for k, ds in written.items()}
    assert uid["original"] == str(_algorithms_by_name(run["SEG"])[original.name].DeviceUID)
    assert uid["changed"] == algorithm_device_uid(other.checksum) != uid["original"]
    assert written["changed"].SOPInstanceUID != written["original"].SOPInstanceUID
    # The lung mask did not change, so neither did its Device UID.
    lung = run["result"]["models"]["lung_mask"]["method"]
    assert {str(_algorithms_by_name(ds)[lung].DeviceUID) for ds in written.values()} == {
        str(_algorithms_by_name(run["SEG"])[lung].DeviceUID)
    }


def test_device_uid_changes_when_the_classifier_bundle_changes(run: dict[str, Any], tmp_path: Path) -> None:
    changed = tmp_path / "egfr-changed"
    shutil.copytree(DEMO_CLASSIFIER, changed)
    document = json.loads((changed / "classifier.json").read_text())
    document.setdefault("details", {})["threshold"] = 0.6
    (changed / "classifier.json").write_text(json.dumps(document))
    bundle = load_classifier_bundle(DEMO_CLASSIFIER)
    features = {name: 1.0 for name in bundle.meta.features}
    [before] = predict_endpoints({"EGFR": DEMO_CLASSIFIER}, features).predictions
    [after] = predict_endpoints({"EGFR": changed}, features).predictions
    assert after.threshold == 0.6 and before.threshold != 0.6
    assert before.probability == after.probability
    first = classifier_algorithm(chain.Prediction(**vars(before)))
    second = classifier_algorithm(chain.Prediction(**vars(after)))
    assert first.device_uid != second.device_uid
    [prediction] = run["result"]["mutations"]["predictions"]
    assert str(_algorithms_by_name(run["SR"])[prediction["classifier_name"]].DeviceUID) == first.device_uid


# --- the SR: TID 1500, procedure, references, primitives ----------------------------------------


def _report(run: dict[str, Any]) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(run["SR"])


def test_sr_is_a_comprehensive_3d_tid_1500_report_of_the_ct_procedure(run: dict[str, Any]) -> None:
    sr = run["SR"]
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == codes.IMAGING_MEASUREMENT_REPORT.value
    [procedure] = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == PROCEDURE_REPORTED
    ]
    value = procedure.ConceptCodeSequence[0]
    # The imaging procedure (a CT of the chest), never one of the algorithms.
    algorithms = {str(i.ManufacturerModelName) for i in algorithm_items(sr)}
    assert str(value.CodeMeaning) not in algorithms and str(value.CodeValue) not in algorithms
    assert (value.CodeValue, value.CodingSchemeDesignator) == (
        codes.PROCEDURE_CT_CHEST.value, codes.PROCEDURE_CT_CHEST.scheme_designator
    )
    ct = run["series"].datasets[0]
    assert ct.Modality == "CT" and "CT" in str(value.CodeMeaning)


def _segment_slices(run: dict[str, Any]) -> dict[int, set[str]]:
    """SEG segment number -> SOP Instance UIDs of the CT slices where its mask is non-empty."""
    masks = seg_to_masks(run["out"] / "SEG.dcm", run["series"])
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in run["SEG"].SegmentSequence}
    uids = [str(ds.SOPInstanceUID) for ds in run["series"].datasets]
    return {
        numbers[label]: {uids[k] for k in np.flatnonzero(mask.any(axis=(1, 2)))}
        for label, mask in masks.items()
    }


def _imaging_measurements(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The groups (CONTAINER items) under TID 1500 "Imaging Measurements" (DCM 126010)."""
    [container] = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [item for item in container.ContentSequence if item.ValueType == "CONTAINER"]


def test_every_finding_references_the_source_images_and_its_segment(run: dict[str, Any]) -> None:
    report = _report(run)
    seg = run["SEG"]
    slices = _segment_slices(run)
    ct_uids = {str(ds.SOPInstanceUID) for ds in run["series"].datasets}
    volumetric = report.content.get_volumetric_roi_measurement_groups()
    image_groups = report.content.get_image_measurement_groups()
    # No finding escapes the checks below (no planar or other kind of group).
    assert len(_imaging_measurements(run["SR"])) == len(volumetric) + len(image_groups)
    assert volumetric, "no finding references a segment"
    for group in volumetric:
        ref = group.referenced_segment
        assert ref is not None, group.tracking_identifier
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        [number] = ref.referenced_segment_numbers
        sources = {str(s.referenced_sop_instance_uid) for s in ref.source_images_for_segmentation}
        # Exactly the CT slices the segment lies on.
        assert sources == slices[number], group.tracking_identifier
    for group in image_groups:
        refs = {
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in group[0].ContentSequence if item.ValueType == "IMAGE"
        }
        assert refs and refs <= ct_uids, group.tracking_identifier
    # The tumour findings sit on the tumour segment.
    tumour = next(int(s.SegmentNumber) for s in seg.SegmentSequence if str(s.SegmentLabel).startswith("Tumour"))
    on_tumour = {g.tracking_identifier for g in volumetric if g.referenced_segment.referenced_segment_numbers == [tumour]}
    for prediction in run["result"]["mutations"]["predictions"]:
        assert f"{prediction['endpoint']} prediction" in on_tumour
    assert codes.TRACKING_TUMOUR_DETECTION in on_tumour


def test_every_finding_has_tracking_identifiers_and_an_algorithm(run: dict[str, Any]) -> None:
    report = _report(run)
    groups = [*report.content.get_volumetric_roi_measurement_groups(), *report.content.get_image_measurement_groups()]
    uids = [g.tracking_uid for g in groups]
    assert all(is_valid_uid(str(u)) for u in uids) and len(set(uids)) == len(uids)
    for group in groups:
        names = {str(item.ConceptNameCodeSequence[0].CodeMeaning) for item in group[0].ContentSequence}
        assert "Algorithm Name" in names and "Algorithm Version" in names, group.tracking_identifier


def test_predictions_are_a_measurement_and_a_qualitative_finding(run: dict[str, Any]) -> None:
    report = _report(run)
    groups = {g.tracking_identifier: g for g in report.content.get_volumetric_roi_measurement_groups()}
    for prediction in run["result"]["mutations"]["predictions"]:
        group = groups[f"{prediction['endpoint']} prediction"]
        [probability] = group.get_measurements()
        assert probability.name.value == codes.probability_code(prediction["endpoint"]).value
        assert float(probability.value) == pytest.approx(prediction["probability"])
        [finding] = group.get_qualitative_evaluations()
        assert finding.name.value == codes.status_code(prediction["endpoint"]).value
        positive = prediction["probability"] >= prediction["threshold"]
        assert finding.value.value == (codes.POSITIVE if positive else codes.NEGATIVE).value
        texts = [str(i.TextValue) for i in group[0].ContentSequence if i.ValueType == "TEXT"]
        called = prediction["positive_class"] if positive else prediction["negative_class"]
        assert any(called in t and f"{prediction['threshold']:g}" in t for t in texts), texts


def test_region_measurements_are_tid_300_measurements(run: dict[str, Any]) -> None:
    report = _report(run)
    groups = {g.tracking_identifier: g for g in report.content.get_volumetric_roi_measurement_groups()}
    for region in run["result"]["regions"]:
        if region["volume_ml"] == 0:
            continue
        volumes = [m for m in groups[region["name"]].get_measurements() if m.name.value == codes.VOLUME.value]
        assert [float(m.value) for m in volumes] == [pytest.approx(region["volume_ml"])]
        assert volumes[0].unit.value == codes.UNIT_ML.value


def test_sr_evidence_lists_the_ct_and_the_seg(run: dict[str, Any]) -> None:
    listed = {
        str(instance.ReferencedSOPInstanceUID)
        for study in run["SR"].CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    ct_uids = {str(ds.SOPInstanceUID) for ds in run["series"].datasets}
    assert listed == ct_uids | {str(run["SEG"].SOPInstanceUID)}


# --- the SEG: every segment automatic and identified ------------------------------------------------


def test_seg_segments_name_their_algorithm(run: dict[str, Any]) -> None:
    for segment in run["SEG"].SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert str(algorithm.AlgorithmName).strip() and str(algorithm.AlgorithmVersion).strip()


# --- dciodvfy ---------------------------------------------------------------------------------------------

#: Expected warnings: radnode's declared private scheme, and Device UID in Contributing
#: Equipment, which AIR requires and dciodvfy's dictionary does not list there.
ALLOWED_WARNINGS = (
    "Unrecognized defined term <99RADNODE>",
    "Unrecognized defined term <99IHE>",
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",
)


@pytest.mark.parametrize("name", OBJECTS)
def test_dciodvfy_finds_no_errors(run: dict[str, Any], name: str) -> None:
    result = subprocess.run(
        ["dciodvfy", str(run["out"] / f"{name}.dcm")], capture_output=True, text=True, timeout=300, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = sorted({line for line in lines if line.startswith("Warning")})
    print(f"dciodvfy {name}: {len(errors)} errors, warnings: {warnings}")
    assert errors == []
    assert [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)] == []
