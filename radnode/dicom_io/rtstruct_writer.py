"""RT Structure Set (PS3.3 A.19) of radnode's regions, written to import into planning systems.

highdicom has no RTSTRUCT, so this module builds it attribute by attribute, with the
habits planning systems (TPS) are strict about:

* Referenced Frame of Reference -> RT Referenced Study -> RT Referenced Series ->
  Contour Image Sequence listing *every* CT instance (PS3.3 C.8.8.5);
* CLOSED_PLANAR contours of at least 3 points, each lying exactly in the plane of a CT
  slice (computed from that slice's own Image Position (Patient), so the contour z of an
  axial series equals the slice z) and referencing that slice in its Contour Image
  Sequence (PS3.3 C.8.8.6);
* holes as keyhole cuts by default (see :mod:`radnode.dicom_io.contours`);
* every DS value at most 16 characters (PS3.5 §6.2), written as fixed-point decimals;
* Implicit VR Little Endian (the default transfer syntax every system reads): a lung
  contour's Contour Data easily exceeds the 64 KiB an explicit-VR DS element can hold
  (2-byte length, PS3.5 §7.1.2), and pydicom would silently turn it into ``UN``;
* ROI Display Color, RT ROI Interpreted Type (ORGAN / GTV / CONTROL), ROI Generation
  Algorithm AUTOMATIC with the algorithm identified, Approval Status UNAPPROVED (an
  automatic result must be reviewed before planning).

Empty regions are left out (a TPS may refuse an ROI without contours) and named in
Structure Set Description, e.g. "no tumour found". A region with a review note (the
tumour contour's quality score is below its threshold) keeps its interpreted type and
gets ROI Observation Label "REVIEW REQUIRED" with the note as ROI Observation Description
(PS3.3 C.8.8.8) and in its ROI Description; its name carries a suffix set by the chain.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from radnode.config.model import OutputSettings
from radnode.dicom_io.contours import HoleStyle, slice_polygons
from radnode.dicom_io.derived import (
    SourceGeometry,
    SourceLike,
    component_summary,
    copy_patient_study,
    object_uids,
    set_equipment,
    source_datasets,
    source_geometry,
    split_regions,
)
from radnode.dicom_io.provenance import add_algorithms
from radnode.dicom_io.regions import (
    AlgorithmInfo,
    Region,
    RegionKind,
    WriterOptions,
    as_writer_options,
)
from radnode.dicom_io.uids import DerivedObject

logger = logging.getLogger(__name__)

#: ROI Observation Label (SH, 16 characters) of a region that a person must review.
REVIEW_LABEL = "REVIEW REQUIRED"

#: RT Structure Set Storage (PS3.4 B.5).
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
#: Contour Geometric Type for an area (PS3.3 C.8.8.6.1).
CLOSED_PLANAR = "CLOSED_PLANAR"
#: ROI Generation Algorithm (PS3.3 C.8.8.5): produced without a human drawing it.
GENERATION_AUTOMATIC = "AUTOMATIC"
#: Approval Status (PS3.3 C.8.8.16) of an unreviewed automatic result.
APPROVAL_UNAPPROVED = "UNAPPROVED"
#: Structure Set Label (SH, 16 characters).
STRUCTURE_SET_LABEL = "RADNODE"
#: PS3.5 §6.2: a DS value is at most 16 characters.
DS_MAX_LENGTH = 16


def format_ds(value: float) -> str:
    """Format a number as a DS string of at most 16 characters, as exactly as fits.

    The shortest string that reads back as the same double is used when it fits
    (so a contour's z equals the slice's Image Position (Patient) z bit for bit);
    otherwise fixed-point with as many decimals as 16 characters allow.
    """
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as DS")
    if value == 0.0:
        return "0"
    text = repr(value)
    if len(text) <= DS_MAX_LENGTH and "e" not in text:
        return text
    integer_digits = len(str(int(abs(value))))
    decimals = max(0, DS_MAX_LENGTH - integer_digits - 1 - (value < 0))
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if len(text) > DS_MAX_LENGTH or text in ("", "-0"):
        text = format_number_as_ds(value)
    return text


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _code_item(code: Code) -> Dataset:
    """Code Sequence Macro item (PS3.3 Table 8.8-1)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _image_reference(image: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return ref


def _algorithm_item(algorithm: AlgorithmInfo) -> Dataset:
    """Algorithm Identification Macro (PS3.3 Table 10-19)."""
    item = Dataset()
    item.AlgorithmFamilyCodeSequence = [_code_item(algorithm.family)]
    item.AlgorithmName = algorithm.name[:64]
    item.AlgorithmVersion = algorithm.version[:64]
    item.AlgorithmSource = "radnode"
    params = dict(algorithm.model_versions)
    if algorithm.demo:
        params["demo"] = "true"
    if params:
        item.AlgorithmParameters = ",".join(f"{k}={v}" for k, v in params.items())
    return item


def _contour_items(
    region: Region,
    geometry: SourceGeometry,
    datasets: Sequence[Dataset],
    smoothing: bool,
    hole_style: HoleStyle,
) -> list[Dataset]:
    items: list[Dataset] = []
    slices = np.flatnonzero(region.mask.reshape(region.mask.shape[0], -1).any(axis=1))
    for k in slices:
        k = int(k)
        for polygon in slice_polygons(region.mask[k], smoothing=smoothing, hole_style=hole_style):
            points = geometry.to_patient(k, polygon[:, 0], polygon[:, 1])
            item = Dataset()
            item.ContourImageSequence = [_image_reference(datasets[k])]
            item.ContourGeometricType = CLOSED_PLANAR
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(items) + 1
            item.ContourData = [format_ds(v) for v in points.ravel()]
            items.append(item)
    return items


def _description(written: Sequence[Region], missing: Sequence[Region]) -> str:
    parts = []
    missing_tumours = [r for r in missing if r.kind is RegionKind.TUMOUR]
    if missing_tumours and not any(r.kind is RegionKind.TUMOUR for r in written):
        notes = [r.review_note for r in missing_tumours if r.review_note]
        parts.append(notes[0] if notes else "no tumour found")
    parts += [f"{r.name}: {r.review_note}" for r in written if r.review_note]
    empty = [r.name for r in missing if r.kind is not RegionKind.TUMOUR]
    if empty:
        parts.append("empty, not written: " + ", ".join(empty))
    parts.append("automatic contours by radnode, review before clinical use")
    return "; ".join(parts)


def build_rtstruct(
    source: SourceLike,
    regions: Sequence[Region],
    algorithm: AlgorithmInfo,
    options: WriterOptions | OutputSettings | None = None,
    *,
    smoothing: bool = False,
    hole_style: HoleStyle | str = HoleStyle.KEYHOLE,
) -> Dataset:
    """Build the RT Structure Set of ``regions`` on the ``source`` CT.

    Parameters
    ----------
    source
        CT slices sorted along the slice normal (``CTSeries`` or its ``datasets``).
    regions
        Regions on the source grid; empty ones are left out and named in Structure
        Set Description.
    algorithm
        Written as ROI Derivation Algorithm Identification (PS3.3 C.8.8.5).
    options
        UID root, series number and description.
    smoothing
        Smooth contours by at most a quarter pixel (never changes a rasterised pixel).
    hole_style
        ``keyhole`` (default) or ``inner``; see :mod:`radnode.dicom_io.contours`.

    Returns
    -------
    pydicom.dataset.Dataset
        The RTSTRUCT with file meta information, ready for ``dcmwrite``.

    Raises
    ------
    MaskShapeError, SourceError, NoRegionsError
        As for :func:`radnode.dicom_io.seg_writer.build_seg`.
    """
    opts = as_writer_options(options)
    style = HoleStyle(hole_style)
    datasets = source_datasets(source)
    geometry = source_geometry(datasets)
    first = datasets[0]
    series_uid = str(first.SeriesInstanceUID)
    written, missing = split_regions(
        regions, geometry, series_uid, "an RT Structure Set needs at least one ROI with a contour"
    )
    uids = object_uids(
        opts, datasets, DerivedObject.RTSTRUCT, algorithm, "smooth" if smoothing else "exact", style.value
    )
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = _file_meta(uids.sop_instance_uid)
    copy_patient_study(first, ds)
    # SOP Common (C.12.1)
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # RT Series (C.8.8.1)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.SeriesNumber = opts.rtstruct_series_number
    ds.SeriesDescription = opts.description("RTSTRUCT")
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.OperatorsName = ""
    # General Equipment (C.7.5.1)
    set_equipment(ds, opts.manufacturer, algorithm.name, algorithm.software_versions,
                  opts.institution_name)
    # SOP Common Contributing Equipment: each algorithm (IHE AIR), with its Device UID
    add_algorithms(ds, algorithm.contributors, opts.institution_name)
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""
    # Structure Set (C.8.8.5)
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = opts.description("contours")[:64]
    ds.StructureSetDescription = _description(written, missing)
    ds.InstanceNumber = 1
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = series_uid
    rt_series.ContourImageSequence = [_image_reference(src) for src in datasets]
    rt_study = Dataset()
    # PS3.3 C.8.8.5: Referenced SOP Class UID of the study is the retired Detached Study
    # Management SOP Class, still required (Type 1) by the module.
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = [rt_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [rt_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    roi_items, contour_seq, observations = [], [], []
    for number, region in enumerate(written, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = region.name
        if region.kind is RegionKind.TUMOUR:
            roi.ROIDescription = component_summary(region.mask, voxel_ml)
        if region.review_note:
            roi.ROIDescription = "; ".join(filter(None, [roi.get("ROIDescription"), region.review_note]))
        roi.ROIGenerationAlgorithm = GENERATION_AUTOMATIC
        roi.ROIDerivationAlgorithmIdentificationSequence = [_algorithm_item(algorithm)]
        roi_items.append(roi)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(region.colour)
        roi_contour.ContourSequence = DicomSequence(
            _contour_items(region, geometry, datasets, smoothing, style)
        )
        contour_seq.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = REVIEW_LABEL if region.review_note else region.name[:16]
        if region.review_note:
            # PS3.3 C.8.8.8: the interpretation stays GTV (a TPS keys on it); the doubt is
            # the observation's label and description (ST), read by every planning system.
            obs.ROIObservationDescription = region.review_note
        obs.RTROIInterpretedType = region.rt_roi_type.value  # type: ignore[union-attr]
        obs.ROIInterpreter = ""
        obs.RTROIIdentificationCodeSequence = [_code_item(region.property_type)]
        observations.append(obs)
    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = observations
    # Approval (C.8.8.16)
    ds.ApprovalStatus = APPROVAL_UNAPPROVED
    n_contours = sum(len(c.ContourSequence) for c in contour_seq)
    logger.info(
        "RTSTRUCT %s for series %s: %d ROIs, %d contours%s",
        uids.sop_instance_uid,
        series_uid,
        len(written),
        n_contours,
        f", empty regions left out: {[r.name for r in missing]}" if missing else "",
    )
    return ds
