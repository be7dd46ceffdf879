"""RTSTRUCT reading and rasterisation against masks made independently from real data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from skimage.draw import polygon

from radnode.dicom_io.rtstruct_read import (
    FrameOfReferenceMismatch,
    RTStructError,
    UnknownRoiError,
    rasterise_roi,
    read_rtstruct_rois,
)
from radnode.dicom_io.series import CTSeries, load_series

IBSI_VOXELS = 125_256  # IBSI 1 reference int_mask_vox_count_init_roi of the phantom GTV


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def nifti_mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> tuple[CTSeries, Path]:
    root = shared_data / "ibsi_ct_phantom"
    return load_series(root / "dicom" / "image"), root / "dicom" / "mask" / "DCM_RS_00060.dcm"


@pytest.fixture(scope="module")
def lung1_002(shared_data: Path) -> tuple[CTSeries, Dataset, Path]:
    case = shared_data / "nsclc_radiomics" / "LUNG1-002"
    return load_series(case / "CT"), pydicom.dcmread(case / "RTSTRUCT" / "1.dcm"), case


def test_ibsi_roi_list(ibsi: tuple[CTSeries, Path]) -> None:
    series, rtstruct = ibsi
    (roi,) = read_rtstruct_rois(rtstruct)
    raw = pydicom.dcmread(rtstruct)
    assert (roi.number, roi.name) == (1, "GTV-1")
    assert roi.interpreted_type is None  # empty RTROIInterpretedType in this file
    assert roi.colour == tuple(int(v) for v in raw.ROIContourSequence[0].ROIDisplayColor)
    assert roi.frame_of_reference_uid == series.frame_of_reference_uid
    assert roi.n_contours == 26 and roi.geometric_types == ("CLOSED_PLANAR",)


def test_ibsi_gtv_matches_nifti_mask(ibsi: tuple[CTSeries, Path], shared_data: Path) -> None:
    series, rtstruct = ibsi
    mask = rasterise_roi(rtstruct, series, "GTV-1")
    ref = nifti_mask(shared_data / "ibsi_ct_phantom" / "nifti" / "mask" / "mask.nii.gz") > 0
    assert mask.dtype == bool and mask.shape == series.array.shape == ref.shape
    score = dice(mask, ref)
    print(f"IBSI GTV-1 Dice vs mask.nii.gz: {score:.6f}, voxels {mask.sum()} vs {ref.sum()}")
    assert score >= 0.98
    assert mask.sum() == IBSI_VOXELS
    np.testing.assert_array_equal(rasterise_roi(rtstruct, series, 1), mask)  # by number


def test_lung1_002_gtv_and_lungs(lung1_002: tuple[CTSeries, Dataset, Path]) -> None:
    series, rtstruct, case = lung1_002
    labels = nifti_mask(case / "mask_GTV_labels.nii.gz")
    gtv = rasterise_roi(rtstruct, series, "GTV-1")
    score = dice(gtv, labels == 1)
    print(f"LUNG1-002 GTV-1 Dice vs mask_GTV_labels.nii.gz: {score:.6f}")
    assert score >= 0.98

    voxel_ml = float(np.prod(series.spacing)) / 1000.0
    lungs = {name: rasterise_roi(rtstruct, series, name) for name in ("Lung L", "Lung R")}
    hu = series.array
    for name, lung in lungs.items():
        volume = lung.sum() * voxel_ml
        assert 1000 < volume < 3500, f"{name}: {volume:.0f} mL"
        assert hu[lung].mean() < -600, f"{name}: mean {hu[lung].mean():.0f} HU is not lung"
    assert not np.any(lungs["Lung L"] & lungs["Lung R"])
    # LPS: +x is the patient's left, so the left lung lies at larger column indices
    assert np.argwhere(lungs["Lung L"])[:, 2].mean() > np.argwhere(lungs["Lung R"])[:, 2].mean()
    assert np.count_nonzero(gtv & ~(lungs["Lung L"] | lungs["Lung R"])) < gtv.sum()


def test_lung1_003_three_gtvs(shared_data: Path) -> None:
    case = shared_data / "nsclc_radiomics" / "LUNG1-003"
    series = load_series(case / "CT")
    labels = nifti_mask(case / "mask_GTV_labels.nii.gz")
    for label in (1, 2, 3):
        mask = rasterise_roi(case / "RTSTRUCT" / "1.dcm", series, f"GTV-{label}")
        assert dice(mask, labels == label) >= 0.98


def test_point_roi_gives_empty_mask(lung1_002: tuple[CTSeries, Dataset, Path]) -> None:
    series, rtstruct, _ = lung1_002
    info = {r.name: r for r in read_rtstruct_rois(rtstruct)}
    assert info["Isocenter 1"].geometric_types == ("POINT",)
    assert info["Lung L"].interpreted_type == "ORGAN"
    assert not rasterise_roi(rtstruct, series, "Isocenter 1").any()


def test_unknown_roi_lists_available(lung1_002: tuple[CTSeries, Dataset, Path]) -> None:
    series, rtstruct, _ = lung1_002
    with pytest.raises(UnknownRoiError) as info:
        rasterise_roi(rtstruct, series, "GTV-9")
    text = str(info.value)
    assert "'GTV-9'" in text and "'GTV-1'" in text and "'Lung L'" in text
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownRoiError, match="999"):
        rasterise_roi(rtstruct, series, 999)


def test_other_frame_of_reference_is_refused(ibsi: tuple[CTSeries, Path]) -> None:
    series, rtstruct = ibsi
    ds = pydicom.dcmread(rtstruct)
    other = generate_uid()
    ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = other
    with pytest.raises(FrameOfReferenceMismatch) as info:
        rasterise_roi(ds, series, "GTV-1")
    assert other in str(info.value) and series.frame_of_reference_uid in str(info.value)


def test_not_an_rtstruct(ibsi: tuple[CTSeries, Path]) -> None:
    series, _ = ibsi
    with pytest.raises(RTStructError, match="not an RT Structure Set"):
        rasterise_roi(series.files[0], series, "GTV-1")


def test_empty_contour_image_items_are_skipped(ibsi: tuple[CTSeries, Path]) -> None:
    series, rtstruct = ibsi
    expected = rasterise_roi(rtstruct, series, "GTV-1")
    ds = pydicom.dcmread(rtstruct)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        items = list(contour.get("ContourImageSequence", []))
        contour.ContourImageSequence = [Dataset(), *items]  # empty first item
    study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    series_ref = study.RTReferencedSeriesSequence[0]
    series_ref.ContourImageSequence = [Dataset(), *series_ref.ContourImageSequence]
    np.testing.assert_array_equal(rasterise_roi(ds, series, "GTV-1"), expected)


def _index_polygon(series: CTSeries, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows/columns/slice of a contour via SimpleITK's own physical-to-index mapping."""
    idx = np.array(
        [series.image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points_mm]
    )
    return idx[:, 1], idx[:, 0], int(round(idx[:, 2].mean()))


def test_nested_contour_cuts_a_hole(ibsi: tuple[CTSeries, Path]) -> None:
    series, rtstruct = ibsi
    ds = pydicom.dcmread(rtstruct)
    contours = ds.ROIContourSequence[0].ContourSequence
    outer = max(contours, key=lambda c: int(c.NumberOfContourPoints))
    pts = np.array([float(v) for v in outer.ContourData]).reshape(-1, 3)
    centre = pts.mean(axis=0)
    inner_pts = centre + 0.4 * (pts - centre)
    inner = copy.deepcopy(outer)
    inner.ContourData = [f"{v:.4f}" for v in inner_pts.ravel()]
    contours.append(inner)

    original = rasterise_roi(rtstruct, series, "GTV-1")
    holed = rasterise_roi(ds, series, "GTV-1")
    r, c, k = _index_polygon(series, pts)
    ri, ci, k_inner = _index_polygon(series, inner_pts)
    assert k == k_inner
    shape = series.array.shape[1:]
    ring = np.zeros(shape, dtype=bool)
    ring[polygon(r, c, shape)] = True
    hole = np.zeros(shape, dtype=bool)
    hole[polygon(ri, ci, shape)] = True
    assert hole.sum() > 100
    np.testing.assert_array_equal(holed[k], original[k] & ~hole)
    np.testing.assert_array_equal(original[k], ring)  # one contour on that slice
    others = np.ones(len(holed), dtype=bool)
    others[k] = False
    np.testing.assert_array_equal(holed[others], original[others])


@pytest.mark.parametrize(("shift_mm", "match"), [(1.5, "not on one slice"), (600.0, "outside")])
def test_contour_off_the_slices(ibsi: tuple[CTSeries, Path], shift_mm: float, match: str) -> None:
    series, rtstruct = ibsi
    ds = pydicom.dcmread(rtstruct)
    contour = ds.ROIContourSequence[0].ContourSequence[3]
    pts = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
    pts[:, 2] += shift_mm
    contour.ContourData = [f"{v:.4f}" for v in pts.ravel()]
    with pytest.raises(RTStructError, match=match):
        rasterise_roi(ds, series, "GTV-1")


def test_repeated_identical_contours_do_not_cancel(ibsi: tuple[CTSeries, Path]) -> None:
    series, rtstruct = ibsi
    single = rasterise_roi(rtstruct, series, "GTV-1")
    doubled = pydicom.dcmread(rtstruct)
    items = doubled.ROIContourSequence[0].ContourSequence
    for item in list(items):
        items.append(copy.deepcopy(item))
    np.testing.assert_array_equal(rasterise_roi(doubled, series, "GTV-1"), single)


def test_lung1_002_left_lung_has_no_empty_slices(lung1_002: tuple[CTSeries, Dataset, Path]) -> None:
    # This planning system repeats identical polygons on some slices of "Lung L".
    series, rtstruct, _ = lung1_002
    lung = rasterise_roi(rtstruct, series, "Lung L")
    filled = np.nonzero(lung.any(axis=(1, 2)))[0]
    per_slice = lung[filled[0] : filled[-1] + 1].sum(axis=(1, 2))
    assert per_slice.min() > 0, f"empty slices inside the lung: {np.nonzero(per_slice == 0)[0] + filled[0]}"
