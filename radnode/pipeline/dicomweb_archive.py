"""The archive over DICOMweb: QIDO-RS to find CT series, WADO-RS to fetch one (``pacs.protocol: dicomweb``).

The same interface as the DIMSE client in :mod:`radnode.pipeline.archive` --
:meth:`QidoArchiveQuery.series` returns :class:`~radnode.pipeline.archive.SeriesAttributes`
objects, :meth:`WadoRetriever.retrieve` a :class:`~radnode.pipeline.archive.RetrieveResult`
-- so :class:`~radnode.pipeline.sweep.Sweeper` runs unchanged on either. QIDO-RS answers are
DICOM JSON (PS3.18 Annex F), read into pydicom data sets and treated as the untrusted input
they are (an invalid UID drops the match, as with C-FIND). WADO-RS instances (PS3.18 §10.4,
in their stored transfer syntax) take the node's ingest like C-GET sub-operations: each is
written as a Part 10 file to ``tmp/`` and handed to :class:`~radnode.node.stow.StowReceiver`,
the STOW-RS path, so it is checked, stored, indexed, audited or quarantined by the
:class:`~radnode.node.ingest.Ingestor` with the archive's AE title as calling AE.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import date
from typing import Any
from urllib.parse import urlsplit

import requests
from pydicom.dataset import Dataset

from radnode.config import Settings
from radnode.node.ingest import Ingestor, local_ingestor
from radnode.node.series_attributes import SeriesAttributes, series_fields
from radnode.node.storage import series_dir
from radnode.node.stow import StowReceiver
from radnode.pipeline.archive import (
    CT_MODALITY,
    INSTANCE_LEVEL_FIELDS,
    RetrieveResult,
    SweepError,
    _da,
    _uid,
    sweep_candidates,
)
from radnode.pipeline.dicomweb_http import dicomweb_client

log = logging.getLogger(__name__)

#: Attributes asked for at SERIES level (QIDO-RS includefield).
SERIES_FIELDS = [
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "StationName", "NumberOfSeriesRelatedInstances", "StudyDate",
]
#: Attributes of one instance for routing rules that test them (as the DIMSE client's IMAGE level).
INSTANCE_FIELDS = ["SOPClassUID", "ImageType", "SliceThickness", "Manufacturer", "SoftwareVersions"]
#: Matches asked for per QIDO-RS request.
QIDO_PAGE = 200
#: WADO-RS: the instances as stored (PS3.18 §8.7.3.5.2, transfer-syntax=*).
STORED_TRANSFER_SYNTAX = (("application/dicom", "*"),)


def _datasets(answer: list[dict[str, Any]]) -> list[Dataset]:
    found = []
    for entry in answer:
        try:
            found.append(Dataset.from_json(entry))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("archive answered a QIDO-RS match that is not DICOM JSON; ignored: %s", exc)
    return found


class _DicomWebArchive:
    """The configured PACS as a DICOMweb client."""

    def __init__(self, settings: Settings) -> None:
        pacs = settings.pacs
        if pacs is None or pacs.protocol != "dicomweb" or pacs.url is None:
            raise SweepError("the DICOMweb sweep needs pacs.protocol: dicomweb and pacs.url")
        self.settings = settings
        self.pacs = pacs
        self.url = pacs.url
        self.client = dicomweb_client(pacs.url, pacs.auth)


class QidoArchiveQuery(_DicomWebArchive):
    """QIDO-RS search for CT series (PS3.18 §10.6): studies by date and modality, then their series.

    Parameters
    ----------
    settings
        ``pacs.url`` and ``pacs.auth``.
    instance_level
        Also search one instance per series for the attributes routing rules on Image
        Type, Slice Thickness, SOP Class or Manufacturer need.
    """

    def __init__(self, settings: Settings, instance_level: bool = False) -> None:
        super().__init__(settings)
        self.instance_level = instance_level

    def _search(self, what: str, call: Callable[[], list[dict[str, Any]]]) -> list[Dataset]:
        try:
            return _datasets(call())
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise SweepError(f"QIDO-RS {what} refused by {self.url} with HTTP {code}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SweepError(f"PACS {self.url} is unreachable ({type(exc).__name__})") from None

    def _search_all(self, what: str, page: Callable[[int, int], list[dict[str, Any]]], key: str) -> list[Dataset]:
        """Every match, page by page (limit/offset, PS3.18 §8.3.4.4); stops when a page is short,
        or brings nothing new (an archive that ignores offset would otherwise be asked forever)."""
        found: list[Dataset] = []
        seen: set[str] = set()
        offset = 0
        while True:
            matches = self._search(what, lambda: page(QIDO_PAGE, offset))
            fresh = [m for m in matches if str(m.get(key, "")) not in seen]
            found += fresh
            seen.update(str(m.get(key, "")) for m in fresh)
            if len(matches) < QIDO_PAGE or not fresh:
                return found
            offset += len(matches)

    def _instance_facts(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        found = self._search(
            "instances",
            lambda: self.client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid, fields=INSTANCE_FIELDS, limit=1
            ),
        )
        if not found:
            return {}
        facts = series_fields(found[0])
        return {name: facts[name] for name in INSTANCE_LEVEL_FIELDS}

    def series(self, date_from: date, date_to: date, modality: str = CT_MODALITY) -> list[SeriesAttributes]:
        """All series of ``modality`` in studies dated within ``[date_from, date_to]``."""
        studies = self._search_all(
            "studies",
            lambda limit, offset: self.client.search_for_studies(
                search_filters={"StudyDate": f"{_da(date_from)}-{_da(date_to)}", "ModalitiesInStudy": modality},
                fields=["StudyInstanceUID", "StudyDate"],
                limit=limit,
                offset=offset,
            ),
            "StudyInstanceUID",
        )
        candidates: list[SeriesAttributes] = []
        for found in studies:
            study_uid = _uid(found, "StudyInstanceUID")
            if not study_uid:
                continue
            matches = self._search_all(
                "series",
                lambda limit, offset: self.client.search_for_series(
                    study_instance_uid=study_uid, search_filters={"Modality": modality}, fields=SERIES_FIELDS,
                    limit=limit, offset=offset,
                ),
                "SeriesInstanceUID",
            )
            candidates.extend(sweep_candidates(
                found, study_uid, matches, modality, self.pacs.ae_title,
                (lambda series_uid: self._instance_facts(study_uid, series_uid)) if self.instance_level else None,
            ))
        log.info("sweep QIDO-RS %s..%s: %d study(ies), %d CT series", date_from, date_to, len(studies), len(candidates))
        return candidates


class WadoRetriever(_DicomWebArchive):
    """WADO-RS a series; each instance goes through the node's ingest (as C-GET sub-operations do).

    Parameters
    ----------
    settings
        ``pacs.url``, ``pacs.auth``, ``pacs.ae_title`` (the calling AE of what it sends), data folder.
    ingestor
        Context manager factory of the :class:`Ingestor` to use (default
        :func:`~radnode.node.ingest.local_ingestor` on ``settings``).
    """

    def __init__(self, settings: Settings, ingestor: Callable[[Settings], AbstractContextManager[Ingestor]] | None = None) -> None:
        super().__init__(settings)
        self._ingestor = ingestor or local_ingestor

    def retrieve(self, candidate: SeriesAttributes) -> RetrieveResult:
        folder = series_dir(self.settings.storage.data_dir, candidate.study_instance_uid, candidate.series_instance_uid)
        completed = failed = 0
        peer = urlsplit(self.url).hostname or self.url
        with self._ingestor(self.settings) as ingestor:
            receiver = StowReceiver(ingestor)
            try:
                for ds in self.client.iter_series(
                    candidate.study_instance_uid, candidate.series_instance_uid, media_types=STORED_TRANSFER_SYNTAX
                ):
                    part = ingestor.store.tmp_dir / f"{uuid.uuid4().hex}.wado-part"
                    try:
                        ds.save_as(part, enforce_file_format=True)
                        result = receiver.store([part], self.pacs.ae_title, peer)
                    finally:
                        part.unlink(missing_ok=True)
                    completed += len(result.stored)
                    failed += len(result.failed)
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                return RetrieveResult(False, folder, completed, failed, None, f"WADO-RS failed with HTTP {code}")
            except (requests.ConnectionError, requests.Timeout) as exc:
                return RetrieveResult(False, folder, completed, failed, None, f"WADO-RS: {self.url} unreachable ({type(exc).__name__})")
        if completed == 0:
            return RetrieveResult(False, folder, completed, failed, None, f"WADO-RS: no instance stored ({failed} refused)")
        if failed:
            log.warning("WADO-RS of series %s: %d instance(s) refused, %d stored", candidate.series_instance_uid, failed, completed)
        return RetrieveResult(True, folder, completed, failed)


def archive_clients(settings: Settings, instance_level: bool = False) -> tuple[QidoArchiveQuery, WadoRetriever]:
    """The query and retriever of a ``pacs.protocol: dicomweb`` archive."""
    return QidoArchiveQuery(settings, instance_level), WadoRetriever(settings)
