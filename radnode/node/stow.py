"""STOW-RS (PS3.18 §10.5) on the node's ingest: a multipart/related body in, a store response out.

The HTTP layer (:mod:`radnode.web.dicomweb`) feeds the request body, as it arrives, to a
:class:`StowBody`. Its parser is python-multipart's streaming :class:`MultipartParser` (the
one Starlette uses for forms); each part goes straight to its own file in ``<data_dir>/tmp``
(nothing but the parser's small buffer is held in memory). Only when the whole body parsed
cleanly are the parts ingested, one at a time, each read back as one Part 10 file, through
:class:`~radnode.node.ingest.Ingestor` -- exactly the path of a C-STORE: disk guard, UID and
header checks, durable write, index, quarantine, audit, series completion. A malformed or
truncated body therefore stores nothing, and the part files are always removed.

Outcomes follow PS3.18 §10.5.3 (Store Instances Response): each stored instance is listed in
the Referenced SOP Sequence, each refused one in the Failed SOP Sequence with its Failure
Reason -- the C-STORE status the ingest chose (0xA700 out of resources when the disk guard
refuses, 0xA900 data set does not match SOP class, 0xCxxx cannot understand, 0x0110
processing failure). The HTTP status: 200 all stored, 202 some stored and some failed, 409
none stored, 507 none stored because the node is out of disk space.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from radnode.node import status
from radnode.node.header import HeaderError, parse_header_fragments
from radnode.node.ingest import Ingestor, StoreRequest
from radnode.node.storage import InvalidUIDError, validate_uid

LOGGER = logging.getLogger(__name__)

#: The only part media type STOW-RS with binary instances carries (PS3.18 §8.6.1.2).
DICOM_MEDIA_TYPE = "application/dicom"
#: Suffix of the part files in tmp/ (removed at start-up by InstanceStore.clean_temporary).
PART_SUFFIX = ".stow-part"
#: Preamble (128) + "DICM" (4) + the (0002,0000) group length element (12), PS3.10 §7.1.
_META_START = 128 + 4 + 12

#: HTTP statuses of a Store Instances response (PS3.18 §10.5.3).
HTTP_OK, HTTP_ACCEPTED, HTTP_CONFLICT, HTTP_INSUFFICIENT_STORAGE = 200, 202, 409, 507


class StowRequestError(Exception):
    """The request as a whole cannot be taken; nothing was stored.

    ``http_status``: 400 malformed body, 413 too large, 415 unsupported media type.
    """

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message


def boundary_of(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` request.

    Raises :class:`StowRequestError` (415) for any other media type, (400) without a boundary.
    """
    media, params = parse_options_header(content_type or "")
    if media.lower() != b"multipart/related":
        raise StowRequestError(415, f"Content-Type must be multipart/related; type=\"{DICOM_MEDIA_TYPE}\", not {media.decode('latin-1')!r}")
    kind = params.get(b"type", b"").decode("latin-1").lower()
    if kind and kind != DICOM_MEDIA_TYPE:
        raise StowRequestError(415, f"only type=\"{DICOM_MEDIA_TYPE}\" parts are accepted (PS3.18 §10.5.1.1), not {kind!r}")
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise StowRequestError(400, "multipart/related without a boundary parameter")
    return boundary.decode("latin-1")


class StowBody:
    """A STOW-RS body being received: :meth:`feed` chunks, :meth:`finish`, then the part files.

    Parameters
    ----------
    content_type
        The request's Content-Type header.
    tmp_dir
        Where part files are written (the node's ``tmp/``, same file system as the archive).
    max_bytes
        Largest body accepted; more raises :class:`StowRequestError` (413) while reading.
    """

    def __init__(self, content_type: str | None, tmp_dir: Path, max_bytes: int) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.max_bytes = max_bytes
        self.received = 0
        self.parts: list[Path] = []
        self._file: Any = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_type = ""
        self._ended = False
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary_of(content_type), callbacks)

    # --- parser callbacks -----------------------------------------------------------------

    def _part_begin(self) -> None:
        self._part_type = ""
        path = self.tmp_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        self._file = open(path, "xb")  # noqa: SIM115 - closed in _part_end or discard()
        self.parts.append(path)

    def _header_end(self) -> None:
        if bytes(self._header_field).strip().lower() == b"content-type":
            media, _params = parse_options_header(bytes(self._header_value))
            self._part_type = media.decode("latin-1").lower()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        if self._part_type != DICOM_MEDIA_TYPE:
            shown = f"is {self._part_type}" if self._part_type else "has no Content-Type"
            raise StowRequestError(
                415, f"part {len(self.parts)} {shown}, not {DICOM_MEDIA_TYPE}: STOW-RS takes DICOM instances only"
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._file.write(data[start:end])

    def _part_end(self) -> None:
        self._file.close()
        self._file = None

    def _end(self) -> None:
        self._ended = True

    # --- feeding --------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Parse one chunk of the body (raises :class:`StowRequestError`; call :meth:`discard` then)."""
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise StowRequestError(413, f"request body exceeds dicomweb.max_request_mb ({self.max_bytes} bytes)")
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise StowRequestError(400, f"malformed multipart/related body: {exc}") from None

    def finish(self) -> list[Path]:
        """The part files, once the closing boundary was seen; else (400) the body was cut short."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise StowRequestError(400, f"malformed multipart/related body: {exc}") from None
        if not self._ended or self._file is not None:
            raise StowRequestError(400, "malformed multipart/related body: no closing boundary")
        if not self.parts:
            raise StowRequestError(400, "multipart/related body without any part")
        return list(self.parts)

    def discard(self) -> None:
        """Remove every part file (always called, also after success)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.parts:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Part10:
    """A Part 10 file split into the UIDs of its File Meta and the data set bytes after it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: memoryview


class NotPart10(ValueError):
    """The part is not a DICOM Part 10 file (no preamble/DICM, or no usable File Meta)."""


def split_part10(path: Path, data: memoryview) -> Part10:
    """Read ``path``'s File Meta (pydicom) and cut ``data`` (its bytes) after it."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise NotPart10(f"not a DICOM Part 10 file: {exc}") from None
    group_length = meta.get("FileMetaInformationGroupLength")
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID") if not meta.get(k)]
    if group_length is None or missing:
        raise NotPart10(f"File Meta lacks {', '.join(missing) or 'FileMetaInformationGroupLength'} (PS3.10 §7.1)")
    offset = _META_START + int(group_length)
    if offset > len(data):
        raise NotPart10("File Meta group length points past the end of the part")
    return Part10(
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        data[offset:],
    )


@dataclass
class StowResult:
    """What one STOW-RS request did, and its PS3.18 response."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # (+ failure reason, comment)
    study_uids: set[str] = field(default_factory=set)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return HTTP_OK
        if self.stored:
            return HTTP_ACCEPTED
        if all(reason == status.OUT_OF_RESOURCES for _c, _i, reason, _t in self.failed):
            return HTTP_INSUFFICIENT_STORAGE
        return HTTP_CONFLICT

    def response(self, base_url: str) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-2) as DICOM JSON (Annex F)."""
        ds = Dataset()
        if len(self.study_uids) == 1:
            ds.RetrieveURL = f"{base_url}/studies/{next(iter(self.study_uids))}"
        referenced = []
        for sop_class, sop_uid in self.stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            referenced.append(item)
        failed = []
        for sop_class, sop_uid, reason, _comment in self.failed:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_uid:
                item.ReferencedSOPInstanceUID = sop_uid
            item.FailureReason = reason
            failed.append(item)
        if referenced:
            ds.ReferencedSOPSequence = referenced
        if failed:
            ds.FailedSOPSequence = failed
        return ds.to_json_dict()


def _uid_or_blank(value: str) -> str:
    try:
        return validate_uid(value, "uid")
    except InvalidUIDError:
        return ""


class StowReceiver:
    """Ingests the part files of one STOW-RS request through the node's :class:`Ingestor`.

    Parameters
    ----------
    ingestor
        The listener's ingestor (same store, index, quarantine, audit, completion).
    """

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def store(self, parts: list[Path], caller: str, peer_address: str, study_uid: str | None = None) -> StowResult:
        """Ingest each part in order; ``study_uid`` is the target study of ``/studies/{study}``."""
        result = StowResult()
        for index, path in enumerate(parts, start=1):
            self._store_one(path, index, caller, peer_address, study_uid, result)
        return result

    def _store_one(
        self, path: Path, index: int, caller: str, peer_address: str, study_uid: str | None, result: StowResult
    ) -> None:
        size = path.stat().st_size
        if size == 0:
            self._refuse(result, "", "", status.CANNOT_UNDERSTAND, f"part {index} is empty", caller, peer_address)
            return
        # One part in memory at a time (a CT slice is about 0.5 MB).
        self._ingest_view(path, memoryview(path.read_bytes()), index, caller, peer_address, study_uid, result)

    def _ingest_view(
        self, path: Path, view: memoryview, index: int, caller: str, peer: str, study_uid: str | None, result: StowResult
    ) -> None:
        try:
            part = split_part10(path, view)
        except NotPart10 as exc:
            self._refuse(result, "", "", status.CANNOT_UNDERSTAND, f"part {index}: {exc}", caller, peer)
            return
        sop_class = _uid_or_blank(part.sop_class_uid)
        sop_uid = _uid_or_blank(part.sop_instance_uid)
        try:
            if study_uid is not None:
                header = parse_header_fragments((part.dataset,), part.transfer_syntax_uid)
                if header.study_instance_uid != study_uid:
                    # PS3.18 §10.5.1.2.2: an instance of another study than the target resource is refused.
                    self._refuse(
                        result, sop_class, sop_uid, status.DATASET_MISMATCH,
                        f"part {index}: Study Instance UID {header.study_instance_uid} is not the target study {study_uid}",
                        caller, peer,
                    )
                    return
            outcome = self.ingestor.ingest(
                StoreRequest(part.sop_class_uid, part.sop_instance_uid, part.transfer_syntax_uid, caller, peer, (part.dataset,))
            )
        except HeaderError:
            outcome = None
        if outcome is None:
            self._refuse(result, sop_class, sop_uid, status.CANNOT_UNDERSTAND, f"part {index}: data set cannot be decoded", caller, peer)
        elif outcome.status == status.SUCCESS:
            result.stored.append((sop_class, sop_uid))
            if outcome.study_instance_uid:
                result.study_uids.add(outcome.study_instance_uid)
        else:
            # The ingestor already audited (and quarantined) it.
            result.failed.append((sop_class, sop_uid, outcome.status, outcome.error_comment or outcome.reason or ""))

    def _refuse(
        self, result: StowResult, sop_class: str, sop_uid: str, reason: int, comment: str, caller: str, peer: str
    ) -> None:
        """A part refused before the ingest (not Part 10, wrong study): audited, not kept."""
        LOGGER.warning("STOW-RS from %s (%s): %s [0x%04X]", caller, peer, comment, reason)
        self.ingestor.audit.record(
            "instance-rejected",
            calling_ae=caller,
            peer_address=peer,
            sop_class_uid=sop_class or None,
            sop_instance_uid=sop_uid or None,
            status=f"0x{reason:04X}",
            reason="stow-part-refused",
            detail=comment,
        )
        result.failed.append((sop_class, sop_uid, reason, comment))

