"""QC of CT series: each case is built by editing copies of real phantom headers."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, MRImageStorage, generate_uid

from radnode.dicom_io import qc
from radnode.dicom_io.qc import QCLimits, QCReport, SeriesRejected, Severity
from radnode.dicom_io.series import load_series

N_SLICES = 60
SPACING = 3.0
PATIENT_NAME = "PAT1"  # the phantom's Patient's Name: must never appear in a report

Editor = Callable[[int, Dataset], Dataset | None]


@pytest.fixture(scope="module")
def phantom(shared_data: Path) -> list[Dataset]:
    """The 60 phantom slices sorted by z (index k == slice k of the loaded series)."""
    files = sorted((shared_data / "ibsi_ct_phantom" / "dicom" / "image").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    assert len(datasets) == N_SLICES
    assert str(datasets[0].PatientName) == PATIENT_NAME
    return datasets


def write(folder: Path, datasets: list[Dataset], edit: Editor | None = None) -> list[Path]:
    """Write copies of ``datasets`` (edited by ``edit``; returning None drops a slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, original in enumerate(datasets):
        ds = copy.deepcopy(original)
        ds = edit(k, ds) if edit else ds
        if ds is None:
            continue
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def reject(path: Path, **kwargs: object) -> QCReport:
    with pytest.raises(SeriesRejected) as info:
        load_series(path, **kwargs)
    report = info.value.report
    assert str(info.value) == report.summary()
    assert not report.passed
    json.dumps(report.to_dict())  # always serialisable
    assert PATIENT_NAME not in json.dumps(report.to_dict())
    return report


def issue(report: QCReport, code: str) -> qc.QCIssue:
    (found,) = [i for i in report.issues if i.code == code]
    return found


def test_clean_series_passes_and_records_harmonisation_facts(
    phantom: list[Dataset], tmp_path: Path
) -> None:
    write(tmp_path, phantom)
    series = load_series(tmp_path)
    report = series.qc
    assert report.passed and report.issues == [] and report.excluded == []
    rec = report.to_dict()["recorded"]
    json.dumps(rec)
    assert rec["slice_thickness_mm"] == float(phantom[0].SliceThickness)
    assert rec["manufacturer"] == phantom[0].Manufacturer
    assert rec["manufacturer_model_name"] == phantom[0].ManufacturerModelName
    assert rec["convolution_kernel"] is None and rec["kvp"] is None  # absent in the phantom
    assert rec["n_slices"] == N_SLICES
    assert rec["series_instance_uid"] == phantom[0].SeriesInstanceUID


def test_recorded_kernel_and_kvp(phantom: list[Dataset], tmp_path: Path) -> None:
    def edit(k: int, ds: Dataset) -> Dataset:
        ds.ConvolutionKernel = ["B30f", "2"]
        ds.KVP = "100"
        return ds

    write(tmp_path, phantom, edit)
    rec = load_series(tmp_path).qc.recorded
    assert rec["convolution_kernel"] == "B30f\\2"
    assert rec["kvp"] == 100.0


def test_missing_slice(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom, lambda k, ds: None if k == 30 else ds)
    report = reject(tmp_path)
    found = issue(report, qc.MISSING_SLICES)
    assert found.severity is Severity.ERROR
    assert found.details["estimated_missing"] == 1
    # the message names the neighbours of the gap and where it is
    assert phantom[29].SOPInstanceUID in found.message
    assert phantom[31].SOPInstanceUID in found.message
    assert f"{float(phantom[29].ImagePositionPatient[2]):.1f}" in found.message
    assert report.codes == {qc.MISSING_SLICES}

    series = load_series(tmp_path, strict=False)  # still usable, flagged
    assert not series.qc.passed and series.qc.has(qc.MISSING_SLICES)
    assert series.array.shape[0] == N_SLICES - 1
    assert series.spacing[2] == pytest.approx(SPACING, abs=1e-3)


def test_non_uniform_spacing(phantom: list[Dataset], tmp_path: Path) -> None:
    def edit(k: int, ds: Dataset) -> Dataset:
        if k == 20:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.6]
        return ds

    write(tmp_path, phantom, edit)
    report = reject(tmp_path)
    found = issue(report, qc.NON_UNIFORM_SPACING)
    assert found.details["max_spacing_mm"] == pytest.approx(SPACING + 0.6, abs=1e-3)
    assert found.details["min_spacing_mm"] == pytest.approx(SPACING - 0.6, abs=1e-3)
    assert phantom[20].SOPInstanceUID in found.message
    assert qc.MISSING_SLICES not in report.codes
    # a generous tolerance accepts it
    assert load_series(tmp_path, qc_limits=QCLimits(spacing_tolerance_mm=1.0)).qc.passed


def test_gantry_tilt(phantom: list[Dataset], tmp_path: Path) -> None:
    tilt = 15.0

    def edit(k: int, ds: Dataset) -> Dataset:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * SPACING * math.tan(math.radians(tilt)), z]
        ds.GantryDetectorTilt = str(tilt)
        return ds

    write(tmp_path, phantom, edit)
    report = reject(tmp_path)
    found = issue(report, qc.GANTRY_TILT)
    assert found.details["tilt_deg"] == pytest.approx(tilt, abs=0.05)
    assert "15.00 degrees" in found.message and phantom[0].SeriesInstanceUID in found.message
    assert report.recorded["gantry_detector_tilt_deg"] == tilt
    assert load_series(tmp_path, qc_limits=QCLimits(max_tilt_deg=20)).qc.passed


def test_mixed_orientation(phantom: list[Dataset], tmp_path: Path) -> None:
    angle = math.radians(10)

    def edit(k: int, ds: Dataset) -> Dataset:
        if k == 12:
            ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(angle), math.sin(angle)]
        return ds

    write(tmp_path, phantom, edit)
    report = reject(tmp_path, strict=False)  # no grid can be built: fatal either way
    found = issue(report, qc.MIXED_ORIENTATION)
    assert found.details["sop_instance_uids"] == [phantom[12].SOPInstanceUID]
    assert phantom[12].SOPInstanceUID in found.message


def test_two_series_mixed(phantom: list[Dataset], tmp_path: Path) -> None:
    other_uid = generate_uid()

    write(tmp_path / "a", phantom)

    def other(k: int, ds: Dataset) -> Dataset | None:
        if k % 2:
            return None
        ds.SeriesInstanceUID = other_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    write(tmp_path / "b", phantom, other)
    report = reject(tmp_path, strict=False)
    found = issue(report, qc.MIXED_SERIES)
    assert found.message.startswith("mixed series: 2 series found: ")
    assert phantom[0].SeriesInstanceUID in found.message and other_uid in found.message

    chosen = load_series(tmp_path, series_uid=other_uid, qc_limits=QCLimits(min_slices=10))
    assert chosen.series_instance_uid == other_uid and len(chosen.datasets) == N_SLICES // 2
    assert chosen.spacing[2] == pytest.approx(2 * SPACING, abs=1e-3)
    assert [e.reason for e in chosen.qc.excluded] == [qc.EXCLUDED_OTHER_SERIES] * N_SLICES

    missing = generate_uid()
    report = reject(tmp_path, series_uid=missing)
    assert missing in issue(report, qc.SERIES_NOT_FOUND).message


def test_localizer_excluded(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom)
    scout = copy.deepcopy(phantom[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal topogram
    scout.SOPInstanceUID = generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.save_as(tmp_path / "scout.dcm")

    series = load_series(tmp_path)
    assert series.qc.passed and len(series.datasets) == N_SLICES
    found = issue(series.qc, qc.LOCALIZER_EXCLUDED)
    assert found.severity is Severity.WARNING and scout.SOPInstanceUID in found.message
    assert [(e.reason, e.sop_instance_uid) for e in series.qc.excluded] == [
        (qc.LOCALIZER_EXCLUDED, scout.SOPInstanceUID)
    ]


def test_too_few_slices(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom[:10])
    found = issue(reject(tmp_path), qc.TOO_FEW_SLICES)
    assert "10 slice(s)" in found.message and "at least 20" in found.message
    assert load_series(tmp_path, qc_limits=QCLimits(min_slices=10)).qc.passed


def test_thick_slices(phantom: list[Dataset], tmp_path: Path) -> None:
    def edit(k: int, ds: Dataset) -> Dataset:
        ds.SliceThickness = "6.0"
        return ds

    write(tmp_path / "thick", phantom, edit)
    found = issue(reject(tmp_path / "thick"), qc.SLICE_THICKNESS_OVER_LIMIT)
    assert found.details["slice_thickness_mm"] == 6.0 and "over the limit of 5 mm" in found.message

    write(tmp_path / "plain", phantom)  # 3 mm fails a stricter configured limit
    found = issue(
        reject(tmp_path / "plain", qc_limits=QCLimits(max_slice_thickness_mm=2.0)),
        qc.SLICE_THICKNESS_OVER_LIMIT,
    )
    assert "3 mm" in found.message


def _as_mr(k: int, ds: Dataset) -> Dataset:
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return ds


def test_mr_series_is_not_ct(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom, _as_mr)
    report = reject(tmp_path, strict=False)
    found = issue(report, qc.NOT_CT)
    assert "MR" in found.message and phantom[0].SeriesInstanceUID in found.message


def test_mr_file_inside_ct_series(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom, lambda k, ds: _as_mr(k, ds) if k == 7 else ds)
    found = issue(reject(tmp_path), qc.NOT_CT)
    assert found.details["sop_instance_uids"] == [phantom[7].SOPInstanceUID]


def test_corrupted_pixel_data(phantom: list[Dataset], tmp_path: Path) -> None:
    def edit(k: int, ds: Dataset) -> Dataset:
        if k == 5:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        return ds

    write(tmp_path, phantom, edit)
    report = reject(tmp_path, strict=False)
    found = issue(report, qc.UNREADABLE_PIXEL_DATA)
    assert phantom[5].SOPInstanceUID in found.message and "slice_005.dcm" in found.message
    assert found.details["failures"][0]["transfer_syntax_uid"] == str(
        phantom[5].file_meta.TransferSyntaxUID
    )


@pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")
@pytest.mark.parametrize("sop_class", ["legacy_converted", "enhanced"])
def test_enhanced_ct_multiframe(phantom: list[Dataset], tmp_path: Path, sop_class: str) -> None:
    frames = LegacyConvertedEnhancedCTImage(
        phantom[:25],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    if sop_class == "enhanced":
        frames.SOPClassUID = EnhancedCTImageStorage
        frames.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    frames.save_as(tmp_path / "multiframe.dcm")
    report = reject(tmp_path, strict=False)
    found = issue(report, qc.ENHANCED_CT_UNSUPPORTED)
    assert frames.SeriesInstanceUID in found.message and frames.SOPClassUID in found.message
    assert "convert it to single-frame CT Image Storage" in found.message

    # beside a classic series it is simply another series to ignore
    write(tmp_path / "classic", phantom)
    series = load_series(tmp_path)
    assert len(series.datasets) == N_SLICES
    assert issue(series.qc, qc.OTHER_SERIES_IGNORED).severity is Severity.WARNING


def test_missing_geometry(phantom: list[Dataset], tmp_path: Path) -> None:
    def edit(k: int, ds: Dataset) -> Dataset:
        if k == 3:
            del ds.ImagePositionPatient
        return ds

    write(tmp_path, phantom, edit)
    found = issue(reject(tmp_path, strict=False), qc.MISSING_GEOMETRY)
    assert phantom[3].SOPInstanceUID in found.message and "ImagePositionPatient" in found.message


def test_no_images(shared_data: Path, tmp_path: Path) -> None:
    shutil.copy(shared_data / "ibsi_ct_phantom" / "dicom" / "mask" / "DCM_RS_00060.dcm", tmp_path)
    (tmp_path / "readme.txt").write_text("nothing to see")
    report = reject(tmp_path, strict=False)
    assert report.codes == {qc.NO_IMAGES}
    reasons = sorted(e.reason for e in report.excluded)
    assert reasons == [qc.EXCLUDED_NON_IMAGE, qc.EXCLUDED_NOT_DICOM]


def test_duplicates(phantom: list[Dataset], tmp_path: Path) -> None:
    paths = write(tmp_path / "s", phantom)
    shutil.copy(paths[4], tmp_path / "copy_of_slice_4.dcm")  # same instance twice: harmless
    series = load_series(tmp_path)
    assert series.qc.passed and len(series.datasets) == N_SLICES
    assert phantom[4].SOPInstanceUID in issue(series.qc, qc.DUPLICATE_INSTANCE).message

    clash = copy.deepcopy(phantom[4])  # another instance at the same position: ambiguous
    clash.SOPInstanceUID = generate_uid()
    clash.file_meta.MediaStorageSOPInstanceUID = clash.SOPInstanceUID
    clash.save_as(tmp_path / "clash.dcm")
    found = issue(reject(tmp_path, strict=False), qc.DUPLICATE_SLICES)
    assert clash.SOPInstanceUID in found.message and phantom[4].SOPInstanceUID in found.message


def test_report_round_trips_through_json(phantom: list[Dataset], tmp_path: Path) -> None:
    write(tmp_path, phantom, lambda k, ds: None if k in (10, 40) else ds)
    series = load_series(tmp_path, strict=False)
    data = json.loads(json.dumps(series.qc.to_dict()))
    assert data["passed"] is False
    (missing,) = data["issues"]
    assert missing["code"] == qc.MISSING_SLICES and missing["severity"] == "error"
    assert missing["details"]["estimated_missing"] == 2 and len(missing["details"]["gaps"]) == 2


def test_spacing_rule_on_plain_numbers() -> None:
    uids = [f"1.2.3.{i}" for i in range(6)]
    limits = QCLimits()
    assert qc.check_spacing(np.arange(6) * 2.5, uids, limits) == []
    (gap,) = qc.check_spacing(np.array([0, 2.5, 5, 12.5, 15, 17.5]), uids, limits)
    assert gap.code == qc.MISSING_SLICES and gap.details["estimated_missing"] == 2
    (dup,) = qc.check_spacing(np.array([0, 2.5, 2.5, 5, 7.5, 10]), uids, limits)
    assert dup.code == qc.DUPLICATE_SLICES


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="min_slices"):
        QCLimits(min_slices=0)
    with pytest.raises(ValueError, match="max_slice_thickness_mm"):
        QCLimits(max_slice_thickness_mm=-1)
