"""What every derived object (SEG, RTSTRUCT, SR) shares: the source grid and its headers.

* :func:`source_datasets` / :class:`SourceGeometry` check that the source CT is one
  series of parallel single-frame slices sorted along the slice normal (the order of
  ``load_series(...).datasets``) and map voxel indices to patient coordinates
  (PS3.3 C.7.6.2.1.1).
* :func:`fill_type2` returns a copy of a source header with the Type 2 attributes of the
  Patient and General Study modules present (empty when the archive left them out):
  highdicom reads them as attributes and raises ``AttributeError`` otherwise (see
  BENCHMARKS.md), and PS3.3 requires them in every derived object anyway.
* :func:`copy_patient_study` copies the Patient, General Study and Patient Study modules
  (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2) into a new dataset, for the RTSTRUCT we build by hand.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from copy import deepcopy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from radnode.dicom_io.regions import AlgorithmInfo, Region, WriterOptions
from radnode.dicom_io.uids import DerivedObject, DerivedUIDs, derived_object_uids, series_fingerprint

logger = logging.getLogger(__name__)

#: Largest |cos| difference between two slices' orientations that still counts as equal.
ORIENTATION_TOLERANCE = 1e-4
#: Largest in-plane offset (mm) between consecutive slice origins accepted as "stacked";
#: beyond it the slices are sheared (gantry tilt) -- fine for per-slice mapping, but logged.
SHEAR_TOLERANCE_MM = 0.01

#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1):
#: must be present in every derived object, may be empty.
TYPE2_PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: Attributes copied from the source CT into a derived object (Patient, Clinical Trial
#: Subject, General Study, Patient Study, Clinical Trial Study modules).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient (C.7.1.1)
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    # Clinical Trial Subject (C.7.1.3)
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    # Patient Study (C.7.2.2)
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "SmokingStatus",
    # Clinical Trial Study (C.7.2.3)
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)


class SourceError(ValueError):
    """The source CT cannot carry a derived object (names the UID and attribute)."""


class MaskShapeError(ValueError):
    """A region's mask does not match the source grid."""


class NoRegionsError(ValueError):
    """Every region is empty, so there is nothing an object could hold."""


@runtime_checkable
class _HasDatasets(Protocol):
    datasets: Sequence[Dataset]


SourceLike = Sequence[Dataset] | _HasDatasets


def source_datasets(source: SourceLike) -> list[Dataset]:
    """The slice headers of ``source`` (a sequence of datasets or a ``CTSeries``)."""
    if isinstance(source, _HasDatasets):
        datasets = list(source.datasets)
    else:
        datasets = list(source)
    if not datasets:
        raise SourceError("the source series has no slices")
    for ds in datasets:
        if not isinstance(ds, Dataset):
            raise TypeError(f"source slices must be pydicom Datasets, not {type(ds).__name__}")
    return datasets


def _vector(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    uid = ds.get("SOPInstanceUID", "?")
    if value is None or len(value) != n:
        raise SourceError(f"slice {uid}: {keyword} must have {n} values, got {value!r}")
    try:
        return np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"slice {uid}: {keyword} {value!r} is not numeric") from exc


@dataclass(frozen=True)
class SourceGeometry:
    """The voxel grid of the source series.

    Attributes
    ----------
    positions
        Image Position (Patient) of each slice, ``(n, 3)`` mm, in ``z`` order.
    row_direction
        Direction cosine along a row (increasing column index), IOP values 1-3.
    column_direction
        Direction cosine down a column (increasing row index), IOP values 4-6.
    pixel_spacing
        (row spacing, column spacing) in mm: the distance between rows, between columns.
    rows, columns
        Matrix size of every slice.
    """

    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal ``row x column``."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Mask shape ``(z, y, x)`` this grid expects."""
        return (len(self.positions), self.rows, self.columns)

    @property
    def slice_spacing(self) -> float:
        """Median distance between consecutive slices along the normal (mm)."""
        if len(self.positions) < 2:
            return 1.0
        along = self.positions @ self.normal
        return float(np.median(np.diff(along)))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing

    @property
    def is_axial(self) -> bool:
        """True when the slices are transverse (normal along the patient z axis)."""
        return bool(abs(abs(self.normal[2]) - 1.0) < ORIENTATION_TOLERANCE)

    def to_patient(self, k: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Patient coordinates (mm) of continuous pixel indices on slice ``k``.

        PS3.3 C.7.6.2.1.1: ``P = S + c * Δc * X + r * Δr * Y`` with ``X`` the row
        direction, ``Y`` the column direction, ``Δc`` the column spacing, ``Δr`` the row
        spacing. Returns an ``(n, 3)`` array.
        """
        dr, dc = self.pixel_spacing
        rows = np.asarray(rows, dtype=np.float64)[:, None]
        columns = np.asarray(columns, dtype=np.float64)[:, None]
        return (
            self.positions[k][None, :]
            + columns * dc * self.row_direction[None, :]
            + rows * dr * self.column_direction[None, :]
        )


def source_geometry(datasets: Sequence[Dataset]) -> SourceGeometry:
    """Check that ``datasets`` form one sorted stack of parallel slices and describe it.

    Raises
    ------
    SourceError
        When slices come from different series or frames of reference, differ in
        orientation or matrix, lack geometry, or are not strictly increasing along the
        slice normal (sort them as ``load_series`` does).
    """
    first = datasets[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID",
                    "FrameOfReferenceUID"):
        for ds in datasets:
            if not str(ds.get(keyword, "")).strip():
                raise SourceError(
                    f"slice {ds.get('SOPInstanceUID', '?')} of series {series_uid}: "
                    f"{keyword} is missing; derived objects must reference it"
                )
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword)) for ds in datasets}
        if len(values) > 1:
            raise SourceError(
                f"source slices of series {series_uid} have {len(values)} different {keyword} "
                f"values; pass one series in one frame of reference"
            )
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        raise SourceError(f"series {series_uid}: a SOP Instance UID appears twice in the source")

    iop = _vector(first, "ImageOrientationPatient", 6)
    spacing = _vector(first, "PixelSpacing", 2)
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    if rows < 1 or cols < 1:
        raise SourceError(f"slice {first.SOPInstanceUID}: Rows/Columns missing")
    if np.any(spacing <= 0):
        raise SourceError(f"slice {first.SOPInstanceUID}: PixelSpacing {spacing} must be > 0")
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(
        row_dir @ col_dir
    ) > 1e-3:
        raise SourceError(
            f"slice {first.SOPInstanceUID}: ImageOrientationPatient {iop.tolist()} is not two "
            "orthogonal unit vectors"
        )
    positions = np.empty((len(datasets), 3))
    for k, ds in enumerate(datasets):
        other = _vector(ds, "ImageOrientationPatient", 6)
        if np.max(np.abs(other - iop)) > ORIENTATION_TOLERANCE:
            raise SourceError(
                f"series {series_uid}: slice {ds.SOPInstanceUID} has orientation "
                f"{other.tolist()}, slice {first.SOPInstanceUID} {iop.tolist()}; all slices must "
                "be parallel"
            )
        if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != cols:
            raise SourceError(
                f"series {series_uid}: slice {ds.SOPInstanceUID} is {ds.get('Rows')}x"
                f"{ds.get('Columns')}, expected {rows}x{cols}"
            )
        if np.max(np.abs(_vector(ds, "PixelSpacing", 2) - spacing)) > 1e-4 * float(spacing.max()):
            raise SourceError(
                f"series {series_uid}: slice {ds.SOPInstanceUID} has another PixelSpacing"
            )
        positions[k] = _vector(ds, "ImagePositionPatient", 3)
    geometry = SourceGeometry(
        positions=positions,
        row_direction=row_dir,
        column_direction=col_dir,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=cols,
    )
    along = positions @ geometry.normal
    if len(datasets) > 1 and np.any(np.diff(along) <= 0):
        bad = int(np.argmax(np.diff(along) <= 0))
        raise SourceError(
            f"series {series_uid}: slices are not strictly increasing along the slice normal "
            f"(slice {bad} at {along[bad]:.3f} mm, slice {bad + 1} at {along[bad + 1]:.3f} mm); "
            "sort them by Image Position (Patient) projected on the normal"
        )
    if len(datasets) > 1:
        steps = np.diff(positions, axis=0)
        in_plane = steps - np.outer(steps @ geometry.normal, geometry.normal)
        if np.max(np.linalg.norm(in_plane, axis=1)) > SHEAR_TOLERANCE_MM:
            logger.info(
                "series %s: slice origins are sheared (gantry tilt); contours use each "
                "slice's own position", series_uid,
            )
    return geometry


def check_masks(regions: Sequence[Region], geometry: SourceGeometry, series_uid: str) -> None:
    """Raise :class:`MaskShapeError` when a mask is not shaped like the source grid."""
    names = [r.name for r in regions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"region names must be unique; repeated: {duplicates}")
    for region in regions:
        if region.mask.shape != geometry.shape:
            raise MaskShapeError(
                f"region {region.name!r}: mask shape {region.mask.shape} does not match the "
                f"source series {series_uid}, which is (z, y, x) = {geometry.shape}"
            )


def split_regions(
    regions: Sequence[Region], geometry: SourceGeometry, series_uid: str, needs: str
) -> tuple[list[Region], list[Region]]:
    """Check the masks and split regions into (to write, empty); raise if none has a voxel.

    ``needs`` completes the error message with what the object requires, e.g. "a
    Segmentation needs at least one segment with one frame".
    """
    check_masks(regions, geometry, series_uid)
    written = [r for r in regions if not r.is_empty]
    missing = [r for r in regions if r.is_empty]
    if not written:
        raise NoRegionsError(f"series {series_uid}: every region is empty ({[r.name for r in regions]}); {needs}")
    return written, missing


def object_uids(
    options: WriterOptions, datasets: Sequence[Dataset], kind: DerivedObject, algorithm: AlgorithmInfo, *extra: str
) -> DerivedUIDs:
    """Deterministic series/SOP UIDs of one derived object of ``datasets``.

    The same source instances, pipeline version and algorithm always give the same UIDs,
    so a re-run job re-sends the same objects instead of duplicating them in the PACS.
    """
    return derived_object_uids(
        options.uid_root,
        str(datasets[0].SeriesInstanceUID),
        kind,
        options.pipeline_version,
        series_fingerprint(str(ds.SOPInstanceUID) for ds in datasets),
        *algorithm.identity(),
        *extra,
    )


def fill_type2(ds: Dataset) -> Dataset:
    """A header-only copy of ``ds`` with every Type 2 Patient/Study attribute present.

    Pixel Data is dropped (derived objects never need it), so the copy is cheap even
    when the caller passed fully loaded images.
    """
    copy = Dataset()
    copy.file_meta = getattr(ds, "file_meta", Dataset())
    for element in ds:
        if element.tag.group == 0x7FE0 or element.tag == 0x00280000:
            continue
        copy.add(deepcopy(element))
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in copy or copy[keyword].value is None:
            setattr(copy, keyword, "")
    return copy


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient/Study modules of ``source`` into ``target`` (Type 2 filled)."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in target:
            setattr(target, keyword, "")


def set_equipment(target: Dataset, manufacturer: str, model: str,
                  software_versions: Sequence[str], institution: str | None = None) -> None:
    """General Equipment module (PS3.3 C.7.5.1) of a radnode object."""
    target.Manufacturer = manufacturer
    target.ManufacturerModelName = model[:64]
    target.SoftwareVersions = [v[:64] for v in software_versions]
    target.DeviceSerialNumber = "0"
    if institution:
        target.InstitutionName = institution[:64]


#: 26-connectivity: voxels touching by a corner belong to one tumour component.
_CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)
#: Components listed by size in descriptions; the rest are counted.
MAX_LISTED_COMPONENTS = 20


def component_summary(mask: np.ndarray, voxel_ml: float) -> str:
    """``"2 connected components (26-connectivity): 12.34 mL, 0.56 mL"``.

    Written as Segment Description / ROI Description of the tumour, so a reader sees
    at a glance that one segment holds several lesions.
    """
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY_3D)
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
    listed = ", ".join(f"{s * voxel_ml:.2f} mL" for s in sizes[:MAX_LISTED_COMPONENTS])
    more = f" (+{count - MAX_LISTED_COMPONENTS} more)" if count > MAX_LISTED_COMPONENTS else ""
    noun = "component" if count == 1 else "components"
    return f"{count} connected {noun} (26-connectivity): {listed}{more}"


@contextlib.contextmanager
def quiet_name_warnings() -> Iterator[None]:
    """Silence highdicom's warning about single-component patient names of the source.

    Many archives hold names like ``PAT1`` (anonymised data); the derived object must
    copy them unchanged, so the warning is noise in every job's log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*unlikely to represent the intended person name"
        )
        yield
