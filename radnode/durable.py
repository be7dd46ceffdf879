"""Durable file replacement: the one way radnode puts a finished file (or folder) in place.

Every writer that must survive ``kill -9`` or a power cut follows the same sequence: write
to a temporary name in the target's own folder (same file system, so the rename is
atomic), fsync the file, rename it over the final name, fsync the folder so the new name
is durable too. A crash at any point leaves either the old file or the new one, never
half of one; a reader never sees a partial file. Callers choose only *how* the bytes are
produced (bytes, JSON, ``Dataset.save_as``, ``torch.save``, a copy), never the sequence.

The listener's streaming variant (a file filled while the data arrives) is
:class:`radnode.node.storage.TemporaryFile`; it ends with the same fsync, rename and
folder fsync from this module.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Mode of files radnode publishes for others to read (results, outbox, configuration).
PUBLIC_FILE_MODE = 0o644
#: Read size of :func:`copy_file`.
_COPY_CHUNK = 1 << 20


def fsync_directory(path: Path) -> None:
    """fsync a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(target: Path) -> Path:
    # Hidden and unique, so a folder scan for ``*.dcm`` or ``*.json`` never picks it up.
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def replacing(target: Path, mode: int | None = PUBLIC_FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on a clean exit it becomes ``target`` durably.

    The caller writes the temporary path however it likes (``save_as``, ``torch.save``);
    this then fsyncs it, sets ``mode`` (``None`` keeps what the writer made), renames it
    over ``target`` and fsyncs the folder. On an exception the temporary file is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    try:
        yield tmp
        _fsync_path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def write_bytes(target: Path, data: bytes | Sequence[bytes | memoryview], mode: int | None = PUBLIC_FILE_MODE) -> int:
    """Write ``data`` (one buffer or several) to ``target`` durably; return the byte count."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    size = 0
    with replacing(target, mode) as tmp:
        with open(tmp, "xb") as handle:
            for part in parts:
                size += handle.write(part)
    return size


def write_text(target: Path, text: str, mode: int | None = PUBLIC_FILE_MODE) -> int:
    """Write UTF-8 ``text`` to ``target`` durably."""
    return write_bytes(target, text.encode("utf-8"), mode)


def write_json(target: Path, payload: Any, mode: int | None = PUBLIC_FILE_MODE) -> int:
    """Write ``payload`` as indented JSON (with a final newline) to ``target`` durably."""
    return write_text(target, json.dumps(payload, indent=2, default=str) + "\n", mode)


def copy_file(source: Path, target: Path, mode: int | None = PUBLIC_FILE_MODE, link: bool = False) -> Path:
    """Put a copy of ``source`` at ``target`` durably, byte for byte.

    With ``link``, a hard link is tried first: for a file that is never modified in place
    (a received instance) it is an exact copy at no cost, and removing either name later
    leaves the other intact. It falls back to copying (another file system, no links).
    ``mode`` applies only to real copies: a link shares the source's inode and mode.
    """
    source, target = Path(source), Path(target)
    if link:
        try:
            with replacing(target, mode=None) as tmp:
                os.link(source, tmp)
            return target
        except OSError:
            pass  # EXDEV, EPERM, EMLINK: copy instead
    with replacing(target, mode) as tmp:
        with open(source, "rb") as src, open(tmp, "xb") as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
    return target


def replace_tree(staged: Path, target: Path) -> None:
    """Move a fully written folder or file ``staged`` to ``target`` durably, replacing it.

    Every file below ``staged`` is fsynced first. A folder cannot be renamed over a
    non-empty one, so an existing ``target`` is moved aside (same folder) and removed
    after the rename; a crash in between leaves a hidden ``.old`` entry beside it,
    never a missing or half-written ``target``.
    """
    staged, target = Path(staged), Path(target)
    if staged.is_dir():
        for root, _dirs, files in os.walk(staged):
            for name in files:
                _fsync_path(Path(root) / name)
            fsync_directory(Path(root))
    else:
        _fsync_path(staged)
    old: Path | None = None
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
        os.replace(target, old)
    os.replace(staged, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        fsync_directory(target.parent)
