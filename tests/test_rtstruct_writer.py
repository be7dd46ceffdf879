"""RTSTRUCT writer: TPS-safe structure, holes, smoothing, read-back onto the CT grid.

Read-back uses radnode.dicom_io.rtstruct_read.rasterise_roi (pixel-centre-inside with
even-odd); plastimatch, dciodvfy and Orthanc checks are in test_writers_validation.py.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from radnode.dicom_io.contours import MAX_SMOOTHING_SHIFT, slice_polygons
from radnode.dicom_io.derived import MaskShapeError
from radnode.dicom_io.regions import AlgorithmInfo, Region, WriterOptions
from radnode.dicom_io.rtstruct_read import rasterise_roi, read_rtstruct_rois
from radnode.dicom_io.rtstruct_writer import build_rtstruct, format_ds
from radnode.dicom_io.series import CTSeries, load_series
from series_support import coronal_copy

ALGORITHM = AlgorithmInfo(name="radnode-seg", version="1.2.3", model_versions={"unet": "0.4"})
CONTOUR_DATA = 0x30060050


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> tuple[CTSeries, np.ndarray]:
    root = shared_data / "ibsi_ct_phantom"
    series = load_series(root / "dicom" / "image")
    gtv = rasterise_roi(root / "dicom" / "mask" / "DCM_RS_00060.dcm", series, "GTV-1")
    return series, gtv


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _bytes(ds: pydicom.Dataset) -> bytes:
    """Serialise; any pydicom warning (e.g. a DS element silently turned into UN) fails."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(_bytes(ds)))


def _holes_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Rings with holes, an island in a hole, a diagonal pinch and a one-pixel hole."""
    mask = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    for k in range(20, 26):
        r = np.hypot(yy - 100, xx - 100)
        mask[k] = (r < 40) & ~((r > 12) & (r < 25))  # disc, ring-shaped hole, island
        mask[k] &= ~((np.abs(yy - 70) < 4) & (np.abs(xx - 100) < 4))  # second hole
        mask[k, 150, 150] = True  # diagonal pair ...
        mask[k, 151, 151] = True  # ... touching at a corner
        mask[k, 160:170, 20:30] = True
        mask[k, 165, 25] = False  # one-pixel hole
    return mask


def test_ibsi_gtv_round_trip(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    rt = _reread(build_rtstruct(series, [Region.of_kind("tumour", gtv)], ALGORITHM))
    back = rasterise_roi(rt, series, "Tumour")
    dice = _dice(back, gtv)
    print(f"IBSI GTV-1 -> RTSTRUCT -> own rasteriser: Dice {dice:.6f}")
    assert dice >= 0.99
    assert np.array_equal(back, gtv)


def test_structure_set_is_tps_safe(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    lung = series.array < -500
    ring = ndimage.binary_dilation(gtv, iterations=2) & ~gtv
    regions = [
        Region.of_kind("lung", lung),
        Region.of_kind("tumour", gtv),
        Region.of_kind("peritumoral_ring", ring),
    ]
    opts = WriterOptions(rtstruct_series_number=42, series_description_prefix="AI")
    rt = _reread(build_rtstruct(series, regions, ALGORITHM, opts))
    src = series.datasets
    assert rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rt.Modality == "RTSTRUCT"
    assert rt.SeriesNumber == 42 and rt.SeriesDescription == "AI RTSTRUCT"
    assert rt.StudyInstanceUID == src[0].StudyInstanceUID and rt.PatientID == src[0].PatientID
    assert rt.ApprovalStatus == "UNAPPROVED"
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    rt_series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert rt_series.SeriesInstanceUID == src[0].SeriesInstanceUID
    listed = [item.ReferencedSOPInstanceUID for item in rt_series.ContourImageSequence]
    assert listed == [ds.SOPInstanceUID for ds in src]  # every CT instance

    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    assert {names[n]: t for n, t in types.items()} == {
        "Lungs": "ORGAN", "Tumour": "GTV", "Peritumoral 3mm": "CONTROL",
    }
    for roi in rt.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ReferencedFrameOfReferenceUID == src[0].FrameOfReferenceUID
        assert roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName == "radnode-seg"

    assert rt.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    z_of = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in src}
    raw = pydicom.dcmread(io.BytesIO(_bytes(rt)))
    for roi_contour, raw_roi in zip(rt.ROIContourSequence, raw.ROIContourSequence, strict=True):
        assert len(roi_contour.ROIDisplayColor) == 3
        pairs = zip(roi_contour.ContourSequence, raw_roi.ContourSequence, strict=True)
        for item, raw_item in pairs:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            assert item.NumberOfContourPoints >= 3
            points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == item.NumberOfContourPoints
            ref = item.ContourImageSequence[0].ReferencedSOPInstanceUID
            # z exactly on the referenced slice
            assert np.all(points[:, 2] == z_of[ref])
            raw_value = raw_item.get_item(CONTOUR_DATA).value
            assert max(len(v.strip()) for v in raw_value.split(b"\\")) <= 16


def test_contours_longer_than_64_kib_survive(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    """A body-outline-sized smoothed contour needs more than the 64 KiB an explicit-VR DS
    element can hold; the object must still serialise as DS and read back exactly."""
    series, _ = ibsi
    air = series.array < -500
    air[np.arange(len(air)) % 6 != 0] = False  # every 6th slice is enough
    rt = build_rtstruct(series, [Region("air", "lung", air)], ALGORITHM, smoothing=True)
    raw = pydicom.dcmread(io.BytesIO(_bytes(rt)))
    longest = max(
        len(item.get_item(CONTOUR_DATA).value)
        for item in raw.ROIContourSequence[0].ContourSequence
    )
    assert longest > 0xFFFF
    assert np.array_equal(rasterise_roi(raw, series, "air"), air)


@pytest.mark.parametrize("hole_style", ["keyhole", "inner"])
@pytest.mark.parametrize("smoothing", [False, True])
def test_holes_round_trip(
    ibsi: tuple[CTSeries, np.ndarray], hole_style: str, smoothing: bool
) -> None:
    series, _ = ibsi
    mask = _holes_mask(series.array.shape)
    rt = _reread(
        build_rtstruct(series, [Region.of_kind("tumour", mask)], ALGORITHM,
                       smoothing=smoothing, hole_style=hole_style)
    )
    assert np.array_equal(rasterise_roi(rt, series, "Tumour"), mask)
    contours = rt.ROIContourSequence[0].ContourSequence
    per_slice = len(contours) // 6
    if hole_style == "keyhole":
        # one polygon per 4-connected piece: disc, island, two diagonal pixels, square
        assert per_slice == ndimage.label(mask[20])[1] == 5
    else:
        # plus three holes as inner contours
        assert per_slice == 8


def _distance_to_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    a = polygon
    b = np.roll(polygon, -1, axis=0)
    ab = b - a
    ap = points[:, None, :] - a[None, :, :]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    nearest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None, :] - nearest, axis=-1).min(axis=1)


def test_smoothing_moves_contours_by_at_most_a_quarter_pixel(
    ibsi: tuple[CTSeries, np.ndarray],
) -> None:
    _, gtv = ibsi
    moved = 0.0
    for k in np.flatnonzero(gtv.any(axis=(1, 2)))[::5]:
        exact = slice_polygons(gtv[k], hole_style="inner")
        smooth = slice_polygons(gtv[k], hole_style="inner", smoothing=True)
        assert len(exact) == len(smooth)
        for e, s in zip(exact, smooth, strict=True):
            d = _distance_to_polygon(s, e)
            assert d.max() <= MAX_SMOOTHING_SHIFT + 1e-9 < 0.5
            moved = max(moved, float(d.max()))
    assert moved > 0.05  # smoothing did something


def test_empty_tumour_is_left_out_and_noted(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    lung = series.array < -500
    rt = build_rtstruct(
        series, [Region.of_kind("lung", lung), Region.of_kind("tumour", np.zeros_like(gtv))],
        ALGORITHM,
    )
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["Lungs"]
    assert "no tumour found" in rt.StructureSetDescription
    assert [r.name for r in read_rtstruct_rois(rt)] == ["Lungs"]


def test_bad_shape_one_voxel_and_border(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    with pytest.raises(MaskShapeError, match="does not match"):
        build_rtstruct(series, [Region.of_kind("tumour", gtv[:, 1:])], ALGORITHM)
    one = np.zeros_like(gtv)
    one[30, 100, 100] = True
    border = np.zeros_like(gtv)
    border[0, :, :5] = True
    border[-1, -3:, :] = True
    border[20, 0, 0] = True
    border[21] = True  # a whole slice
    rt = _reread(
        build_rtstruct(series, [Region.of_kind("tumour", one), Region("edge", "lung", border)],
                       ALGORITHM)
    )
    contour = rt.ROIContourSequence[0].ContourSequence
    assert len(contour) == 1 and contour[0].NumberOfContourPoints >= 3
    assert np.array_equal(rasterise_roi(rt, series, "Tumour"), one)
    assert np.array_equal(rasterise_roi(rt, series, "edge"), border)


def test_non_axial_series(ibsi: tuple[CTSeries, np.ndarray], tmp_path: Path) -> None:
    series, gtv = ibsi
    coronal = coronal_copy(series, tmp_path / "coronal")
    rt = _reread(build_rtstruct(coronal, [Region.of_kind("tumour", gtv)], ALGORITHM))
    y_of = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[1]) for ds in coronal.datasets}
    for item in rt.ROIContourSequence[0].ContourSequence:
        points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
        ref = item.ContourImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(points[:, 1], y_of[ref], atol=1e-6)  # in the coronal plane
    assert np.array_equal(rasterise_roi(rt, coronal, "Tumour"), gtv)


def test_uids_are_deterministic(ibsi: tuple[CTSeries, np.ndarray]) -> None:
    series, gtv = ibsi
    regions = [Region.of_kind("tumour", gtv)]
    a = build_rtstruct(series, regions, ALGORITHM)
    b = build_rtstruct(series, regions, ALGORITHM)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    c = build_rtstruct(series, regions, ALGORITHM, smoothing=True)
    assert c.SOPInstanceUID != a.SOPInstanceUID


@pytest.mark.parametrize(
    "value", [0.0, -0.0, -100.4, 1e-9, 123456.1234567, -99999.999999, 1.5e12, -3.0000001e-7]
)
def test_format_ds_fits_16_characters(value: float) -> None:
    text = format_ds(value)
    assert len(text) <= 16
    assert abs(float(text) - value) <= max(1e-6, abs(value) * 1e-9)


def _proper_crossings(polygons: list[np.ndarray]) -> int:
    """Number of pairs of edges that cross at a single interior point (touching is fine)."""
    edges = np.concatenate([np.stack([p, np.roll(p, -1, axis=0)], axis=1) for p in polygons])
    a, b = edges[:, 0], edges[:, 1]

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
            - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    a1, b1 = a[:, None], b[:, None]
    a2, b2 = a[None, :], b[None, :]
    crossing = (orient(a1, b1, a2) * orient(a1, b1, b2) < 0) & (
        orient(a2, b2, a1) * orient(a2, b2, b1) < 0
    )
    return int(np.count_nonzero(np.triu(crossing, 1)))


def test_random_masks_round_trip_without_crossing_edges() -> None:
    """Random slices (noise, speckle holes, islands, edge contact) in every encoding."""
    from skimage.draw import polygon as fill_polygon

    rng = np.random.default_rng(20240601)
    for trial in range(24):
        mask = rng.random((24, 28)) < rng.uniform(0.35, 0.75)
        if trial % 2:
            mask = ndimage.binary_closing(mask)
        for style in ("keyhole", "inner"):
            for smoothing in (False, True):
                polygons = slice_polygons(mask, smoothing=smoothing, hole_style=style)
                back = np.zeros_like(mask)
                for polygon in polygons:
                    assert len(polygon) >= 3
                    rr, cc = fill_polygon(polygon[:, 0], polygon[:, 1], shape=mask.shape)
                    plane = np.zeros_like(mask)
                    plane[rr, cc] = True
                    back ^= plane
                assert np.array_equal(back, mask), (trial, style, smoothing)
                assert _proper_crossings(polygons) == 0, (trial, style, smoothing)
