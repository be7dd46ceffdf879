"""Read the ROIs of an RT Structure Set (PS3.3 A.19) and rasterise one onto a CT grid.

An RTSTRUCT stores each ROI as planar polygons in patient coordinates (mm): Contour Data
(3006,0050) of the ROI Contour Module (PS3.3 C.8.8.6). Rasterising means, for every
CLOSED_PLANAR contour:

1. map its points to continuous voxel indices of the series grid (inverse of
   origin + direction x spacing);
2. find its slice from the index along the normal (the z position), accepting a small
   tolerance for rounding; the Contour Image Sequence is only a hint (it is often absent,
   and some planning systems write an empty first item there, see BENCHMARKS.md), so the
   position decides;
3. mark the pixels whose centres lie inside the polygon (``skimage.draw.polygon`` on the
   continuous row/column coordinates) and combine the contours of one slice by nesting:
   a contour lying inside a larger one of the same ROI cuts a hole (an inner contour,
   PS3.3 C.8.8.6.3), one inside a hole is an island again, and everything else is a
   union. Planning systems also write the same outline two or more times on a slice,
   exactly or with a point more or less (LUNG1-002's "Lung L"); plain even-odd filling
   would erase such slices, so a contour covering nearly all of its container
   (:data:`DUPLICATE_AREA_RATIO`) counts as a repeat of it, not as a hole.

The result is a boolean array ``(z, y, x)`` matching ``series.array``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from skimage.draw import polygon as fill_polygon

from radnode.dicom_io.series import CTSeries

logger = logging.getLogger(__name__)

#: SOP Class UID of RT Structure Set Storage (PS3.4 B.5).
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
#: Contour Geometric Type (3006,0042) that encloses an area (PS3.3 C.8.8.6.1).
CLOSED_PLANAR = "CLOSED_PLANAR"
#: Contour Data (3006,0050).
CONTOUR_DATA_TAG = Tag(0x3006, 0x0050)
#: Default slice-matching tolerance as a fraction of the slice spacing.
DEFAULT_Z_TOLERANCE_FRACTION = 0.25


class RTStructError(ValueError):
    """The RTSTRUCT cannot be read or does not fit the series."""


class UnknownRoiError(RTStructError, KeyError):
    """The requested ROI name or number is not in the structure set."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class FrameOfReferenceMismatch(RTStructError):
    """The ROI is defined in another Frame of Reference than the CT series."""


@dataclass(frozen=True)
class RoiInfo:
    """One ROI of a structure set.

    Attributes
    ----------
    number
        ROI Number (3006,0022).
    name
        ROI Name (3006,0026).
    interpreted_type
        RT ROI Interpreted Type (3006,00A4) from the RT ROI Observations, e.g. ``GTV``,
        ``ORGAN``, ``EXTERNAL`` (``None`` when absent or empty).
    colour
        ROI Display Color (3006,002A) as (R, G, B), ``None`` when absent.
    frame_of_reference_uid
        Referenced Frame of Reference UID (3006,0024) of the ROI.
    n_contours
        Number of items in its Contour Sequence.
    geometric_types
        The distinct Contour Geometric Types of its contours.
    """

    number: int
    name: str
    interpreted_type: str | None
    colour: tuple[int, int, int] | None
    frame_of_reference_uid: str | None
    n_contours: int
    geometric_types: tuple[str, ...]


def read_rtstruct(path_or_ds: Path | str | Dataset) -> Dataset:
    """Return the RTSTRUCT dataset, reading it when given a path.

    Raises
    ------
    RTStructError
        If the object is not an RT Structure Set (Modality RTSTRUCT / SOP class
        1.2.840.10008.5.1.4.1.1.481.3) or lacks the Structure Set ROI Sequence.
    """
    ds = path_or_ds if isinstance(path_or_ds, Dataset) else pydicom.dcmread(path_or_ds)
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class != RTSTRUCT_SOP_CLASS_UID and modality != "RTSTRUCT":
        raise RTStructError(
            f"{_name(ds)} is not an RT Structure Set (SOP class {sop_class or '?'}, modality "
            f"{modality or '?'}; expected {RTSTRUCT_SOP_CLASS_UID} / RTSTRUCT)"
        )
    if "StructureSetROISequence" not in ds:
        raise RTStructError(f"{_name(ds)} has no Structure Set ROI Sequence (3006,0020)")
    return ds


def read_rtstruct_rois(path_or_ds: Path | str | Dataset) -> list[RoiInfo]:
    """List the ROIs of a structure set (number, name, type, colour, contour counts)."""
    ds = read_rtstruct(path_or_ds)
    types = {
        int(obs.ReferencedROINumber): (str(obs.get("RTROIInterpretedType", "")).strip() or None)
        for obs in ds.get("RTROIObservationsSequence", [])
        if "ReferencedROINumber" in obs
    }
    contours = {
        int(item.ReferencedROINumber): item
        for item in ds.get("ROIContourSequence", [])
        if "ReferencedROINumber" in item
    }
    rois: list[RoiInfo] = []
    for roi in ds.StructureSetROISequence:
        number = int(roi.ROINumber)
        item = contours.get(number)
        colour = None
        sequence: Sequence[Dataset] = []
        if item is not None:
            sequence = item.get("ContourSequence", [])
            raw_colour = item.get("ROIDisplayColor")
            if raw_colour is not None and len(raw_colour) == 3:
                colour = (int(raw_colour[0]), int(raw_colour[1]), int(raw_colour[2]))
        rois.append(
            RoiInfo(
                number=number,
                name=str(roi.get("ROIName", "")),
                interpreted_type=types.get(number),
                colour=colour,
                frame_of_reference_uid=str(roi.get("ReferencedFrameOfReferenceUID", "")) or None,
                n_contours=len(sequence),
                geometric_types=tuple(
                    sorted({str(c.get("ContourGeometricType", "")) for c in sequence})
                ),
            )
        )
    return rois


def rasterise_roi(
    rtstruct: Path | str | Dataset,
    series: CTSeries,
    roi: str | int,
    *,
    z_tolerance_mm: float | None = None,
) -> np.ndarray:
    """Rasterise one ROI onto the voxel grid of ``series``.

    Parameters
    ----------
    rtstruct
        Path of the RTSTRUCT file or its dataset.
    series
        The CT series the structure set was drawn on (same Frame of Reference).
    roi
        ROI Name (exact match) or ROI Number.
    z_tolerance_mm
        Largest distance (mm) between a contour plane and the slice it is assigned to;
        defaults to a quarter of the slice spacing.

    Returns
    -------
    numpy.ndarray
        Boolean mask, shape ``(z, y, x)`` like ``series.array``. Empty when the ROI has
        no CLOSED_PLANAR contour (e.g. a POINT isocentre); that is logged.

    Raises
    ------
    UnknownRoiError
        When ``roi`` names no ROI; the message lists the available ones.
    FrameOfReferenceMismatch
        When the ROI's Frame of Reference differs from the series'.
    RTStructError
        When a contour is not planar on one slice, lies between slices beyond the
        tolerance, or lies outside the stack.
    """
    ds = read_rtstruct(rtstruct)
    info = _find_roi(ds, roi)
    _check_frame_of_reference(ds, info, series)

    image = series.image
    size_x, size_y, size_z = image.GetSize()
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin())
    to_index = np.linalg.inv(direction @ np.diag(spacing))
    tolerance = (
        DEFAULT_Z_TOLERANCE_FRACTION * spacing[2] if z_tolerance_mm is None else z_tolerance_mm
    )
    sop_to_slice = {uid: k for k, uid in enumerate(series.sop_instance_uids)}

    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    contour_items = _contours_of(ds, info.number)
    skipped: dict[str, int] = {}
    n_closed = 0
    per_slice: dict[int, list[np.ndarray]] = {}
    for index, contour in enumerate(contour_items):
        kind = str(contour.get("ContourGeometricType", ""))
        points = _contour_points(contour) if kind == CLOSED_PLANAR else np.empty(0)
        if points.size == 0:
            skipped[kind or "empty"] = skipped.get(kind or "empty", 0) + 1
            continue
        if points.size % 3:
            raise RTStructError(
                f"ROI '{info.name}' contour #{index + 1}: Contour Data has {points.size} values, "
                "not a multiple of 3 (x, y, z)"
            )
        if points.size < 9:  # fewer than 3 points encloses nothing
            skipped["degenerate"] = skipped.get("degenerate", 0) + 1
            continue
        idx = (points.reshape(-1, 3) - origin) @ to_index.T  # columns: x(col), y(row), k
        k = _slice_of(idx[:, 2], spacing[2], tolerance, size_z, info.name, index)
        _check_reference(contour, k, sop_to_slice, info.name, index)
        rr, cc = fill_polygon(idx[:, 1], idx[:, 0], shape=(size_y, size_x))
        filled = np.zeros((size_y, size_x), dtype=bool)
        filled[rr, cc] = True
        per_slice.setdefault(k, []).append(filled)
        n_closed += 1
    for k, polygons in per_slice.items():
        mask[k] = _combine_nested(polygons)
    if skipped:
        logger.info(
            "ROI '%s' (number %d): skipped contours that enclose no area: %s",
            info.name,
            info.number,
            skipped,
        )
    if n_closed == 0:
        logger.warning(
            "ROI '%s' (number %d) of structure set %s has no CLOSED_PLANAR contour; mask is empty",
            info.name,
            info.number,
            ds.get("SOPInstanceUID", "?"),
        )
    return mask


def _find_roi(ds: Dataset, roi: str | int) -> RoiInfo:
    rois = read_rtstruct_rois(ds)
    if isinstance(roi, (int, np.integer)) and not isinstance(roi, bool):
        matches = [r for r in rois if r.number == int(roi)]
    else:
        matches = [r for r in rois if r.name == roi]
    if not matches:
        available = ", ".join(f"{r.number}: '{r.name}'" for r in rois) or "none"
        raise UnknownRoiError(
            f"ROI {roi!r} not found in structure set {ds.get('SOPInstanceUID', '?')}; "
            f"available ROIs (number: name): {available}"
        )
    if len(matches) > 1:
        raise RTStructError(
            f"ROI name {roi!r} is used by ROI numbers {[r.number for r in matches]} in structure "
            f"set {ds.get('SOPInstanceUID', '?')}; pass the ROI number instead"
        )
    return matches[0]


def _check_frame_of_reference(ds: Dataset, info: RoiInfo, series: CTSeries) -> None:
    roi_for = info.frame_of_reference_uid
    if roi_for is None:
        declared = [
            str(item.FrameOfReferenceUID)
            for item in ds.get("ReferencedFrameOfReferenceSequence", [])
            if "FrameOfReferenceUID" in item
        ]
        roi_for = declared[0] if len(declared) == 1 else None
    if roi_for is None:
        logger.warning(
            "ROI '%s' of structure set %s declares no Frame of Reference; assuming series %s's",
            info.name,
            ds.get("SOPInstanceUID", "?"),
            series.series_instance_uid,
        )
        return
    if roi_for != series.frame_of_reference_uid:
        raise FrameOfReferenceMismatch(
            f"ROI '{info.name}' of structure set {ds.get('SOPInstanceUID', '?')} is in Frame of "
            f"Reference {roi_for}, but series {series.series_instance_uid} is in "
            f"{series.frame_of_reference_uid}; the contours cannot be placed on this series"
        )


def _contours_of(ds: Dataset, number: int) -> list[Dataset]:
    for item in ds.get("ROIContourSequence", []):
        if int(item.get("ReferencedROINumber", -1)) == number:
            return list(item.get("ContourSequence", []))
    return []


#: A contour inside another that covers at least this share of the container's area is a
#: repeat of the container's outline, not a hole in it.
DUPLICATE_AREA_RATIO = 0.9
#: Share of a contour's pixels that must lie in another for it to count as inside it.
_CONTAINED_FRACTION = 0.99


def _combine_nested(polygons: list[np.ndarray]) -> np.ndarray:
    """Combine the filled contours of one slice: holes by nesting depth, repeats ignored."""
    if len(polygons) == 1:
        return polygons[0]
    order = sorted(range(len(polygons)), key=lambda i: -int(polygons[i].sum()))
    depth: dict[int, int] = {}
    for position, i in enumerate(order):
        area = int(polygons[i].sum())
        parent = None
        # The smallest earlier (larger-or-equal) contour that holds this one is its container.
        for j in reversed(order[:position]):
            if area and np.count_nonzero(polygons[i] & polygons[j]) >= _CONTAINED_FRACTION * area:
                parent = j
                break
        if parent is None:
            depth[i] = 0
        elif area >= DUPLICATE_AREA_RATIO * int(polygons[parent].sum()):
            depth[i] = depth[parent]  # the same outline drawn again
        else:
            depth[i] = depth[parent] + 1
    result = np.zeros_like(polygons[0])
    for depth_level in sorted(set(depth.values())):
        for i, d in depth.items():
            if d == depth_level:
                if d % 2 == 0:
                    result |= polygons[i]
                else:
                    result &= ~polygons[i]
    return result


def _contour_points(contour: Dataset) -> np.ndarray:
    """Contour Data (3006,0050) as a flat float array.

    Parsed straight from the raw DS text when pydicom has not converted it yet: building
    one DSfloat per coordinate costs more than filling the polygon for large ROIs.
    """
    if CONTOUR_DATA_TAG not in contour:
        return np.empty(0)
    element = contour.get_item(CONTOUR_DATA_TAG)
    raw = element.value if isinstance(element, RawDataElement) else None
    if isinstance(raw, bytes):
        text = raw.decode("ascii", errors="replace").strip("\x00 ")
        if not text:
            return np.empty(0)
        try:
            return np.array(text.split("\\"), dtype=np.float64)
        except ValueError:
            pass  # unusual formatting: let pydicom parse it
    values = contour.ContourData
    if values is None or values == "":
        return np.empty(0)
    if not isinstance(values, (list, tuple, MultiValue)):
        values = [values]
    return np.asarray([float(v) for v in values], dtype=np.float64)


def _slice_of(
    k_values: np.ndarray,
    slice_spacing: float,
    tolerance: float,
    n_slices: int,
    roi: str,
    index: int,
) -> int:
    """The slice a contour lies on, from the continuous slice indices of its points."""
    k = int(np.rint(np.median(k_values)))
    off_mm = np.abs(k_values - k) * slice_spacing
    if off_mm.max() > tolerance:
        raise RTStructError(
            f"ROI '{roi}' contour #{index + 1} is not on one slice: its points lie up to "
            f"{off_mm.max():.3f} mm from slice {k} (tolerance {tolerance:.3f} mm); the structure "
            "set may belong to another series or reconstruction"
        )
    if not 0 <= k < n_slices:
        raise RTStructError(
            f"ROI '{roi}' contour #{index + 1} lies at slice index {k}, outside the series' "
            f"{n_slices} slices"
        )
    return k


def _check_reference(
    contour: Dataset, k: int, sop_to_slice: dict[str, int], roi: str, index: int
) -> None:
    """Compare the Contour Image Sequence hint with the slice found by position (log only).

    Items without a Referenced SOP Instance UID are skipped: some planning systems
    write an empty first item.
    """
    for item in contour.get("ContourImageSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        if not uid:
            continue
        referenced = sop_to_slice.get(uid)
        if referenced is not None and referenced != k:
            logger.warning(
                "ROI '%s' contour #%d references instance %s (slice %d) but lies on slice %d; "
                "using the position",
                roi,
                index + 1,
                uid,
                referenced,
                k,
            )


def _name(ds: Dataset) -> str:
    filename = getattr(ds, "filename", None)
    return f"file {filename}" if filename else f"dataset {ds.get('SOPInstanceUID', '?')}"
