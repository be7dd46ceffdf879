"""One received instance: validate, write durably, index, and decide the C-STORE status.

This is the body of the C-STORE handler with the network taken away, so tests can call
it directly and the handler in :mod:`radnode.node.scp` stays a few lines long. The order
is fixed: disk guard -> command UIDs -> header parse -> data set checks -> duplicate check
-> durable write -> index commit -> Success. Bad data goes to quarantine with a reason.

It is the only way an instance enters radnode: the listener's C-STORE (a sender, or a
C-MOVE sub-operation of the sweep) and the sweep's C-GET sub-operations
(:func:`local_ingestor` for a process without a listener) all call :meth:`Ingestor.ingest`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from radnode.config import Settings
from radnode.node import status
from radnode.node.audit import AuditLog
from radnode.node.header import HeaderError, InstanceHeader, parse_header_fragments
from radnode.node.index import InstanceRecord, NodeIndex, SeriesChange
from radnode.node.quarantine import Quarantine
from radnode.node.storage import (
    AUDIT_FILE,
    INDEX_FILE,
    InstanceStore,
    InvalidUIDError,
    TemporaryFile,
    encode_file_meta,
    validate_uid,
)

LOGGER = logging.getLogger(__name__)

#: Error Comment (0000,0902) is LO: at most 64 characters (PS3.7 Annex E).
ERROR_COMMENT_MAX = 64
#: Peer address recorded for files indexed by crash recovery.
RECOVERED_PEER = "recovered-at-start-up"
#: Striped locks serialise concurrent stores of the same SOP Instance UID only.
_LOCK_STRIPES = 64

Outcome = Literal["stored", "duplicate", "new-version", "rejected"]


@dataclass(frozen=True)
class StoreRequest:
    """What the peer sent: the C-STORE command's UIDs and the encoded data set.

    ``dataset`` holds the data set bytes in the pieces they arrived in (the PDV values of
    its P-DATA-TF PDUs, PS3.8 Annex E), so that they are written without being joined.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    dataset: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        """Length of the encoded data set in bytes."""
        return sum(len(part) for part in self.dataset)


@dataclass(frozen=True)
class StoreOutcome:
    """The status to answer with and what happened."""

    status: int
    outcome: Outcome
    error_comment: str | None = None
    reason: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    path: Path | None = None
    size: int = 0
    change: SeriesChange | None = None
    quarantine_file: Path | None = None


class _Rejection(Exception):
    def __init__(self, code: int, reason: str, comment: str, detail: str | None = None) -> None:
        super().__init__(comment)
        self.code = code
        self.reason = reason
        self.comment = comment[:ERROR_COMMENT_MAX]
        self.detail = detail or comment


class Ingestor:
    """Turns a :class:`StoreRequest` into a stored, indexed instance and a status.

    Parameters
    ----------
    store, index, audit
        Where files go, where they are indexed, where decisions are recorded.
    on_update
        ``series.on_update``: whether an instance for an already complete series opens a
        new round (``reprocess``) or is only stored (``ignore``).
    on_expected_reached
        Called (after the commit) when a series reached the instance count its data
        announced, so the completion checker can run at once.
    quarantine
        Where rejected data is kept, within its caps (default: the default caps).
    """

    def __init__(
        self,
        store: InstanceStore,
        index: NodeIndex,
        audit: AuditLog,
        on_update: Literal["reprocess", "ignore"] = "reprocess",
        on_expected_reached: Callable[[], None] | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.store = store
        self.quarantine = quarantine or Quarantine.from_settings(store)
        self.index = index
        self.audit = audit
        self.on_update = on_update
        self.on_expected_reached = on_expected_reached
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def ingest(self, request: StoreRequest, staged: TemporaryFile | None = None) -> StoreOutcome:
        """Validate, store and index one instance; never raises for bad input.

        ``staged``, if given, is a temporary file the listener already filled while the
        data arrived (File Meta of the command's UIDs, then the data set). It is committed
        instead of writing the bytes again only when it holds exactly the File Meta this
        method builds followed by the whole data set; in every other case it is discarded.
        """
        try:
            return self._ingest(request, staged)
        finally:
            if staged is not None:
                staged.discard()  # a no-op once committed

    def _ingest(self, request: StoreRequest, staged: TemporaryFile | None) -> StoreOutcome:
        if not self.store.has_room():
            return self._reject(
                request,
                _Rejection(
                    status.OUT_OF_RESOURCES,
                    "disk-full",
                    "Out of resources: free disk below storage.min_free_gb",
                    f"free {self.store.free_bytes()} B < {self.store.min_free_bytes} B",
                ),
                quarantine=False,
            )
        try:
            header = self._check(request)
            return self._store(request, header, staged)
        except _Rejection as rejection:
            return self._reject(request, rejection, quarantine=True)
        except psycopg.OperationalError as exc:
            # The shared index is out of reach beyond its reconnect window: nothing was
            # acknowledged and the file is not kept, so a transient status lets the sender retry.
            LOGGER.error(
                "cannot index SOP instance %s: index database unreachable (%s)",
                _printable(request.sop_instance_uid),
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__,
            )
            return self._reject(
                request,
                _Rejection(
                    status.OUT_OF_RESOURCES,
                    "index-unavailable",
                    "Out of resources: index database unreachable; retry later",
                    type(exc).__name__,
                ),
                quarantine=False,
            )
        except (OSError, sqlite3.Error, psycopg.Error) as exc:
            LOGGER.exception("storing SOP instance %s failed", _printable(request.sop_instance_uid))
            return self._reject(
                request,
                _Rejection(status.PROCESSING_FAILURE, "local-error", f"Local error: {type(exc).__name__}", str(exc)),
                quarantine=False,
            )

    # --- checks ---------------------------------------------------------------------------

    def _check(self, request: StoreRequest) -> InstanceHeader:
        try:
            validate_uid(request.sop_class_uid, "Affected SOP Class UID")
            validate_uid(request.sop_instance_uid, "Affected SOP Instance UID")
        except InvalidUIDError as exc:
            raise _Rejection(status.INVALID_UID, "invalid-uid", f"Invalid UID in {exc.attribute}", str(exc)) from None
        try:
            header = parse_header_fragments(request.dataset, request.transfer_syntax_uid)
        except HeaderError as exc:
            raise _Rejection(status.CANNOT_UNDERSTAND, "undecodable", "Data set cannot be decoded", str(exc)) from None
        if header.has_file_meta_elements:
            raise _Rejection(
                status.NONCONFORMANT_META,
                "nonconformant-meta",
                "Data set contains group 0002 (File Meta) elements",
                "PS3.10 §7.1 puts File Meta elements only in the file header, never in the data set",
            )
        required = {
            "SOPClassUID": header.sop_class_uid,
            "SOPInstanceUID": header.sop_instance_uid,
            "StudyInstanceUID": header.study_instance_uid,
            "SeriesInstanceUID": header.series_instance_uid,
        }
        missing = [name for name, value in required.items() if value is None]
        if missing:
            raise _Rejection(
                status.MISSING_ATTRIBUTE, "missing-attribute", f"Missing {', '.join(missing)}"
            )
        try:
            for name, value in required.items():
                validate_uid(value, name)
        except InvalidUIDError as exc:
            raise _Rejection(status.INVALID_UID, "invalid-uid", f"Invalid UID in {exc.attribute}", str(exc)) from None
        if header.sop_class_uid != request.sop_class_uid.rstrip("\x00 "):
            raise _Rejection(
                status.DATASET_MISMATCH,
                "sop-class-mismatch",
                "SOPClassUID differs from Affected SOP Class UID",
                f"data set {header.sop_class_uid}, command {request.sop_class_uid}",
            )
        if header.sop_instance_uid != request.sop_instance_uid.rstrip("\x00 "):
            raise _Rejection(
                status.DATASET_MISMATCH,
                "sop-instance-mismatch",
                "SOPInstanceUID differs from Affected SOP Instance UID",
                f"data set {header.sop_instance_uid}, command {request.sop_instance_uid}",
            )
        return header

    # --- store ----------------------------------------------------------------------------

    def _store(self, request: StoreRequest, header: InstanceHeader, staged: TemporaryFile | None) -> StoreOutcome:
        sop_uid = header.sop_instance_uid
        study_uid = header.study_instance_uid
        series_uid = header.series_instance_uid
        sop_class = header.sop_class_uid
        assert sop_uid and study_uid and series_uid and sop_class  # checked in _check
        transfer_syntax = request.transfer_syntax_uid.rstrip("\x00 ")
        meta = encode_file_meta(sop_class, sop_uid, transfer_syntax, request.calling_ae)
        lock = self._locks[zlib.crc32(sop_uid.encode("ascii")) % _LOCK_STRIPES]
        with lock:
            versions = self.index.instance_versions(sop_uid)
            for existing in versions:
                if existing.transfer_syntax_uid == transfer_syntax and self._same_bytes(existing, request.dataset):
                    self.audit.record(
                        "instance-duplicate",
                        sop_instance_uid=sop_uid,
                        series_instance_uid=series_uid,
                        calling_ae=request.calling_ae,
                        peer_address=request.peer_address,
                        version=existing.version,
                        outcome="duplicate",
                    )
                    return StoreOutcome(
                        status.SUCCESS,
                        "duplicate",
                        series_instance_uid=series_uid,
                        study_instance_uid=study_uid,
                        path=self.store.data_dir / existing.path,
                        size=existing.size,
                    )
            version = max((v.version for v in versions), default=0) + 1
            if version > 1:
                LOGGER.warning(
                    "SOP instance %s re-sent with different content; keeping both (version %d)",
                    sop_uid,
                    version,
                )
            final = self.store.instance_path(study_uid, series_uid, sop_uid, version)
            if (
                staged is not None
                and staged.is_open
                and not staged.failed
                and staged.prefix == meta
                and staged.size == len(meta) + request.size
            ):
                stored = staged.commit(final)
            else:
                stored = self.store.write_instance(final, [meta, *request.dataset])
            record = InstanceRecord(
                sop_instance_uid=sop_uid,
                version=version,
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                sop_class_uid=sop_class,
                transfer_syntax_uid=transfer_syntax,
                modality=header.modality,
                calling_ae=request.calling_ae,
                peer_address=request.peer_address,
                path=stored.relative_path,
                size=stored.size,
                received_at=time.time(),
            )
            try:
                change = self.index.add_instance(
                    record, header.to_json(), header.expected_count, self.on_update
                )
            except BaseException:
                # Not acknowledged, so not kept: the sender will retry.
                final.unlink(missing_ok=True)
                raise
        outcome: Outcome = "stored" if version == 1 else "new-version"
        self.audit.record(
            "instance-stored",
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            transfer_syntax_uid=transfer_syntax,
            calling_ae=request.calling_ae,
            peer_address=request.peer_address,
            version=version,
            size=stored.size,
            outcome=outcome,
        )
        if change.update_ignored:
            LOGGER.info(
                "series %s is %s; new instance stored but not reprocessed (series.on_update = ignore)",
                series_uid,
                change.state.value,
            )
        if change.expected_reached and self.on_expected_reached is not None:
            self.on_expected_reached()
        return StoreOutcome(
            status.SUCCESS,
            outcome,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            path=stored.path,
            size=stored.size,
            change=change,
        )

    def _same_bytes(self, existing: InstanceRecord, dataset: tuple[bytes | memoryview, ...]) -> bool:
        path = self.store.data_dir / existing.path
        try:
            on_disk = self.store.read_dataset_bytes(path)
        except (OSError, ValueError):
            LOGGER.warning("indexed file %s is unreadable; treating the re-send as new", path)
            return False
        if len(on_disk) != sum(len(part) for part in dataset):
            return False
        view, offset = memoryview(on_disk), 0
        for part in dataset:
            if view[offset : offset + len(part)] != part:
                return False
            offset += len(part)
        return True

    # --- crash recovery -------------------------------------------------------------------

    def recover_orphans(self) -> int:
        """Index files under ``incoming/`` that a crash left unindexed; return how many.

        A crash between the rename and the index commit leaves a complete file that was
        never acknowledged. It is valid data, so it is indexed (its series then completes
        as usual) rather than deleted. Only series folders whose file count differs from
        the index are examined, which keeps start-up fast for a large archive.
        """
        counts = self.index.file_counts_by_series()
        recovered = 0
        for study_dir in _subdirs(self.store.incoming):
            for series_dir in _subdirs(Path(study_dir.path)):
                files = [e for e in os.scandir(series_dir.path) if e.name.endswith(".dcm") and e.is_file()]
                if len(files) == counts.get(series_dir.name, 0):
                    continue
                known = self.index.instance_paths(series_dir.name)
                for entry in files:
                    relative = Path(entry.path).relative_to(self.store.data_dir).as_posix()
                    if relative not in known and self._index_orphan(Path(entry.path), relative):
                        recovered += 1
        return recovered

    def _index_orphan(self, path: Path, relative: str) -> bool:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            header = InstanceHeader.from_dataset(ds)
            meta = ds.file_meta
            sop_uid = validate_uid(header.sop_instance_uid, "SOPInstanceUID")
            series_uid = validate_uid(header.series_instance_uid, "SeriesInstanceUID")
            study_uid = validate_uid(header.study_instance_uid, "StudyInstanceUID")
            sop_class = validate_uid(header.sop_class_uid, "SOPClassUID")
        except (OSError, ValueError, InvalidDicomError, AttributeError) as exc:
            LOGGER.error("cannot recover %s: %s", path, exc)
            return False
        stem = path.name.removesuffix(".dcm")
        version = int(stem.rsplit("_v", 1)[1]) if "_v" in stem else 1
        if path.parent.name != series_uid or stem.split("_v", 1)[0] != sop_uid:
            LOGGER.error("cannot recover %s: its UIDs do not match its path", path)
            return False
        if any(v.version == version for v in self.index.instance_versions(sop_uid)):
            return False
        record = InstanceRecord(
            sop_instance_uid=sop_uid,
            version=version,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
            modality=header.modality,
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            peer_address=RECOVERED_PEER,
            path=relative,
            size=path.stat().st_size,
            received_at=time.time(),
        )
        self.index.add_instance(record, header.to_json(), header.expected_count, self.on_update)
        self.audit.record(
            "instance-recovered",
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            path=relative,
            size=record.size,
        )
        return True

    # --- rejection ------------------------------------------------------------------------

    def _reject(self, request: StoreRequest, rejection: _Rejection, quarantine: bool) -> StoreOutcome:
        quarantined: Path | None = None
        rate_limited = False
        if quarantine and request.size:
            meta = encode_file_meta(
                _printable(request.sop_class_uid),
                _printable(request.sop_instance_uid),
                _printable(request.transfer_syntax_uid),
                request.calling_ae,
            )
            try:
                kept = self.quarantine.keep(
                    [meta, *request.dataset],
                    {
                        "reason": rejection.reason,
                        "status": f"0x{rejection.code:04X}",
                        "error_comment": rejection.comment,
                        "detail": rejection.detail,
                        "calling_ae": request.calling_ae,
                        "peer_address": request.peer_address,
                        "transfer_syntax_uid": request.transfer_syntax_uid,
                        "command_sop_class_uid": request.sop_class_uid,
                        "command_sop_instance_uid": request.sop_instance_uid,
                        "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    request.calling_ae,
                    request.peer_address,
                )
                quarantined = kept.path
                rate_limited = kept.rate_limited
                for stem in kept.dropped:
                    self.audit.record("quarantine-dropped", quarantine_file=stem, reason="quarantine-cap")
            except OSError:
                LOGGER.exception("could not quarantine rejected data (%s)", rejection.reason)
        if rate_limited:
            # Answered and audited like any rejection, but not logged: a flood must not multiply log lines.
            LOGGER.debug("rejection from %s (%s) over the quarantine rate; not kept", request.calling_ae, request.peer_address)
            self._audit_rejection(request, rejection, None, "rate-limited")
            return StoreOutcome(rejection.code, "rejected", error_comment=rejection.comment, reason=rejection.reason)
        LOGGER.warning(
            "rejected C-STORE from %s (%s): %s [0x%04X] %s",
            request.calling_ae,
            request.peer_address,
            rejection.reason,
            rejection.code,
            rejection.detail,
        )
        self._audit_rejection(request, rejection, quarantined.name if quarantined else None, None)
        return StoreOutcome(
            rejection.code,
            "rejected",
            error_comment=rejection.comment,
            reason=rejection.reason,
            quarantine_file=quarantined,
        )

    def _audit_rejection(
        self, request: StoreRequest, rejection: _Rejection, quarantine_file: str | None, detail: str | None
    ) -> None:
        self.audit.record(
            "instance-rejected",
            calling_ae=request.calling_ae,
            peer_address=request.peer_address,
            sop_class_uid=_printable(request.sop_class_uid),
            sop_instance_uid=_printable(request.sop_instance_uid),
            transfer_syntax_uid=_printable(request.transfer_syntax_uid),
            status=f"0x{rejection.code:04X}",
            reason=rejection.reason,
            error_comment=rejection.comment,
            quarantine_file=quarantine_file,
            size=request.size,
            detail=detail,
        )


@contextmanager
def local_ingestor(settings: Settings) -> Iterator[Ingestor]:
    """An :class:`Ingestor` on the node's data folder for a process without a listener
    (``radnode sweep`` retrieving with C-GET): same checks, layout, index, audit and
    quarantine as the listener. Index rows commit with ``full`` durability, since this
    process does not reconcile files with the index at start-up as the listener does."""
    store = InstanceStore(settings.storage.data_dir, settings.storage.min_free_gb)
    index = NodeIndex(store.data_dir / INDEX_FILE, "full", settings.database.url)
    audit = AuditLog(store.data_dir / AUDIT_FILE, settings.database.url)
    try:
        yield Ingestor(
            store, index, audit, settings.series.on_update, quarantine=Quarantine.from_settings(store, settings.storage)
        )
    finally:
        index.close()
        audit.close()


def _subdirs(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _printable(value: object) -> str:
    """An untrusted UID as a bounded, printable ASCII string (for logs and meta)."""
    text = str(value) if value is not None else ""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:128]
