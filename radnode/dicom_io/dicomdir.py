"""Find the files referenced by a DICOMDIR (PS3.10 section 8, PS3.3 F.3 Basic Directory IOD).

A DICOMDIR lists the instances of a File-set as directory records; each IMAGE (or other
leaf) record names its file by Referenced File ID (0004,1500), a list of path components
relative to the folder holding the DICOMDIR. Media written on one system are often copied
with the case of the names changed, so a component that does not exist as written is
matched case-insensitively.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

logger = logging.getLogger(__name__)

DICOMDIR_NAME = "DICOMDIR"


class DicomdirError(ValueError):
    """A DICOMDIR could not be read or references nothing usable."""


def is_dicomdir(path: Path) -> bool:
    """Whether ``path`` is a DICOMDIR file (Media Storage Directory Storage SOP class).

    The name is not trusted alone: the file meta Media Storage SOP Class UID must be
    1.2.840.10008.1.3.10.
    """
    if not path.is_file():
        return False
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    return meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage


def find_dicomdir(folder: Path) -> Path | None:
    """Return the DICOMDIR directly inside ``folder`` (any letter case), if there is one."""
    for child in folder.iterdir():
        if child.name.upper() == DICOMDIR_NAME and is_dicomdir(child):
            return child
    return None


def referenced_files(dicomdir: Path) -> list[Path]:
    """List the files that the directory records of ``dicomdir`` reference.

    Parameters
    ----------
    dicomdir
        Path of the DICOMDIR file.

    Returns
    -------
    list of Path
        Existing files, in record order, without duplicates. References to missing files
        are logged and skipped (the loader's QC then reports what is absent).

    Raises
    ------
    DicomdirError
        If the file is not a readable DICOMDIR.
    """
    try:
        ds = pydicom.dcmread(dicomdir)
    except (InvalidDicomError, OSError) as exc:
        raise DicomdirError(f"cannot read DICOMDIR {dicomdir}: {exc}") from exc
    records = ds.get("DirectoryRecordSequence")
    if records is None:
        raise DicomdirError(
            f"{dicomdir} has no Directory Record Sequence (0004,1220); not a DICOMDIR"
        )
    root = dicomdir.parent
    found: list[Path] = []
    seen: set[Path] = set()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        path = _resolve(root, parts)
        if path is None:
            logger.warning(
                "DICOMDIR %s references a missing file %s (record type %s)",
                dicomdir,
                "/".join(parts),
                record.get("DirectoryRecordType", "?"),
            )
            continue
        if path not in seen:
            seen.add(path)
            found.append(path)
    return found


def _resolve(root: Path, parts: list[str]) -> Path | None:
    """Join ``parts`` under ``root``, matching each component case-insensitively if needed."""
    current = root
    for part in parts:
        candidate = current / part
        if not candidate.exists():
            if not current.is_dir():
                return None
            matches = [c for c in current.iterdir() if c.name.upper() == part.upper()]
            if len(matches) != 1:
                return None
            candidate = matches[0]
        current = candidate
    return current if current.is_file() else None
