"""The outbox: result objects wait here, on disk and in the database, until every destination has them.

A job's result objects (or a forwarded series' received files) are put, byte for byte, at
``<data_dir>/outbox/<SOPInstanceUID>.dcm`` (a hard link where possible, else a copy; durably,
see :mod:`radnode.durable`) and one *item* per (SOP Instance UID, destination) is recorded in
``<data_dir>/outbox.sqlite`` -- or, with ``database.url`` set, in the ``outbox_*`` tables of
that PostgreSQL database (one implementation for both, see :mod:`radnode.sqlstore`), where
every process of the node and ``radnode status`` see one delivery state. The files stay on
the node's disk in both cases: only the node delivers, and the DICOM bytes would only bloat
the shared database and its backups. The dispatcher (:mod:`radnode.pipeline.dispatch`) sends
due items and reports every attempt back here. The rules this module enforces:

* **exactly once per (object, destination)**: the item table has a unique key on
  ``(sop_instance_uid, destination)``; staging the same object again (a re-run after a
  crash derives the same UIDs) adds nothing, and a ``sent`` item is never sent again.
  A crash between the peer's success response and the ``sent`` record makes the next
  start send that one object again; since the SOP Instance UID is the same, the archive
  still holds it once (PS3.4 B.4.1: a C-STORE of a known SOP Instance UID replaces or is
  ignored, it never adds a second instance);
* **a down destination delays, never loses**: when the association cannot be established
  the destination's items wait with exponential backoff, forever; only a *peer status*
  failure (PS3.4 B.2.3, e.g. 0xA700 out of resources, 0xA900 data set does not match SOP
  class, 0xCxxx cannot understand) counts towards ``max_attempts``, after which the item
  is ``failed``, visible in ``radnode status`` and re-armed by ``radnode jobs retry``;
* **every attempt is persisted** with its outcome and the peer's status code;
* **a reviewed destination gets only what a reviewer let go**: items staged
  ``awaiting_review`` (a destination with ``requires_approval``, or ``uncertain_contour:
  hold`` on an uncertain contour) are never due; :meth:`Outbox.decide` records the one
  decision per job and, in the same transaction, puts the approved RTSTRUCT copy in place
  of the original (``replaced``), lets the other objects go or marks them ``rejected``
  (see :mod:`radnode.pipeline.review`).

Every read-then-update (an attempt, a decision, a destination's failure count) runs in the
store's exclusive write transaction -- ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
PostgreSQL -- so processes sharing the outbox never lose one another's updates. All outbox
SQL lives in this module.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from radnode import durable
from radnode.config import Destination, ResultObject
from radnode.node.status import format_status
from radnode.pipeline.database import is_postgres_url
from radnode.pipeline.sqlite_db import in_clause, where
from radnode.pipeline.jobs import Backoff, Phase, phase_of
from radnode.sqlstore import Dialect, open_store

log = logging.getLogger(__name__)

OUTBOX_DIR = "outbox"
OUTBOX_DB = "outbox.sqlite"
#: Default number of peer-refused attempts before an item is marked failed.
DEFAULT_MAX_ATTEMPTS = 8
#: Default backoff between attempts (per item after a refusal, per destination when down).
DEFAULT_BACKOFF = Backoff(base_seconds=10.0, factor=2.0, max_seconds=600.0)

#: Modality (0008,0060) of each result object (PS3.3 C.8.20.1, C.8.8.1, C.17.1).
MODALITY_TO_OBJECT: dict[str, ResultObject] = {
    "SEG": ResultObject.SEG,
    "RTSTRUCT": ResultObject.RTSTRUCT,
    "SR": ResultObject.SR,
}


class ItemState(StrEnum):
    """Delivery state of one (object, destination) item."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    #: Waits for a reviewer: a destination with ``requires_approval``, or ``uncertain_contour:
    #: hold`` when the tumour contour is uncertain. One state for both: one review decides.
    AWAITING_REVIEW = "awaiting_review"
    REJECTED = "rejected"  # a reviewer rejected it (or a structure it carries): never sent
    REPLACED = "replaced"  # an RTSTRUCT whose approved copy goes instead: never sent
    HELD = "awaiting_review"  # the earlier name of AWAITING_REVIEW (an alias)


#: Item states that never change again (kept as the proof of what was, or was not, sent).
FINAL_STATES = (ItemState.SENT, ItemState.REJECTED, ItemState.REPLACED)


class ReviewError(ValueError):
    """A review decision the outbox refuses (nothing awaits review, or the job was decided)."""


@dataclass(frozen=True)
class ReviewDecision:
    """A reviewer's decision on one job's contours, for every destination that waits for it."""

    job_id: int
    decision: str  # "approved" or "rejected"
    reviewer: str
    decided_at: float
    comment: str = ""
    approved_structures: tuple[str, ...] = ()
    rejected_structures: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    approved_objects: tuple[str, ...] = ()

    @property
    def approved(self) -> bool:
        return self.decision == "approved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "decision": self.decision, "reviewer": self.reviewer, "decided_at": self.decided_at,
            "comment": self.comment, "approved_structures": list(self.approved_structures),
            "rejected_structures": list(self.rejected_structures), "destinations": list(self.destinations),
            "approved_objects": list(self.approved_objects),
        }


class AttemptOutcome(StrEnum):
    """How one send attempt ended."""

    SUCCESS = "success"  # status 0x0000
    WARNING = "warning"  # stored, with a warning status (PS3.4 B.2.3: 0xB000, 0xB006, 0xB007)
    REFUSED = "refused"  # a failure status from the peer; counts towards max_attempts
    UNREACHABLE = "unreachable"  # no association (down, rejected, aborted): delays only
    LOCAL_ERROR = "local_error"  # the outbox file is unreadable; counts towards max_attempts


class DestinationState(StrEnum):
    """Health of a destination as seen from its latest association."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class OutboxItem:
    """One object waiting for (or delivered to) one destination."""

    id: int
    sop_instance_uid: str
    destination: str
    state: ItemState
    attempts: int
    refusals: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    sent_at: float | None
    last_status: int | None
    last_error: str | None
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    object_type: str
    phase: str | None
    job_id: int | None
    series_uid: str | None
    source_series_uid: str | None


@dataclass(frozen=True)
class DestinationHealth:
    """What ``radnode status`` shows per destination."""

    name: str
    state: DestinationState
    consecutive_failures: int
    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None
    pending: int
    sent: int
    failed: int
    held: int = 0  # items awaiting review (the field keeps its first name)
    rejected: int = 0

    @property
    def awaiting_review(self) -> int:
        """Items waiting for a reviewer (:attr:`ItemState.AWAITING_REVIEW`)."""
        return self.held


@dataclass(frozen=True)
class _Header:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    study_uid: str | None
    series_uid: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS {objects} (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    object_type         TEXT NOT NULL,
    phase               TEXT,
    study_uid           TEXT,
    series_uid          TEXT,
    source_series_uid   TEXT,
    job_id              INTEGER,
    path                TEXT NOT NULL,
    staged_at           REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS {items} (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT    NOT NULL REFERENCES {objects} (sop_instance_uid),
    destination      TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    refusals         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL    NOT NULL,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    sent_at          REAL,
    last_status      INTEGER,
    last_error       TEXT,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS {items_due} ON {items} (state, destination, next_attempt_at);
CREATE TABLE IF NOT EXISTS {attempts} (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id     INTEGER NOT NULL REFERENCES {items} (id),
    started_at  REAL    NOT NULL,
    finished_at REAL    NOT NULL,
    outcome     TEXT    NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS {attempts_item} ON {attempts} (item_id);
CREATE TABLE IF NOT EXISTS {reviews} (
    job_id              INTEGER PRIMARY KEY,
    decision            TEXT NOT NULL,
    reviewer            TEXT NOT NULL,
    decided_at          REAL NOT NULL,
    comment             TEXT NOT NULL DEFAULT '',
    approved_structures TEXT NOT NULL DEFAULT '[]',
    rejected_structures TEXT NOT NULL DEFAULT '[]',
    destinations        TEXT NOT NULL DEFAULT '[]',
    approved_objects    TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS {destinations} (
    name                 TEXT PRIMARY KEY,
    state                TEXT NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_success_at      REAL,
    last_failure_at      REAL,
    last_error           TEXT
);
"""

#: The outbox's tables and indexes, as its SQL names them (``{items}``).
TABLE_KEYS = ("objects", "items", "attempts", "reviews", "destinations", "items_due", "attempts_item")
#: Names in the SQLite file: those of every existing data folder.
SQLITE_TABLES: dict[str, str] = {key: key for key in TABLE_KEYS}
#: Names in PostgreSQL, where the outbox shares one database (and one namespace of tables and
#: indexes) with the job queue, the series index and the audit trail: ``items`` or ``objects``
#: alone would be ambiguous there, so every name carries the store's prefix.
POSTGRES_TABLES: dict[str, str] = {key: f"outbox_{key}" for key in TABLE_KEYS}
#: Tables in the order their rows may be inserted (references point backwards).
ROW_TABLES = ("objects", "items", "attempts", "reviews", "destinations")


class _NamedConnection:
    """A connection of either engine whose SQL names the outbox tables ``{items}``, ``{objects}``, …

    The names are filled in per backend (:data:`SQLITE_TABLES`, :data:`POSTGRES_TABLES`), so
    every statement of this module is written once for both.
    """

    def __init__(self, conn: Any, tables: dict[str, str]) -> None:
        self._conn = conn
        self._tables = tables

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.format_map(self._tables), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._conn.executemany(sql.format_map(self._tables), rows)


class _NamedStore:
    """The outbox's :class:`~radnode.sqlstore.SQLStore`, handing out :class:`_NamedConnection` s."""

    def __init__(self, store: Any, tables: dict[str, str]) -> None:
        self.store = store
        self.tables = tables

    @contextmanager
    def connect(self) -> Iterator[_NamedConnection]:
        with self.store.connect() as conn:
            yield _NamedConnection(conn, self.tables)

    @contextmanager
    def write(self) -> Iterator[_NamedConnection]:
        with self.store.write() as conn:
            yield _NamedConnection(conn, self.tables)


def create_postgres_tables(url: str) -> None:
    """Create the outbox tables in the PostgreSQL database at ``url`` (``radnode db init``, as their owner).

    Needs no data folder: the tables hold rows only; the files are the node's business.
    """
    open_store(Path(OUTBOX_DB), _SCHEMA.format_map(POSTGRES_TABLES), url, POSTGRES_TABLES["items"], "outbox")


def outbox_exists(data_dir: Path, database_url: str | None = None) -> bool:
    """Whether the node has an outbox to read, without creating one.

    On PostgreSQL the tables are shared and opening them creates nothing in the data folder,
    so there is always one; embedded, only once ``outbox.sqlite`` exists (read-only commands
    such as ``radnode status`` must not create it).
    """
    return is_postgres_url(database_url) or (Path(data_dir) / OUTBOX_DB).exists()


_ITEM_SELECT = (
    "SELECT i.*, o.path, o.sop_class_uid, o.transfer_syntax_uid, o.object_type, o.phase, o.job_id, "
    "o.series_uid, o.source_series_uid FROM {items} i JOIN {objects} o ON o.sop_instance_uid = i.sop_instance_uid"
)


class Outbox:
    """Result objects under ``<data_dir>/outbox`` and their delivery state (SQLite file or PostgreSQL).

    Parameters
    ----------
    data_dir
        The node's data folder (``storage.data_dir``).
    backoff
        Delay schedule after failed attempts.
    max_attempts
        Peer-refused attempts before an item is ``failed``.
    clock
        Source of "now" (tests pass a fake one).
    database_url
        ``database.url``: with a ``postgresql://`` URL the rows live in that database's
        ``outbox_*`` tables (shared by every process of the node); unset, in
        ``<data_dir>/outbox.sqlite``. The object files stay under ``<data_dir>/outbox``
        either way: only the node sends them.
    """

    def __init__(
        self,
        data_dir: Path,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        database_url: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"outbox max_attempts must be >= 1, got {max_attempts}")
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / OUTBOX_DIR
        self.db_path = self.data_dir / OUTBOX_DB
        self.backoff = backoff
        self.max_attempts = max_attempts
        self._clock = clock
        shared = is_postgres_url(database_url)
        if not shared:  # on PostgreSQL, opening (`radnode status`, the dashboard) writes nothing here
            self.folder.mkdir(parents=True, exist_ok=True)
        tables = POSTGRES_TABLES if shared else SQLITE_TABLES
        store = open_store(self.db_path, _SCHEMA.format_map(tables), database_url, tables["items"], "outbox")
        self._db = _NamedStore(store, tables)
        with self._db.connect() as conn:  # items of a node from before the review gate (read first: status is read-only)
            held = conn.execute("SELECT 1 FROM {items} WHERE state = 'held' LIMIT 1").fetchone() is not None
        if held:
            with self._db.write() as conn:
                conn.execute("UPDATE {items} SET state = ? WHERE state = 'held'", (ItemState.AWAITING_REVIEW.value,))

    def describe(self) -> str:
        """Where the rows live, for logs (no password)."""
        return str(self._db.store.describe())

    @staticmethod
    def _item(row: Any) -> OutboxItem:
        return OutboxItem(
            id=row["id"],
            sop_instance_uid=row["sop_instance_uid"],
            destination=row["destination"],
            state=ItemState(row["state"]),
            attempts=row["attempts"],
            refusals=row["refusals"],
            next_attempt_at=row["next_attempt_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            sent_at=row["sent_at"],
            last_status=row["last_status"],
            last_error=row["last_error"],
            path=Path(row["path"]),
            sop_class_uid=row["sop_class_uid"],
            transfer_syntax_uid=row["transfer_syntax_uid"],
            object_type=row["object_type"],
            phase=row["phase"],
            job_id=row["job_id"],
            series_uid=row["series_uid"],
            source_series_uid=row["source_series_uid"],
        )

    # -- staging ------------------------------------------------------------------------

    @staticmethod
    def _read_header(path: Path) -> _Header:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError) as exc:
            raise ValueError(f"cannot stage {path}: not a readable DICOM file ({exc})") from exc
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
        if not sop_uid or not sop_class or not ts:
            raise ValueError(
                f"cannot stage {path}: SOPInstanceUID (0008,0018), SOPClassUID (0008,0016) and the "
                "file meta TransferSyntaxUID (0002,0010) are all required"
            )
        return _Header(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            modality=str(ds.get("Modality", "") or ""),
            study_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
            series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
        )

    def _copy_in(self, source: Path, sop_uid: str) -> Path:
        """Put ``source`` at ``<outbox>/<sop_uid>.dcm`` durably, byte for byte; keep an
        existing copy. A hard link where possible: sources (received instances, finished
        results) are never modified in place, and either name can be deleted alone."""
        target = self.folder / f"{sop_uid}.dcm"
        if target.exists():
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        return durable.copy_file(source, target, link=True)

    def stage(
        self,
        files: Iterable[Path],
        destinations: Sequence[Destination],
        *,
        job_id: int | None = None,
        source_series_uid: str | None = None,
        result_objects_only: bool = True,
        only_phase: Phase | None = None,
        hold: bool = False,
    ) -> list[OutboxItem]:
        """Copy objects into the outbox and create one item per wanted destination.

        Parameters
        ----------
        files
            DICOM files to stage.
        destinations
            Candidates; a destination receives an object only if the object's type is in
            its ``objects`` list (result objects) -- or always, for forwarded objects when
            ``result_objects_only`` is false.
        job_id, source_series_uid
            Links back to the job and the input series (shown in ``status``).
        result_objects_only
            Stage only SEG / RTSTRUCT / SR; other files are skipped with a log line.
        only_phase
            Stage only the objects of this delivery phase (the others are not complete yet).
        hold
            Create the new items ``awaiting_review``: they wait for :meth:`decide` (or
            :meth:`release`); items that exist already keep their state. When the job was
            decided already (a report phase staged after the review), the decision applies
            to them at once.

        Returns
        -------
        list of OutboxItem
            Every item for the staged objects, including ones that existed already.
        """
        now = self._clock()
        staged_uids: list[str] = []
        for path in files:
            header = self._read_header(Path(path))
            result_object = MODALITY_TO_OBJECT.get(header.modality)
            if result_object is None and result_objects_only:
                log.debug("not staging %s: Modality %r is no result object", path, header.modality)
                continue
            phase = phase_of(result_object) if result_object is not None else None
            if only_phase is not None and phase is not only_phase:
                continue
            stored = self._copy_in(Path(path), header.sop_instance_uid)
            wanted = [
                d.name
                for d in destinations
                if result_object is None or result_object in d.objects
            ]
            with self._db.write() as conn:
                conn.execute(
                    "INSERT INTO {objects} (sop_instance_uid, sop_class_uid, transfer_syntax_uid, object_type, "
                    "phase, study_uid, series_uid, source_series_uid, job_id, path, staged_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                    (
                        header.sop_instance_uid,
                        header.sop_class_uid,
                        header.transfer_syntax_uid,
                        result_object.value if result_object is not None else (header.modality or "OT"),
                        phase.value if phase is not None else None,
                        header.study_uid,
                        header.series_uid,
                        source_series_uid,
                        job_id,
                        str(stored),
                        now,
                    ),
                )
                for name in wanted:
                    conn.execute(
                        "INSERT INTO {items} (sop_instance_uid, destination, state, next_attempt_at, "
                        "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                        (header.sop_instance_uid, name,
                         (ItemState.AWAITING_REVIEW if hold else ItemState.PENDING).value, now, now, now),
                    )
                if hold and job_id is not None:
                    decided = self._review_row(conn, job_id)
                    if decided is not None:
                        self._apply_decision(conn, decided, {}, now)
            staged_uids.append(header.sop_instance_uid)
            log.info(
                "staged %s %s (job %s) for %s",
                result_object.value if result_object else header.modality,
                header.sop_instance_uid,
                job_id,
                ", ".join(wanted) or "no destination",
            )
        if not staged_uids:
            return []
        marks = ",".join("?" * len(staged_uids))
        with self._db.connect() as conn:
            rows = conn.execute(f"{_ITEM_SELECT} WHERE i.sop_instance_uid IN ({marks}) ORDER BY i.id", staged_uids)
            return [self._item(r) for r in rows.fetchall()]

    # -- dispatching --------------------------------------------------------------------

    def due(self, destinations: Iterable[str] | None = None, limit: int = 500) -> dict[str, list[OutboxItem]]:
        """Pending items whose next attempt is due, grouped by destination, oldest first."""
        now = self._clock()
        query = f"{_ITEM_SELECT} WHERE i.state = ? AND i.next_attempt_at <= ?"
        params: list[Any] = [ItemState.PENDING.value, now]
        if destinations is not None:
            names = list(destinations)
            if not names:
                return {}
            clause, names = in_clause("i.destination", names)
            query += clause
            params += names
        query += " ORDER BY i.destination, o.phase NULLS FIRST, i.id LIMIT ?"
        params.append(int(limit))
        grouped: dict[str, list[OutboxItem]] = {}
        with self._db.connect() as conn:
            for row in conn.execute(query, params).fetchall():
                item = self._item(row)
                grouped.setdefault(item.destination, []).append(item)
        return grouped

    def next_due_at(self, destinations: Iterable[str] | None = None) -> float | None:
        """When the earliest pending item (of these destinations) becomes due; ``None`` if none."""
        query = "SELECT MIN(next_attempt_at) AS t FROM {items} WHERE state = ?"
        params: list[Any] = [ItemState.PENDING.value]
        if destinations is not None:
            names = list(destinations)
            if not names:
                return None
            clause, names = in_clause("destination", names)
            query += clause
            params += names
        with self._db.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return row["t"] if row is not None else None

    def record(
        self,
        item: OutboxItem,
        outcome: AttemptOutcome,
        status: int | None = None,
        error: str | None = None,
        started_at: float | None = None,
    ) -> OutboxItem:
        """Persist one attempt on ``item`` and move the item to its next state."""
        now = self._clock()
        outcome = AttemptOutcome(outcome)
        with self._db.write() as conn:
            row = conn.execute(f"{_ITEM_SELECT} WHERE i.id = ?", (item.id,)).fetchone()
            if row is None:
                raise KeyError(f"no outbox item {item.id}")
            current = self._item(row)
            attempts = current.attempts + 1
            refusals = current.refusals
            sent_at = current.sent_at
            next_at = current.next_attempt_at
            if outcome in (AttemptOutcome.SUCCESS, AttemptOutcome.WARNING):
                state, sent_at = ItemState.SENT, now
            elif outcome is AttemptOutcome.UNREACHABLE:
                state = ItemState.PENDING  # a down destination delays, never loses
                # the dispatcher records the destination as down first, so its failure count is current
                next_at = now + self.backoff.delay(max(1, self._destination_failures(conn, current.destination)))
            else:
                refusals += 1
                if refusals >= self.max_attempts:
                    state = ItemState.FAILED
                else:
                    state = ItemState.PENDING
                    next_at = now + self.backoff.delay(refusals)
            conn.execute(
                "UPDATE {items} SET state = ?, attempts = ?, refusals = ?, next_attempt_at = ?, updated_at = ?, "
                "sent_at = ?, last_status = ?, last_error = ? WHERE id = ?",
                (state.value, attempts, refusals, next_at, now, sent_at, status, error, item.id),
            )
            conn.execute(
                "INSERT INTO {attempts} (item_id, started_at, finished_at, outcome, status, error) VALUES (?, ?, ?, ?, ?, ?)",
                (item.id, started_at if started_at is not None else now, now, outcome.value, status, error),
            )
            updated = self._item(conn.execute(f"{_ITEM_SELECT} WHERE i.id = ?", (item.id,)).fetchone())
        if updated.state is ItemState.FAILED:
            log.error(
                "outbox item %d (%s %s -> %s) failed after %d refused attempts; last status %s: %s",
                updated.id, updated.object_type, updated.sop_instance_uid, updated.destination,
                updated.refusals, format_status(status), error,
            )
        return updated

    def record_destination(self, name: str, reachable: bool, error: str | None = None) -> None:
        """Update a destination's health after an association attempt."""
        now = self._clock()
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO {destinations} (name, state) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, DestinationState.UNKNOWN.value),
            )
            if reachable:
                conn.execute(
                    "UPDATE {destinations} SET state = ?, consecutive_failures = 0, last_success_at = ? WHERE name = ?",
                    (DestinationState.UP.value, now, name),
                )
            else:
                conn.execute(
                    "UPDATE {destinations} SET state = ?, consecutive_failures = consecutive_failures + 1, "
                    "last_failure_at = ?, last_error = ? WHERE name = ?",
                    (DestinationState.DOWN.value, now, error, name),
                )

    @staticmethod
    def _destination_failures(conn: _NamedConnection, name: str) -> int:
        row = conn.execute("SELECT consecutive_failures FROM {destinations} WHERE name = ?", (name,)).fetchone()
        return int(row["consecutive_failures"]) if row is not None else 0

    def defer_destination(self, name: str) -> float:
        """Push all pending items of an unreachable destination back by its backoff; returns the delay."""
        now = self._clock()
        with self._db.write() as conn:
            delay = self.backoff.delay(max(1, self._destination_failures(conn, name)))
            conn.execute(
                "UPDATE {items} SET next_attempt_at = ? WHERE destination = ? AND state = ? AND next_attempt_at < ?",
                (now + delay, name, ItemState.PENDING.value, now + delay),
            )
        return delay

    # -- operator actions ---------------------------------------------------------------

    def rearm(self, job_id: int | None = None, item_ids: Iterable[int] | None = None) -> int:
        """Give failed items a new attempt budget (``radnode jobs retry``); returns how many."""
        now = self._clock()
        query = "UPDATE {items} SET state = ?, refusals = 0, next_attempt_at = ?, updated_at = ? WHERE state = ?"
        params: list[Any] = [ItemState.PENDING.value, now, now, ItemState.FAILED.value]
        if job_id is not None:
            query += " AND sop_instance_uid IN (SELECT sop_instance_uid FROM {objects} WHERE job_id = ?)"
            params.append(job_id)
        if item_ids is not None:
            ids = list(item_ids)
            if not ids:
                return 0
            clause, ids = in_clause("id", ids)
            query += clause
            params += ids
        with self._db.write() as conn:
            return conn.execute(query, params).rowcount

    def release(self, job_id: int, except_destinations: Iterable[str] = ()) -> int:
        """Let a job's items awaiting review go as they are (``radnode jobs release``): due now.

        ``except_destinations`` (those with ``requires_approval``) keep waiting: they get
        only an approved copy, through :meth:`decide`. Returns how many items were released.
        """
        now = self._clock()
        query = (
            "UPDATE {items} SET state = ?, next_attempt_at = ?, updated_at = ? WHERE state = ? AND "
            "sop_instance_uid IN (SELECT sop_instance_uid FROM {objects} WHERE job_id = ?)"
        )
        params: list[Any] = [ItemState.PENDING.value, now, now, ItemState.AWAITING_REVIEW.value, job_id]
        kept = list(except_destinations)
        if kept:
            query += f" AND destination NOT IN ({','.join('?' * len(kept))})"
            params += kept
        with self._db.write() as conn:
            return conn.execute(query, params).rowcount

    # -- review -------------------------------------------------------------------------

    @staticmethod
    def _decision(row: Any) -> ReviewDecision:
        return ReviewDecision(
            job_id=row["job_id"], decision=row["decision"], reviewer=row["reviewer"], decided_at=row["decided_at"],
            comment=row["comment"], approved_structures=tuple(json.loads(row["approved_structures"])),
            rejected_structures=tuple(json.loads(row["rejected_structures"])),
            destinations=tuple(json.loads(row["destinations"])), approved_objects=tuple(json.loads(row["approved_objects"])),
        )

    def _review_row(self, conn: _NamedConnection, job_id: int) -> ReviewDecision | None:
        row = conn.execute("SELECT * FROM {reviews} WHERE job_id = ?", (job_id,)).fetchone()
        return self._decision(row) if row is not None else None

    def review(self, job_id: int) -> ReviewDecision | None:
        """The recorded decision on a job, or ``None``."""
        with self._db.connect() as conn:
            return self._review_row(conn, job_id)

    def reviews(self, limit: int = 100) -> list[ReviewDecision]:
        """The latest decisions, newest first."""
        with self._db.connect() as conn:
            rows = conn.execute("SELECT * FROM {reviews} ORDER BY decided_at DESC, job_id DESC LIMIT ?", (int(limit),))
            return [self._decision(r) for r in rows.fetchall()]

    def decide(self, decision: ReviewDecision, approved_copies: dict[str, Path] | None = None) -> list[OutboxItem]:
        """Record the decision on a job and apply it to its items awaiting review, atomically.

        ``approved_copies`` maps each awaiting RTSTRUCT's SOP Instance UID to its approved
        copy (written by :mod:`radnode.dicom_io.approval`): every destination that waited
        for the original gets the copy (``pending``) and the original becomes ``replaced``.
        An RTSTRUCT without a copy, every object of a rejected job and, when a structure was
        rejected, the SEG and SR (they carry it) become ``rejected``; otherwise they go.
        Raises :class:`ReviewError` when the job was decided already or nothing awaits review.
        """
        now = self._clock()
        copies = dict(approved_copies or {})
        headers = {uid: self._read_header(path) for uid, path in copies.items()}
        stored = {uid: self._copy_in(path, headers[uid].sop_instance_uid) for uid, path in copies.items()}
        with self._db.write() as conn:
            if self._review_row(conn, decision.job_id) is not None:
                raise ReviewError(f"job {decision.job_id} was reviewed already")
            waiting = [self._item(r) for r in conn.execute(
                f"{_ITEM_SELECT} WHERE o.job_id = ? AND i.state = ? ORDER BY i.id",
                (decision.job_id, ItemState.AWAITING_REVIEW.value)).fetchall()]
            if not waiting:
                raise ReviewError(f"job {decision.job_id} has nothing awaiting review")
            new_objects = []
            for original, header in headers.items():
                source = next((i for i in waiting if i.sop_instance_uid == original), None)
                if source is None:
                    raise ReviewError(f"RTSTRUCT {original} of job {decision.job_id} is not awaiting review")
                conn.execute(
                    "INSERT INTO {objects} (sop_instance_uid, sop_class_uid, transfer_syntax_uid, object_type, "
                    "phase, study_uid, series_uid, source_series_uid, job_id, path, staged_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                    (header.sop_instance_uid, header.sop_class_uid, header.transfer_syntax_uid, source.object_type,
                     source.phase, header.study_uid, header.series_uid, source.source_series_uid, decision.job_id,
                     str(stored[original]), now),
                )
                new_objects.append(header.sop_instance_uid)
            recorded = replace(
                decision, destinations=tuple(sorted({i.destination for i in waiting})), approved_objects=tuple(new_objects)
            )
            conn.execute(
                "INSERT INTO {reviews} (job_id, decision, reviewer, decided_at, comment, approved_structures, "
                "rejected_structures, destinations, approved_objects) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (recorded.job_id, recorded.decision, recorded.reviewer, recorded.decided_at, recorded.comment,
                 json.dumps(list(recorded.approved_structures)), json.dumps(list(recorded.rejected_structures)),
                 json.dumps(list(recorded.destinations)), json.dumps(list(recorded.approved_objects))),
            )
            self._apply_decision(conn, recorded, {k: h.sop_instance_uid for k, h in headers.items()}, now)
            rows = conn.execute(f"{_ITEM_SELECT} WHERE o.job_id = ? ORDER BY i.id", (decision.job_id,)).fetchall()
        log.info("job %d reviewed: %s by a dashboard user; %d destination(s)", decision.job_id, recorded.decision,
                 len(recorded.destinations))
        return [self._item(r) for r in rows]

    def _apply_decision(
        self, conn: _NamedConnection, decision: ReviewDecision, copies: dict[str, str], now: float
    ) -> None:
        """Move a job's ``awaiting_review`` items according to ``decision`` (see :meth:`decide`)."""
        waiting = [self._item(r) for r in conn.execute(
            f"{_ITEM_SELECT} WHERE o.job_id = ? AND i.state = ?", (decision.job_id, ItemState.AWAITING_REVIEW.value)
        ).fetchall()]
        update = ("UPDATE {items} SET state = ?, next_attempt_at = ?, updated_at = ?, last_error = ? WHERE id = ?")
        who = f"at review by {decision.reviewer}"
        for item in waiting:
            if item.sop_instance_uid in copies:
                conn.execute(
                    "INSERT INTO {items} (sop_instance_uid, destination, state, next_attempt_at, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                    (copies[item.sop_instance_uid], item.destination, ItemState.PENDING.value, now, now, now),
                )
                state, note = ItemState.REPLACED, f"replaced {who} by approved {copies[item.sop_instance_uid]}"
            elif not decision.approved:
                state, note = ItemState.REJECTED, f"rejected {who}: {decision.comment or 'no reason given'}"
            elif item.object_type == "RTSTRUCT":
                state, note = ItemState.REJECTED, f"not reviewed (no approved copy) {who}"
            elif decision.rejected_structures:
                state = ItemState.REJECTED
                note = f"withheld {who}: carries rejected {', '.join(decision.rejected_structures)}"
            else:
                state, note = ItemState.PENDING, None
            conn.execute(update, (state.value, now, now, note, item.id))

    def retry_now(self, destination: str | None = None) -> int:
        """Make pending items due immediately (after an operator fixed a destination)."""
        now = self._clock()
        query = "UPDATE {items} SET next_attempt_at = ? WHERE state = ?"
        params: list[Any] = [now, ItemState.PENDING.value]
        if destination is not None:
            query += " AND destination = ?"
            params.append(destination)
        with self._db.write() as conn:
            return conn.execute(query, params).rowcount

    # -- queries ------------------------------------------------------------------------

    def items(
        self,
        job_id: int | None = None,
        states: Iterable[ItemState] | None = None,
        destination: str | None = None,
        limit: int = 1000,
    ) -> list[OutboxItem]:
        """Items, oldest first, optionally filtered."""
        found = where(
            {"o.job_id": job_id, "i.destination": destination},
            {"i.state": None if states is None else [ItemState(s).value for s in states]},
        )
        if found is None:
            return []
        clause, params = found
        query = f"{_ITEM_SELECT}{clause} ORDER BY i.id LIMIT ?"
        params.append(int(limit))
        with self._db.connect() as conn:
            return [self._item(r) for r in conn.execute(query, params).fetchall()]

    def attempts(self, item_id: int) -> list[dict[str, Any]]:
        """Every persisted attempt of one item, oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute("SELECT * FROM {attempts} WHERE item_id = ? ORDER BY id", (item_id,)).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, dict[ItemState, int]]:
        """Destination -> state -> number of items."""
        result: dict[str, dict[ItemState, int]] = {}
        with self._db.connect() as conn:
            for row in conn.execute("SELECT destination, state, COUNT(*) AS n FROM {items} GROUP BY destination, state"):
                per = result.setdefault(row["destination"], {s: 0 for s in ItemState})
                per[ItemState(row["state"])] = row["n"]
        return result

    def attempt_counts(self) -> dict[tuple[str, AttemptOutcome], int]:
        """(destination, outcome) -> number of persisted attempts (for metrics)."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT i.destination AS destination, a.outcome AS outcome, COUNT(*) AS n FROM {attempts} a "
                "JOIN {items} i ON i.id = a.item_id GROUP BY i.destination, a.outcome"
            ).fetchall()
        return {(r["destination"], AttemptOutcome(r["outcome"])): r["n"] for r in rows}

    def health(self, configured: Iterable[str] = ()) -> list[DestinationHealth]:
        """Health of every configured destination and of any other with items."""
        counts = self.counts()
        with self._db.connect() as conn:
            rows = {r["name"]: r for r in conn.execute("SELECT * FROM {destinations}").fetchall()}
        names = list(dict.fromkeys([*configured, *sorted(counts), *sorted(rows)]))
        result = []
        for name in names:
            row = rows.get(name)
            per = counts.get(name, {s: 0 for s in ItemState})
            result.append(
                DestinationHealth(
                    name=name,
                    state=DestinationState(row["state"]) if row is not None else DestinationState.UNKNOWN,
                    consecutive_failures=row["consecutive_failures"] if row is not None else 0,
                    last_success_at=row["last_success_at"] if row is not None else None,
                    last_failure_at=row["last_failure_at"] if row is not None else None,
                    last_error=row["last_error"] if row is not None else None,
                    pending=per[ItemState.PENDING],
                    sent=per[ItemState.SENT],
                    failed=per[ItemState.FAILED],
                    held=per[ItemState.AWAITING_REVIEW],
                    rejected=per[ItemState.REJECTED],
                )
            )
        return result

    def job_delivery(self, job_id: int) -> dict[str, dict[ItemState, int]]:
        """Phase -> item state -> count, for one job (``status`` shows both phases)."""
        result: dict[str, dict[ItemState, int]] = {}
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT o.phase AS phase, i.state AS state, COUNT(*) AS n FROM {items} i JOIN {objects} o "
                "ON o.sop_instance_uid = i.sop_instance_uid WHERE o.job_id = ? GROUP BY o.phase, i.state",
                (job_id,),
            )
            for row in rows:
                per = result.setdefault(row["phase"] or "-", {s: 0 for s in ItemState})
                per[ItemState(row["state"])] = row["n"]
        return result

    # -- retention ----------------------------------------------------------------------

    def purge_delivered(self, older_than_seconds: float) -> int:
        """Delete outbox files whose every item is final (sent, or rejected / replaced at review)
        since more than ``older_than_seconds``.

        The database rows stay (they are the proof of delivery and keep "exactly once"
        true if the same object is staged again).
        """
        cutoff = self._clock() - older_than_seconds
        removed = 0
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT o.sop_instance_uid, o.path FROM {objects} o WHERE NOT EXISTS (SELECT 1 FROM {items} i "
                "WHERE i.sop_instance_uid = o.sop_instance_uid AND (i.state NOT IN (?, ?, ?) OR i.updated_at >= ?))",
                (*(s.value for s in FINAL_STATES), cutoff),
            ).fetchall()
        for row in rows:
            path = Path(row["path"])
            if path.exists():
                path.unlink()
                removed += 1
        return removed



    # -- migration ----------------------------------------------------------------------

    def is_empty(self) -> bool:
        """Whether no table of the outbox holds a row."""
        with self._db.connect() as conn:
            return not any(conn.execute("SELECT 1 FROM {" + t + "} LIMIT 1").fetchone() for t in ROW_TABLES)

    def copy_from(self, source: Outbox) -> dict[str, int]:
        """Copy every row of ``source`` into this empty outbox, ids and states kept (``radnode db migrate``).

        Items keep their ids because attempts refer to them and operators know them from
        ``radnode status``; object rows keep their file paths (the files stay where they
        are, on the node). Raises :class:`ValueError` when this outbox holds rows already:
        a migration never merges two outboxes. Returns table -> rows copied.
        """
        found: dict[str, list[Any]] = {}
        with source._db.connect() as conn:
            for table in ROW_TABLES:
                found[table] = conn.execute("SELECT * FROM {" + table + "} ORDER BY 1").fetchall()
        with self._db.write() as conn:
            if any(conn.execute("SELECT 1 FROM {" + t + "} LIMIT 1").fetchone() for t in ROW_TABLES):
                raise ValueError(f"the outbox at {self.describe()} holds rows already; migrate into an empty one")
            for table, rows in found.items():
                if rows:
                    columns = list(rows[0].keys())
                    conn.executemany(
                        f"INSERT INTO {{{table}}} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [tuple(row) for row in rows],
                    )
            if self._db.store.dialect is Dialect.POSTGRESQL:  # new ids continue after the copied ones
                for table in ("items", "attempts"):
                    conn.execute(
                        "SELECT setval(pg_get_serial_sequence('{" + table + "}', 'id'), "
                        "(SELECT COALESCE(MAX(id), 0) + 1 FROM {" + table + "}), false)"
                    )
        return {table: len(rows) for table, rows in found.items()}
