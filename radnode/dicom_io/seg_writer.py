"""DICOM Segmentation (PS3.3 A.51) of radnode's regions, built with highdicom.

One segment per non-empty region, BINARY by default (FRACTIONAL on request), one frame
per source slice that holds the segment (empty frames are omitted), each frame with its
Plane Position and a Derivation Image reference to its CT slice (highdicom derives both
from the source headers, whose Pixel Data it never reads). Every segment is AUTOMATIC
with the algorithm identified (name, version, family CID 7162 "Artificial Intelligence")
and a recommended display colour (CIELab).

Regions whose mask is empty are left out and named in Content Description, e.g. "no
tumour found": a SEG cannot carry a segment with no frame in a useful way, and a viewer
should not show an empty label. :func:`seg_to_masks` reads a SEG back onto the source
grid via ``highdicom.seg.segread``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from os import PathLike

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from radnode.config.model import OutputSettings
from radnode.dicom_io import codes
from radnode.dicom_io.derived import (
    SourceLike,
    component_summary,
    fill_type2,
    object_uids,
    quiet_name_warnings,
    source_datasets,
    source_geometry,
    split_regions,
)
from radnode.dicom_io.provenance import contributing_equipment, declare_coding_schemes, ihe_coding_scheme
from radnode.dicom_io.regions import (
    AlgorithmInfo,
    Region,
    RegionKind,
    WriterOptions,
    as_writer_options,
)
from radnode.dicom_io.uids import (
    DerivedObject,
    derive_uid,
)

logger = logging.getLogger(__name__)

#: Content Label (0070,0080) of radnode SEGs (CS, 16 characters).
CONTENT_LABEL = "RADNODE_SEG"
#: Largest value of a FRACTIONAL frame (PS3.3 C.8.20.2.3).
MAX_FRACTIONAL_VALUE = 255


def _algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    parameters = dict(algorithm.model_versions)
    if algorithm.demo:
        parameters["demo"] = "true"
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=algorithm.family,
        version=algorithm.version[:64],
        source="radnode",
        parameters=parameters or None,
    )


def _segment_description(
    number: int,
    region: Region,
    algorithm: AlgorithmInfo,
    tracking_uid: str,
    voxel_ml: float,
) -> hd.seg.SegmentDescription:
    inside_lung = region.kind in (RegionKind.TUMOUR, RegionKind.PERITUMORAL_RING)
    anatomic = [codes.LUNG] if inside_lung else None
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=region.name,
        segmented_property_category=region.category,
        segmented_property_type=region.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_identification(algorithm),
        tracking_uid=tracking_uid,
        tracking_id=region.name,
        anatomic_regions=anatomic,
        display_color=hd.color.CIELabColor.from_rgb(*region.colour),
    )
    if region.type_modifier is not None:
        # PS3.3 C.8.20.2: laterality is a modifier inside the property type item.
        property_type = description.SegmentedPropertyTypeCodeSequence[0]
        property_type.SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept.from_code(region.type_modifier)
        ]
    if region.kind is RegionKind.TUMOUR:
        description.SegmentDescription = component_summary(region.mask, voxel_ml)
    return description


def _content_description(written: Sequence[Region], missing: Sequence[Region]) -> str:
    kinds = {r.kind for r in written}
    tumour_missing = any(r.kind is RegionKind.TUMOUR for r in missing)
    if tumour_missing and RegionKind.TUMOUR not in kinds:
        notes = [r.review_note for r in missing if r.kind is RegionKind.TUMOUR and r.review_note]
        text = notes[0] if notes else "no tumour found"
    else:
        text = "radnode automatic segmentation"
    others = [r.name for r in missing if r.kind is not RegionKind.TUMOUR]
    if others:
        text += "; empty: " + ", ".join(others)
    return text[:64]


def _private_schemes(written: Sequence[Region], algorithm: AlgorithmInfo) -> list[CodingSchemeIdentificationItem]:
    """Declarations of the private coding schemes this SEG uses (PS3.3 C.12.1.1.4)."""
    schemes = []
    used = {c.scheme_designator for r in written for c in (r.category, r.property_type, r.type_modifier) if c}
    if codes.RADNODE_SCHEME in used:
        schemes.append(codes.radnode_coding_scheme())
    if algorithm.contributors:
        schemes.append(ihe_coding_scheme())
    return schemes


def _make_deterministic(seg: Dataset, root: str, sop_uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID by a derived one."""
    new_uid = derive_uid(root, sop_uid, "dimension-organization")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = new_uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = new_uid


def build_seg(
    source: SourceLike,
    regions: Sequence[Region],
    algorithm: AlgorithmInfo,
    options: WriterOptions | OutputSettings | None = None,
    *,
    fractional: bool = False,
) -> Dataset:
    """Build the Segmentation of ``regions`` on the ``source`` CT.

    Parameters
    ----------
    source
        The CT slices sorted along the slice normal (``CTSeries`` or its
        ``datasets``); Pixel Data is neither needed nor read.
    regions
        Regions on the source grid; empty ones are left out and named in Content
        Description.
    algorithm
        Segment Algorithm Identification (PS3.3 C.8.20.2: Type 1 for AUTOMATIC).
    options
        UID root, series number and description.
    fractional
        Write a FRACTIONAL (PROBABILITY, 8 bit) instead of a BINARY segmentation.

    Returns
    -------
    pydicom.dataset.Dataset
        The ``highdicom.seg.Segmentation``.

    Raises
    ------
    MaskShapeError
        A mask is not shaped like the source (z, rows, columns).
    NoRegionsError
        Every region is empty.
    SourceError
        The source is not one sorted stack of parallel slices.
    """
    opts = as_writer_options(options)
    datasets = source_datasets(source)
    geometry = source_geometry(datasets)
    series_uid = str(datasets[0].SeriesInstanceUID)
    written, missing = split_regions(
        regions, geometry, series_uid, "a Segmentation needs at least one segment with one frame"
    )
    uids = object_uids(opts, datasets, DerivedObject.SEG, algorithm)
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    descriptions = [
        _segment_description(
            i + 1, region, algorithm, uids.sub_uid(opts.uid_root, "segment", region.name), voxel_ml
        )
        for i, region in enumerate(written)
    ]
    stack = np.stack([r.mask for r in written], axis=-1)
    if fractional:
        pixels: np.ndarray = stack.astype(np.float32)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = stack
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    sources = [fill_type2(ds) for ds in datasets]
    with quiet_name_warnings():
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=uids.series_instance_uid,
            series_number=opts.seg_series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=1,
            manufacturer=opts.manufacturer,
            manufacturer_model_name=algorithm.name[:64],
            software_versions=list(algorithm.software_versions),
            device_serial_number="0",
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE,
            content_description=_content_description(written, missing),
            content_label=CONTENT_LABEL,
            omit_empty_frames=True,
            series_description=opts.description("SEG"),
            institution_name=opts.institution_name,
            contributing_equipment=contributing_equipment(algorithm.contributors, opts.institution_name),
        )
    _make_deterministic(seg, opts.uid_root, uids.sop_instance_uid)
    declare_coding_schemes(seg, _private_schemes(written, algorithm))
    logger.info(
        "SEG %s for series %s: %d segments, %d frames%s",
        uids.sop_instance_uid,
        series_uid,
        len(written),
        int(seg.NumberOfFrames),
        f", empty regions left out: {[r.name for r in missing]}" if missing else "",
    )
    return seg


def _read(seg: Dataset | str | PathLike[str]) -> hd.seg.Segmentation:
    if isinstance(seg, Dataset):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
        buffer.seek(0)
        return hd.seg.segread(buffer)
    return hd.seg.segread(seg)


def seg_to_masks(seg: Dataset | str | PathLike[str], source: SourceLike) -> dict[str, np.ndarray]:
    """Read a SEG back onto the source grid: segment label -> boolean ``(z, y, x)`` mask.

    The object is serialised and parsed with ``highdicom.seg.segread`` (exactly what a
    receiver does), then its frames are placed on the source slices they were derived
    from. FRACTIONAL segments are thresholded at 0.5.
    """
    datasets = source_datasets(source)
    parsed = _read(seg)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    numbers = [int(item.SegmentNumber) for item in parsed.SegmentSequence]
    array = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        dtype=np.float32,
    )
    return {
        str(item.SegmentLabel): array[..., i] >= 0.5
        for i, item in enumerate(parsed.SegmentSequence)
    }
