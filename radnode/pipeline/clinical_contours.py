"""A clinician's GTV for the CT being processed: find it, read it, compare radnode's own with it.

When a planning system already holds a clinician's RT Structure Set for a CT, that GTV
is the better tumour region for radiomics and mutation predictions, and it is the
reference against which radnode's own tumour contour can be monitored on the hospital's
own data. Where it comes from:

* the node's index: an RTSTRUCT pushed with (or before) the CT, or fetched by the sweep
  (:meth:`~radnode.pipeline.archive.ArchiveQuery.study_series` + the sweep's retriever),
  is an indexed instance of the same study (:meth:`NodeIndex.study_instances`);
* for a live-received CT, when a PACS is configured: :class:`PacsContourLookup` C-FINDs
  the study's RTSTRUCT series and retrieves them through the node's ingest in a
  background thread while the CT is segmented; the chain waits for it at most
  ``clinical_contours.pacs_timeout_seconds`` and never fails because of it.

A structure set is used only when it lies in the CT's Frame of Reference, is not one of
radnode's own (Manufacturer), and has an ROI matching ``clinical_contours.gtv_names``
(fnmatch patterns, case-insensitive, in order of preference; RT ROI Interpreted Type
``GTV`` first among one pattern's matches) that rasterises onto the CT grid
(:func:`radnode.dicom_io.rtstruct_read.rasterise_roi`). Every structure set passed over
is logged and listed in result.json with the reason.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from radnode.config import Settings
from radnode.dicom_io.regions import WriterOptions
from radnode.dicom_io.rtstruct_read import (
    RTSTRUCT_SOP_CLASS_UID,
    RoiInfo,
    RTStructError,
    rasterise_roi,
    read_rtstruct,
    read_rtstruct_rois,
)
from radnode.dicom_io.series import CTSeries
from radnode.models.metrics import dice, hausdorff95

log = logging.getLogger(__name__)

#: result.json ``tumour_source`` values.
SOURCE_CLINICIAN = "clinician"
SOURCE_MODEL = "model"
RTSTRUCT_MODALITY = "RTSTRUCT"


class ContourIgnored(ValueError):
    """A structure set that cannot serve as the clinician's GTV for this CT (the message says why)."""


@dataclass(frozen=True)
class ClinicianContour:
    """The clinician's GTV on the CT grid and where it came from."""

    mask: np.ndarray
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    roi_name: str
    roi_number: int
    interpreted_type: str | None
    dataset: Dataset = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """result.json's identification of the contour (UIDs and ROI, no patient data)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_class_uid": RTSTRUCT_SOP_CLASS_UID,
            "roi_name": self.roi_name,
            "roi_number": self.roi_number,
            "interpreted_type": self.interpreted_type,
        }


@dataclass
class ContourSearch:
    """The outcome of looking for a clinician's GTV: the one used, and every one passed over."""

    contour: ClinicianContour | None = None
    ignored: list[dict[str, str]] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)

    def ignore(self, uid: str, reason: str) -> None:
        log.warning("clinician RTSTRUCT %s ignored: %s", uid, reason)
        self.ignored.append({"sop_instance_uid": uid, "reason": reason})


def select_gtv(rois: list[RoiInfo], patterns: list[str]) -> RoiInfo | None:
    """The ROI to use as the GTV: first pattern with a match wins; then type GTV, then lowest number.

    ROIs without a closed contour (a point, an empty ROI) never match.
    """
    usable = [r for r in rois if "CLOSED_PLANAR" in r.geometric_types]
    for pattern in patterns:
        matches = [r for r in usable if fnmatch.fnmatchcase(r.name.strip().lower(), pattern.strip().lower())]
        if matches:
            return sorted(matches, key=lambda r: ((r.interpreted_type or "").upper() != "GTV", r.number))[0]
    return None


def referenced_series(ds: Dataset) -> set[str]:
    """Series UIDs the structure set says it was drawn on (RT Referenced Series Sequence)."""
    found: set[str] = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    found.add(str(series.SeriesInstanceUID))
    return found


def frames_of_reference(ds: Dataset) -> set[str]:
    return {
        str(item.FrameOfReferenceUID)
        for item in ds.get("ReferencedFrameOfReferenceSequence", [])
        if "FrameOfReferenceUID" in item
    }


def load_clinician_gtv(source: Path | Dataset, series: CTSeries, settings: Settings) -> ClinicianContour:
    """Read one structure set and rasterise its GTV onto ``series``; :class:`ContourIgnored` says why not."""
    try:
        ds = read_rtstruct(source)
    except (RTStructError, OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ContourIgnored(f"not a readable RT Structure Set: {exc}") from exc
    if str(ds.get("Manufacturer", "")).strip() == WriterOptions().manufacturer:
        raise ContourIgnored("written by radnode itself, not by a clinician")
    frames = frames_of_reference(ds)
    if frames and series.frame_of_reference_uid not in frames:
        raise ContourIgnored(
            f"references Frame of Reference {', '.join(sorted(frames))}, not the CT's {series.frame_of_reference_uid}"
        )
    referenced = referenced_series(ds)
    if referenced and series.series_instance_uid not in referenced:
        log.info("RTSTRUCT %s was drawn on series %s; trying it on %s (same Frame of Reference)",
                 ds.get("SOPInstanceUID", "?"), sorted(referenced), series.series_instance_uid)
    rois = read_rtstruct_rois(ds)
    roi = select_gtv(rois, settings.clinical_contours.gtv_names)
    if roi is None:
        names = ", ".join(repr(r.name) for r in rois) or "none"
        raise ContourIgnored(
            f"no ROI matches clinical_contours.gtv_names {settings.clinical_contours.gtv_names} (ROIs: {names})"
        )
    try:
        mask = rasterise_roi(ds, series, roi.number)
    except RTStructError as exc:
        raise ContourIgnored(f"ROI {roi.name!r} does not fit the CT: {exc}") from exc
    if not mask.any():
        raise ContourIgnored(f"ROI {roi.name!r} covers no voxel of the CT")
    return ClinicianContour(
        mask=mask,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        roi_name=roi.name,
        roi_number=roi.number,
        interpreted_type=roi.interpreted_type,
        dataset=ds,
    )


def indexed_rtstructs(settings: Settings, study_uid: str) -> list[tuple[str, Path]]:
    """(SOP Instance UID, file) of every RTSTRUCT the node holds for a study, newest first."""
    from radnode.node.index import open_existing_index

    data_dir = Path(settings.storage.data_dir)
    index = open_existing_index(data_dir, settings.database.url)
    if index is None:
        return []
    try:
        records = index.study_instances(study_uid, RTSTRUCT_SOP_CLASS_UID)
    finally:
        index.close()
    return [(r.sop_instance_uid, data_dir / r.path) for r in records]


def find_clinician_gtv(series: CTSeries, settings: Settings) -> ContourSearch:
    """The clinician's GTV for ``series`` from the node's index (see the module docstring)."""
    search = ContourSearch()
    if not settings.clinical_contours.enabled:
        return search
    candidates = indexed_rtstructs(settings, series.study_instance_uid)
    # Structure sets drawn on this very series first; otherwise the newest.
    drawn_here: list[tuple[str, Path]] = []
    others: list[tuple[str, Path]] = []
    for uid, path in candidates:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ReferencedFrameOfReferenceSequence"])
            here = series.series_instance_uid in referenced_series(header)
        except Exception:
            here = False
        (drawn_here if here else others).append((uid, path))
    return search_structure_sets(drawn_here + others, series, settings, search)


def search_structure_sets(
    candidates: list[tuple[str, Path]], series: CTSeries, settings: Settings, search: ContourSearch | None = None
) -> ContourSearch:
    """The first of ``candidates`` (SOP Instance UID, file) whose GTV fits ``series``; the others' reasons logged."""
    search = search if search is not None else ContourSearch()
    for uid, path in candidates:
        search.searched.append(uid)
        try:
            search.contour = load_clinician_gtv(path, series, settings)
        except ContourIgnored as exc:
            search.ignore(uid, str(exc))
            continue
        log.info("series %s: clinician GTV %r from RTSTRUCT %s", series.series_instance_uid,
                 search.contour.roi_name, uid)
        break
    return search


def agreement(model: np.ndarray, clinician: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float | None]:
    """Dice, HD95 (mm) and the volume ratio model / clinician of radnode's tumour against the clinician's GTV."""
    model_voxels = int(np.count_nonzero(model))
    clinician_voxels = int(np.count_nonzero(clinician))
    hd95 = hausdorff95(model, clinician, spacing)
    return {
        "dice": round(float(dice(model, clinician)), 4),
        "hd95_mm": None if math.isnan(hd95) else round(hd95, 3),
        "volume_ratio": round(model_voxels / clinician_voxels, 4) if clinician_voxels else None,
        "model_volume_ml": round(model_voxels * float(np.prod(spacing)) / 1000.0, 3),
        "clinician_volume_ml": round(clinician_voxels * float(np.prod(spacing)) / 1000.0, 3),
    }


class PacsContourLookup:
    """C-FIND the configured PACS for a study's RTSTRUCT series and retrieve them, in the background.

    Started before segmentation so that the query overlaps it; :meth:`wait` bounds what
    the chain spends on it. Retrieved instances go through the node's ingest (C-MOVE to
    the listener, or C-GET into :func:`~radnode.node.ingest.local_ingestor`), so
    :func:`find_clinician_gtv` then finds them in the index. Any failure is logged only.
    """

    def __init__(self, settings: Settings, study_uid: str) -> None:
        self.settings = settings
        self.study_uid = study_uid
        self.error: str | None = None
        self.retrieved: list[str] = []
        self._thread = threading.Thread(target=self._run, name="radnode-rtstruct-lookup", daemon=True)

    @classmethod
    def wanted(cls, settings: Settings) -> bool:
        """Whether a live job should query the PACS at all (a PACS is configured and the query is on)."""
        return settings.pacs is not None and settings.clinical_contours.enabled and settings.clinical_contours.query_pacs

    def start(self) -> PacsContourLookup:
        self._thread.start()
        return self

    def _run(self) -> None:
        from radnode.pipeline.archive import ArchiveQuery, GetRetriever, MoveRetriever

        try:
            found = ArchiveQuery(self.settings).study_series(self.study_uid, RTSTRUCT_MODALITY)
            assert self.settings.pacs is not None
            retriever = GetRetriever(self.settings) if self.settings.pacs.retrieve == "get" else MoveRetriever(self.settings)
            for candidate in found:
                result = retriever.retrieve(candidate)
                if result.ok:
                    self.retrieved.append(candidate.series_instance_uid)
                else:
                    log.warning("RTSTRUCT series %s not retrieved: %s", candidate.series_instance_uid, result.error)
        except Exception as exc:  # the archive is optional here: log and go on
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("PACS lookup of clinician RTSTRUCTs for study %s failed: %s", self.study_uid, self.error)

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds; True when the lookup finished."""
        self._thread.join(max(0.0, timeout))
        finished = not self._thread.is_alive()
        if not finished:
            self.error = f"no answer within {timeout:.0f} s"
            log.warning("PACS lookup of clinician RTSTRUCTs for study %s: %s; going on without", self.study_uid, self.error)
        return finished
