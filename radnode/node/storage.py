"""Durable files: received instances, quarantined data, and the disk guard.

An instance is acknowledged only after its bytes are on disk. Each write goes to a
temporary file in ``<data_dir>/tmp`` (same file system as the archive, so the rename is
atomic), is fsync'ed, renamed to ``incoming/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, and the
directory is fsync'ed so the new name survives a crash too. A crash at any point leaves
either nothing, or a temporary file that :meth:`InstanceStore.clean_temporary` removes at
start-up, or a complete file. The listener fills the temporary file while the data
arrives (:class:`TemporaryFile`); the fsync, rename and directory fsync still come only
after the last byte, and before the sender hears Success.

The file is a PS3.10 Part 10 file: a 128-byte preamble, ``DICM``, a File Meta Information
group encoded here by hand (Explicit VR Little Endian, PS3.10 §7.1), then the data set
bytes exactly as they arrived in the negotiated transfer syntax (no re-encoding).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radnode.durable import fsync_directory

LOGGER = logging.getLogger(__name__)

#: PS3.5 §9.1: a UID is at most 64 characters of digits and dots, with components that do
#: not start with 0 (except the single digit 0). This is what makes a UID safe as a path
#: component: no separators, no "..", no empty name.
UID_MAX_LENGTH = 64
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

#: Implementation Class UID of radnode in the File Meta (PS3.7 §D.3.3.2): a UUID-derived
#: UID (PS3.5 §B.2) fixed for the project.
IMPLEMENTATION_CLASS_UID = "2.25.229367735812395312066591627212327893761"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = "RADNODE_0_1"

_PREAMBLE = b"\x00" * 128 + b"DICM"
_TEMP_SUFFIX = ".part"
_BYTES_PER_GB = 1_000_000_000
#: Most buffers one ``writev`` takes (IOV_MAX); a data set in small PDUs has more pieces.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: Folders remembered as existing (saves a stat per store); cleared when it grows past this.
_KNOWN_DIRS_LIMIT = 100_000

# The layout of ``<data_dir>`` (defined here only; everything else asks this module).
#: Received instances: ``incoming/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.
INCOMING_DIR = "incoming"
#: Rejected data, each item with a JSON reason file (see :mod:`radnode.node.quarantine`).
QUARANTINE_DIR = "quarantine"
#: Temporary files (same file system, so the final rename is atomic).
TMP_DIR = "tmp"
#: The node's index of instances and series.
INDEX_FILE = "radnode.sqlite"
#: The audit trail.
AUDIT_FILE = Path("audit") / "audit.jsonl"


class InvalidUIDError(ValueError):
    """A UID that is not a conformant UID and so can never become a path component."""

    def __init__(self, attribute: str, value: object) -> None:
        self.attribute = attribute
        self.value = value
        super().__init__(
            f"{attribute} {value!r} is not a valid UID: PS3.5 §9.1 allows at most "
            f"{UID_MAX_LENGTH} characters of digits and dots, without leading zeros"
        )


def validate_uid(value: object, attribute: str) -> str:
    """Return ``value`` if it is a conformant UID, else raise :class:`InvalidUIDError`.

    Trailing NUL/space padding (PS3.5 §6.2, UI values are NUL-padded) is removed first.
    """
    if not isinstance(value, str):
        raise InvalidUIDError(attribute, value)
    uid = value.rstrip("\x00 ")
    if not uid or len(uid) > UID_MAX_LENGTH or _UID_RE.fullmatch(uid) is None:
        raise InvalidUIDError(attribute, value)
    return uid


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """Encode one group-0002 element in Explicit VR Little Endian (PS3.5 §7.1.2)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str | None = None
) -> bytes:
    """Preamble, prefix and File Meta Information group for a Part 10 file (PS3.10 §7.1).

    Encoded by hand because building it through pydicom costs more than writing the file.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
            _element(0x0016, b"AE", source_ae.encode("ascii", "replace")) if source_ae else b"",
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body


def series_dir(data_dir: Path, study_uid: str, series_uid: str) -> Path:
    """Folder of one received series: ``<data_dir>/incoming/<StudyUID>/<SeriesUID>``.

    Raises :class:`InvalidUIDError` for a UID that is not a conformant UID, since this is
    where a UID becomes a path (an archive's or a sender's UID is untrusted input).
    """
    study = validate_uid(study_uid, "StudyInstanceUID")
    series = validate_uid(series_uid, "SeriesInstanceUID")
    return Path(data_dir) / INCOMING_DIR / study / series


def _write_all(fd: int, parts: Sequence[bytes | memoryview]) -> int:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    written = 0
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    if written != total:
        raise OSError(f"short write: {written} of {total} bytes")
    return written


@dataclass(frozen=True)
class StoredFile:
    """Where an instance was written and how big the file is."""

    path: Path
    relative_path: str
    size: int


class InstanceStore:
    """The on-disk layout under ``data_dir``: ``incoming/``, ``quarantine/`` and ``tmp/``.

    Parameters
    ----------
    data_dir
        Root folder (``storage.data_dir``); created if missing.
    min_free_gb
        The disk guard (``storage.min_free_gb``): below this much free space, nothing is
        written and the node answers 0xA700.
    """

    def __init__(self, data_dir: Path, min_free_gb: float = 1.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.incoming = self.data_dir / INCOMING_DIR
        self.quarantine_dir = self.data_dir / QUARANTINE_DIR
        self.tmp_dir = self.data_dir / TMP_DIR
        self.min_free_bytes = int(min_free_gb * _BYTES_PER_GB)
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()
        for folder in (self.data_dir, self.incoming, self.quarantine_dir, self.tmp_dir):
            self._make_dirs(folder)

    # --- start-up -------------------------------------------------------------------------

    def clean_temporary(self) -> int:
        """Delete temporary files left by a crash; return how many were removed.

        Only ``tmp/`` holds temporary files, and nothing in it was ever acknowledged.
        """
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            fsync_directory(self.tmp_dir)
            LOGGER.warning("removed %d leftover temporary file(s) from %s", removed, self.tmp_dir)
        return removed

    # --- disk guard -----------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes available to this process on the data file system."""
        stats = os.statvfs(self.data_dir)
        return stats.f_bavail * stats.f_frsize

    def has_room(self) -> bool:
        """True when free space is at or above ``storage.min_free_gb``."""
        return self.free_bytes() >= self.min_free_bytes

    # --- instances ------------------------------------------------------------------------

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, version: int = 1) -> Path:
        """Final path of an instance; version > 1 marks a differing re-send (``_v2``).

        The UIDs must already be validated; they are re-checked here because this is
        the line that turns them into a path.
        """
        validate_uid(sop_uid, "SOPInstanceUID")
        name = f"{sop_uid}.dcm" if version == 1 else f"{sop_uid}_v{version}.dcm"
        return series_dir(self.data_dir, study_uid, series_uid) / name

    def write_instance(self, final: Path, parts: Sequence[bytes | memoryview]) -> StoredFile:
        """Write ``parts`` durably to ``final`` (temp file, fsync, rename, fsync dir)."""
        staged = self.temporary()
        try:
            staged.append(parts)
            return staged.commit(final)
        finally:
            staged.discard()  # nothing left behind when a step failed; no-op after commit

    def temporary(self, prefix: bytes = b"") -> TemporaryFile:
        """A new temporary file in ``tmp/`` holding ``prefix``, to be appended to and then
        committed to its final path (see :class:`TemporaryFile`)."""
        staged = TemporaryFile(self, self.tmp_dir / f"{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        if prefix:
            staged.append([prefix])
        staged.prefix = prefix
        return staged

    def read_dataset_bytes(self, path: Path) -> bytes:
        """The data set part of a Part 10 file we wrote (everything after the File Meta)."""
        with open(path, "rb") as handle:
            head = handle.read(144)
            if len(head) < 144 or head[128:132] != b"DICM":
                raise ValueError(f"{path} is not a Part 10 file")
            (group_length,) = struct.unpack("<I", head[140:144])
            handle.seek(144 + group_length)
            return handle.read()

    # --- quarantine -----------------------------------------------------------------------

    def quarantine(self, parts: Sequence[bytes | memoryview], reason: dict[str, Any]) -> Path | None:
        """Keep rejected bytes with a JSON reason file; return the data file's path.

        The name never derives from the (untrusted) UIDs. Nothing is written when the
        disk guard is tripped, since quarantine must not fill the disk either.
        """
        if not self.has_room():
            LOGGER.error("disk guard: not quarantining %s", reason.get("reason"))
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        stem = f"{stamp}-{uuid.uuid4().hex[:12]}"
        data_path = self.quarantine_dir / f"{stem}.dcm"
        stored = self.write_instance(data_path, parts)
        record = dict(reason, data_file=data_path.name, size=stored.size)
        text = json.dumps(record, indent=2, sort_keys=True, default=str).encode("utf-8")
        self.write_instance(self.quarantine_dir / f"{stem}.json", [text])
        return data_path

    # --- helpers --------------------------------------------------------------------------

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and parents, fsync'ing each parent that gained an entry."""
        if folder in self._known_dirs:
            return
        with self._dir_lock:
            missing: list[Path] = []
            current = folder
            while not current.exists():
                missing.append(current)
                current = current.parent
            for path in reversed(missing):
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                fsync_directory(path.parent)
            if len(self._known_dirs) > _KNOWN_DIRS_LIMIT:
                self._known_dirs.clear()
            self._known_dirs.add(folder)


class TemporaryFile:
    """A file in ``tmp/`` being written: appended to, then committed or discarded.

    :meth:`commit` is the durable sequence of the module docstring (fsync, rename,
    fsync of the directory); :meth:`discard` closes and deletes it. The listener appends
    a C-STORE data set PDU by PDU while it arrives (:meth:`append_quietly`), so that only
    the fsync is left when the last PDU is in. Thread-safe: a connection that closes
    mid-transfer discards the file from another thread.
    """

    def __init__(self, store: InstanceStore, path: Path) -> None:
        self.store = store
        self.path = path
        self.prefix = b""
        #: Bytes appended so far.
        self.size = 0
        #: True once an append failed; such a file is never committed.
        self.failed = False
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)

    @property
    def is_open(self) -> bool:
        """True until the file is committed or discarded."""
        return self._fd is not None

    def append(self, parts: Sequence[bytes | memoryview]) -> None:
        """Append ``parts``; raises OSError (and marks the file failed) when that fails."""
        with self._lock:
            if self._fd is None:
                raise OSError(f"temporary file {self.path.name} is already closed")
            try:
                self.size += _write_all(self._fd, parts)
            except OSError:
                self.failed = True
                raise

    def append_quietly(self, part: bytes | memoryview) -> None:
        """Append one piece; a failure only marks the file failed (and is logged).
        Nothing happens once the file is discarded (the connection closed meanwhile)."""
        if self._fd is None:
            return
        try:
            self.append([part])
        except OSError as exc:
            LOGGER.error("writing temporary file %s failed: %s", self.path.name, exc)

    def commit(self, final: Path) -> StoredFile:
        """fsync, close, rename to ``final``, fsync its directory; return what was stored."""
        with self._lock:
            fd = self._fd
            if fd is None or self.failed:
                raise OSError(f"temporary file {self.path.name} cannot be committed (closed or failed)")
            self._fd = None
            try:
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quietly(self.path)
                raise
            os.close(fd)
            try:
                self.store._make_dirs(final.parent)
                os.replace(self.path, final)
            except BaseException:
                _unlink_quietly(self.path)
                raise
        fsync_directory(final.parent)
        return StoredFile(final, final.relative_to(self.store.data_dir).as_posix(), self.size)

    def discard(self) -> None:
        """Close and delete the file unless it was committed; safe to call again."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            _unlink_quietly(self.path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
