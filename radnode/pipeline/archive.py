"""The archive as a Query/Retrieve client: C-FIND for CT series, C-MOVE or C-GET to fetch one.

PS3.4 Annex C, Study Root information model. Everything the archive answers is untrusted
input: a UID that is not a conformant UID (PS3.5 §9.1) is dropped at query time, because
UIDs become folder names; retrieved instances are stored only through the node's ingest
(C-MOVE: the listener; C-GET: :class:`GetRetriever` hands each sub-operation to an
:class:`~radnode.node.ingest.Ingestor`), so both land in ``incoming/<study>/<series>/``,
indexed and audited like any instance a sender pushed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    RTStructureSetStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from radnode.config import Settings
from radnode.node import status
from radnode.node.ingest import Ingestor, StoreRequest, local_ingestor
from radnode.node.series_attributes import SeriesAttributes, element_value, int_value, series_fields, text_value
from radnode.node.storage import InvalidUIDError, series_dir, validate_uid

log = logging.getLogger(__name__)

#: Modality (0008,0060) the sweep looks for.
CT_MODALITY = "CT"
#: Attributes only an IMAGE-level C-FIND returns (read from one instance of the series).
INSTANCE_LEVEL_FIELDS = ("sop_class_uid", "image_type", "slice_thickness", "manufacturer", "software_versions")


class SweepError(RuntimeError):
    """The sweep cannot run (no PACS configured, query refused, already running)."""


@dataclass(frozen=True)
class RetrieveResult:
    """The end of one retrieval."""

    ok: bool
    folder: Path
    completed: int = 0
    failed: int = 0
    status: int | None = None
    error: str | None = None


class Retriever(Protocol):
    """Fetches one series from the archive into a folder the job can read."""

    def retrieve(self, candidate: SeriesAttributes) -> RetrieveResult: ...


def _da(value: date) -> str:
    """A date as DICOM DA (PS3.5 6.2: YYYYMMDD)."""
    return value.strftime("%Y%m%d")


def _text(ds: Dataset, keyword: str) -> str | None:
    return text_value(element_value(ds, keyword))


def _uid(ds: Dataset, keyword: str) -> str | None:
    """A UID the archive returned, or None (logged) when it is missing or not a valid UID."""
    value = _text(ds, keyword)
    if value is None:
        return None
    try:
        return validate_uid(value, keyword)
    except InvalidUIDError as exc:
        log.warning("archive answered an invalid %s; that match is ignored: %s", keyword, exc)
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
        found = series_fields(matches[0])
        return {name: found[name] for name in INSTANCE_LEVEL_FIELDS}

    def _find(self, assoc: Any, identifier: Dataset) -> list[Dataset]:
        matches: list[Dataset] = []
        for response, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in response:
                raise SweepError("C-FIND got no response from the PACS (timeout or abort)")
            code = int(response.Status)
            category = status.category(code)
            if category == status.CATEGORY_PENDING and found is not None:
                matches.append(found)
            elif category not in (status.CATEGORY_PENDING, status.CATEGORY_SUCCESS):
                raise SweepError(f"C-FIND refused by the PACS with status 0x{code:04X}")
        return matches

    def series(self, date_from: date, date_to: date, modality: str = CT_MODALITY) -> list[SeriesAttributes]:
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
            candidates: list[SeriesAttributes] = []
            for found in studies:
                study_uid = _uid(found, "StudyInstanceUID")
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
                candidates.extend(sweep_candidates(
                    found, study_uid, self._find(assoc, query), modality, self.pacs.ae_title,
                    (lambda series_uid: self._instance_facts(assoc, study_uid, series_uid)) if self.instance_level else None,
                ))
        finally:
            assoc.release()
        log.info("sweep C-FIND %s..%s: %d study(ies), %d CT series", date_from, date_to, len(studies), len(candidates))
        return candidates

    def study_series(self, study_uid: str, modality: str) -> list[SeriesAttributes]:
        """C-FIND (SERIES level) the series of one modality in one study, e.g. a clinician's
        RTSTRUCTs for a CT; one association, the node's timeouts."""
        ae = self.ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self.open(ae)
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.Modality = modality
            query.NumberOfSeriesRelatedInstances = ""
            found = self._find(assoc, query)
        finally:
            assoc.release()
        return [
            SeriesAttributes(series_instance_uid=uid, study_instance_uid=study_uid, modality=modality,
                             instance_count=int_value(element_value(ds, "NumberOfSeriesRelatedInstances")),
                             calling_ae=self.pacs.ae_title)
            for ds in found
            if (uid := _uid(ds, "SeriesInstanceUID")) and (_text(ds, "Modality") or "").upper() == modality
        ]


def sweep_candidates(
    study: Dataset,
    study_uid: str,
    answers: Iterable[Dataset],
    modality: str,
    archive_ae: str,
    instance_facts: Callable[[str], dict[str, Any]] | None = None,
) -> list[SeriesAttributes]:
    """The sweep's candidates among one study's SERIES-level answers (C-FIND or QIDO-RS alike).

    Answers without a valid Series Instance UID, or of another modality (an archive that
    ignores the Modality key still returns them), are dropped; ``instance_facts`` adds the
    instance-level attributes some routing rules need.
    """
    candidates: list[SeriesAttributes] = []
    for series in answers:
        series_uid = _uid(series, "SeriesInstanceUID")
        series_modality = _text(series, "Modality") or ""
        if not series_uid or series_modality.upper() != modality:
            continue
        extra = instance_facts(series_uid) if instance_facts is not None else {}
        candidates.append(
            SeriesAttributes(
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                modality=series_modality,
                study_date=_text(study, "StudyDate"),
                series_description=_text(series, "SeriesDescription"),
                body_part_examined=_text(series, "BodyPartExamined"),
                series_number=int_value(element_value(series, "SeriesNumber")),
                instance_count=int_value(element_value(series, "NumberOfSeriesRelatedInstances")),
                station_name=_text(series, "StationName"),
                # Series the sweep fetches come from the archive: it is their sender.
                calling_ae=archive_ae,
                **extra,
            )
        )
    return candidates


def _retrieve_identifier(candidate: SeriesAttributes) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = candidate.study_instance_uid
    identifier.SeriesInstanceUID = candidate.series_instance_uid
    return identifier


def _final_status(responses: Iterator[tuple[Dataset, Dataset | None]]) -> tuple[int | None, int, int]:
    """Consume C-MOVE/C-GET responses; return (final status, completed, failed sub-operations)."""
    final: int | None = None
    completed = failed = 0
    for response, _identifier in responses:
        if "Status" not in response:
            return None, completed, failed
        final = int(response.Status)
        completed = int(response.get("NumberOfCompletedSuboperations", completed) or 0)
        failed = int(response.get("NumberOfFailedSuboperations", failed) or 0)
    return final, completed, failed


def _retrieve_outcome(candidate: SeriesAttributes, folder: Path, final: int | None, completed: int, failed: int, verb: str) -> RetrieveResult:
    if final is None:
        return RetrieveResult(False, folder, completed, failed, None, f"{verb}: no response from the PACS (timeout or abort)")
    category = status.category(final)
    if category == status.CATEGORY_SUCCESS or (category == status.CATEGORY_WARNING and completed > 0):
        if failed:
            log.warning("%s of series %s: %d sub-operation(s) failed, %d completed", verb, candidate.series_instance_uid, failed, completed)
        return RetrieveResult(True, folder, completed, failed, final)
    hint = " (the PACS does not know radnode's AE title as a move destination)" if final == status.MOVE_DESTINATION_UNKNOWN else ""
    return RetrieveResult(False, folder, completed, failed, final, f"{verb} failed with status 0x{final:04X}{hint}")


class MoveRetriever(_Association):
    """C-MOVE a series to radnode's own AE title (the listener receives it)."""

    def retrieve(self, candidate: SeriesAttributes) -> RetrieveResult:
        folder = series_dir(self.settings.storage.data_dir, candidate.study_instance_uid, candidate.series_instance_uid)
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
    """C-GET a series over one association; each instance goes through the node's ingest.

    The C-STORE sub-operations arrive on the same association. Their data is untrusted
    archive input, so it takes exactly the path of an instance sent to the listener
    (:class:`~radnode.node.ingest.Ingestor`): UID checks (a UID never becomes a path
    unchecked), the exact bytes received written durably under ``incoming/``, indexed,
    audited, or quarantined with a reason and answered with a failure status.

    Parameters
    ----------
    settings
        PACS address, our AE title, timeouts, data folder.
    ingestor
        A context manager factory yielding the :class:`Ingestor` to use; by default
        :func:`~radnode.node.ingest.local_ingestor` on ``settings``.
    """

    def __init__(self, settings: Settings, ingestor: Callable[[Settings], AbstractContextManager[Ingestor]] | None = None) -> None:
        super().__init__(settings)
        self._ingestor = ingestor or local_ingestor

    def retrieve(self, candidate: SeriesAttributes) -> RetrieveResult:
        folder = series_dir(self.settings.storage.data_dir, candidate.study_instance_uid, candidate.series_instance_uid)
        archive_ae = self.pacs.ae_title
        with self._ingestor(self.settings) as ingestor:

            def on_store(event: Any) -> int | Dataset:
                request = event.request
                with request.DataSet.getbuffer() as data:
                    outcome = ingestor.ingest(
                        StoreRequest(
                            sop_class_uid=str(request.AffectedSOPClassUID or ""),
                            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                            transfer_syntax_uid=str(event.context.transfer_syntax),
                            calling_ae=archive_ae,
                            peer_address=str(event.assoc.acceptor.address),
                            dataset=(data,),
                        )
                    )
                if outcome.status == status.SUCCESS:
                    if outcome.series_instance_uid != candidate.series_instance_uid:
                        log.warning(
                            "C-GET of series %s: the archive sent an instance of series %s (stored as such)",
                            candidate.series_instance_uid, outcome.series_instance_uid,
                        )
                    return status.SUCCESS
                response = Dataset()
                response.Status = outcome.status
                if outcome.error_comment:
                    response.ErrorComment = outcome.error_comment
                return response

            ae = self.ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            ae.add_requested_context(CTImageStorage)
            ae.add_requested_context(RTStructureSetStorage)  # a clinician's contours for the CT
            try:
                roles = [build_role(CTImageStorage, scp_role=True), build_role(RTStructureSetStorage, scp_role=True)]
                assoc = self.open(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
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
