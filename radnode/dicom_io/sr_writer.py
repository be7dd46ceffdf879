"""Comprehensive 3D SR with a TID 1500 Measurement Report of radnode's results (highdicom).

Content tree (PS3.16):

* TID 1500 root "Imaging Measurement Report", language, procedure reported "CT Chest"
  (LOINC 24627-2), observer context TID 1002/1004: device "radnode" with its version.
* Imaging Measurements:

  - per region that has a segment in the SEG: a TID 1411 Volumetric ROI group that
    references that segment (TID 1411 row "Referenced Segment", with the CT images the
    segment lies on as its source), finding category/type from the segment, algorithm TID 4019, and TID 300
    measurements: volume (mL, sum-of-voxels method), mean/min/max attenuation (HU,
    derivation CID 7464), longest 3D diameter (mm, IBSI L0JK), sphericity (IBSI QCFX),
    and the selected radiomic features (IBSI codes where they exist, else private
    ``99RADNODE`` codes, see :mod:`radnode.dicom_io.codes`);
  - per classifier: a TID 1411 group on the tumour segment whose algorithm is the
    classifier (name, version, training cohort and endpoint as parameters) with the
    probability as a measurement (UCUM "1"), the class at the model's threshold as a
    qualitative evaluation ("<endpoint> status" = Positive / Negative) with a comment
    naming class and threshold, and, for demo models, the comment "demo — not for
    clinical use" (without a tumour segment: a TID 1501 group on the CT images);
  - a "Tumour detection" group: qualitative evaluation Neoplasm = Present (TID 1411 on
    the tumour segment) or Absent (TID 1501 on the CT images, with the text "no tumour
    found").
  - on a region whose contour was quality-assessed (the tumour): the score as a TID 300
    measurement and the qualitative finding "Contour quality assessment" = uncertain,
    review required / acceptable (private ``99RADNODE`` codes), with the text
    "tumour contour uncertain — review required" when uncertain.

* Qualitative Evaluations (TID 1500 row 12, UMLS C0034375): the same tumour finding, an
  uncertain contour's finding and text, and the demo notice as text, so a viewer that shows only the top level still shows them.

IHE AI Results (AIR) points (docs/conformance.md lists them all): every finding group
references the SEG segment it describes together with the CT images that segment was
derived from (:func:`segment_reference`), or, without a segment, the CT
images themselves; each classifier's output is a measurement (probability) and a
qualitative finding (its class at the model's threshold); each algorithm is an item of
the Contributing Equipment Sequence with its Device UID (:mod:`radnode.dicom_io.provenance`).

The SR is PRELIMINARY/UNVERIFIED and PARTIAL: nobody has reviewed an automatic result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    CodeContentItem,
    ContainerContentItem,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    DeviceObserverIdentifyingAttributes,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from radnode import __version__
from radnode.config.model import OutputSettings
from radnode.dicom_io import codes
from radnode.dicom_io.derived import (
    SourceLike,
    fill_type2,
    object_uids,
    quiet_name_warnings,
    source_datasets,
    source_geometry,
)
from radnode.dicom_io.provenance import (
    ContributingAlgorithm,
    checksum_of,
    contributing_equipment,
    ihe_coding_scheme,
)
from radnode.dicom_io.regions import (
    KIND_DEFAULTS,
    AlgorithmInfo,
    ClinicianContourReport,
    MeasurementSet,
    Prediction,
    RegionKind,
    RegionMeasurements,
    WriterOptions,
    as_writer_options,
)
from radnode.dicom_io.uids import DerivedObject, derive_uid

logger = logging.getLogger(__name__)

#: TID 1500 row 12 container.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Concept name of free-text remarks (DCM 121106).
COMMENT = Code("121106", "DCM", "Comment")
#: SR documents are UTF-8 so the demo notice's dash (and any patient name) survive.
UTF8_CHARACTER_SET = "ISO_IR 192"
#: Segmented Property Types that mark a tumour segment.
_TUMOUR_TYPES = {(codes.NEOPLASM.value, "SCT"), (codes.NSCLC.value, "SCT")}

_Group = VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations


def _segments(seg: Dataset | None) -> dict[str, Dataset]:
    if seg is None:
        return {}
    return {str(item.SegmentLabel): item for item in seg.get("SegmentSequence", [])}


def _is_tumour(segment: Dataset) -> bool:
    item = segment.SegmentedPropertyTypeCodeSequence[0]
    return (str(item.CodeValue), str(item.CodingSchemeDesignator)) in _TUMOUR_TYPES


def _coded(item: Dataset) -> CodedConcept:
    return CodedConcept(
        str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)
    )


def _num(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _region_measurements(
    region: RegionMeasurements, feature_names: Sequence[str] | None
) -> list[Measurement]:
    items: list[Measurement] = []
    seen: set[tuple[str, str]] = set()

    def add(name: Code, value: float | None, unit: Code, **kw: Code) -> None:
        value = _num(value)
        if value is None:
            return
        key = (name.value, name.scheme_designator) + tuple(v.value for v in kw.values())
        if key in seen:
            return
        seen.add(key)
        items.append(Measurement(name=name, value=value, unit=unit, **kw))

    add(codes.VOLUME, region.volume_ml, codes.UNIT_ML, method=codes.SUM_OF_VOXELS)
    add(codes.ATTENUATION_COEFFICIENT, region.mean_hu, codes.UNIT_HU, derivation=codes.MEAN)
    add(codes.ATTENUATION_COEFFICIENT, region.min_hu, codes.UNIT_HU, derivation=codes.MINIMUM)
    add(codes.ATTENUATION_COEFFICIENT, region.max_hu, codes.UNIT_HU, derivation=codes.MAXIMUM)
    add(codes.MAX_3D_DIAMETER, region.longest_diameter_mm, codes.UNIT_MM)
    add(codes.SPHERICITY, region.sphericity, codes.UNIT_NONE)
    if region.contour_quality is not None:
        add(codes.CONTOUR_QUALITY_SCORE, region.contour_quality.score, codes.UNIT_NONE)
    names = list(region.features) if feature_names is None else [
        n for n in feature_names if n in region.features
    ]
    skipped = 0
    for name in names:
        concept = codes.feature_concept(name)
        before = len(items)
        add(concept.name, region.features[name], concept.unit)
        skipped += len(items) == before
    if skipped:
        logger.info("region %r: %d features not written (not finite or duplicate concept)",
                    region.region_name, skipped)
    return items


def _tracking(root: str, sop_uid: str, label: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=derive_uid(root, sop_uid, "tracking", label), identifier=label)


def _algorithm(algorithm: AlgorithmInfo) -> AlgorithmIdentification:
    params = [f"{k}={v}" for k, v in sorted(algorithm.model_versions.items())]
    if algorithm.demo:
        params.append("demo=true")
    return AlgorithmIdentification(
        name=algorithm.name[:64], version=algorithm.version[:64], parameters=params or None
    )


def _add_text(group: Sequence[Dataset], text: str) -> None:
    """Append a CONTAINS TEXT "Comment" to a measurement group container."""
    container = group[0]
    if "ContentSequence" not in container:
        container.ContentSequence = hd.sr.ContentSequence()
    container.ContentSequence.append(
        TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
    )


def segment_reference(seg: Dataset, number: int) -> ReferencedSegment:
    """TID 1411 "Referenced Segment" with the CT images that segment was derived from.

    IHE AIR wants a finding to reference both the segment and its source images. The
    images come from the Derivation Image Sequence of the segment's frames (highdicom
    writes one per frame). ``ReferencedSegment.from_segmentation`` does the same but
    fails on a one-segment SEG, whose Segment Identification is in the shared
    functional groups.
    """
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    sources: dict[str, SourceImageForSegmentation] = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        identification = frame.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        if not identification or int(identification[0].ReferencedSegmentNumber) != number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for image in derivation.get("SourceImageSequence", []):
                uid = str(image.ReferencedSOPInstanceUID)
                sources.setdefault(uid, SourceImageForSegmentation(str(image.ReferencedSOPClassUID), uid))
    if not sources:
        raise ValueError(
            f"SEG {seg.SOPInstanceUID}: segment {number} has no frame with a derivation image; "
            "the SR cannot reference its source images"
        )
    return ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_images=list(sources.values()),
    )


def _image_sources(datasets: Sequence[Dataset]) -> list[SourceImageForMeasurementGroup]:
    """Every source CT slice, for a finding that has no segment to point at (AIR)."""
    return [
        SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets
    ]


def _prediction_finding(prediction: Prediction) -> QualitativeEvaluation:
    """The classifier's call at its threshold as an AIR qualitative finding."""
    return QualitativeEvaluation(
        codes.status_code(prediction.endpoint),
        codes.POSITIVE if prediction.is_positive else codes.NEGATIVE,
    )


def _prediction_text(prediction: Prediction) -> str:
    relation = ">=" if prediction.is_positive else "<"
    return (
        f"{prediction.endpoint}: {prediction.predicted_class} (probability "
        f"{prediction.probability:.3f} {relation} threshold {prediction.threshold:g})"
    )


def classifier_algorithm(prediction: Prediction) -> ContributingAlgorithm:
    """The classifier bundle behind a prediction, as an AIR contributing algorithm."""
    checksum = prediction.checksum or checksum_of(
        "classifier", prediction.classifier_name, prediction.classifier_version
    )
    return ContributingAlgorithm(
        name=prediction.classifier_name,
        version=prediction.classifier_version,
        checksum=checksum,
        role=f"{prediction.endpoint} classifier",
        demo=prediction.demo,
    )


def _prediction_group(
    prediction: Prediction,
    tumour_reference: ReferencedSegment | None,
    root: str,
    sop_uid: str,
    images: Sequence[SourceImageForMeasurementGroup] = (),
) -> _Group:
    algorithm = AlgorithmIdentification(
        name=prediction.classifier_name[:64],
        version=prediction.classifier_version[:64],
        parameters=[
            f"endpoint={prediction.endpoint}",
            f"training cohort={prediction.training_cohort}",
            *(["demo=true"] if prediction.demo else []),
        ],
    )
    measurement = Measurement(
        name=codes.probability_code(prediction.endpoint),
        value=float(prediction.probability),
        unit=codes.UNIT_NONE,
    )
    tracking = _tracking(root, sop_uid, f"{prediction.endpoint} prediction")
    finding = [_prediction_finding(prediction)]
    group: _Group
    if tumour_reference is not None:
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=tumour_reference,
            finding_type=codes.NSCLC,
            algorithm_id=algorithm,
            measurements=[measurement],
            qualitative_evaluations=finding,
        )
    else:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=codes.NSCLC,
            algorithm_id=algorithm,
            measurements=[measurement],
            qualitative_evaluations=finding,
            source_images=list(images) or None,
        )
    _add_text(group, _prediction_text(prediction))
    if prediction.demo:
        _add_text(group, codes.DEMO_TEXT)
    return group


def _detection_group(
    tumour_reference: ReferencedSegment | None,
    algorithm: AlgorithmInfo,
    root: str,
    sop_uid: str,
    images: Sequence[SourceImageForMeasurementGroup],
) -> _Group:
    """Neoplasm Present (on the tumour segment) or Absent (on the CT images searched)."""
    tracking = _tracking(root, sop_uid, codes.TRACKING_TUMOUR_DETECTION)
    if tumour_reference is not None:
        return VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=tumour_reference,
            finding_type=codes.NEOPLASM,
            algorithm_id=_algorithm(algorithm),
            qualitative_evaluations=[QualitativeEvaluation(codes.NEOPLASM, codes.PRESENT)],
        )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.NEOPLASM,
        algorithm_id=_algorithm(algorithm),
        qualitative_evaluations=[QualitativeEvaluation(codes.NEOPLASM, codes.ABSENT)],
        source_images=list(images) or None,
    )
    _add_text(group, codes.NO_TUMOUR_TEXT)
    return group


def _quality_evaluation(region: RegionMeasurements, name_source: bool = False) -> list[QualitativeEvaluation] | None:
    """The TID 1411 qualitative findings of radnode's own region: "contour quality" when it
    was assessed, and, beside a clinician's contour (``name_source``), "Source of
    segmentation" = automatic contour."""
    found: list[QualitativeEvaluation] = []
    quality = region.contour_quality
    if quality is not None:
        value = codes.CONTOUR_UNCERTAIN if quality.uncertain else codes.CONTOUR_ACCEPTABLE
        found.append(QualitativeEvaluation(codes.CONTOUR_QUALITY, value))
    if name_source:
        found.append(QualitativeEvaluation(codes.CONTOUR_SOURCE, codes.MODEL_CONTOUR))
    return found or None


def _qualitative_container(
    tumour_found: bool,
    demo: bool,
    uncertain: list[RegionMeasurements] | None = None,
    clinician: ClinicianContourReport | None = None,
) -> ContainerContentItem:
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence()
    container.ContentSequence.append(
        CodeContentItem(
            name=codes.NEOPLASM,
            value=codes.PRESENT if tumour_found else codes.ABSENT,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    if not tumour_found:
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=codes.NO_TUMOUR_TEXT,
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
    for region in uncertain or []:
        assert region.contour_quality is not None
        container.ContentSequence.append(
            CodeContentItem(name=codes.CONTOUR_QUALITY, value=codes.CONTOUR_UNCERTAIN,
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=f"{region.region_name}: {region.contour_quality.text}",
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
    if clinician is not None:
        container.ContentSequence.append(
            CodeContentItem(name=codes.CONTOUR_SOURCE, value=codes.CLINICIAN_CONTOUR,
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=f"Radiomics and predictions {clinician.text}",
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
    if demo:
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=codes.DEMO_TEXT,
                            relationship_type=RelationshipTypeValues.CONTAINS)
        )
    return container


def _clinician_groups(
    clinician: ClinicianContourReport,
    segments: dict[str, Dataset],
    algorithm: AlgorithmInfo,
    opts: WriterOptions,
    sop_uid: str,
    images: Sequence[SourceImageForMeasurementGroup],
) -> list[_Group]:
    """TID 1501 groups of the regions measured on a clinician's GTV (on the CT images).

    Not TID 1411: the clinician's contour is an RT Structure Set, not a SEG segment, so
    the groups name it by the qualitative finding "Source of segmentation" = clinician
    contour and a comment with the ROI name and the structure set's UID (which the SR
    lists as evidence). The tumour group also carries the agreement of radnode's own
    tumour contour with the GTV.
    """
    groups: list[_Group] = []
    for kind, region in clinician.regions:
        segment = segments.get(region.region_name)
        defaults = KIND_DEFAULTS[kind]
        items = _region_measurements(region, opts.sr_features)
        if kind is RegionKind.TUMOUR:
            for name, value, unit in (
                (codes.AGREEMENT_DICE, clinician.dice, codes.UNIT_NONE),
                (codes.AGREEMENT_HD95, clinician.hd95_mm, codes.UNIT_MM),
                (codes.AGREEMENT_VOLUME_RATIO, clinician.volume_ratio, codes.UNIT_NONE),
            ):
                if _num(value) is not None:
                    items.append(Measurement(name=name, value=float(value), unit=unit))  # type: ignore[arg-type]
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(opts.uid_root, sop_uid, f"{region.region_name} (clinician contour)"),
            finding_category=_coded(segment.SegmentedPropertyCategoryCodeSequence[0]) if segment else defaults.category,
            finding_type=_coded(segment.SegmentedPropertyTypeCodeSequence[0]) if segment else defaults.property_type,
            finding_sites=[FindingSite(codes.LUNG)],
            algorithm_id=_algorithm(algorithm),
            measurements=items or None,
            qualitative_evaluations=[QualitativeEvaluation(codes.CONTOUR_SOURCE, codes.CLINICIAN_CONTOUR)],
            source_images=list(images) or None,
        )
        _add_text(group, clinician.text)
        groups.append(group)
    return groups


def build_sr(
    source: SourceLike,
    seg: Dataset | None,
    measurements: MeasurementSet,
    algorithm: AlgorithmInfo,
    options: WriterOptions | OutputSettings | None = None,
) -> Dataset:
    """Build the TID 1500 Measurement Report (Comprehensive 3D SR) of a job.

    Parameters
    ----------
    source
        CT slices sorted along the slice normal (``CTSeries`` or its ``datasets``).
    seg
        The SEG from :func:`build_seg`; each region's group references its segment by
        label. ``None`` (nothing segmented) still gives a valid report saying so.
    measurements
        Region measurements (``region_name`` = segment label) and predictions.
    algorithm
        The segmentation algorithm (observer device, TID 4019 in each region group).
    options
        UID root, series number and description, radiomic feature subset.

    Returns
    -------
    pydicom.dataset.Dataset
        The ``highdicom.sr.Comprehensive3DSR``.
    """
    opts = as_writer_options(options)
    datasets = source_datasets(source)
    source_geometry(datasets)
    first = datasets[0]
    series_uid = str(first.SeriesInstanceUID)
    segments = _segments(seg)
    demo = algorithm.demo or any(p.demo for p in measurements.predictions)
    classifiers = [classifier_algorithm(p) for p in measurements.predictions]
    # The clinician's structure set changes what the report measures: an SR computed on it
    # must not reuse the UID of the same CT's SR computed on radnode's own contour.
    clinician_source = measurements.clinician
    uids = object_uids(
        opts, datasets, DerivedObject.SR, algorithm, str(seg.SOPInstanceUID) if seg is not None else "no-seg",
        *sorted(c.device_uid for c in classifiers),
        *(
            ("clinician-contour", str(clinician_source.rtstruct.SOPInstanceUID), clinician_source.roi_name)
            if clinician_source is not None else ()
        ),
    )
    sop_uid = uids.sop_instance_uid

    def reference(label: str) -> ReferencedSegment:
        assert seg is not None
        return segment_reference(seg, int(segments[label].SegmentNumber))

    images = _image_sources(datasets)

    groups: list[_Group] = []
    uncertain: list[RegionMeasurements] = []
    for region in measurements.regions:
        segment = segments.get(region.region_name)
        if segment is None:
            logger.warning(
                "SR %s: measurements of %r left out, the SEG has no such segment (has %s)",
                sop_uid, region.region_name, sorted(segments),
            )
            continue
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(opts.uid_root, sop_uid, region.region_name),
            referenced_segment=reference(region.region_name),
            finding_category=_coded(segment.SegmentedPropertyCategoryCodeSequence[0]),
            finding_type=_coded(segment.SegmentedPropertyTypeCodeSequence[0]),
            finding_sites=[FindingSite(codes.LUNG)],
            algorithm_id=_algorithm(algorithm),
            measurements=_region_measurements(region, opts.sr_features) or None,
            qualitative_evaluations=_quality_evaluation(region, measurements.clinician is not None),
        )
        if region.contour_quality is not None and region.contour_quality.uncertain:
            _add_text(group, region.contour_quality.text)
            uncertain.append(region)
        groups.append(group)
    tumour_labels = [label for label, item in segments.items() if _is_tumour(item)]
    tumour_found = bool(tumour_labels)
    tumour_reference = reference(tumour_labels[0]) if tumour_found else None
    clinician = measurements.clinician
    if clinician is not None:
        groups.extend(_clinician_groups(clinician, segments, algorithm, opts, sop_uid, images))
    for prediction in measurements.predictions:
        # Predictions from the clinician's GTV do not describe radnode's tumour segment.
        group = _prediction_group(
            prediction, None if clinician is not None else tumour_reference, opts.uid_root, sop_uid, images
        )
        if clinician is not None:
            _add_text(group, f"inputs {clinician.text}")
        groups.append(group)
    groups.append(_detection_group(tumour_reference, algorithm, opts.uid_root, sop_uid, images))

    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid(opts.uid_root, "device", opts.manufacturer, __version__),
            name="radnode",
            manufacturer_name=opts.manufacturer,
            model_name=f"radnode {__version__}",
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_qualitative_container(tumour_found, demo, uncertain, clinician))
    equipment = contributing_equipment([*algorithm.contributors, *classifiers], opts.institution_name)
    evidence = [fill_type2(ds) for ds in datasets]
    if seg is not None:
        evidence.append(seg)
    if clinician is not None:
        evidence.append(clinician.rtstruct)
    with quiet_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=uids.series_instance_uid,
            series_number=opts.sr_series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=opts.manufacturer,
            is_complete=False,
            is_final=False,
            is_verified=False,
            institution_name=opts.institution_name,
            series_description=opts.description("SR"),
            manufacturer_model_name=algorithm.name[:64],
            software_versions=list(algorithm.software_versions),
            device_serial_number="0",
            coding_schemes=[codes.radnode_coding_scheme(), *([ihe_coding_scheme()] if equipment else [])],
            specific_character_set=UTF8_CHARACTER_SET,
            contributing_equipment=equipment,
        )
    logger.info(
        "SR %s for series %s: %d measurement groups, tumour %s%s",
        sop_uid, series_uid, len(groups), "found" if tumour_found else "not found",
        ", demo models" if demo else "",
    )
    return sr

