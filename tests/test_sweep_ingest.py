"""The sweep's C-GET against a hostile archive: every retrieved instance takes the ingest path.

The archive is a real pynetdicom Query/Retrieve SCP in the test process. It answers the
sweep's C-FIND with one good series (and one series whose UID is a path-traversal
string), and its C-GET delivers real CT slices: two good ones, one whose SOP Instance
UID is ``../../../../escaped`` and one whose Series Instance UID climbs out of the data
folder. The good slices must be stored byte for byte under ``incoming/``, indexed and
audited; the hostile ones quarantined with a reason; nothing written outside the data
folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from radnode.config import Settings
from radnode.node.audit import read_audit
from radnode.node.index import NodeIndex
from radnode.node.storage import AUDIT_FILE, INDEX_FILE
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.sweep import Sweeper

from node_support import IBSI_SLICES, free_port

ARCHIVE_AE = "HOSTILE_PACS"
STUDY_DATE = "20240315"


class HostileArchive:
    """A Study Root C-FIND / C-GET SCP serving a fixed set of series (by SeriesInstanceUID)."""

    def __init__(self, study_uid: str, series: dict[str, list[Dataset]]) -> None:
        self.study_uid = study_uid
        self.series = series
        self.port = free_port()
        self._server: Any = None

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        if level == "STUDY":
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = self.study_uid
            match.StudyDate = STUDY_DATE
            yield 0xFF00, match
        elif level == "SERIES":
            for series_uid, instances in self.series.items():
                match = Dataset()
                match.QueryRetrieveLevel = "SERIES"
                match.StudyInstanceUID = self.study_uid
                match.SeriesInstanceUID = series_uid
                match.Modality = "CT"
                match.NumberOfSeriesRelatedInstances = str(len(instances))
                yield 0xFF00, match
        yield 0x0000, None

    def _on_get(self, event: Any) -> Iterator[Any]:
        instances = self.series.get(str(event.identifier.SeriesInstanceUID), [])
        yield len(instances)
        for ds in instances:
            yield 0xFF00, ds

    def __enter__(self) -> HostileArchive:
        ae = AE(ae_title=ARCHIVE_AE)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self._on_find), (evt.EVT_C_GET, self._on_get)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def _slices(shared_data: Path, count: int) -> list[Path]:
    return sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:count]


def test_c_get_from_a_hostile_archive_is_ingested_or_quarantined(tmp_path: Path, shared_data: Path) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    sources = _slices(shared_data, 4)
    instances = []
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = STUDY_DATE
        instances.append(ds)
    good, bad_sop, bad_series = instances[:2], instances[2], instances[3]
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad_sop.SOPInstanceUID = "../../../../escaped"  # a name that climbs out of the series folder
        bad_sop.file_meta.MediaStorageSOPInstanceUID = bad_sop.SOPInstanceUID
        bad_series.SeriesInstanceUID = "../../../evil"

    # The data folder sits three levels down, so each traversal would still land in tmp_path.
    data_dir = tmp_path / "a" / "b" / "data"
    hostile_series = "1.2.3/../../../x"
    with HostileArchive(study_uid, {series_uid: instances, hostile_series: good}) as archive:
        settings = Settings(
            storage={"data_dir": str(data_dir), "min_free_gb": 0.0},
            node={"ae_title": "RADNODE"},
            pacs={"ae_title": ARCHIVE_AE, "host": "127.0.0.1", "port": archive.port, "retrieve": "get"},
        )
        queue = SQLiteJobQueue(data_dir / "jobs.sqlite")
        report = Sweeper(settings, queue, "1").run(date(2024, 3, 1), date(2024, 3, 31))

    # The series with a traversal UID was never a candidate; the good one was queued.
    assert [d.candidate.series_instance_uid for d in report.decisions] == [series_uid]
    ((queued_uid, job_id),) = report.queued
    job = queue.get(job_id)
    series_folder = data_dir.resolve() / "incoming" / study_uid / series_uid
    assert queued_uid == series_uid and job.input_path == series_folder

    # Nothing outside the data folder.
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and data_dir.resolve() not in p.resolve().parents]
    assert outside == []

    # The good slices: the exact bytes received, indexed, audited as stored from the archive.
    stored = sorted(series_folder.glob("*.dcm"))
    assert sorted(p.name for p in stored) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in good)
    for ds in good:
        on_disk = pydicom.dcmread(series_folder / f"{ds.SOPInstanceUID}.dcm")
        assert on_disk.PixelData == ds.PixelData
    index = NodeIndex(data_dir / INDEX_FILE)
    try:
        records = index.series_instances(series_uid)
        assert sorted(r.sop_instance_uid for r in records) == sorted(str(ds.SOPInstanceUID) for ds in good)
        assert {r.calling_ae for r in records} == {ARCHIVE_AE}
    finally:
        index.close()
    audit = read_audit(data_dir / AUDIT_FILE)
    stored_events = [r for r in audit if r["event"] == "instance-stored"]
    assert sorted(r["sop_instance_uid"] for r in stored_events) == sorted(str(ds.SOPInstanceUID) for ds in good)

    # The hostile slices: quarantined with their reasons, audited as rejected.
    reasons = [json.loads(p.read_text()) for p in sorted((data_dir / "quarantine").glob("*.json"))]
    assert sorted(r["reason"] for r in reasons) == ["invalid-uid", "invalid-uid"]
    details = " ".join(r["detail"] for r in reasons)
    assert "Affected SOP Instance UID" in details and "SeriesInstanceUID" in details
    rejected = [r for r in audit if r["event"] == "instance-rejected"]
    assert len(rejected) == 2 and all(r["calling_ae"] == ARCHIVE_AE for r in rejected)
    assert len(list((data_dir / "quarantine").glob("*.dcm"))) == 2
