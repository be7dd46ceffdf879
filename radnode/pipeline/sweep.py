"""The sweep: find CT series in the archive that were never processed, fetch and queue them.

Steps (PS3.4 Annex C, Query/Retrieve, Study Root information model):

1. C-FIND at STUDY level for studies in a StudyDate range that hold CT
   (ModalitiesInStudy), then at SERIES level per study for series with Modality CT;
2. skip series already handled -- a job for (SeriesInstanceUID, pipeline version) that is
   done, still active, or failed (an operator retries those with ``radnode jobs retry``)
   -- and series the routing rules would not process;
3. retrieve the rest, at most ``sweep.max_concurrent_retrievals`` at a time and at most
   ``sweep.max_series_per_run`` per run: C-MOVE to radnode's own AE (the listener stores
   them in ``<data_dir>/incoming/<study>/<series>/``), or C-GET on the same association
   into ``<data_dir>/sweep/<study>/<series>/`` when ``pacs.retrieve`` is ``get``;
4. queue each retrieved series at sweep priority.

Progress is persisted in ``<data_dir>/sweep.sqlite``: a run that is interrupted (node
stopped, window over, per-run limit reached) is resumed by the next sweep over the same
range, and items already queued are never fetched again. All sweep SQL lives here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from radnode.config import Settings
from radnode.pipeline.sqlite_db import SQLiteDB
from radnode.pipeline.jobs import JobSource, JobSpec, JobState, Priority
from radnode.pipeline.queue import JobQueue

log = logging.getLogger(__name__)

SWEEP_DB = "sweep.sqlite"
SWEEP_LOCK = "sweep.lock"
#: Folder (under the data dir) that C-GET retrievals write to.
SWEEP_DIR = "sweep"
#: Folder (under the data dir) where the listener stores received series.
INCOMING_DIR = "incoming"
#: Modality (0008,0060) the sweep looks for.
CT_MODALITY = "CT"

# DIMSE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4; PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_PENDING_WARNING = 0xFF01
#: C-MOVE/C-GET warning: sub-operations complete, one or more failures or warnings.
STATUS_SUBOPS_WARNING = 0xB000
#: C-MOVE failure: move destination unknown (the PACS does not know radnode's AE title).
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
_CATEGORY_SUCCESS = "Success"
_CATEGORY_PENDING = "Pending"
_CATEGORY_WARNING = "Warning"


class SweepError(RuntimeError):
    """The sweep cannot run (no PACS configured, query refused, already running)."""


class ItemState(StrEnum):
    """Progress of one series within a sweep run."""

    PLANNED = "planned"
    RETRIEVING = "retrieving"
    QUEUED = "queued"
    FAILED = "failed"


class RunState(StrEnum):
    """State of a sweep run."""

    RUNNING = "running"  # in progress, or interrupted (resumed by the next sweep of its range)
    PARTIAL = "partial"  # stopped by the per-run limit or the window; resumed next time
    DONE = "done"


@dataclass(frozen=True)
class SeriesCandidate:
    """A CT series as the archive describes it at SERIES level (no patient data)."""

    study_uid: str
    series_uid: str
    modality: str
    study_date: str | None = None
    series_description: str | None = None
    body_part: str | None = None
    series_number: int | None = None
    instance_count: int | None = None
    station_name: str | None = None
    # From one instance (IMAGE-level C-FIND), only when a routing rule needs them.
    sop_class_uid: str | None = None
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    manufacturer: str | None = None
    software_versions: tuple[str, ...] = ()

    def attributes(self) -> dict[str, Any]:
        """The attributes routing rules test, by DICOM keyword (as the node's index keeps them)."""
        return {
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
            "Modality": self.modality,
            "StudyDate": self.study_date,
            "SeriesDescription": self.series_description,
            "BodyPartExamined": self.body_part,
            "StationName": self.station_name,
            "SOPClassUID": self.sop_class_uid,
            "ImageType": list(self.image_type),
            "SliceThickness": self.slice_thickness,
            "Manufacturer": self.manufacturer,
            "SoftwareVersions": list(self.software_versions),
        }


@dataclass(frozen=True)
class Decision:
    """What the sweep does with one candidate: take it, or skip it and why."""

    candidate: SeriesCandidate
    take: bool
    reason: str
    profile: str = "default"
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetrieveResult:
    """The end of one retrieval."""

    ok: bool
    folder: Path
    completed: int = 0
    failed: int = 0
    status: int | None = None
    error: str | None = None


@dataclass
class SweepReport:
    """What a sweep did (or, with ``dry_run``, would do)."""

    run_id: int | None
    date_from: date
    date_to: date
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)
    queued: list[tuple[str, int]] = field(default_factory=list)  # (series UID, job id)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (series UID, error)
    remaining: int = 0  # planned items left for the next run (limit, window, stop)

    @property
    def taken(self) -> list[Decision]:
        return [d for d in self.decisions if d.take]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.take]


@dataclass(frozen=True)
class RouteVerdict:
    """What the routing rules say about a candidate (see :mod:`radnode.node.routing`)."""

    process: bool
    reason: str
    profile: str = "default"
    destinations: tuple[str, ...] = ()


#: Routing check on the attributes the archive returned at SERIES level.
RouteCheck = Callable[[SeriesCandidate], RouteVerdict]


class Retriever(Protocol):
    """Fetches one series from the archive into a folder the job can read."""

    def retrieve(self, candidate: SeriesCandidate) -> RetrieveResult: ...


def incoming_series_dir(data_dir: Path, study_uid: str, series_uid: str) -> Path:
    """Folder where the listener stores a received series (``<data_dir>/incoming/<study>/<series>``)."""
    return Path(data_dir) / INCOMING_DIR / study_uid / series_uid


def _da(value: date) -> str:
    """A date as DICOM DA (PS3.5 6.2: YYYYMMDD)."""
    return value.strftime("%Y%m%d")


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class _Association:
    """Opens associations to the configured PACS with our AE title and timeouts."""

    def __init__(self, settings: Settings) -> None:
        if settings.pacs is None:
            raise SweepError("the sweep needs a 'pacs' section (ae_title, host, port) to query")
        self.settings = settings
        self.pacs = settings.pacs

    def ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        return ae

    def open(self, ae: AE, **kwargs: Any) -> Any:
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, **kwargs)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted"
            raise SweepError(f"PACS {self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port} {why}")
        return assoc


def rules_need_instance_level(settings: Settings) -> bool:
    """Whether a routing rule tests attributes an archive only returns per instance."""
    return any(
        rule.match.image_type_contains is not None
        or rule.match.slice_thickness_min is not None
        or rule.match.slice_thickness_max is not None
        for rule in settings.routing
    )


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split("\\") if v.strip())
    try:
        return tuple(str(v).strip() for v in value)
    except TypeError:
        return (str(value).strip(),)


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class ArchiveQuery(_Association):
    """C-FIND against the configured PACS (Study Root, PS3.4 C.6.2).

    Parameters
    ----------
    settings
        PACS address, our AE title, timeouts.
    instance_level
        Also C-FIND one series' instances for Image Type, Slice Thickness, SOP Class,
        Manufacturer (routing rules on those cannot be judged from SERIES level).
    """

    def __init__(self, settings: Settings, instance_level: bool = False) -> None:
        super().__init__(settings)
        self.instance_level = instance_level

    def _instance_facts(self, assoc: Any, study_uid: str, series_uid: str) -> dict[str, Any]:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = ""
        query.SOPClassUID = ""
        query.ImageType = ""
        query.SliceThickness = ""
        query.Manufacturer = ""
        query.SoftwareVersions = ""
        matches = self._find(assoc, query)
        if not matches:
            return {}
        first = matches[0]
        return {
            "sop_class_uid": _text(first, "SOPClassUID"),
            "image_type": _multi(first, "ImageType"),
            "slice_thickness": _float(first, "SliceThickness"),
            "manufacturer": _text(first, "Manufacturer"),
            "software_versions": _multi(first, "SoftwareVersions"),
        }

    def _find(self, assoc: Any, identifier: Dataset) -> list[Dataset]:
        matches: list[Dataset] = []
        for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                raise SweepError("C-FIND got no response from the PACS (timeout or abort)")
            code = int(status.Status)
            category = code_to_category(code)
            if category == _CATEGORY_PENDING and found is not None:
                matches.append(found)
            elif category not in (_CATEGORY_PENDING, _CATEGORY_SUCCESS):
                raise SweepError(f"C-FIND refused by the PACS with status 0x{code:04X}")
        return matches

    def series(self, date_from: date, date_to: date, modality: str = CT_MODALITY) -> list[SeriesCandidate]:
        """All series of ``modality`` in studies dated within ``[date_from, date_to]``."""
        ae = self.ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self.open(ae)
        try:
            study = Dataset()
            study.QueryRetrieveLevel = "STUDY"
            study.StudyInstanceUID = ""
            study.StudyDate = f"{_da(date_from)}-{_da(date_to)}"
            study.ModalitiesInStudy = modality
            studies = self._find(assoc, study)
            candidates: list[SeriesCandidate] = []
            for found in studies:
                study_uid = _text(found, "StudyInstanceUID")
                if not study_uid:
                    continue
                query = Dataset()
                query.QueryRetrieveLevel = "SERIES"
                query.StudyInstanceUID = study_uid
                query.SeriesInstanceUID = ""
                query.Modality = modality
                query.SeriesNumber = ""
                query.SeriesDescription = ""
                query.BodyPartExamined = ""
                query.StationName = ""
                query.NumberOfSeriesRelatedInstances = ""
                for series in self._find(assoc, query):
                    series_uid = _text(series, "SeriesInstanceUID")
                    series_modality = _text(series, "Modality") or ""
                    if not series_uid or series_modality.upper() != modality:
                        continue  # an archive that ignores the Modality key still returns others
                    extra = self._instance_facts(assoc, study_uid, series_uid) if self.instance_level else {}
                    candidates.append(
                        SeriesCandidate(
                            study_uid=study_uid,
                            series_uid=series_uid,
                            modality=series_modality,
                            study_date=_text(found, "StudyDate"),
                            series_description=_text(series, "SeriesDescription"),
                            body_part=_text(series, "BodyPartExamined"),
                            series_number=_int(series, "SeriesNumber"),
                            instance_count=_int(series, "NumberOfSeriesRelatedInstances"),
                            station_name=_text(series, "StationName"),
                            **extra,
                        )
                    )
        finally:
            assoc.release()
        log.info("sweep C-FIND %s..%s: %d study(ies), %d CT series", date_from, date_to, len(studies), len(candidates))
        return candidates


def _retrieve_identifier(candidate: SeriesCandidate) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = candidate.study_uid
    identifier.SeriesInstanceUID = candidate.series_uid
    return identifier


def _final_status(responses: Iterator[tuple[Dataset, Dataset | None]]) -> tuple[int | None, int, int]:
    """Consume C-MOVE/C-GET responses; return (final status, completed, failed sub-operations)."""
    final: int | None = None
    completed = failed = 0
    for status, _identifier in responses:
        if "Status" not in status:
            return None, completed, failed
        final = int(status.Status)
        completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
        failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
    return final, completed, failed


def _retrieve_outcome(candidate: SeriesCandidate, folder: Path, final: int | None, completed: int, failed: int, verb: str) -> RetrieveResult:
    if final is None:
        return RetrieveResult(False, folder, completed, failed, None, f"{verb}: no response from the PACS (timeout or abort)")
    category = code_to_category(final)
    if category == _CATEGORY_SUCCESS or (category == _CATEGORY_WARNING and completed > 0):
        if failed:
            log.warning("%s of series %s: %d sub-operation(s) failed, %d completed", verb, candidate.series_uid, failed, completed)
        return RetrieveResult(True, folder, completed, failed, final)
    hint = " (the PACS does not know radnode's AE title as a move destination)" if final == STATUS_MOVE_DESTINATION_UNKNOWN else ""
    return RetrieveResult(False, folder, completed, failed, final, f"{verb} failed with status 0x{final:04X}{hint}")


class MoveRetriever(_Association):
    """C-MOVE a series to radnode's own AE title (the listener receives it)."""

    def retrieve(self, candidate: SeriesCandidate) -> RetrieveResult:
        folder = incoming_series_dir(self.settings.storage.data_dir, candidate.study_uid, candidate.series_uid)
        ae = self.ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        try:
            assoc = self.open(ae)
        except SweepError as exc:
            return RetrieveResult(False, folder, error=str(exc))
        try:
            final, completed, failed = _final_status(
                assoc.send_c_move(
                    _retrieve_identifier(candidate), self.settings.node.ae_title, StudyRootQueryRetrieveInformationModelMove
                )
            )
        finally:
            if assoc.is_established:
                assoc.release()
        return _retrieve_outcome(candidate, folder, final, completed, failed, "C-MOVE")


class GetRetriever(_Association):
    """C-GET a series over one association into ``<data_dir>/sweep/<study>/<series>/``."""

    def retrieve(self, candidate: SeriesCandidate) -> RetrieveResult:
        folder = Path(self.settings.storage.data_dir) / SWEEP_DIR / candidate.study_uid / candidate.series_uid
        folder.mkdir(parents=True, exist_ok=True)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            fd, tmp = tempfile.mkstemp(prefix=".get.", dir=folder)
            os.close(fd)
            try:
                ds.save_as(tmp, enforce_file_format=True)
                os.replace(tmp, folder / f"{ds.SOPInstanceUID}.dcm")
            except Exception:
                Path(tmp).unlink(missing_ok=True)
                log.exception("C-GET: could not store an instance of series %s", candidate.series_uid)
                return 0xA700  # out of resources (PS3.4 B.2.3)
            return STATUS_SUCCESS

        ae = self.ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        try:
            assoc = self.open(ae, ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
        except SweepError as exc:
            return RetrieveResult(False, folder, error=str(exc))
        try:
            final, completed, failed = _final_status(
                assoc.send_c_get(_retrieve_identifier(candidate), StudyRootQueryRetrieveInformationModelGet)
            )
        finally:
            if assoc.is_established:
                assoc.release()
        return _retrieve_outcome(candidate, folder, final, completed, failed, "C-GET")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    date_from   TEXT NOT NULL,
    date_to     TEXT NOT NULL,
    state       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL,
    found       INTEGER NOT NULL DEFAULT 0,
    skipped     INTEGER NOT NULL DEFAULT 0,
    queued      INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE TABLE IF NOT EXISTS items (
    run_id         INTEGER NOT NULL REFERENCES runs (id),
    series_uid     TEXT    NOT NULL,
    study_uid      TEXT    NOT NULL,
    instance_count INTEGER,
    state          TEXT    NOT NULL,
    job_id         INTEGER,
    error          TEXT,
    updated_at     REAL    NOT NULL,
    PRIMARY KEY (run_id, series_uid)
);
"""


class SweepStore:
    """Persisted progress of sweep runs (``<data_dir>/sweep.sqlite``)."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / SWEEP_DB
        self._clock = clock
        self._db = SQLiteDB(self.path, _SCHEMA)


    def open_run(self, date_from: date, date_to: date) -> tuple[int, bool]:
        """Resume the unfinished run over this range, or start one; returns (run id, resumed)."""
        now = self._clock()
        with self._db.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT id FROM runs WHERE date_from = ? AND date_to = ? AND state != ? ORDER BY id DESC LIMIT 1",
                (date_from.isoformat(), date_to.isoformat(), RunState.DONE.value),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE runs SET state = ?, updated_at = ? WHERE id = ?", (RunState.RUNNING.value, now, row["id"])
                )
                conn.execute("COMMIT")
                return int(row["id"]), True
            cursor = conn.execute(
                "INSERT INTO runs (date_from, date_to, state, started_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (date_from.isoformat(), date_to.isoformat(), RunState.RUNNING.value, now, now),
            )
            conn.execute("COMMIT")
            return int(cursor.lastrowid or 0), False

    def plan(self, run_id: int, candidate: SeriesCandidate) -> None:
        """Add a series to a run (kept as it is when the run already has it)."""
        with self._db.connect() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO items (run_id, series_uid, study_uid, instance_count, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, candidate.series_uid, candidate.study_uid, candidate.instance_count, ItemState.PLANNED.value, self._clock()),
            )

    def set_item(self, run_id: int, series_uid: str, state: ItemState, job_id: int | None = None, error: str | None = None) -> None:
        with self._db.connect() as conn:
            conn.execute(
                "UPDATE items SET state = ?, job_id = COALESCE(?, job_id), error = ?, updated_at = ? "
                "WHERE run_id = ? AND series_uid = ?",
                (ItemState(state).value, job_id, error, self._clock(), run_id, series_uid),
            )

    def open_items(self, run_id: int) -> list[dict[str, Any]]:
        """Items still to fetch (planned, or interrupted while retrieving), oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE run_id = ? AND state IN (?, ?) ORDER BY rowid",
                (run_id, ItemState.PLANNED.value, ItemState.RETRIEVING.value),
            ).fetchall()
        return [dict(r) for r in rows]

    def finish_run(self, run_id: int, state: RunState, found: int, skipped: int, error: str | None = None) -> None:
        now = self._clock()
        with self._db.connect() as conn:
            counts = {
                r["state"]: r["n"]
                for r in conn.execute("SELECT state, COUNT(*) AS n FROM items WHERE run_id = ? GROUP BY state", (run_id,))
            }
            conn.execute(
                "UPDATE runs SET state = ?, updated_at = ?, finished_at = ?, found = ?, skipped = ?, queued = ?, "
                "failed = ?, error = ? WHERE id = ?",
                (
                    state.value,
                    now,
                    now if state is RunState.DONE else None,
                    found,
                    skipped,
                    counts.get(ItemState.QUEUED.value, 0),
                    counts.get(ItemState.FAILED.value, 0),
                    error,
                    run_id,
                ),
            )

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """Latest runs first."""
        with self._db.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()]

    def items(self, run_id: int) -> list[dict[str, Any]]:
        with self._db.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM items WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()]


@contextmanager
def sweep_lock(data_dir: Path) -> Iterator[None]:
    """Only one sweep per data folder at a time (the scheduled one, or ``radnode sweep``)."""
    path = Path(data_dir) / SWEEP_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SweepError(f"another sweep is running on {data_dir} (lock {path})") from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Sweeper:
    """Runs sweeps against ``settings.pacs`` and queues what it fetches.

    Parameters
    ----------
    settings
        PACS, sweep limits, our AE title, data folder.
    queue
        Where retrieved series are queued (at :attr:`Priority.SWEEP`).
    pipeline_version
        Chain version of the "already processed" check.
    route
        Routing check on the C-FIND attributes; ``None`` accepts every CT series.
    query, retriever
        Replaceable for other archives; default to C-FIND and C-MOVE/C-GET per ``pacs.retrieve``.
    """

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        pipeline_version: str,
        route: RouteCheck | None = None,
        query: ArchiveQuery | None = None,
        retriever: Retriever | None = None,
        store: SweepStore | None = None,
    ) -> None:
        if settings.pacs is None:
            raise SweepError("the sweep needs a 'pacs' section (ae_title, host, port) to query")
        self.settings = settings
        self.queue = queue
        self.pipeline_version = pipeline_version
        self.route = route
        self.query = query or ArchiveQuery(settings)
        if retriever is None:
            retriever = GetRetriever(settings) if settings.pacs.retrieve == "get" else MoveRetriever(settings)
        self.retriever = retriever
        self.data_dir = Path(settings.storage.data_dir)
        self.store = store or SweepStore(self.data_dir)

    def decide(self, candidate: SeriesCandidate) -> Decision:
        """Take a candidate, or say why it is skipped."""
        latest = self.queue.latest_for_series(candidate.series_uid, self.pipeline_version)
        if latest is not None:
            if latest.state is JobState.DONE:
                return Decision(candidate, False, f"already processed (job {latest.id}, pipeline {self.pipeline_version})")
            if latest.active:
                return Decision(candidate, False, f"already queued (job {latest.id}, {latest.state.value})")
            if latest.state is JobState.FAILED:
                return Decision(
                    candidate, False, f"failed before (job {latest.id}: {latest.reason}); use `radnode jobs retry {latest.id}`"
                )
        if self.route is not None:
            verdict = self.route(candidate)
            if not verdict.process:
                return Decision(candidate, False, f"routing: {verdict.reason}")
            return Decision(candidate, True, f"never processed; {verdict.reason}", verdict.profile, verdict.destinations)
        return Decision(candidate, True, "never processed")

    def run(
        self,
        date_from: date,
        date_to: date,
        dry_run: bool = False,
        limit: int | None = None,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> SweepReport:
        """Sweep ``[date_from, date_to]``.

        Parameters
        ----------
        dry_run
            Query and decide only: nothing is retrieved, queued or persisted.
        limit
            Series to retrieve in this run (default ``sweep.max_series_per_run``).
        deadline
            Unix time after which no new retrieval starts (end of the off-peak window).
        stop
            Set to interrupt between retrievals (node shutdown).
        """
        if date_to < date_from:
            raise SweepError(f"sweep range is empty: --from {date_from} is after --to {date_to}")
        limit = self.settings.sweep.max_series_per_run if limit is None else limit
        candidates = self.query.series(date_from, date_to)
        report = SweepReport(None, date_from, date_to, dry_run, decisions=[self.decide(c) for c in candidates])
        if dry_run:
            return report
        with sweep_lock(self.data_dir):
            run_id, resumed = self.store.open_run(date_from, date_to)
            report.run_id = run_id
            if resumed:
                log.info("resuming sweep run %d over %s..%s", run_id, date_from, date_to)
            for decision in report.taken:
                self.store.plan(run_id, decision.candidate)
            by_uid = {d.candidate.series_uid: d for d in report.taken}
            wanted = set(by_uid)
            todo: list[Decision] = []
            for item in self.store.open_items(run_id):
                if item["series_uid"] not in wanted:
                    # Planned earlier but now handled elsewhere (or gone from the archive).
                    reason = next((d.reason for d in report.skipped if d.candidate.series_uid == item["series_uid"]), "no longer found")
                    self.store.set_item(run_id, item["series_uid"], ItemState.FAILED, error=f"skipped on resume: {reason}")
                    continue
                todo.append(by_uid[item["series_uid"]])
            batch = todo[:limit]
            report.remaining = len(todo) - len(batch)
            self._retrieve_all(run_id, batch, report, deadline, stop)
            state = RunState.DONE if report.remaining == 0 else RunState.PARTIAL
            self.store.finish_run(run_id, state, found=len(candidates), skipped=len(report.skipped))
        log.info(
            "sweep %s..%s: %d CT series, %d skipped, %d queued, %d failed, %d left for the next run",
            date_from, date_to, len(candidates), len(report.skipped), len(report.queued), len(report.failed), report.remaining,
        )
        return report

    def _retrieve_all(
        self,
        run_id: int,
        batch: Sequence[Decision],
        report: SweepReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        lock = threading.Lock()

        def one(decision: Decision) -> None:
            candidate = decision.candidate
            if (stop is not None and stop.is_set()) or (deadline is not None and time.time() >= deadline):
                with lock:
                    report.remaining += 1
                return
            self.store.set_item(run_id, candidate.series_uid, ItemState.RETRIEVING)
            try:
                result = self.retriever.retrieve(candidate)
            except Exception as exc:  # one bad series must not end the sweep
                log.exception("sweep: retrieving series %s failed", candidate.series_uid)
                result = RetrieveResult(False, self.data_dir, error=f"{type(exc).__name__}: {exc}")
            if not result.ok:
                self.store.set_item(run_id, candidate.series_uid, ItemState.FAILED, error=result.error)
                with lock:
                    report.failed.append((candidate.series_uid, result.error or "retrieval failed"))
                log.warning("sweep: series %s not retrieved: %s", candidate.series_uid, result.error)
                return
            job = self.queue.enqueue(
                JobSpec(
                    series_uid=candidate.series_uid,
                    study_uid=candidate.study_uid,
                    input_path=result.folder,
                    pipeline_version=self.pipeline_version,
                    priority=Priority.SWEEP,
                    source=JobSource.SWEEP,
                    profile=decision.profile,
                    destinations=decision.destinations,
                    instance_count=result.completed or candidate.instance_count,
                    max_attempts=self.settings.pipeline.max_attempts,
                )
            )
            self.store.set_item(run_id, candidate.series_uid, ItemState.QUEUED, job_id=job.id)
            with lock:
                report.queued.append((candidate.series_uid, job.id))

        workers = max(1, min(self.settings.sweep.max_concurrent_retrievals, len(batch) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radnode-sweep") as pool:
            list(pool.map(one, batch))
