"""The processing chain: the stages of one job, listed in one place.

``radnode process`` runs it offline on a folder; the worker runs the same function for
queued jobs. Each stage is a plain typed function of the previous stages' outputs, so a
test can call any of them alone, and each stage's wall time lands in ``result.json``.
A new stage is a function here and one line in :func:`run_chain`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from radnode import __version__, durable

from radnode.config import Settings
from radnode.dicom_io.provenance import ContributingAlgorithm, checksum_of, engine_algorithm
from radnode.dicom_io.qc import QCLimits
from radnode.dicom_io.regions import (
    CHECKSUM_SUFFIX,
    AlgorithmInfo,
    ContourQualityFinding,
    MeasurementSet,
    ClinicianContourReport,
    Prediction,
    Region,
    RegionKind,
    RegionMeasurements,
    WriterOptions,
)
from radnode.dicom_io.rtstruct_writer import build_rtstruct
from radnode.dicom_io.seg_writer import build_seg
from radnode.dicom_io.series import CTSeries, SeriesRejected, load_series
from radnode.dicom_io.sr_writer import build_sr
from radnode.models.lungmask import LungMaskResult, segment_lungs
from radnode.models.mutation import MutationResult, deep_feature_columns, flat_features, predict_endpoints
from radnode.models.radiomics import RadiomicsResult, extract_regions
from radnode.models.regions import Regions, RegionStats, build_regions, region_statistics
from radnode.pipeline.clinical_contours import (
    SOURCE_CLINICIAN,
    SOURCE_MODEL,
    ContourSearch,
    PacsContourLookup,
    agreement,
    find_clinician_gtv,
    indexed_rtstructs,
    search_structure_sets,
)
from radnode.pipeline.review import LUNGS_ONLY_DIR, QUALITY_FILE
from radnode.pipeline.version import PIPELINE_VERSION
from radnode.models.quality import COMPETING_DETECTION, UNCERTAIN_SUFFIX, UNCERTAIN_TEXT, UNCERTAIN_TEXT_ASCII
from radnode.models.tumour import NO_MODEL, TumourSegmentation, segment_tumour
from radnode.models.verify import verify_configured_bundles
from radnode.models.external.lungs import replace_lungs

log = logging.getLogger(__name__)


RESULT_FILE = "result.json"

#: Provenance of the weight-free lung mask (radnode.models.lungmask).
LUNG_MASK_METHOD = "radnode-lungmask-classical"
LUNG_MASK_VERSION = "1"

#: Called with (stage name, "start" | "done") so a CLI can draw progress.
ProgressHook = Callable[[str, str], None]
#: Called when a delivery phase's objects are on disk: ("contours", {"SEG": path,
#: "RTSTRUCT": path}) as soon as segmentation is done, then ("report", {"SR": path}).
#: The worker dispatches each phase at once, so planners get contours before radiomics.
PhaseHook = Callable[[str, dict[str, Path]], None]


@dataclass
class StageTiming:
    """Wall time of one stage, as reported in result.json."""

    name: str
    seconds: float
    status: str = "done"


@dataclass
class ChainResult:
    """What a chain run produced; serialised to ``result.json``."""

    status: str  # "done" | "rejected" | "failed"
    input_path: str
    series: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    stages: list[StageTiming] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    regions: list[dict[str, Any]] = field(default_factory=list)
    radiomics: dict[str, Any] = field(default_factory=dict)
    mutations: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    review: dict[str, Any] = field(default_factory=dict)
    tumour_source: str = SOURCE_MODEL
    clinician_contour: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "radnode_version": __version__,
            "pipeline_version": PIPELINE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": self.status,
            "error": self.error,
            "input": {"path": self.input_path, **self.series},
            "qc": self.qc,
            "models": self.models,
            "regions": self.regions,
            "radiomics": self.radiomics,
            "mutations": self.mutations,
            "warnings": self.warnings,
            "review": self.review,
            "tumour_source": self.tumour_source,
            "clinician_contour": self.clinician_contour,
            "stages": [vars(s) for s in self.stages],
            "phases": self.phases,
            "outputs": self.outputs,
        }


class NoClinicianContour(Exception):
    """A late clinician structure set gave no usable GTV: the job ends with nothing to send."""


@dataclass
class StageOutcome:
    """Set by an optional stage that failed: its error, for result.json."""

    error: str | None = None


class _Stages:
    """Times stages and reports them to an optional progress hook."""

    def __init__(self, result: ChainResult, hook: ProgressHook | None) -> None:
        self._result = result
        self._hook = hook

    @contextmanager
    def stage(self, name: str, required: bool = True) -> Iterator[StageOutcome]:
        """Time a stage; an optional stage (``required=False``) records its error and goes on."""
        if self._hook:
            self._hook(name, "start")
        start = time.perf_counter()
        outcome = StageOutcome()
        status = "failed"
        try:
            yield outcome
            status = "done"
        except Exception as exc:
            if required:
                raise
            outcome.error = f"{type(exc).__name__}: {exc}"
            self._result.warnings.append(f"{name}: {outcome.error}")
            log.exception("optional stage %s failed; the job goes on", name)
        finally:
            self._result.stages.append(StageTiming(name, round(time.perf_counter() - start, 3), status))
            if self._hook:
                self._hook(name, status)


def qc_limits(settings: Settings) -> QCLimits:
    """QC limits for the chain, from the ``qc`` section of the settings."""
    return QCLimits(**settings.qc.model_dump())


def load_and_check(input_path: Path, settings: Settings) -> CTSeries:
    """Stage 1: read one CT series and run QC; raises ``SeriesRejected`` on QC errors."""
    return load_series(input_path, qc_limits=qc_limits(settings), strict=True)


def describe_series(series: CTSeries) -> dict[str, Any]:
    """UIDs and geometry of the input, for result.json (no patient names or IDs)."""
    image = series.image
    return {
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "modality": series.modality,
        "slices": len(series.datasets),
        "size": list(image.GetSize()),
        "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "origin_mm": [round(v, 6) for v in image.GetOrigin()],
        "direction": [round(v, 9) for v in image.GetDirection()],
        "convolution_kernel": series.convolution_kernel,
        "slice_thickness_mm": series.slice_thickness,
    }


def find_lungs(series: CTSeries) -> LungMaskResult:
    """Stage 2: the classical (DuneAI-style) lung mask, right = 1, left = 2."""
    return segment_lungs(series.image)


def find_tumour(series: CTSeries, lungs: LungMaskResult, settings: Settings) -> TumourSegmentation:
    """Stage 3: tumour mask inside the lungs (RA-Seg bundle, or the classical outline)."""
    models = settings.models
    return segment_tumour(
        series.image, lungs.lungs, models.segmentation_bundle, models.device, models.segmentation_sha256, models=models
    )


def zyx_spacing(series: CTSeries) -> tuple[float, float, float]:
    """Voxel spacing in numpy (z, y, x) order."""
    x, y, z = series.image.GetSpacing()
    return (float(z), float(y), float(x))


def make_regions(series: CTSeries, lungs: LungMaskResult, tumour: TumourSegmentation, settings: Settings) -> Regions:
    """Stage 4: tumour, peritumoral ring (physical distance, within lung), whole lung."""
    return build_regions(
        tumour.mask, lungs.lungs, zyx_spacing(series), ring_width_mm=settings.radiomics.ring_width_mm
    )


def writer_regions(lungs: LungMaskResult, regions: Regions, tumour: TumourSegmentation | None = None) -> list[Region]:
    """The regions as the writers take them: each lung, tumour, ring (empty ones included).

    An uncertain tumour contour (see :mod:`radnode.models.quality`) keeps its place and
    type but its name gets :data:`UNCERTAIN_SUFFIX` and it carries the review note, so
    that a planner sees the doubt in the TPS's structure list.
    """
    tumour_name, note = None, None
    if tumour is not None and tumour.uncertain:
        tumour_name, note = "Tumour" + UNCERTAIN_SUFFIX, review_note(tumour, ascii_only=True)
    return [
        Region.of_kind(RegionKind.LUNG_RIGHT, lungs.right),
        Region.of_kind(RegionKind.LUNG_LEFT, lungs.left),
        Region.of_kind(RegionKind.TUMOUR, regions.tumour, name=tumour_name, review_note=note),
        Region.of_kind(
            RegionKind.PERITUMORAL_RING, regions.ring, name=f"Peritumoral {regions.ring_width_mm:g}mm"
        ),
    ]


def review_note(tumour: TumourSegmentation, ascii_only: bool = False) -> str:
    """The flag with the score and its threshold, e.g. for the RTSTRUCT ROI observation.

    ``ascii_only`` for objects written in the source CT's character set (RTSTRUCT, SEG),
    where the em dash may not be encodable.
    """
    quality = tumour.quality
    assert quality is not None and quality.score is not None
    text = UNCERTAIN_TEXT_ASCII if ascii_only else UNCERTAIN_TEXT
    why = []
    if quality.score < quality.calibration.threshold:
        why.append(f"quality score {quality.score:.2f} < {quality.calibration.threshold:.2f}")
    ratio = quality.signals.competitor_ratio if quality.signals is not None else None
    if COMPETING_DETECTION in quality.reasons and ratio is not None:
        why.append(f"another structure {ratio:.0%} as probable")
    return f"{text} ({'; '.join(why)})"


def review_summary(tumour: TumourSegmentation) -> dict[str, Any]:
    """result.json's ``review`` block: whether a person must look at the tumour contour, and why."""
    quality = tumour.quality
    if quality is None:
        return {"required": False, "flags": [], "tumour_quality_score": None}
    return {
        "required": quality.uncertain,
        "flags": [UNCERTAIN_TEXT] if quality.uncertain else [],
        "tumour_quality_score": None if quality.score is None else round(quality.score, 4),
        "threshold": quality.calibration.threshold,
        "calibrated": quality.calibration.calibrated,
        "reasons": list(quality.reasons),
        "model": f"{tumour.method} {tumour.version}",
    }


def contour_quality_finding(tumour: TumourSegmentation) -> ContourQualityFinding | None:
    """The tumour's quality as the SR reports it (``None``: not assessed or no contour)."""
    quality = tumour.quality
    if quality is None or quality.score is None:
        return None
    text = review_note(tumour) if quality.uncertain else "tumour contour quality acceptable"
    return ContourQualityFinding(round(quality.score, 4), quality.calibration.threshold, quality.uncertain, text)


#: Radiomics region -> the writer region whose SR group carries its features. The whole
#: lung has no single segment (the SEG holds each lung), so its features stay in result.json.
SR_GROUP_OF_RADIOMICS_REGION = {"tumour": RegionKind.TUMOUR, "ring": RegionKind.PERITUMORAL_RING}


def compute_radiomics(series: CTSeries, regions: Regions, settings: Settings) -> RadiomicsResult:
    """Stage 7 (phase 2): pyradiomics features of tumour, ring and whole lung."""
    return extract_regions(series.image, regions, dict(settings.radiomics.profiles), parallel=settings.radiomics.parallel)


def radiomics_for_sr(radiomics: RadiomicsResult | None, written: list[Region]) -> dict[str, dict[str, float]]:
    """Writer region name -> finite feature values (the SR's feature subset is chosen by the writer)."""
    if radiomics is None:
        return {}
    by_kind = {r.kind: r.name for r in written}
    out: dict[str, dict[str, float]] = {}
    for region, kind in SR_GROUP_OF_RADIOMICS_REGION.items():
        found = radiomics.regions.get(region)
        if found is not None and found.status == "done":
            out[by_kind[kind]] = {k: v for k, v in found.features.items() if math.isfinite(v)}
    return out


def predict_mutations(
    radiomics: RadiomicsResult | None, settings: Settings, deep_features: list[float] | None = None
) -> MutationResult:
    """Stage 8 (phase 2): configured classifier bundles on the case's features.

    The columns a bundle may use are the radiomic features (``<region>_<feature>``) and,
    when the tumour network produced them, its deep features (``deep_000`` ... , method A).
    """
    bundles = settings.models.classifier_bundles
    if not bundles:
        return MutationResult()
    if radiomics is None and not deep_features:
        return MutationResult(errors={e: "no radiomic or deep features for this case" for e in bundles})
    features = {} if radiomics is None else flat_features(
        {name: r.features for name, r in radiomics.regions.items() if r.status == "done"}
    )
    features.update(deep_feature_columns(deep_features or []))
    return predict_endpoints(bundles, features, settings.models.classifier_sha256)


def measure_regions(series: CTSeries, written: list[Region]) -> list[RegionStats]:
    """Stage 5: volume, HU statistics, longest diameter and sphericity of every region."""
    image = series.array
    spacing = zyx_spacing(series)
    return [region_statistics(r.mask, image, spacing, name=r.name) for r in written]


def segmentation_algorithms(tumour: TumourSegmentation) -> tuple[ContributingAlgorithm, ...]:
    """The lung mask and (when one ran) the tumour bundle, as IHE AIR contributing algorithms.

    The weight-free lung mask ships with radnode, so its checksum covers radnode's
    version; a bundle's is its content checksum (a bundle without one, e.g. a test's
    stand-in, falls back to name and version).
    """
    lung = ContributingAlgorithm(
        name=LUNG_MASK_METHOD,
        version=LUNG_MASK_VERSION,
        checksum=checksum_of("lung-mask", LUNG_MASK_METHOD, LUNG_MASK_VERSION, __version__),
        role="lung segmentation",
    )
    if tumour.method == NO_MODEL:
        return (lung,)
    bundle = ContributingAlgorithm(
        name=tumour.method,
        version=tumour.version,
        checksum=tumour.checksum or checksum_of("tumour-model", tumour.method, tumour.version),
        role="tumour segmentation",
        manufacturer=tumour.manufacturer,
        demo=tumour.demo,
    )
    return (lung, bundle)


def algorithm_info(tumour: TumourSegmentation) -> AlgorithmInfo:
    """Provenance written into every object: package, pipeline and model versions."""
    versions = {"pipeline": PIPELINE_VERSION, LUNG_MASK_METHOD: LUNG_MASK_VERSION}
    if tumour.method != NO_MODEL:
        versions[tumour.method] = tumour.version
        if tumour.weights_sha256:
            versions[f"{tumour.method}{CHECKSUM_SUFFIX}"] = tumour.weights_sha256
    return AlgorithmInfo(model_versions=versions, demo=tumour.demo, contributors=segmentation_algorithms(tumour))


def report_algorithm(algorithm: AlgorithmInfo, radiomics: RadiomicsResult | None) -> AlgorithmInfo:
    """The SR's provenance: the segmentation's, plus the radiomics engine that computed its features."""
    if radiomics is None:
        return algorithm
    engine = radiomics.engine
    versions = {**algorithm.model_versions, f"radiomics-{engine['name']}": str(engine["version"])}
    contributors = (*algorithm.contributors, engine_algorithm(engine, radiomics.profiles))
    return AlgorithmInfo(model_versions=versions, demo=algorithm.demo, contributors=contributors)


def start_pacs_lookup(series: CTSeries, settings: Settings) -> PacsContourLookup | None:
    """Ask the PACS for the study's clinician RTSTRUCTs while the CT is segmented.

    Only when a PACS is configured, the query is on, and the node holds no RTSTRUCT of
    the study yet (a push that included one, or the sweep, already brought it).
    """
    if not PacsContourLookup.wanted(settings):
        return None
    try:
        if indexed_rtstructs(settings, series.study_instance_uid):
            return None
    except Exception:
        log.exception("node index not readable for the RTSTRUCT lookup; asking the PACS")
    return PacsContourLookup(settings, series.study_instance_uid).start()


def find_clinician_contour(
    series: CTSeries, settings: Settings, lookup: PacsContourLookup | None, started: float
) -> tuple[ContourSearch, dict[str, Any]]:
    """The clinician's GTV for the series (after the PACS lookup, waited for within its bound)."""
    pacs: dict[str, Any] = {}
    if lookup is not None:
        remaining = settings.clinical_contours.pacs_timeout_seconds - (time.monotonic() - started)
        finished = lookup.wait(remaining)
        pacs = {"queried": True, "finished": finished, "retrieved_series": lookup.retrieved, "error": lookup.error}
    return find_clinician_gtv(series, settings), pacs


def clinician_measurements(
    series: CTSeries, analysis: Regions, written: list[Region], radiomics: RadiomicsResult | None
) -> list[tuple[RegionKind, RegionMeasurements]]:
    """The clinician GTV's tumour and ring as the SR reports them (named like radnode's segments)."""
    names = {r.kind: r.name for r in written}
    out: list[tuple[RegionKind, RegionMeasurements]] = []
    for region, kind, mask in (("tumour", RegionKind.TUMOUR, analysis.tumour), ("ring", RegionKind.PERITUMORAL_RING, analysis.ring)):
        stats = region_statistics(mask, series.array, zyx_spacing(series), name=names[kind])
        if stats.empty:
            continue
        found = radiomics.regions.get(region) if radiomics is not None else None
        features = {k: v for k, v in found.features.items() if math.isfinite(v)} if found and found.status == "done" else {}
        out.append((kind, RegionMeasurements(
            region_name=stats.name, volume_ml=stats.volume_ml, mean_hu=stats.hu_mean, min_hu=stats.hu_min,
            max_hu=stats.hu_max, longest_diameter_mm=stats.max_diameter_mm, sphericity=stats.sphericity,
            features=features,
        )))
    return out


def save_dataset(dataset: Dataset, path: Path) -> Path:
    """Write a DICOM object as a Part 10 file, durably (see :mod:`radnode.durable`)."""
    with durable.replacing(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def write_contours(
    series: CTSeries, written: list[Region], algorithm: AlgorithmInfo, options: WriterOptions, out_dir: Path
) -> tuple[dict[str, Path], Dataset | None]:
    """Phase 1 objects: SEG and RTSTRUCT (what a planner needs first)."""
    files: dict[str, Path] = {}
    present = [r for r in written if not r.is_empty]
    if not present:
        return files, None
    seg = build_seg(series, written, algorithm, options)
    files["SEG"] = save_dataset(seg, out_dir / "SEG.dcm")
    files["RTSTRUCT"] = save_dataset(build_rtstruct(series, written, algorithm, options), out_dir / "RTSTRUCT.dcm")
    return files, seg


def measurement_set(
    stats: list[RegionStats],
    features: dict[str, dict[str, float]],
    mutations: MutationResult,
    quality: dict[str, ContourQualityFinding] | None = None,
    clinician: ClinicianContourReport | None = None,
) -> MeasurementSet:
    """Region statistics, radiomic features and predictions as the SR's content (empty regions left out).

    ``quality`` maps a region name to its contour quality finding (the tumour's);
    ``clinician`` is the clinician's GTV the features were computed on, if any.
    """
    quality = quality or {}
    return MeasurementSet(
        regions=[
            RegionMeasurements(
                region_name=s.name,
                volume_ml=s.volume_ml,
                mean_hu=s.hu_mean,
                min_hu=s.hu_min,
                max_hu=s.hu_max,
                longest_diameter_mm=s.max_diameter_mm,
                sphericity=s.sphericity,
                features=features.get(s.name, {}),
                contour_quality=quality.get(s.name),
            )
            for s in stats
            if not s.empty
        ],
        predictions=[Prediction(**vars(p)) for p in mutations.predictions],
        clinician=clinician,
    )


def lungs_only_needed(settings: Settings, tumour: TumourSegmentation) -> bool:
    """Whether a ``skip_tumour`` destination will need the lungs-only objects of this job."""
    from radnode.config.model import UncertainContourPolicy

    return tumour.uncertain and any(
        d.uncertain_contour is UncertainContourPolicy.SKIP_TUMOUR for d in settings.destinations
    )


def write_lungs_only(
    series: CTSeries, lungs: LungMaskResult, tumour: TumourSegmentation, options: WriterOptions, out_dir: Path
) -> dict[str, Path]:
    """SEG and RTSTRUCT without tumour and ring, for destinations that must not get an uncertain GTV.

    They name the lung mask as their algorithm plus the withheld tumour model (so their
    UIDs differ from the full objects' and the reader sees what was left out), and say
    why the tumour is missing where "no tumour found" would stand.
    """
    withheld = Region.of_kind(
        RegionKind.TUMOUR, np.zeros_like(lungs.right, dtype=bool),
        review_note=f"tumour withheld: {review_note(tumour, ascii_only=True)}",
    )
    regions = [Region.of_kind(RegionKind.LUNG_RIGHT, lungs.right), Region.of_kind(RegionKind.LUNG_LEFT, lungs.left), withheld]
    algorithm = AlgorithmInfo(model_versions={
        "pipeline": PIPELINE_VERSION, LUNG_MASK_METHOD: LUNG_MASK_VERSION,
        "tumour-withheld": f"{tumour.method}-{tumour.version}",
    })
    folder = out_dir / LUNGS_ONLY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "SEG": save_dataset(build_seg(series, regions, algorithm, options), folder / "SEG.dcm"),
        "RTSTRUCT": save_dataset(build_rtstruct(series, regions, algorithm, options), folder / "RTSTRUCT.dcm"),
    }
    return files


def write_report(
    series: CTSeries,
    seg: Dataset | None,
    measurements: MeasurementSet,
    algorithm: AlgorithmInfo,
    options: WriterOptions,
    out_dir: Path,
) -> dict[str, Path]:
    """Phase 2 object: the TID 1500 Structured Report."""
    sr = build_sr(series, seg, measurements, algorithm, options)
    return {"SR": save_dataset(sr, out_dir / "SR.dcm")}


def write_overlays(series: CTSeries, written: list[Region], out_dir: Path) -> dict[str, str]:
    """Overlay PNGs (radnode.dicom_io.overlays) under ``out_dir/overlays``; result.json names them."""
    import SimpleITK as sitk

    from radnode.dicom_io.overlays import OVERLAY_DIR, render_overlays

    volume = sitk.GetArrayFromImage(series.image)
    files = render_overlays(volume, zyx_spacing(series), written, out_dir / OVERLAY_DIR)
    return {f"overlay_{view}": str(path.relative_to(out_dir)) for view, path in files.items()}


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON durably, so readers never see half a file (see :mod:`radnode.durable`)."""
    durable.write_json(path, payload)


def run_chain(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: ProgressHook | None = None,
    on_phase: PhaseHook | None = None,
    structure_sets: Sequence[tuple[str, Path]] | None = None,
) -> ChainResult:
    """Run the whole chain on one series folder and write ``out_dir/result.json``.

    A QC rejection is a normal outcome (status ``rejected`` with the reasons), not an
    exception: a hospital wants to see *why* a series was not processed.

    ``structure_sets`` ((SOP Instance UID, file) of clinicians' RT Structure Sets) is the
    late-arrival mode of :mod:`radnode.pipeline.late_contours`: the CT was processed before
    they arrived, so only they are searched for the GTV (no index or PACS lookup), the
    SEG and RTSTRUCT are rebuilt (the SR references the SEG; their UIDs are those already
    sent) but not handed over again, and a structure set without a usable GTV ends the job
    ``done`` with nothing to send.
    """
    late = structure_sets is not None
    result = ChainResult(status="failed", input_path=str(input_path))
    stages = _Stages(result, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with stages.stage("models"):  # every configured bundle intact (and as pinned) before any work
            verify_configured_bundles(settings.models)
        with stages.stage("load_and_qc"):
            try:
                series = load_and_check(input_path, settings)
            except SeriesRejected as rejected:
                result.status = "rejected"
                result.qc = rejected.report.to_dict()
                result.error = rejected.report.summary()
                raise
        result.series = describe_series(series)
        result.qc = series.qc.to_dict()
        lookup_started = time.monotonic()
        lookup = None if late else start_pacs_lookup(series, settings)  # overlaps segmentation; never blocks the job
        with stages.stage("lung_mask"):
            lungs = find_lungs(series)
        result.models["lung_mask"] = {"method": LUNG_MASK_METHOD, "version": LUNG_MASK_VERSION, **lungs.summary()}
        with stages.stage("tumour"):
            tumour = find_tumour(series, lungs, settings)
        result.models["tumour"] = tumour.summary()
        if tumour.lungs is not None:  # an external model mapped lung labels (models.label_map)
            lungs = replace_lungs(lungs, tumour.lungs, zyx_spacing(series))
            result.models["lung_mask"] = {"method": tumour.method, "version": tumour.version, **lungs.summary()}
        result.review = review_summary(tumour)
        if tumour.uncertain:
            result.warnings.append(review_note(tumour))
        # before the contours phase: the node reads it to apply each destination's policy
        write_json_atomically(out_dir / QUALITY_FILE, result.review)
        result.outputs["contour_quality"] = QUALITY_FILE
        with stages.stage("regions"):
            regions = make_regions(series, lungs, tumour, settings)
            written = writer_regions(lungs, regions, tumour)
        with stages.stage("measurements"):
            stats = measure_regions(series, written)
        result.regions = [s.as_dict() for s in stats]
        algorithm = algorithm_info(tumour)
        options = WriterOptions.from_settings(
            settings.output, pipeline_version=PIPELINE_VERSION, sr_features=tuple(settings.radiomics.sr_features)
        )
        with stages.stage("write_contours"):
            files, seg = write_contours(series, written, algorithm, options, out_dir)
            if files and not late and lungs_only_needed(settings, tumour):
                lungs_only = write_lungs_only(series, lungs, tumour, options, out_dir)
                result.outputs.update({f"{k}_lungs_only": str(p.relative_to(out_dir)) for k, p in lungs_only.items()})
        _record_phase(result, "contours", {} if late else files, out_dir, on_phase)
        # Phase 2: a failure here is recorded and the SR still goes out; phase 1 stands.
        # A clinician's GTV, when the archive holds one, is the region radiomics and
        # predictions use; radnode's own contour (sent above) is compared with it.
        search, analysis = ContourSearch(), regions
        with stages.stage("clinician_contour", required=False) as outcome:
            if structure_sets is not None:
                search, pacs = search_structure_sets(list(structure_sets), series, settings), {}
            else:
                search, pacs = find_clinician_contour(series, settings, lookup, lookup_started)
            result.clinician_contour = {"found": search.contour is not None, "ignored": search.ignored, **({"pacs": pacs} if pacs else {})}
            if late:
                result.clinician_contour["arrived_after_ct"] = True
            if search.contour is not None:
                analysis = build_regions(
                    search.contour.mask, lungs.lungs, zyx_spacing(series), ring_width_mm=settings.radiomics.ring_width_mm
                )
                result.tumour_source = SOURCE_CLINICIAN
                result.clinician_contour.update(search.contour.describe())
                if tumour.method != NO_MODEL:  # no tumour model ran: nothing of radnode's to compare
                    result.clinician_contour.update({
                        "agreement": agreement(regions.tumour, search.contour.mask, zyx_spacing(series)),
                        "model": {"name": tumour.method, "version": tumour.version},
                    })
        if outcome.error:
            result.clinician_contour = {"found": False, "error": outcome.error}
            if late:  # reading failed, unlike a structure set without a GTV: worth a retry
                raise RuntimeError(f"clinician contour: {outcome.error}")
        if late and search.contour is None:
            raise NoClinicianContour("no usable clinician GTV in the structure set(s) that arrived; nothing to send")
        radiomics = None
        if settings.radiomics.enabled:
            with stages.stage("radiomics", required=False) as outcome:
                radiomics = compute_radiomics(series, analysis, settings)
            result.radiomics = radiomics.to_dict() if radiomics is not None else {"error": outcome.error}
        with stages.stage("mutations", required=False) as outcome:
            mutations = predict_mutations(radiomics, settings, tumour.deep_features)
        if outcome.error:
            mutations = MutationResult(errors={"*": outcome.error})
        result.mutations = mutations.to_dict()
        with stages.stage("write_report"):
            finding = contour_quality_finding(tumour)
            tumour_name = next(r.name for r in written if r.kind is RegionKind.TUMOUR)
            clinician = None
            if search.contour is not None:
                agreed = result.clinician_contour.get("agreement") or {}
                clinician = ClinicianContourReport(
                    roi_name=search.contour.roi_name, rtstruct=search.contour.dataset,
                    regions=clinician_measurements(series, analysis, written, radiomics),
                    dice=agreed.get("dice"), hd95_mm=agreed.get("hd95_mm"), volume_ratio=agreed.get("volume_ratio"),
                )
            content = measurement_set(
                stats, {} if clinician else radiomics_for_sr(radiomics, written), mutations,
                {tumour_name: finding} if finding else None, clinician,
            )
            files = write_report(series, seg, content, report_algorithm(algorithm, radiomics), options, out_dir)
        _record_phase(result, "report", files, out_dir, on_phase)
        with stages.stage("overlays", required=False):  # previews for the dashboard; never fails a job
            result.outputs.update(write_overlays(series, written, out_dir))
        result.status = "done"
        log.info("chain done for series %s", series.series_instance_uid)
    except SeriesRejected:
        log.warning("series at %s rejected by QC: %s", input_path, result.error)
    except NoClinicianContour as nothing:
        result.status = "done"
        result.warnings.append(str(nothing))
        _record_phase(result, "report", {}, out_dir, on_phase)
        log.warning("series at %s: %s", input_path, nothing)
    except Exception as exc:  # a job must always leave a result.json saying what broke
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        log.exception("chain failed for %s", input_path)
    result.outputs["result"] = RESULT_FILE
    write_json_atomically(out_dir / RESULT_FILE, result.to_dict())
    return result


def _record_phase(
    result: ChainResult, phase: str, files: dict[str, Path], out_dir: Path, on_phase: PhaseHook | None
) -> None:
    """Note a finished delivery phase and hand its files to the caller (the worker dispatches them)."""
    result.phases.append(phase)
    for kind, path in files.items():
        result.outputs[kind] = str(path.relative_to(out_dir))
    if on_phase is not None:
        on_phase(phase, files)
