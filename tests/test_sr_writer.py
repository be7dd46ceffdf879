"""TID 1500 SR writer: content tree, references to the SEG, codes, read back with srread."""

from __future__ import annotations

import io
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from radnode.dicom_io import codes
from radnode.dicom_io.regions import (
    AlgorithmInfo,
    MeasurementSet,
    Prediction,
    Region,
    RegionMeasurements,
    WriterOptions,
)
from radnode.dicom_io.rtstruct_read import rasterise_roi
from radnode.dicom_io.seg_writer import build_seg
from radnode.dicom_io.series import CTSeries, load_series
from radnode.dicom_io.sr_writer import build_sr

ALGORITHM = AlgorithmInfo(name="radnode-seg", version="1.2.3", model_versions={"unet": "0.4"})
FEATURES = {
    "original_glcm_Contrast": 3.25,
    "original_shape_Elongation": 0.81,
    "original_firstorder_Mean": -46.9,
    "wavelet-LLH_glrlm_RunEntropy": 4.5,
    "original_ngtdm_Busyness": float("nan"),
}


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> tuple[CTSeries, np.ndarray, np.ndarray]:
    root = shared_data / "ibsi_ct_phantom"
    series = load_series(root / "dicom" / "image")
    gtv = rasterise_roi(root / "dicom" / "mask" / "DCM_RS_00060.dcm", series, "GTV-1")
    lung = series.array < -500
    return series, gtv, lung


def _read(sr: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _measurement_set(gtv_ml: float, predictions: tuple[Prediction, ...] = ()) -> MeasurementSet:
    return MeasurementSet(
        regions=[
            RegionMeasurements(
                "Tumour", volume_ml=gtv_ml, mean_hu=-46.9, min_hu=-1000.0, max_hu=723.0,
                longest_diameter_mm=121.5, sphericity=0.62, features=FEATURES,
            ),
            RegionMeasurements("Lungs", volume_ml=2500.0, mean_hu=-820.0),
        ],
        predictions=predictions,
    )


def _values(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    out = {}
    for m in group.get_measurements():
        derivation = m.derivation
        key = m.name.meaning + (f" ({derivation.meaning})" if derivation is not None else "")
        out[key] = float(m.value)
    return out


def test_report_references_segments_and_reads_back(
    ibsi: tuple[CTSeries, np.ndarray, np.ndarray],
) -> None:
    series, gtv, lung = ibsi
    regions = [Region.of_kind("lung", lung), Region.of_kind("tumour", gtv)]
    seg = build_seg(series, regions, ALGORITHM)
    gtv_ml = float(np.count_nonzero(gtv)) * 0.977 * 0.977 * 3.0 / 1000
    prediction = Prediction("EGFR", 0.73, "egfr-rf", "0.9", "NSCLC-Radiogenomics (n=211)")
    sr = build_sr(series, seg, _measurement_set(gtv_ml, (prediction,)), ALGORITHM, WriterOptions())
    doc = _read(sr)
    assert isinstance(doc, hd.sr.Comprehensive3DSR)
    assert doc.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert doc.PatientID == series.datasets[0].PatientID
    assert doc.SeriesNumber == 9103 and doc.Manufacturer == "radnode"
    assert doc.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert doc.PreliminaryFlag == "PRELIMINARY" and doc.VerificationFlag == "UNVERIFIED"
    scheme_items = {i.CodingSchemeDesignator for i in doc.CodingSchemeIdentificationSequence}
    assert codes.RADNODE_SCHEME in scheme_items

    groups = {
        g.tracking_identifier: g for g in doc.content.get_volumetric_roi_measurement_groups()
    }
    # The detection finding sits on the tumour segment too (IHE AIR: a finding references
    # what it is about).
    assert set(groups) == {"Tumour", "Lungs", "EGFR prediction", "Tumour detection"}
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    for name in ("Tumour", "Lungs"):
        ref = groups[name].referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert labels[ref.referenced_segment_numbers[0]] == name

    tumour = _values(groups["Tumour"])
    assert tumour["Volume"] == pytest.approx(gtv_ml)
    assert tumour["Attenuation Coefficient (Mean)"] == -46.9
    assert tumour["Attenuation Coefficient (Minimum)"] == -1000.0
    assert tumour["Attenuation Coefficient (Maximum)"] == 723.0
    assert tumour["Maximum 3D Diameter of a Mesh"] == 121.5
    assert tumour["Sphericity"] == 0.62
    # IBSI codes where they exist, private codes otherwise, NaN left out
    names = {m.name.value: m.name.scheme_designator for m in groups["Tumour"].get_measurements()}
    assert names["ACUI"] == "IBSI" and names["Q3CK"] == "IBSI"
    private = codes.feature_concept("wavelet-LLH_glrlm_RunEntropy").name.value
    assert names[private] == codes.RADNODE_SCHEME
    assert codes.feature_concept("original_ngtdm_Busyness").name.value not in names
    units = {m.name.meaning: m.unit.value for m in groups["Tumour"].get_measurements()}
    assert units["Volume"] == "ml" and units["original_firstorder_Mean"] == "[hnsf'U]"

    egfr = groups["EGFR prediction"]
    assert egfr.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    [probability] = egfr.get_measurements()
    assert float(probability.value) == 0.73 and probability.name.value == "PEGFR"
    algorithm = _texts_by_name(egfr[0])
    assert algorithm["Algorithm Name"] == ["egfr-rf"]
    assert algorithm["Algorithm Version"] == ["0.9"]
    assert "training cohort=NSCLC-Radiogenomics (n=211)" in algorithm["Algorithm Parameters"]
    assert codes.DEMO_TEXT not in _all_text(doc)


def _texts_by_name(container: pydicom.Dataset) -> dict[str, list[str]]:
    """TEXT children of one container, by concept meaning."""
    out: dict[str, list[str]] = {}
    for item in container.ContentSequence:
        if item.ValueType == "TEXT":
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            out.setdefault(meaning, []).append(str(item.TextValue))
    return out


def _all_text(doc: pydicom.Dataset) -> list[str]:
    texts = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(doc.ContentSequence)
    return texts


def _qualitative(doc: pydicom.Dataset) -> pydicom.Dataset:
    [container] = [
        item for item in doc.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return container


def test_demo_predictions_carry_the_notice(ibsi: tuple[CTSeries, np.ndarray, np.ndarray]) -> None:
    series, gtv, _ = ibsi
    seg = build_seg(series, [Region.of_kind("tumour", gtv)], ALGORITHM)
    demo = Prediction("KRAS", 0.2, "demo-kras", "0.0.1", "synthetic", demo=True)
    sr = build_sr(series, seg, _measurement_set(358.0, (demo,)), ALGORITHM)
    doc = _read(sr)
    texts = _all_text(doc)
    assert texts.count(codes.DEMO_TEXT) == 2  # in the prediction group and at the top
    assert doc.SpecificCharacterSet == "ISO_IR 192"
    container = _qualitative(doc)
    finding = container.ContentSequence[0].ConceptCodeSequence[0]
    assert finding.CodeValue == codes.PRESENT.value


def test_no_tumour_report_says_so(ibsi: tuple[CTSeries, np.ndarray, np.ndarray]) -> None:
    series, gtv, lung = ibsi
    seg = build_seg(
        series, [Region.of_kind("lung", lung), Region.of_kind("tumour", np.zeros_like(gtv))],
        ALGORITHM,
    )
    measurements = MeasurementSet(regions=[RegionMeasurements("Lungs", volume_ml=2400.0)])
    doc = _read(build_sr(series, seg, measurements, ALGORITHM))
    groups = doc.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Lungs"]
    assert codes.NO_TUMOUR_TEXT in _all_text(doc)
    container = _qualitative(doc)
    assert container.ContentSequence[0].ConceptCodeSequence[0].CodeValue == codes.ABSENT.value
    [detection] = doc.content.get_image_measurement_groups()
    evaluation = detection.get_qualitative_evaluations()[0]
    assert evaluation.value.value == codes.ABSENT.value
    # IHE AIR: a finding without a segment references the images it was made on.
    images = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in detection[0].ContentSequence if item.ValueType == "IMAGE"
    }
    assert images == {str(ds.SOPInstanceUID) for ds in series.datasets}


def test_without_seg_and_with_feature_subset(ibsi: tuple[CTSeries, np.ndarray, np.ndarray]) -> None:
    series, gtv, _ = ibsi
    doc = _read(build_sr(series, None, MeasurementSet(), ALGORITHM))
    assert codes.NO_TUMOUR_TEXT in _all_text(doc)

    seg = build_seg(series, [Region.of_kind("tumour", gtv)], ALGORITHM)
    opts = WriterOptions(sr_features=["original_glcm_Contrast", "not_computed_feature"])
    doc = _read(build_sr(series, seg, _measurement_set(358.0), ALGORITHM, opts))
    [tumour] = [
        g for g in doc.content.get_volumetric_roi_measurement_groups()
        if g.tracking_identifier == "Tumour"
    ]
    written = {m.name.meaning for m in tumour.get_measurements()}
    assert "Contrast of GLCM" in written
    assert not written & {"original_firstorder_Mean", "wavelet-LLH_glrlm_RunEntropy"}


def test_prediction_without_a_tumour_segment_is_made_on_the_images(
    ibsi: tuple[CTSeries, np.ndarray, np.ndarray],
) -> None:
    series, _, _ = ibsi
    prediction = Prediction("KRAS", 0.31, "kras-b", "2", "cohort", threshold=0.25,
                            negative_class="wild-type", positive_class="mutant", checksum="ab" * 32)
    doc = _read(build_sr(series, None, MeasurementSet(predictions=[prediction]), ALGORITHM))
    groups = {g.tracking_identifier: g for g in doc.content.get_image_measurement_groups()}
    kras = groups["KRAS prediction"]
    [finding] = kras.get_qualitative_evaluations()
    assert (finding.name.value, finding.value.value) == (codes.status_code("KRAS").value, codes.POSITIVE.value)
    assert any("mutant" in t and "threshold 0.25" in t for t in _texts_by_name(kras[0])["Comment"])
    images = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kras[0].ContentSequence if item.ValueType == "IMAGE"
    }
    assert images == {str(ds.SOPInstanceUID) for ds in series.datasets}
    # The classifier is contributing equipment even without a SEG.
    models = [str(i.ManufacturerModelName) for i in doc.ContributingEquipmentSequence]
    assert "kras-b" in models


def test_sr_uids_are_deterministic(ibsi: tuple[CTSeries, np.ndarray, np.ndarray]) -> None:
    series, gtv, _ = ibsi
    seg = build_seg(series, [Region.of_kind("tumour", gtv)], ALGORITHM)
    a = build_sr(series, seg, _measurement_set(358.0), ALGORITHM)
    b = build_sr(series, seg, _measurement_set(358.0), ALGORITHM)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != seg.SOPInstanceUID


def test_invalid_probability_is_rejected() -> None:
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        Prediction("EGFR", 1.5, "x", "1", "cohort")
    with pytest.raises(ValueError):
        Prediction("EGFR", math.nan, "x", "1", "cohort")
