"""C-GET SCP: the node serves a stored series to its remote workers (PS3.4 C.4.3).

A ``radnode worker`` on another machine does not mount the node's data folder: it asks
the node for the series of its job with a C-GET at SERIES level (Study Root
Query/Retrieve Information Model - GET) and receives the instances as C-STORE
sub-operations on the same association, so no inbound port is needed on the worker.

Who may ask is decided before any of this runs: the association passes the node's AE
allow-list and host list (:mod:`radnode.node.access`) like every other association.
Only the newest stored version of each SOP instance is sent (a differing re-send
replaced the older file). A retrieve that names no series, or a series the node does not
hold, ends with a failure status and a comment, never an exception.

This module never imports torch or MONAI (it runs in the listener).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from radnode.node.index import InstanceRecord, NodeIndex

LOGGER = logging.getLogger(__name__)

#: C-GET statuses (PS3.4 C.4.3.1.4).
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
PENDING = 0xFF00


def get_contexts() -> list[Any]:
    """The Query/Retrieve GET context the listener accepts."""
    return [build_context(StudyRootQueryRetrieveInformationModelGet, ALL_TRANSFER_SYNTAXES)]


def newest_versions(records: list[InstanceRecord]) -> list[InstanceRecord]:
    """One record per SOP instance: the highest version, in arrival order."""
    newest: dict[str, InstanceRecord] = {}
    for record in records:
        if record.sop_instance_uid not in newest or record.version > newest[record.sop_instance_uid].version:
            newest[record.sop_instance_uid] = record
    return sorted(newest.values(), key=lambda r: (r.received_at, r.sop_instance_uid))


def _failure(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class SeriesGetProvider:
    """Answers C-GET requests at SERIES level from the node's index and files."""

    def __init__(self, index: NodeIndex, data_dir: Path) -> None:
        self.index = index
        self.data_dir = Path(data_dir)

    def _path(self, record: InstanceRecord) -> Path:
        path = Path(record.path)
        return path if path.is_absolute() else self.data_dir / path

    def handle(self, event: Any) -> Iterator[Any]:
        """``evt.EVT_C_GET`` handler: yield the sub-operation count, then ``(status, dataset)`` pairs."""
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "") or "").upper()
        series_uid = str(identifier.get("SeriesInstanceUID", "") or "")
        calling = str(event.assoc.requestor.ae_title).strip()
        if level != "SERIES" or not series_uid or "\\" in series_uid:
            yield 1  # pynetdicom reads the count first; the failure below ends the retrieve
            yield _failure(IDENTIFIER_MISMATCH, "only SERIES level with one SeriesInstanceUID"), None
            return
        records = newest_versions(self.index.series_instances(series_uid))
        if not records:
            LOGGER.warning("C-GET from %r: series %s is not stored here", calling, series_uid)
            yield 1
            yield _failure(UNABLE_TO_PROCESS, "series not stored on this node"), None
            return
        LOGGER.info("C-GET from %r: sending %d instance(s) of series %s", calling, len(records), series_uid)
        yield len(records)
        for record in records:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            try:
                dataset = pydicom.dcmread(self._path(record))
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                LOGGER.error("C-GET of series %s: cannot read %s: %s", series_uid, record.sop_instance_uid, exc)
                yield _failure(UNABLE_TO_PROCESS, "stored instance unreadable"), None
                return
            yield PENDING, dataset
