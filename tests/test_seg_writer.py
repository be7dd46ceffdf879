"""DICOM-SEG writer: structure, exact read-back through highdicom.seg.segread, bad input.

Real data: the IBSI 1 CT phantom; its RTSTRUCT GTV-1 rasterised by
radnode.dicom_io.rtstruct_read (equal to the phantom's NIfTI mask) is the tumour.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.config.model import OutputSettings
from radnode.dicom_io import codes
from radnode.dicom_io.derived import MaskShapeError, NoRegionsError, SourceError
from radnode.dicom_io.regions import AlgorithmInfo, Region, WriterOptions
from radnode.dicom_io.rtstruct_read import rasterise_roi
from radnode.dicom_io.seg_writer import build_seg, seg_to_masks
from radnode.dicom_io.series import CTSeries, load_series
from series_support import coronal_copy

ALGORITHM = AlgorithmInfo(name="radnode-seg", version="1.2.3", model_versions={"unet": "0.4"})
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> tuple[CTSeries, np.ndarray]:
    root = shared_data / "ibsi_ct_phantom"
    series = load_series(root / "dicom" / "image")
    gtv = rasterise_roi(root / "dicom" / "mask" / "DCM_RS_00060.dcm", series, "GTV-1")
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nifti" / "mask" / "mask.nii.gz")))
    assert np.array_equal(gtv, nifti.astype(bool)), "RTSTRUCT and NIfTI mask disagree"
    return series, gtv


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _regions(series: CTSeries, gtv: np.ndarray) -> list[Region]:
    # A "lung" stand-in: air-like voxels in a box (semantics do not matter here).
    lung = series.array < -500
    lung[:, :20, :] = False
    ring = np.zeros_like(gtv)
    ring[:, 1:-1, 1:-1] = gtv[:, :-2, 1:-1] & ~gtv[:, 1:-1, 1:-1]
    return [
        Region.of_kind("lung", lung),
        Region.of_kind("tumour", gtv),
        Region.of_kind("peritumoral_ring", ring),
    ]


def test_ibsi_gtv_reads_back_exactly(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    regions = _regions(series, gtv)
    seg = build_seg(series, regions, ALGORITHM, WriterOptions())
    back = seg_to_masks(seg, series)
    assert set(back) == {r.name for r in regions}
    for region in regions:
        assert back[region.name].shape == region.mask.shape
        assert np.array_equal(back[region.name], region.mask), region.name
    assert _dice(back["Tumour"], gtv) >= 0.99
    assert np.count_nonzero(back["Tumour"]) == np.count_nonzero(gtv)


def test_seg_attributes_follow_the_standard_and_the_source(
    ibsi: tuple[CTSeries, np.ndarray],
) -> None:
    series, gtv = ibsi
    settings = OutputSettings(seg_series_number=77, series_description_prefix="lungAI")
    seg = build_seg(series, [Region.of_kind("tumour", gtv)], ALGORITHM, settings)
    src = series.datasets[0]
    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesNumber == 77 and seg.SeriesDescription == "lungAI SEG"
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == src.PatientID and seg.PatientName == src.PatientName
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.Manufacturer == "radnode"
    assert any("unet 0.4" in v for v in seg.SoftwareVersions)
    # one frame per slice that holds the tumour, each at that slice's position
    slices = np.flatnonzero(gtv.any(axis=(1, 2)))
    assert int(seg.NumberOfFrames) == len(slices)
    index_of = {ds.SOPInstanceUID: k for k, ds in enumerate(series.datasets)}
    referenced = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        k = index_of[source.ReferencedSOPInstanceUID]
        referenced.append(k)
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in series.datasets[k].ImagePositionPatient])
    assert sorted(referenced) == slices.tolist()
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "radnode-seg" and algo.AlgorithmVersion == "1.2.3"
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == codes.ALGORITHM_FAMILY_AI.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.NEOPLASM.value
    assert len(segment.RecommendedDisplayCIELabValue) == 3
    assert "1 connected component" in segment.SegmentDescription


def test_lung_sides_carry_a_laterality_modifier(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, _ = ibsi
    left = np.zeros(series.array.shape, dtype=bool)
    right = np.zeros_like(left)
    left[10:20, 50:100, 120:180] = True
    right[10:20, 50:100, 20:80] = True
    seg = build_seg(
        series, [Region.of_kind("lung_left", left), Region.of_kind("lung_right", right)], ALGORITHM
    )
    modifiers = [
        item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        for item in seg.SegmentSequence
    ]
    assert [m.CodeValue for m in modifiers] == [codes.LEFT.value, codes.RIGHT.value]
    back = seg_to_masks(seg, series)
    assert np.array_equal(back["Lung left"], left) and np.array_equal(back["Lung right"], right)


def test_fractional_option(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    seg = build_seg(series, [Region.of_kind("tumour", gtv)], ALGORITHM, fractional=True)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert np.array_equal(seg_to_masks(seg, series)["Tumour"], gtv)


def test_no_tumour_gives_a_lung_only_seg_that_says_so(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    lung = series.array < -500
    empty = np.zeros_like(gtv)
    regions = [Region.of_kind("lung", lung), Region.of_kind("tumour", empty)]
    seg = build_seg(series, regions, ALGORITHM)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lungs"]
    assert "no tumour found" in seg.ContentDescription
    assert np.array_equal(seg_to_masks(seg, series)["Lungs"], lung)


def test_all_regions_empty_is_a_clear_error(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    with pytest.raises(NoRegionsError, match="every region is empty"):
        build_seg(series, [Region.of_kind("tumour", np.zeros_like(gtv))], ALGORITHM)


def test_mask_shape_mismatch_names_both_shapes(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    with pytest.raises(MaskShapeError, match=r"\(59, 201, 204\).*\(60, 201, 204\)"):
        build_seg(series, [Region.of_kind("tumour", gtv[1:])], ALGORITHM)


def test_one_voxel_tumour_and_border_touching_mask(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    one = np.zeros_like(gtv)
    one[30, 100, 100] = True
    border = np.zeros_like(gtv)
    border[0, :, :5] = True  # first slice, left edge
    border[-1, -3:, :] = True  # last slice, bottom rows
    border[20, 0, 0] = True  # a corner voxel
    seg = build_seg(
        series, [Region.of_kind("tumour", one), Region(name="edge", kind="lung", mask=border)],
        ALGORITHM,
    )
    back = seg_to_masks(seg, series)
    assert np.array_equal(back["Tumour"], one)
    assert np.array_equal(back["edge"], border)
    assert int(seg.NumberOfFrames) == 1 + 3


def test_non_axial_series(ibsi: tuple[CTSeries, np.ndarray], tmp_path: Path) -> None:
    series, gtv = ibsi
    coronal = coronal_copy(series, tmp_path / "coronal")
    seg = build_seg(coronal, [Region.of_kind("tumour", gtv)], ALGORITHM)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert np.array_equal(seg_to_masks(seg, coronal)["Tumour"], gtv)


def test_uids_are_deterministic(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    regions = [Region.of_kind("tumour", gtv)]
    a = build_seg(series, regions, ALGORITHM)
    b = build_seg(list(series.datasets), regions, ALGORITHM)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.DimensionOrganizationSequence[0].DimensionOrganizationUID == (
        b.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )
    assert a.SegmentSequence[0].TrackingUID == b.SegmentSequence[0].TrackingUID
    c = build_seg(series, regions, ALGORITHM, WriterOptions(pipeline_version="2"))
    assert c.SOPInstanceUID != a.SOPInstanceUID
    d = build_seg(series, regions, ALGORITHM, WriterOptions(uid_root="1.2.826.0.1.3680043.10.543"))
    assert d.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.543.")


def test_source_without_type2_attributes_and_unsorted_source(
    ibsi: tuple[CTSeries, np.ndarray],
) -> None:
    series, gtv = ibsi
    stripped = [copy.deepcopy(ds) for ds in series.datasets]
    for ds in stripped:
        for keyword in ("PatientBirthDate", "AccessionNumber", "PatientSex", "StudyID"):
            if keyword in ds:
                delattr(ds, keyword)
    assert "PixelData" not in stripped[0]
    seg = build_seg(stripped, [Region.of_kind("tumour", gtv)], ALGORITHM)
    assert seg.PatientBirthDate == "" and seg.AccessionNumber == ""
    assert "AccessionNumber" not in stripped[0]  # the caller's headers are untouched
    shuffled = list(series.datasets)
    shuffled[3], shuffled[4] = shuffled[4], shuffled[3]
    with pytest.raises(SourceError, match="not strictly increasing"):
        build_seg(shuffled, [Region.of_kind("tumour", gtv)], ALGORITHM)
