"""Outbox and dispatch against real Orthanc archives: per-destination object types, exactly
once, a stopped archive that later comes back, and a peer's failure status recorded."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from radnode.config import Settings
from radnode.pipeline.dispatch import Dispatcher, DispatchLoop
from radnode.pipeline.jobs import Backoff
from radnode.pipeline.outbox import AttemptOutcome, DestinationState, ItemState, Outbox
from radnode.testing.orthanc import OrthancServer, free_port

from pipeline_support import first_header, wait_for, write_result_objects

#: Status Orthanc answers when it cannot index an object (PS3.4 B.2.3 "Refused: Out of Resources").
ORTHANC_REFUSED = 0xA700


@pytest.fixture(scope="module")
def ct_header(shared_data: Path) -> pydicom.Dataset:
    return first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")


def destination(name: str, server: OrthancServer, port: int | None = None, objects: list[str] | None = None) -> dict[str, object]:
    entry: dict[str, object] = {"name": name, "ae_title": server.aet, "host": "127.0.0.1", "port": port or server.dicom_port}
    if objects is not None:
        entry["objects"] = objects
    return entry


def modalities_in_study(server: OrthancServer, study_uid: str) -> dict[str, int]:
    """Modality -> number of instances, over every series of the study in Orthanc."""
    counts: dict[str, int] = {}
    for series in server.study_series(study_uid):
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def test_each_destination_gets_its_object_types_exactly_once(tmp_path: Path, ct_header: pydicom.Dataset) -> None:
    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="PLANNING") as planning:
        settings = Settings(
            storage={"data_dir": str(tmp_path / "data")},
            destinations=[destination("pacs", pacs), destination("planning", planning, objects=["RTSTRUCT"])],
        )
        outbox = Outbox(tmp_path / "data")
        loop = DispatchLoop(Dispatcher(outbox, settings), idle_seconds=0.5)
        (tmp_path / "run1").mkdir()
        first = write_result_objects(ct_header, tmp_path / "run1", ["SEG", "RTSTRUCT", "SR"])
        items = outbox.stage(first, settings.destinations, job_id=1, source_series_uid=str(ct_header.SeriesInstanceUID))
        assert sorted((i.destination, i.object_type) for i in items) == [
            ("pacs", "RTSTRUCT"), ("pacs", "SEG"), ("pacs", "SR"), ("planning", "RTSTRUCT"),
        ]
        loop.start()
        try:
            loop.wake()
            wait_for(lambda: not outbox.items(states=[ItemState.PENDING]), 30, what="all items sent")
        finally:
            loop.stop()
        study = str(ct_header.StudyInstanceUID)
        assert modalities_in_study(pacs, study) == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        assert modalities_in_study(planning, study) == {"RTSTRUCT": 1}

        # A re-run of the job after a crash writes the same objects (same derived UIDs) again.
        (tmp_path / "run2").mkdir()
        again = write_result_objects(ct_header, tmp_path / "run2", ["SEG", "RTSTRUCT", "SR"])
        assert {pydicom.dcmread(p).SOPInstanceUID for p in again} == {i.sop_instance_uid for i in items}
        restaged = outbox.stage(again, settings.destinations, job_id=2)
        assert sorted(i.id for i in restaged) == sorted(i.id for i in items)  # nothing new
        assert Dispatcher(outbox, settings).run_once().sent == 0
        for item in outbox.items():
            assert item.state is ItemState.SENT and item.last_status == 0x0000
            attempts = outbox.attempts(item.id)
            assert [(a["outcome"], a["status"]) for a in attempts] == [(AttemptOutcome.SUCCESS.value, 0)]
        assert pacs.statistics()["CountInstances"] == 3
        assert planning.statistics()["CountInstances"] == 1
        health = {h.name: h for h in outbox.health(["pacs", "planning"])}
        assert health["pacs"].state is DestinationState.UP and health["pacs"].sent == 3
        assert health["planning"].sent == 1


def test_a_stopped_archive_delays_delivery_and_loses_nothing(tmp_path: Path, ct_header: pydicom.Dataset) -> None:
    port = free_port()
    pacs = OrthancServer(aet="PACS", workdir=tmp_path / "orthanc", extra_config={"DicomPort": port})
    pacs.start()
    try:
        settings = Settings(storage={"data_dir": str(tmp_path / "data")}, destinations=[destination("pacs", pacs, port=port)])
        outbox = Outbox(tmp_path / "data", backoff=Backoff(0.3, 2, 1.0))
        dispatcher = Dispatcher(outbox, settings)
        out = tmp_path / "out"
        out.mkdir()
        outbox.stage(write_result_objects(ct_header, out, ["SEG", "RTSTRUCT"]), settings.destinations, job_id=7)
        assert dispatcher.run_once().sent == 2

        pacs.stop()  # the archive goes down while the report is being finished
        outbox.stage(write_result_objects(ct_header, out, ["SR"]), settings.destinations, job_id=7)
        down = dispatcher.run_once()
        assert down.sent == 0 and down.unreachable == 1 and down.destinations_down == ["pacs"]
        (waiting,) = outbox.items(states=[ItemState.PENDING])
        assert waiting.object_type == "SR" and waiting.next_attempt_at > waiting.updated_at - 1
        assert [a["outcome"] for a in outbox.attempts(waiting.id)] == [AttemptOutcome.UNREACHABLE.value]
        (health,) = outbox.health(["pacs"])
        assert health.state is DestinationState.DOWN and health.pending == 1 and health.last_error
        # Unreachable for a while: still pending, never failed.
        for _ in range(3):
            wait_for(lambda: (outbox.next_due_at() or 0) <= time.time(), 5, 0.05, "backoff to pass")
            assert dispatcher.run_once().unreachable == 1
        assert outbox.items(states=[ItemState.FAILED]) == []

        pacs.start()  # back, same DICOM port, same storage
        wait_for(lambda: dispatcher.run_once().sent == 1, 20, 0.2, "the SR to reach the archive")
        assert modalities_in_study(pacs, str(ct_header.StudyInstanceUID)) == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        outcomes = [a["outcome"] for a in outbox.attempts(waiting.id)]
        assert outcomes[-1] == AttemptOutcome.SUCCESS.value and outcomes.count("success") == 1
        assert outcomes[:-1] == [AttemptOutcome.UNREACHABLE.value] * (len(outcomes) - 1)
        (health,) = outbox.health(["pacs"])
        assert health.state is DestinationState.UP and health.sent == 3 and health.pending == 0
    finally:
        pacs.stop()


def test_a_refusal_status_is_recorded_and_the_item_fails_after_its_attempts(
    tmp_path: Path, ct_header: pydicom.Dataset
) -> None:
    with OrthancServer(aet="PACS") as pacs:
        settings = Settings(storage={"data_dir": str(tmp_path / "data")}, destinations=[destination("pacs", pacs)])
        outbox = Outbox(tmp_path / "data", backoff=Backoff(0.05, 1, 0.05), max_attempts=2)
        dispatcher = Dispatcher(outbox, settings)
        out = tmp_path / "out"
        out.mkdir()
        # Without SeriesInstanceUID Orthanc cannot index the object and refuses it.
        (item,) = outbox.stage(write_result_objects(ct_header, out, ["SR"], broken=True), settings.destinations)
        first = dispatcher.run_once()
        assert first.refused == 1 and first.sent == 0
        wait_for(lambda: dispatcher.run_once().refused == 1, 5, 0.05, "the second attempt")
        (failed,) = outbox.items(states=[ItemState.FAILED])
        assert failed.id == item.id and failed.last_status == ORTHANC_REFUSED and failed.refusals == 2
        statuses = [(a["outcome"], a["status"]) for a in outbox.attempts(item.id)]
        assert statuses == [(AttemptOutcome.REFUSED.value, ORTHANC_REFUSED)] * 2
        assert dispatcher.run_once().refused == 0  # failed items are not retried on their own
        (health,) = outbox.health(["pacs"])
        assert health.failed == 1 and health.state is DestinationState.UP  # the peer is up; it refused
        assert outbox.rearm(item_ids=[item.id]) == 1
        assert outbox.items(states=[ItemState.PENDING])[0].refusals == 0
        assert pacs.statistics()["CountInstances"] == 0
