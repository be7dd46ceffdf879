"""Loading real CT series: geometry, HU values, file discovery and transfer syntaxes."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from radnode.dicom_io.qc import QCLimits, SeriesRejected
from radnode.dicom_io.series import CTSeries, load_series

IBSI = "ibsi_ct_phantom"
LIDC_SLAB_LIMITS = QCLimits(min_slices=10)


def _ibsi_files(shared_data: Path) -> list[Path]:
    return sorted((shared_data / IBSI / "dicom" / "image").glob("*.dcm"))


def _lidc_dir(shared_data: Path, case: str) -> Path:
    (series_dir,) = [p.parent for p in (shared_data / "lidc_slabs" / case).rglob("*.xml")]
    return series_dir


def _sitk_reference(files: list[Path]) -> sitk.Image:
    """The same files read by SimpleITK/GDCM, an independent reader."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(files[0].parent))
    reader.SetFileNames(names)
    return reader.Execute()


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> CTSeries:
    return load_series(shared_data / IBSI / "dicom" / "image")


def _assert_same_geometry(image: sitk.Image, ref: sitk.Image, tol: float = 1e-3) -> None:
    assert image.GetSize() == ref.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin(), atol=tol)
    np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing(), atol=tol)
    np.testing.assert_allclose(image.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_ibsi_phantom_matches_nifti(ibsi: CTSeries, shared_data: Path) -> None:
    ref = sitk.ReadImage(str(shared_data / IBSI / "nifti" / "image" / "phantom.nii.gz"))
    _assert_same_geometry(ibsi.image, ref)
    np.testing.assert_array_equal(ibsi.array, sitk.GetArrayViewFromImage(ref))
    assert ibsi.image.GetPixelID() == sitk.sitkInt16  # slope 1, intercept -1000
    assert ibsi.qc.passed and not ibsi.qc.issues
    assert ibsi.array.shape == (len(ibsi.datasets), 201, 204)


def test_slice_k_comes_from_datasets_k(ibsi: CTSeries) -> None:
    positions = []
    for k, (ds, path) in enumerate(zip(ibsi.datasets, ibsi.files, strict=True)):
        assert "PixelData" not in ds
        on_disk = pydicom.dcmread(path)
        assert on_disk.SOPInstanceUID == ds.SOPInstanceUID
        hu = on_disk.pixel_array.astype(np.int32) * int(on_disk.RescaleSlope) + int(
            on_disk.RescaleIntercept
        )
        np.testing.assert_array_equal(ibsi.array[k], hu)
        np.testing.assert_allclose(
            ibsi.image.TransformIndexToPhysicalPoint((0, 0, k)),
            [float(v) for v in ds.ImagePositionPatient],
            atol=1e-3,
        )
        positions.append(float(ds.ImagePositionPatient[2]))
    assert np.all(np.diff(positions) > 0)
    first = pydicom.dcmread(ibsi.files[0], stop_before_pixels=True)
    assert ibsi.series_instance_uid == first.SeriesInstanceUID
    assert ibsi.study_instance_uid == first.StudyInstanceUID
    assert ibsi.frame_of_reference_uid == first.FrameOfReferenceUID
    assert ibsi.modality == "CT"
    assert ibsi.slice_thickness == pytest.approx(float(first.SliceThickness))
    assert ibsi.spacing[2] == pytest.approx(3.0, abs=1e-3)


def test_lung1_002_geometry_matches_mask_grid(shared_data: Path) -> None:
    case = shared_data / "nsclc_radiomics" / "LUNG1-002"
    series = load_series(case)  # the RTSTRUCT beside the CT is left out, not an error
    mask = sitk.ReadImage(str(case / "mask_GTV_labels.nii.gz"))
    _assert_same_geometry(series.image, mask)
    assert series.image.GetSize() == (512, 512, 111)
    reasons = sorted(e.reason for e in series.qc.excluded)
    assert reasons == ["non_image_object", "not_dicom", "not_dicom"]  # RTSTRUCT, README, NIfTI
    assert series.qc.passed
    assert series.array.min() >= -1024 and series.array.max() <= 3071


@pytest.mark.parametrize("case", ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
def test_lidc_slabs_load(shared_data: Path, case: str) -> None:
    folder = _lidc_dir(shared_data, case)
    files = sorted(folder.glob("*.dcm"))
    assert all(f.name.startswith("-") for f in files)
    with pytest.raises(SeriesRejected) as info:  # 11-16 slices < default min_slices 20
        load_series(folder)
    assert info.value.report.codes == {"too_few_slices"}

    series = load_series(folder, qc_limits=LIDC_SLAB_LIMITS)
    ref = _sitk_reference(files)
    _assert_same_geometry(series.image, ref)
    np.testing.assert_array_equal(series.array, sitk.GetArrayViewFromImage(ref))
    assert series.image.GetPixelID() == sitk.sitkInt16
    assert series.convolution_kernel == "STANDARD"
    rec = series.qc.recorded
    assert rec["kvp"] == 120.0 and rec["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert rec["slice_thickness_mm"] == pytest.approx(2.5)
    assert rec["slice_spacing_mm"] == pytest.approx(2.5, abs=1e-3)
    assert [e.reason for e in series.qc.excluded] == ["not_dicom"]  # the LIDC XML


def test_shuffled_nested_folders(ibsi: CTSeries, shared_data: Path, tmp_path: Path) -> None:
    files = _ibsi_files(shared_data)
    rng = random.Random(7)
    rng.shuffle(files)
    for i, f in enumerate(files):
        sub = tmp_path / f"a{i % 3}" / f"b{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f"{rng.randrange(10**6)}_{i}")
    (tmp_path / "notes.txt").write_text("not DICOM")
    series = load_series(str(tmp_path))
    np.testing.assert_array_equal(series.array, ibsi.array)
    assert series.image.GetOrigin() == ibsi.image.GetOrigin()
    assert [d.SOPInstanceUID for d in series.datasets] == [d.SOPInstanceUID for d in ibsi.datasets]
    assert [e.reason for e in series.qc.excluded] == ["not_dicom"]


def test_explicit_file_list(ibsi: CTSeries, shared_data: Path) -> None:
    files = _ibsi_files(shared_data)[::-1]
    series = load_series(files)
    np.testing.assert_array_equal(series.array, ibsi.array)


def test_dicomdir(ibsi: CTSeries, shared_data: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "CT").mkdir(parents=True)
    for i, f in enumerate(_ibsi_files(shared_data)):
        shutil.copy(f, media / "CT" / f"I{i:04d}")
    shutil.copy(shared_data / IBSI / "dicom" / "mask" / "DCM_RS_00060.dcm", media / "CT" / "RS0001")
    # -Nxc: the phantom is Implicit VR, which the general-purpose profile only warns about
    subprocess.run(
        ["dcmmkdir", "-Nxc", "+I", "--recurse", "CT"], cwd=media, check=True, capture_output=True
    )
    assert (media / "DICOMDIR").is_file()
    # a stray second series the DICOMDIR does not reference must not be read
    stray = pydicom.dcmread(_ibsi_files(shared_data)[0])
    stray.SeriesInstanceUID = pydicom.uid.generate_uid()
    stray.SOPInstanceUID = pydicom.uid.generate_uid()
    stray.save_as(media / "CT" / "STRAY")

    for target in (media, media / "DICOMDIR"):
        series = load_series(target)
        np.testing.assert_array_equal(series.array, ibsi.array)
        assert series.qc.passed
        assert not any("STRAY" in e.path for e in series.qc.excluded)
    with pytest.raises(SeriesRejected) as info:  # walking the files instead sees both series
        load_series(sorted((media / "CT").iterdir()))
    assert "mixed_series" in info.value.report.codes


def _compress(src: Path, dst: Path, syntax: str) -> None:
    """Re-encode one file losslessly: DCMTK for JPEG-LS and RLE, pydicom for JPEG 2000."""
    if syntax == JPEGLSLossless:
        subprocess.run(["dcmcjpls", str(src), str(dst)], check=True, capture_output=True)
    elif syntax == RLELossless:
        subprocess.run(["dcmcrle", str(src), str(dst)], check=True, capture_output=True)
    elif syntax == JPEG2000Lossless:
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(dst)
    elif syntax == ExplicitVRLittleEndian:
        shutil.copy(src, dst)
    else:  # pragma: no cover - test table error
        raise AssertionError(syntax)


SYNTAXES = [JPEGLSLossless, JPEG2000Lossless, RLELossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["jpeg-ls", "jpeg2000", "rle"])
def test_compressed_ibsi_series_same_hu(
    ibsi: CTSeries, shared_data: Path, tmp_path: Path, syntax: str
) -> None:
    for f in _ibsi_files(shared_data):
        _compress(f, tmp_path / f.name, syntax)
    series = load_series(tmp_path)
    assert series.qc.recorded["transfer_syntax_uids"] == [str(syntax)]
    np.testing.assert_array_equal(series.array, ibsi.array)
    assert series.image.GetPixelID() == sitk.sitkInt16


def test_compressed_signed_slab_mixed_syntaxes(shared_data: Path, tmp_path: Path) -> None:
    """Signed 16-bit GE slices, each slice in another transfer syntax."""
    folder = _lidc_dir(shared_data, "LIDC-IDRI-0003")
    reference = load_series(folder, qc_limits=LIDC_SLAB_LIMITS)
    files = sorted(folder.glob("*.dcm"))
    cycle = SYNTAXES + [ExplicitVRLittleEndian]
    for i, f in enumerate(files):
        _compress(f, tmp_path / f"s{i}.dcm", cycle[i % len(cycle)])
    series = load_series(tmp_path, qc_limits=LIDC_SLAB_LIMITS)
    assert len(series.qc.recorded["transfer_syntax_uids"]) == len(cycle)
    np.testing.assert_array_equal(series.array, reference.array)
    assert series.array.min() < 0


def _rewrite(shared_data: Path, tmp_path: Path, **attrs: object) -> list[Path]:
    out = []
    for f in _ibsi_files(shared_data):
        ds = pydicom.dcmread(f)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(tmp_path / f.name)
        out.append(tmp_path / f.name)
    return out


def test_non_unit_slope_gives_float_hu(ibsi: CTSeries, shared_data: Path, tmp_path: Path) -> None:
    _rewrite(shared_data, tmp_path, RescaleSlope="0.5", RescaleIntercept="-1000.25")
    series = load_series(tmp_path)
    assert series.image.GetPixelID() == sitk.sitkFloat32
    raw = ibsi.array.astype(np.float64) + 1000.0  # stored values of the original
    np.testing.assert_allclose(series.array, raw * 0.5 - 1000.25, atol=1e-3)


def test_integer_hu_outside_int16_falls_back_to_float(shared_data: Path, tmp_path: Path) -> None:
    _rewrite(shared_data, tmp_path, RescaleIntercept="31000")
    series = load_series(tmp_path)
    assert series.image.GetPixelID() == sitk.sitkFloat32
    assert series.array.max() > np.iinfo(np.int16).max


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_series(tmp_path / "nowhere")
