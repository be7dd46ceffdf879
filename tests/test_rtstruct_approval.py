"""The approved RTSTRUCT copy: Approval module, rejected structures left out consistently,
a new deterministic instance; checked by dciodvfy, plastimatch and radnode's own reader."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from radnode.dicom_io.approval import ApprovalError, approved_rtstruct, roi_names
from radnode.dicom_io.regions import AlgorithmInfo, Region, RegionKind
from radnode.dicom_io.rtstruct_read import UnknownRoiError, rasterise_roi, read_rtstruct_rois
from radnode.dicom_io.rtstruct_writer import REVIEW_LABEL, build_rtstruct
from radnode.dicom_io.series import load_series
from radnode.phantom.generate import generate_phantom

ALGORITHM = AlgorithmInfo(name="radnode-test", version="1", model_versions={})
WHEN = datetime.datetime(2026, 3, 14, 9, 26, 53)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("approval")
    generate_phantom(root / "phantom", seed=5, slices=20, tumors=1, matrix=128, tumor_types=["solid"])
    series = load_series(root / "phantom" / "ct")
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "phantom" / "truth" / "lungs.nii.gz")))
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "phantom" / "truth" / "tumor.nii.gz"))) > 0
    regions = [Region.of_kind(RegionKind.LUNG_RIGHT, lungs == 1), Region.of_kind(RegionKind.LUNG_LEFT, lungs == 2),
               Region.of_kind(RegionKind.TUMOUR, tumour)]
    original = build_rtstruct(series, regions, ALGORITHM)
    path = root / "RTSTRUCT.dcm"
    original.save_as(path, enforce_file_format=True)
    return {"root": root, "series": series, "path": path, "masks": {r.name: r.mask for r in regions}}


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: make debian-tools")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def _plastimatch(rtstruct: Path, ct_dir: Path, out: Path) -> dict[str, np.ndarray]:
    tool = shutil.which("plastimatch")
    if tool is None:
        pytest.fail("plastimatch is not installed: make debian-tools")
    subprocess.run([tool, "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_dir), "--output-prefix",
                    str(out), "--prefix-format", "nrrd"], capture_output=True, timeout=120, check=True)
    return {p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool) for p in out.glob("*.nrrd")}


def test_approved_copy_without_the_rejected_tumour(case: dict) -> None:
    original = pydicom.dcmread(case["path"])
    names = roi_names(original)
    tumour = next(n for n in names if n.startswith("Tumour"))
    approved = approved_rtstruct(original, "dr.ada", WHEN, rejected=[tumour], comment="lungs fine, GTV too small")
    out = case["root"] / "approved.dcm"
    approved.save_as(out, enforce_file_format=True)
    back = pydicom.dcmread(out)

    assert back.ApprovalStatus == "APPROVED"
    assert (back.ReviewDate, back.ReviewTime, str(back.ReviewerName)) == ("20260314", "092653", "dr.ada")
    assert "lungs fine, GTV too small" in back.StructureSetDescription and tumour in back.StructureSetDescription
    assert back.SOPInstanceUID != original.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.SeriesInstanceUID == original.SeriesInstanceUID and back.InstanceNumber == original.InstanceNumber + 1
    # The tumour is gone from all three sequences, the lungs are unchanged.
    kept = [n for n in names if n != tumour]
    assert roi_names(back) == kept
    numbers = {int(r.ROINumber) for r in back.StructureSetROISequence}
    assert {int(c.ReferencedROINumber) for c in back.ROIContourSequence} == numbers
    assert {int(o.ReferencedROINumber) for o in back.RTROIObservationsSequence} == numbers
    assert all(str(o.ROIInterpreter) == "dr.ada" for o in back.RTROIObservationsSequence)
    assert {r.name for r in read_rtstruct_rois(back)} == set(kept)
    with pytest.raises(UnknownRoiError):
        rasterise_roi(back, case["series"], tumour)
    for name in kept:
        assert np.array_equal(rasterise_roi(back, case["series"], name), rasterise_roi(original, case["series"], name))
    assert pydicom.dcmread(case["path"]).ApprovalStatus == "UNAPPROVED"  # the original is untouched

    assert _dciodvfy_errors(out) == []
    masks = _plastimatch(out, case["root"] / "phantom" / "ct", case["root"] / "plastimatch")
    assert set(masks) == set(kept)
    for name in kept:
        truth = case["masks"][name]
        dice = 2 * np.count_nonzero(masks[name] & truth) / (np.count_nonzero(masks[name]) + np.count_nonzero(truth))
        assert dice >= 0.95, (name, dice)


def test_the_same_approval_is_the_same_instance_and_a_different_one_is_not(case: dict) -> None:
    original = pydicom.dcmread(case["path"])
    tumour = next(n for n in roi_names(original) if n.startswith("Tumour"))
    first = approved_rtstruct(original, "dr.ada", WHEN)
    again = approved_rtstruct(original, "dr.ada", WHEN + datetime.timedelta(minutes=5))
    other = approved_rtstruct(original, "dr.ada", WHEN, rejected=[tumour])
    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert roi_names(first) == roi_names(original)
    out = case["root"] / "approved_all.dcm"
    first.save_as(out, enforce_file_format=True)
    assert _dciodvfy_errors(out) == []


def test_an_approved_uncertain_tumour_is_labelled_reviewed(case: dict) -> None:
    regions = [Region.of_kind(RegionKind.TUMOUR, case["masks"]["Tumour"], name="Tumour (uncertain)",
                              review_note="tumour contour uncertain - review required (quality score 0.41 < 0.6)")]
    flagged = build_rtstruct(case["series"], regions, ALGORITHM)
    assert flagged.RTROIObservationsSequence[0].ROIObservationLabel == REVIEW_LABEL
    approved = approved_rtstruct(flagged, "dr.ada", WHEN)
    (obs,) = approved.RTROIObservationsSequence
    assert obs.ROIObservationLabel == "REVIEWED" and obs.RTROIInterpretedType == "GTV"
    assert obs.ROIObservationDescription.startswith("approved at review by dr.ada; was: tumour contour uncertain")
    out = case["root"] / "approved_flagged.dcm"
    approved.save_as(out, enforce_file_format=True)
    assert _dciodvfy_errors(out) == []


def test_unknown_or_all_rejected_structures_are_refused(case: dict) -> None:
    original = pydicom.dcmread(case["path"])
    with pytest.raises(ApprovalError, match="no structure called '../etc'"):
        approved_rtstruct(original, "dr.ada", WHEN, rejected=["../etc"])
    with pytest.raises(ApprovalError, match="every structure"):
        approved_rtstruct(original, "dr.ada", WHEN, rejected=roi_names(original))

