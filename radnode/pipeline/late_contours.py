"""A clinician's RT Structure Set that arrives after its CT was processed.

Planning often happens after radnode has sent its contours: the physician's GTV reaches
the node later (C-STORE, STOW-RS, or the sweep's retrieval). The CT's job looked for a
clinician's contour only while it ran, so without this module that GTV would never drive
the radiomics and predictions, nor be compared with radnode's tumour.

The path reuses the node's machinery end to end: the RTSTRUCT series completes like any
series (:mod:`radnode.node.completion`); :func:`late_contour_job` (called by
:meth:`PipelineService.on_series_complete`) decides whether it is a clinician's structure
set for a CT that radnode processed (or is processing), and the service queues a
:attr:`~radnode.pipeline.jobs.JobKind.CLINICIAN_CONTOUR` job on the RTSTRUCT series; the
node's worker pool runs :func:`run_late_contour_chain` in a child process, which is the
chain of :mod:`radnode.pipeline.chain` in its late-arrival mode (only these structure sets,
SEG and RTSTRUCT not handed over again, a new SR). The job's end records the agreement
like any job's.

Skipped with a log line, never an error or a quarantine: radnode's own structure sets,
ones without an ROI matching ``clinical_contours.gtv_names``, ones whose CT the node never
saw or never processed, a CT whose job has not run yet (it finds the structure set in the
index itself), and a CT whose finished job already used the same structure set.
Idempotent: a series that already has such a job for the same round queues nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from radnode.config import Settings
from radnode.dicom_io.regions import WriterOptions
from radnode.dicom_io.rtstruct_read import RTSTRUCT_SOP_CLASS_UID, RTStructError, read_rtstruct, read_rtstruct_rois
from radnode.node.index import NodeIndex
from radnode.node.routing import loop_guard
from radnode.node.series_attributes import SeriesAttributes
from radnode.node.storage import INDEX_FILE, series_dir
from radnode.pipeline.clinical_contours import RTSTRUCT_MODALITY, frames_of_reference, referenced_series, select_gtv
from radnode.pipeline.jobs import Job, JobKind, JobSource, JobSpec, JobState, Priority
from radnode.pipeline.queue import JobQueue

if TYPE_CHECKING:  # the chain's imports (models) are heavy; the completion thread must not wait for them
    from radnode.pipeline.chain import ChainResult, PhaseHook, ProgressHook

log = logging.getLogger(__name__)

#: A job's result file (``radnode.pipeline.chain.RESULT_FILE``, not imported for the reason above).
RESULT_FILE = "result.json"

#: CT Image Storage and Enhanced CT Image Storage: the series a structure set can be matched to.
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


class LateContourSkipped(Exception):
    """A completed RT Structure Set series that gives no clinician-contour job (the message says why)."""


@dataclass(frozen=True)
class LateStructureSet:
    """A clinician's structure set series and the processed CT series it belongs to."""

    study_uid: str
    structure_sets: tuple[tuple[str, Path], ...]  # (SOP Instance UID, file) with a GTV-like ROI
    ct_series_uid: str
    ct_folder: Path


def is_structure_set(attributes: SeriesAttributes) -> bool:
    """Whether a completed series is an RT Structure Set series."""
    return attributes.sop_class_uid == RTSTRUCT_SOP_CLASS_UID or (attributes.modality or "").upper() == RTSTRUCT_MODALITY


def _usable(files: Sequence[Path], settings: Settings) -> tuple[list[tuple[str, Path]], set[str], set[str], str]:
    """Structure sets among ``files`` that may hold the clinician's GTV, what they reference, and the study."""
    newest: dict[str, Path] = {}
    referenced: set[str] = set()
    frames: set[str] = set()
    study = ""
    reasons: list[str] = []
    for path in files:
        try:
            ds = read_rtstruct(path)
            rois = read_rtstruct_rois(ds)
        except (RTStructError, OSError, pydicom.errors.InvalidDicomError) as exc:
            reasons.append(f"{path.name}: not a readable RT Structure Set ({exc})")
            continue
        uid = str(ds.get("SOPInstanceUID", path.stem))
        if str(ds.get("Manufacturer", "")).strip() == WriterOptions().manufacturer:
            reasons.append(f"{uid}: written by radnode itself")
            continue
        if select_gtv(rois, settings.clinical_contours.gtv_names) is None:
            reasons.append(f"{uid}: no ROI matches clinical_contours.gtv_names")
            continue
        newest[uid] = path  # files come in arrival order: a later version of an instance wins
        referenced |= referenced_series(ds)
        frames |= frames_of_reference(ds)
        study = str(ds.get("StudyInstanceUID", study))
    if not newest:
        raise LateContourSkipped("; ".join(reasons) or "no structure set in the series")
    return list(newest.items()), referenced, frames, study


def _frame_of_reference(path: Path) -> str | None:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
    except Exception:
        return None
    value = header.get("FrameOfReferenceUID")
    return str(value) if value else None


def _ct_series(index: NodeIndex, data_dir: Path, study: str, referenced: set[str], frames: set[str]) -> tuple[str, str]:
    """(study, series) of the CT the structure sets belong to: a referenced series the node
    holds, else the newest CT series of the study in one of their Frames of Reference."""
    for uid in sorted(referenced):
        records = [r for r in index.series_instances(uid) if r.sop_class_uid in CT_SOP_CLASSES]
        if records:
            return records[0].study_instance_uid, uid
    if study and frames:
        seen: set[str] = set()
        for sop_class in CT_SOP_CLASSES:
            for record in index.study_instances(study, sop_class):  # newest first
                if record.series_instance_uid in seen:
                    continue
                seen.add(record.series_instance_uid)
                if _frame_of_reference(data_dir / record.path) in frames:
                    return record.study_instance_uid, record.series_instance_uid
    raise LateContourSkipped(
        f"references CT series {sorted(referenced) or 'none'} / Frame of Reference {sorted(frames) or 'none'}, "
        "none of which the node holds"
    )


def resolve(index: NodeIndex, data_dir: Path, files: Sequence[Path], settings: Settings) -> LateStructureSet:
    """The clinician's structure sets among ``files`` and the CT they were drawn on; :class:`LateContourSkipped` if none."""
    usable, referenced, frames, study = _usable(files, settings)
    ct_study, ct_series = _ct_series(index, data_dir, study, referenced, frames)
    return LateStructureSet(study or ct_study, tuple(usable), ct_series, series_dir(data_dir, ct_study, ct_series))


def _used_structure_set(job: Job, results_dir: Path) -> str | None:
    """The clinician structure set a finished job measured on, from its result.json."""
    try:
        result: dict[str, Any] = json.loads((results_dir / str(job.id) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return (result.get("clinician_contour") or {}).get("sop_instance_uid")


def late_contour_job(
    event: Any, attributes: SeriesAttributes, settings: Settings, queue: JobQueue, index: NodeIndex | None, results_dir: Path,
    pipeline_version: str,
) -> JobSpec | None:
    """The clinician-contour job a completed series calls for, or ``None`` (logged when it is a structure set)."""
    series_uid = str(event.series_instance_uid)
    if not settings.clinical_contours.enabled or not is_structure_set(attributes):
        return None
    if loop_guard(attributes, settings.output.uid_root):
        return None  # radnode's own RTSTRUCT coming back
    previous = queue.latest_for_series(series_uid, kind=JobKind.CLINICIAN_CONTOUR)
    if previous is not None and previous.instance_count == event.instance_count and not getattr(event, "is_update", False):
        log.info("RTSTRUCT series %s already has clinician-contour job %d (%s)", series_uid, previous.id, previous.state.value)
        return None
    if index is None:
        log.info("RTSTRUCT series %s: no node index on this data folder; not matched to a CT", series_uid)
        return None
    data_dir = Path(settings.storage.data_dir)
    try:
        late = resolve(index, data_dir, [data_dir / r.path for r in index.series_instances(series_uid)], settings)
    except LateContourSkipped as skipped:
        log.info("RTSTRUCT series %s: not a clinician's contour for a CT on this node: %s", series_uid, skipped)
        return None
    ct_job = queue.latest_for_series(late.ct_series_uid)
    if ct_job is None:
        log.info("RTSTRUCT series %s: CT series %s was never processed by radnode; skipped", series_uid, late.ct_series_uid)
        return None
    if ct_job.state in (JobState.QUEUED, JobState.RETRYING):
        log.info("RTSTRUCT series %s: job %d of CT series %s has not run yet and will use it", series_uid, ct_job.id, late.ct_series_uid)
        return None
    if ct_job.state in (JobState.FAILED, JobState.CANCELLED):
        log.info("RTSTRUCT series %s: job %d of CT series %s ended %s; skipped", series_uid, ct_job.id, late.ct_series_uid, ct_job.state.value)
        return None
    if ct_job.state is JobState.DONE and _used_structure_set(ct_job, results_dir) in {uid for uid, _ in late.structure_sets}:
        log.info("RTSTRUCT series %s: job %d of CT series %s already used it", series_uid, ct_job.id, late.ct_series_uid)
        return None
    log.info("RTSTRUCT series %s arrived after CT series %s was processed (job %d): redoing its clinician-contour part",
             series_uid, late.ct_series_uid, ct_job.id)
    return JobSpec(
        series_uid=series_uid,
        study_uid=str(event.study_instance_uid),
        input_path=series_dir(data_dir, str(event.study_instance_uid), series_uid),
        pipeline_version=pipeline_version,
        priority=Priority.LIVE,
        source=JobSource.LIVE,
        profile=ct_job.profile,
        destinations=ct_job.destinations,
        instance_count=event.instance_count,
        calling_ae=event.calling_ae,
        max_attempts=settings.pipeline.max_attempts,
        kind=JobKind.CLINICIAN_CONTOUR,
    )


def run_late_contour_chain(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: ProgressHook | None = None,
    on_phase: PhaseHook | None = None,
) -> ChainResult:
    """The chain of a clinician-contour job: ``input_path`` is the RTSTRUCT series' folder.

    Finds the CT the structure sets belong to in the node's index (as :func:`late_contour_job`
    did) and runs :func:`~radnode.pipeline.chain.run_chain` on it in its late-arrival mode.
    """
    from radnode.pipeline.chain import ChainResult, run_chain, write_json_atomically

    data_dir = Path(settings.storage.data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = NodeIndex(data_dir / INDEX_FILE, database_url=settings.database.url)
    try:
        late = resolve(index, data_dir, sorted(p for p in Path(input_path).iterdir() if p.is_file()), settings)
    except LateContourSkipped as skipped:  # the index changed since the job was queued
        result = ChainResult(status="failed", input_path=str(input_path), error=f"no CT for this structure set: {skipped}")
        result.outputs["result"] = RESULT_FILE
        write_json_atomically(out_dir / RESULT_FILE, result.to_dict())
        return result
    finally:
        index.close()
    return run_chain(late.ct_folder, out_dir, settings, progress, on_phase, structure_sets=late.structure_sets)
