"""Load one CT series from files into a SimpleITK image in Hounsfield units.

Steps: find the files (a folder walked recursively, a DICOMDIR, or an explicit list),
read their headers, pick the one CT Image Storage series (PS3.3 A.3), leave out what
does not belong in the volume (localizers, other series, non-image objects), check the
geometry with :mod:`radnode.dicom_io.qc`, decode the pixels with whatever pydicom
decoders are installed, apply Rescale Slope/Intercept (PS3.3 C.11.1.1.2) and build an
image whose origin, spacing and direction come from the headers:

* slices are sorted along the slice normal ``n = row x column`` (the two halves of
  Image Orientation (Patient) (0020,0037)) by the projection of Image Position (Patient)
  (0020,0032) on ``n`` (PS3.3 C.7.6.2.1.1), never by Instance Number or file name;
* the slice spacing comes from those projections, never from Slice Thickness, which is
  the reconstructed slice width and may differ from the spacing;
* Pixel Spacing (0028,0030) is (row spacing, column spacing) = (y, x) (PS3.3 10.7.1.3).

Voxel ``[x, y, k]`` of the image (``array[k, y, x]`` in numpy) comes from
``datasets[k]``; radnode masks use the same ``(z, y, x)`` order.

Multi-frame Enhanced CT (and Legacy Converted Enhanced CT) is not supported: such a series
is rejected with ``enhanced_ct_unsupported`` and must be converted to classic
single-frame CT Image Storage first.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
)

from radnode.dicom_io import qc
from radnode.dicom_io.dicomdir import find_dicomdir, is_dicomdir, referenced_files
from radnode.dicom_io.qc import ExcludedFile, QCIssue, QCLimits, QCReport, SeriesRejected

__all__ = [
    "CTSeries",
    "ENHANCED_CT_SOP_CLASSES",
    "QCLimits",
    "QCReport",
    "SeriesRejected",
    "load_series",
]

logger = logging.getLogger(__name__)

#: Multi-frame CT SOP classes (PS3.4 B.5) that this reader refuses.
ENHANCED_CT_SOP_CLASSES: frozenset[str] = frozenset(
    {EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
#: Image Type (0008,0008) value 3 of a scout/topogram (PS3.3 C.8.2.1.1.1).
LOCALIZER_IMAGE_TYPE = "LOCALIZER"
#: Modalities of objects that carry no image to stack (structures, plans, reports, ...).
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "KO", "PR", "REG", "DOC", "RWV"}
)
#: Reason for files that looked like DICOM but could not be parsed.
EXCLUDED_UNREADABLE = "unreadable_file"
#: Relative tolerance for Pixel Spacing to count as equal between slices.
_PIXEL_SPACING_RTOL = 1e-4
#: Attributes every slice needs to place it in space, with their value multiplicity.
_GEOMETRY_ATTRIBUTES = (
    ("ImagePositionPatient", 3),
    ("ImageOrientationPatient", 6),
    ("PixelSpacing", 2),
)
_INT16_MIN, _INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max


@dataclass(frozen=True, eq=False)
class CTSeries:
    """One CT series as a HU image plus its sorted headers and QC report.

    Attributes
    ----------
    image
        HU values, sitkInt16 when every slope is 1 and every intercept an integer (and
        the values fit), sitkFloat32 otherwise. Voxel ``[x, y, k]`` comes from
        ``datasets[k]``.
    datasets
        The slice headers sorted along the slice normal, without Pixel Data.
    files
        The file of each slice, same order.
    qc
        The QC report (``qc.passed`` may be false when loaded with ``strict=False``).
    """

    image: sitk.Image
    datasets: tuple[Dataset, ...]
    files: tuple[Path, ...]
    qc: QCReport

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID (0020,000E)."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID (0020,000D)."""
        return str(self.datasets[0].get("StudyInstanceUID", ""))

    @property
    def frame_of_reference_uid(self) -> str:
        """Frame of Reference UID (0020,0052); the patient coordinate system of the grid."""
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))

    @property
    def modality(self) -> str:
        """Modality (0008,0060), always ``CT`` for a loaded series."""
        return str(self.datasets[0].get("Modality", ""))

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOP Instance UID of each slice, in ``z`` order (for derived objects' references)."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def convolution_kernel(self) -> str | None:
        """Convolution Kernel (0018,1210) of the first slice, multiple values joined by ``\\``."""
        return _kernel(self.datasets[0])

    @property
    def slice_thickness(self) -> float | None:
        """Slice Thickness (0018,0050) in mm of the first slice (reconstructed width)."""
        return _float(self.datasets[0].get("SliceThickness"))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm; z is the distance between slice positions."""
        sx, sy, sz = self.image.GetSpacing()
        return (sx, sy, sz)

    @property
    def array(self) -> np.ndarray:
        """Read-only numpy view ``(z, y, x)`` of :attr:`image` (valid while this object lives)."""
        return sitk.GetArrayViewFromImage(self.image)


@dataclass(frozen=True)
class _Header:
    """One parsed file header and the facts used to group it."""

    path: Path
    ds: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    modality: str

    @property
    def is_localizer(self) -> bool:
        image_type = [str(v).upper() for v in _as_list(self.ds.get("ImageType"))]
        return len(image_type) >= 3 and image_type[2] == LOCALIZER_IMAGE_TYPE

    @property
    def is_ct(self) -> bool:
        return self.sop_class_uid == CTImageStorage and self.modality == "CT"

    @property
    def is_enhanced_ct(self) -> bool:
        return self.sop_class_uid in ENHANCED_CT_SOP_CLASSES

    @property
    def is_image(self) -> bool:
        if self.sop_class_uid == CTImageStorage or self.is_enhanced_ct:
            return True  # even when broken: QC must say why it cannot be used
        return (
            "Rows" in self.ds
            and "Columns" in self.ds
            and self.modality not in NON_IMAGE_MODALITIES
            and self.sop_class_uid != MediaStorageDirectoryStorage
        )


# --- public entry ------------------------------------------------------------------------


def load_series(
    path: Path | str | Sequence[Path | str],
    *,
    series_uid: str | None = None,
    qc_limits: QCLimits | None = None,
    strict: bool = True,
) -> CTSeries:
    """Load one CT series, check it and return it as a HU image.

    Parameters
    ----------
    path
        A folder (walked recursively, files in any order, non-DICOM files ignored), a
        folder holding a DICOMDIR or a DICOMDIR file (then only the files it references
        are read), a single file, or a sequence of files.
    series_uid
        The Series Instance UID to load when several series are present. Without it the
        folder must hold exactly one CT Image Storage series (RTSTRUCT, SEG and similar
        objects beside it are fine).
    qc_limits
        Acceptance limits; defaults to :class:`QCLimits()`.
    strict
        When true, raise :class:`SeriesRejected` if QC finds any error. When false,
        return the series with ``qc.passed`` false for errors after which an image can
        still be built (missing slices, irregular spacing, gantry tilt, too few slices,
        thick slices: the image then uses the median slice spacing and ignores shear).

    Returns
    -------
    CTSeries

    Raises
    ------
    SeriesRejected
        On QC errors with ``strict=True``, and always for errors that leave no voxel
        grid to build (``qc.FATAL_CODES``: no images, mixed series, not CT, Enhanced CT,
        missing/mixed geometry, duplicate slice positions, undecodable pixel data).
    FileNotFoundError
        If ``path`` does not exist.
    """
    limits = qc_limits or QCLimits()
    files = _collect_files(path)
    issues: list[QCIssue] = []
    excluded: list[ExcludedFile] = []

    headers = _read_headers(files, excluded)
    source = _describe_source(path, len(files))
    selected = _select_series(headers, series_uid, issues, excluded, source)
    if selected is None:
        raise SeriesRejected(QCReport.from_issues(issues, excluded))
    series = selected[0].series_uid

    geometry = _check_geometry(selected, limits, issues)
    recorded = _harmonisation_record(selected, geometry)
    report = QCReport.from_issues(issues, excluded, recorded)
    if geometry is None or report.fatal or (strict and not report.passed):
        logger.warning("series %s rejected: %s", series, report.summary())
        raise SeriesRejected(report)

    ordered = [selected[i] for i in geometry.order]
    volume = _decode_volume(ordered, issues)
    recorded["pixel_type"] = None if volume is None else str(volume.dtype)
    report = QCReport.from_issues(issues, excluded, recorded)
    if volume is None or report.fatal or (strict and not report.passed):
        logger.warning("series %s rejected: %s", series, report.summary())
        raise SeriesRejected(report)

    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetSpacing(
        (geometry.pixel_spacing[1], geometry.pixel_spacing[0], geometry.slice_spacing)
    )
    image.SetDirection(tuple(float(v) for v in geometry.direction.ravel()))
    logger.info(
        "loaded series %s: %d slices, spacing %s mm, %s, QC %s",
        series,
        len(ordered),
        tuple(round(s, 4) for s in image.GetSpacing()),
        image.GetPixelIDTypeAsString(),
        "passed" if report.passed else "failed",
    )
    return CTSeries(
        image=image,
        datasets=tuple(h.ds for h in ordered),
        files=tuple(h.path for h in ordered),
        qc=report,
    )


# --- file discovery and headers -----------------------------------------------------------


def _collect_files(path: Path | str | Sequence[Path | str]) -> list[Path]:
    """Expand ``path`` into the list of candidate files."""
    if not isinstance(path, (str, os.PathLike)):
        return [Path(p) for p in path]
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"series path {root} does not exist")
    if root.is_file():
        return referenced_files(root) if is_dicomdir(root) else [root]
    dicomdir = find_dicomdir(root)
    if dicomdir is not None:
        logger.debug("reading the files referenced by %s", dicomdir)
        return referenced_files(dicomdir)
    return sorted(p for p in root.rglob("*") if p.is_file())


def _describe_source(path: Path | str | Sequence[Path | str], n_files: int) -> str:
    """Where the files came from, for messages."""
    where = str(path) if isinstance(path, (str, os.PathLike)) else "the given file list"
    return f"{where} ({n_files} file(s))"


def _read_headers(files: Iterable[Path], excluded: list[ExcludedFile]) -> list[_Header]:
    """Parse every file up to Pixel Data; non-DICOM and unreadable files go to ``excluded``."""
    headers: list[_Header] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            excluded.append(ExcludedFile(str(path), qc.EXCLUDED_NOT_DICOM))
            continue
        except Exception as exc:  # noqa: BLE001 - any parser failure means "unreadable file"
            logger.warning("cannot parse %s as DICOM: %s", path, exc)
            excluded.append(ExcludedFile(str(path), EXCLUDED_UNREADABLE))
            continue
        meta = getattr(ds, "file_meta", Dataset())
        sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
        sop_uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
        headers.append(
            _Header(
                path=path,
                ds=ds,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                modality=str(ds.get("Modality", "")).upper(),
            )
        )
    return headers


# --- series selection ------------------------------------------------------------------------


def _describe(group: list[_Header]) -> str:
    """'<uid> (<modality>, <n> instances)' for messages."""
    modalities = ",".join(sorted({h.modality or "?" for h in group}))
    return f"{group[0].series_uid} ({modalities}, {len(group)} instance(s))"


def _select_series(
    headers: list[_Header],
    series_uid: str | None,
    issues: list[QCIssue],
    excluded: list[ExcludedFile],
    source: str,
) -> list[_Header] | None:
    """Choose the CT series and the instances of it that form the volume.

    Returns ``None`` (with a fatal issue appended) when there is nothing to load.
    """
    groups: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        if not h.is_image:
            excluded.append(
                ExcludedFile(str(h.path), qc.EXCLUDED_NON_IMAGE, h.sop_instance_uid, h.series_uid)
            )
            continue
        groups[h.series_uid].append(h)

    if series_uid is not None:
        if series_uid not in groups:
            found = "; ".join(_describe(g) for g in groups.values()) or "none"
            issues.append(
                QCIssue.error(
                    qc.SERIES_NOT_FOUND,
                    f"series {series_uid} not found in {source}; image series there: {found}",
                    series_instance_uid=series_uid,
                    available=sorted(groups),
                )
            )
            return None
        chosen = series_uid
    else:
        ct_uids = sorted(
            uid for uid, g in groups.items() if any(h.is_ct and not h.is_localizer for h in g)
        )
        if len(ct_uids) > 1:
            issues.append(
                QCIssue.error(
                    qc.MIXED_SERIES,
                    f"mixed series: {len(ct_uids)} series found: "
                    + ", ".join(_describe(groups[u]) for u in ct_uids)
                    + "; choose one with series_uid",
                    series_instance_uids=ct_uids,
                )
            )
            return None
        if not ct_uids:
            _report_no_ct(groups, issues, excluded, source)
            return None
        chosen = ct_uids[0]

    for uid, group in groups.items():
        if uid == chosen:
            continue
        only_localizers = all(h.is_localizer for h in group)
        reason = qc.EXCLUDED_LOCALIZER if only_localizers else qc.EXCLUDED_OTHER_SERIES
        excluded.extend(ExcludedFile(str(h.path), reason, h.sop_instance_uid, uid) for h in group)
        if only_localizers:
            _localizer_warning(group, issues)
        elif series_uid is None:
            issues.append(
                QCIssue.warning(
                    qc.OTHER_SERIES_IGNORED,
                    f"ignored non-CT image series {_describe(group)} found with CT series {chosen}",
                    series_instance_uid=uid,
                    n_instances=len(group),
                )
            )
    return _instances_of(groups[chosen], issues, excluded)


def _report_no_ct(
    groups: dict[str, list[_Header]],
    issues: list[QCIssue],
    excluded: list[ExcludedFile],
    source: str,
) -> None:
    """Explain why no CT series could be chosen (fatal issue)."""
    everything = [h for g in groups.values() for h in g]
    enhanced = [h for h in everything if h.is_enhanced_ct]
    localizers = [h for h in everything if h.is_ct and h.is_localizer]
    others = [h for h in everything if not h.is_ct and not h.is_enhanced_ct]
    for h in everything:
        reason = (
            qc.EXCLUDED_ENHANCED_CT
            if h.is_enhanced_ct
            else qc.EXCLUDED_LOCALIZER
            if h.is_ct
            else qc.EXCLUDED_NOT_CT
        )
        excluded.append(ExcludedFile(str(h.path), reason, h.sop_instance_uid, h.series_uid))
    if localizers:
        _localizer_warning(localizers, issues)
    if enhanced:
        issues.append(_enhanced_issue(enhanced))
    elif others:
        issues.append(_not_ct_issue(others))
    else:
        what = "only localizer images" if localizers else "no DICOM image files"
        issues.append(
            QCIssue.error(
                qc.NO_IMAGES,
                f"no CT images to load: {what} in {source}",
                n_localizers=len(localizers),
            )
        )


def _instances_of(
    group: list[_Header], issues: list[QCIssue], excluded: list[ExcludedFile]
) -> list[_Header] | None:
    """Filter the chosen series down to unique, non-localizer CT slices."""
    uid = group[0].series_uid
    slices: list[_Header] = []
    seen: dict[str, _Header] = {}
    duplicates: list[_Header] = []
    localizers = [h for h in group if h.is_ct and h.is_localizer]
    enhanced = [h for h in group if h.is_enhanced_ct]
    not_ct = [h for h in group if not h.is_ct and not h.is_enhanced_ct]
    for h in group:
        if not h.is_ct or h.is_localizer:
            continue
        if h.sop_instance_uid in seen:
            duplicates.append(h)
            continue
        seen[h.sop_instance_uid] = h
        slices.append(h)
    for h in localizers:
        excluded.append(ExcludedFile(str(h.path), qc.EXCLUDED_LOCALIZER, h.sop_instance_uid, uid))
    for h in duplicates:
        excluded.append(ExcludedFile(str(h.path), qc.EXCLUDED_DUPLICATE, h.sop_instance_uid, uid))
    for h in enhanced:
        excluded.append(ExcludedFile(str(h.path), qc.EXCLUDED_ENHANCED_CT, h.sop_instance_uid, uid))
    for h in not_ct:
        excluded.append(ExcludedFile(str(h.path), qc.EXCLUDED_NOT_CT, h.sop_instance_uid, uid))
    if localizers:
        _localizer_warning(localizers, issues)
    if duplicates:
        issues.append(
            QCIssue.warning(
                qc.DUPLICATE_INSTANCE,
                f"{len(duplicates)} file(s) repeat an instance already read in series {uid}; "
                "kept the first copy of: "
                + qc.format_list([f"{h.sop_instance_uid} ({h.path.name})" for h in duplicates]),
                sop_instance_uids=[h.sop_instance_uid for h in duplicates],
            )
        )
    if enhanced:
        issues.append(_enhanced_issue(enhanced))
    if not_ct:
        issues.append(_not_ct_issue(not_ct))
    if not slices:
        if not enhanced and not not_ct:
            issues.append(
                QCIssue.error(
                    qc.NO_IMAGES, f"series {uid} holds no CT image slices (only localizers)"
                )
            )
        return None
    return slices


def _localizer_warning(localizers: list[_Header], issues: list[QCIssue]) -> None:
    uids = [h.sop_instance_uid for h in localizers]
    issues.append(
        QCIssue.warning(
            qc.LOCALIZER_EXCLUDED,
            f"{len(uids)} localizer image(s) (Image Type value 3 LOCALIZER) left out of the "
            f"volume: {qc.format_list(uids)}",
            sop_instance_uids=uids,
        )
    )


def _enhanced_issue(headers: list[_Header]) -> QCIssue:
    uids = sorted({h.series_uid for h in headers})
    return QCIssue.error(
        qc.ENHANCED_CT_UNSUPPORTED,
        f"multi-frame Enhanced/Legacy Converted Enhanced CT ({headers[0].sop_class_uid}) is not "
        f"supported: series {', '.join(uids)} ({len(headers)} file(s), e.g. instance "
        f"{headers[0].sop_instance_uid}); convert it to single-frame CT Image Storage "
        f"({CTImageStorage})",
        series_instance_uids=uids,
        sop_instance_uids=[h.sop_instance_uid for h in headers],
        sop_class_uid=headers[0].sop_class_uid,
    )


def _not_ct_issue(headers: list[_Header]) -> QCIssue:
    found = sorted({f"{h.modality or '?'} / {h.sop_class_uid or '?'}" for h in headers})
    return QCIssue.error(
        qc.NOT_CT,
        f"{len(headers)} image instance(s) are not CT Image Storage with Modality CT "
        f"(found Modality / SOP Class {'; '.join(found)}) in series "
        f"{', '.join(sorted({h.series_uid for h in headers}))}: "
        + qc.format_list([h.sop_instance_uid for h in headers]),
        sop_instance_uids=[h.sop_instance_uid for h in headers],
        found=found,
    )


# --- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    order: np.ndarray  # indices into the selected headers, sorted along the normal
    origin: np.ndarray  # (3,) IPP of the first sorted slice
    direction: np.ndarray  # (3, 3) columns: row cosine, column cosine, normal
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) = (y, x)
    slice_spacing: float
    positions_mm: np.ndarray  # sorted projections on the normal


def _check_geometry(
    headers: list[_Header], limits: QCLimits, issues: list[QCIssue]
) -> _Geometry | None:
    """Apply the geometry rules and derive the voxel grid (``None`` after a fatal issue)."""
    uid = headers[0].series_uid
    sop_uids = [h.sop_instance_uid for h in headers]
    missing: list[str] = []
    for h in headers:
        absent = [
            k
            for k, n in _GEOMETRY_ATTRIBUTES
            if len(_as_list(h.ds.get(k))) != n
        ]
        if absent:
            missing.append(f"{h.sop_instance_uid} lacks {'/'.join(absent)}")
    if missing:
        issues.append(
            QCIssue.error(
                qc.MISSING_GEOMETRY,
                f"series {uid}: {len(missing)} slice(s) without usable geometry: "
                + qc.format_list(missing),
                problems=missing,
            )
        )
        return None

    grid = {
        (int(h.ds.get("Rows", 0)), int(h.ds.get("Columns", 0)), int(h.ds.get("SamplesPerPixel", 1)))
        for h in headers
    }
    spacings = np.array([[float(v) for v in h.ds.PixelSpacing] for h in headers])
    spacing_varies = not np.allclose(spacings, spacings[0], rtol=_PIXEL_SPACING_RTOL, atol=0)
    if len(grid) > 1 or spacing_varies or next(iter(grid))[2] != 1:
        issues.append(
            QCIssue.error(
                qc.INCONSISTENT_PIXEL_GRID,
                f"series {uid}: slices differ in Rows/Columns/Samples per Pixel "
                f"{sorted(grid)} or Pixel Spacing "
                f"{sorted({tuple(s) for s in spacings.round(5).tolist()})}; expected one "
                "single-sample grid",
                grids=sorted(grid),
            )
        )
        return None

    orientations = np.array([[float(v) for v in h.ds.ImageOrientationPatient] for h in headers])
    orientation_issues = qc.check_orientation(orientations, sop_uids, limits)
    issues.extend(orientation_issues)
    if orientation_issues:
        return None

    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] - np.dot(orientations[0, 3:], row) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in h.ds.ImagePositionPatient] for h in headers])
    projections = positions @ normal
    order = np.argsort(projections, kind="stable")
    sorted_pos = projections[order]
    sorted_uids = [sop_uids[i] for i in order]

    spacing_issues = qc.check_spacing(sorted_pos, sorted_uids, limits)
    issues.extend(spacing_issues)
    issues.extend(
        qc.check_tilt(
            positions[order], normal, uid, limits, _float(headers[0].ds.get("GantryDetectorTilt"))
        )
    )
    issues.extend(qc.check_slice_count(len(headers), uid, limits))

    if len(headers) == 1:
        slice_spacing = _float(headers[0].ds.get("SliceThickness")) or 1.0
    elif spacing_issues:
        slice_spacing = float(np.median(np.diff(sorted_pos)))
    else:
        slice_spacing = float((sorted_pos[-1] - sorted_pos[0]) / (len(sorted_pos) - 1))
    thicknesses = [_float(h.ds.get("SliceThickness")) for h in headers]
    issues.extend(
        qc.check_slice_thickness(
            thicknesses, slice_spacing if len(headers) > 1 else None, uid, limits
        )
    )
    if slice_spacing <= 0:
        return None
    return _Geometry(
        order=order,
        origin=positions[order[0]],
        direction=np.column_stack([row, col, normal]),
        pixel_spacing=(float(spacings[0, 0]), float(spacings[0, 1])),
        slice_spacing=slice_spacing,
        positions_mm=sorted_pos,
    )


# --- pixels ---------------------------------------------------------------------------------


def _decode_volume(ordered: list[_Header], issues: list[QCIssue]) -> np.ndarray | None:
    """Decode every slice and apply Rescale Slope/Intercept into one ``(z, y, x)`` array.

    The result is int16 when every slope is 1, every intercept an integer and every
    value fits, float32 otherwise (computed in float64, then rounded once).
    """
    rows, cols = int(ordered[0].ds.Rows), int(ordered[0].ds.Columns)
    rescale = [
        (_float(h.ds.get("RescaleSlope")) or 1.0, _float(h.ds.get("RescaleIntercept")) or 0.0)
        for h in ordered
    ]
    integral = all(s == 1.0 and float(i).is_integer() for s, i in rescale)
    volume = np.empty((len(ordered), rows, cols), dtype=np.int16 if integral else np.float32)
    failures: list[dict[str, str]] = []
    for k, (h, (slope, intercept)) in enumerate(zip(ordered, rescale, strict=True)):
        try:
            raw = _read_pixels(h.path, rows, cols)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; report them all
            failures.append(
                {
                    "path": str(h.path),
                    "sop_instance_uid": h.sop_instance_uid,
                    "transfer_syntax_uid": _transfer_syntax(h.ds),
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            continue
        if volume.dtype == np.int16:
            hu = raw.astype(np.int32) + int(intercept)
            if hu.min() >= _INT16_MIN and hu.max() <= _INT16_MAX:
                volume[k] = hu
                continue
            logger.info("HU values of %s exceed int16; using float32", h.sop_instance_uid)
            volume = volume.astype(np.float32)
        volume[k] = (raw.astype(np.float64) * slope + intercept).astype(np.float32)
    if failures:
        issues.append(
            QCIssue.error(
                qc.UNREADABLE_PIXEL_DATA,
                f"pixel data of {len(failures)} slice(s) could not be decoded: "
                + qc.format_list(
                    [
                        f"{f['sop_instance_uid']} ({Path(f['path']).name}, transfer syntax "
                        f"{f['transfer_syntax_uid']}): {f['error']}"
                        for f in failures
                    ]
                ),
                failures=failures,
            )
        )
        return None
    return volume


def _read_pixels(path: Path, rows: int, cols: int) -> np.ndarray:
    """Decode the single frame of ``path``; raise ``ValueError`` on a wrong shape."""
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data (7FE0,0010)")
    arr = ds.pixel_array
    if arr.shape != (rows, cols):
        raise ValueError(f"decoded shape {arr.shape}, expected one frame of {(rows, cols)}")
    return arr


# --- harmonisation record ---------------------------------------------------------------------


def _harmonisation_record(
    headers: list[_Header], geometry: _Geometry | None
) -> dict[str, Any]:
    """Acquisition/reconstruction facts kept with the result (no patient identifiers)."""
    first = headers[0].ds

    def unique(values: Iterable[Any]) -> Any:
        distinct = sorted({v for v in values if v is not None}, key=str)
        if not distinct:
            return None
        return distinct[0] if len(distinct) == 1 else distinct

    record: dict[str, Any] = {
        "series_instance_uid": headers[0].series_uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "modality": headers[0].modality,
        "n_slices": len(headers),
        "rows": int(first.get("Rows", 0)),
        "columns": int(first.get("Columns", 0)),
        "convolution_kernel": unique(_kernel(h.ds) for h in headers),
        "slice_thickness_mm": unique(_float(h.ds.get("SliceThickness")) for h in headers),
        "manufacturer": unique(_str(h.ds.get("Manufacturer")) for h in headers),
        "manufacturer_model_name": unique(_str(h.ds.get("ManufacturerModelName")) for h in headers),
        "software_versions": unique(_kernel(h.ds, "SoftwareVersions") for h in headers),
        "kvp": unique(_float(h.ds.get("KVP")) for h in headers),
        "xray_tube_current_ma": unique(_float(h.ds.get("XRayTubeCurrent")) for h in headers),
        "exposure_mas": unique(_float(h.ds.get("Exposure")) for h in headers),
        "reconstruction_diameter_mm": unique(
            _float(h.ds.get("ReconstructionDiameter")) for h in headers
        ),
        "gantry_detector_tilt_deg": unique(_float(h.ds.get("GantryDetectorTilt")) for h in headers),
        "contrast_bolus_agent": unique(_str(h.ds.get("ContrastBolusAgent")) for h in headers),
        "patient_position": unique(_str(h.ds.get("PatientPosition")) for h in headers),
        "transfer_syntax_uids": sorted(
            {_transfer_syntax(h.ds) for h in headers}
        ),
        "rescale_slope": unique(_float(h.ds.get("RescaleSlope")) for h in headers),
        "rescale_intercept": unique(_float(h.ds.get("RescaleIntercept")) for h in headers),
    }
    if geometry is not None:
        record["pixel_spacing_mm"] = list(geometry.pixel_spacing)
        record["slice_spacing_mm"] = geometry.slice_spacing
        record["origin_mm"] = geometry.origin.tolist()
        record["direction"] = geometry.direction.ravel().tolist()
        record["z_range_mm"] = [float(geometry.positions_mm[0]), float(geometry.positions_mm[-1])]
    return record


def _transfer_syntax(ds: Dataset) -> str:
    return str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    if value is None or value == "":
        return []
    return [value]


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _kernel(ds: Dataset, keyword: str = "ConvolutionKernel") -> str | None:
    """A possibly multi-valued string attribute as one ``\\``-joined string."""
    values = [str(v).strip() for v in _as_list(ds.get(keyword)) if str(v).strip()]
    return "\\".join(values) if values else None
