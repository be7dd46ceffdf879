"""STOW-RS deliveries: how answers map to the outbox, and bearer-token auth against a real recipient.

The recipient is another radnode node's STOW-RS server (listener + :class:`DicomWebServer` on
loopback), so the token, the Store Instances response and its per-instance lists are real.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from radnode.config import Settings
from radnode.node import status
from radnode.pipeline.dicomweb_send import DUPLICATE_SOP_INSTANCE, item_outcomes
from radnode.pipeline.dispatch import Dispatcher
from radnode.pipeline.outbox import AttemptOutcome, DestinationState, ItemState, Outbox
from radnode.web.dicomweb import DicomWebServer

from node_support import IBSI_SLICES, free_port, node_settings, running_node
from pipeline_support import write_result_objects

TOKEN = "token-of-the-sending-radnode"


def store_response(referenced: list[str], failed: list[tuple[str, int]]) -> Dataset:
    ds = Dataset()
    if referenced:
        ds.ReferencedSOPSequence = [Dataset() for _ in referenced]
        for item, uid in zip(ds.ReferencedSOPSequence, referenced):
            item.ReferencedSOPInstanceUID = uid
    if failed:
        ds.FailedSOPSequence = [Dataset() for _ in failed]
        for item, (uid, reason) in zip(ds.FailedSOPSequence, failed):
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
    return ds


def test_answers_map_to_outcomes() -> None:
    mixed = item_outcomes(202, store_response(["1.1"], [("1.2", status.DATASET_MISMATCH), ("1.3", DUPLICATE_SOP_INSTANCE)]), "", ["1.1", "1.2", "1.3"])
    assert mixed["1.1"][0] is AttemptOutcome.SUCCESS
    assert mixed["1.2"][:2] == (AttemptOutcome.REFUSED, status.DATASET_MISMATCH)
    assert mixed["1.3"][0] is AttemptOutcome.SUCCESS  # the archive has it: delivered
    # A 409 that only says "already exists" (no DICOM JSON body) is a delivery, any other 409 is not.
    assert item_outcomes(409, None, "Instance already exists", ["1.4"])["1.4"][0] is AttemptOutcome.SUCCESS
    assert item_outcomes(409, None, "SOP class not supported", ["1.4"])["1.4"][0] is AttemptOutcome.REFUSED
    assert item_outcomes(507, store_response([], [("1.5", status.OUT_OF_RESOURCES)]), "", ["1.5"])["1.5"][:2] == (
        AttemptOutcome.REFUSED, status.OUT_OF_RESOURCES,
    )
    # 200 without a list (some servers answer so): stored.
    assert item_outcomes(200, None, "", ["1.6"])["1.6"][0] is AttemptOutcome.SUCCESS


@pytest.fixture
def recipient(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    settings = node_settings(
        tmp_path / "recipient",
        dicomweb={"enabled": True, "host": "127.0.0.1", "port": free_port(), "tokens": {"RADNODE1": TOKEN}},
    )
    with running_node(settings) as node:
        server = DicomWebServer(settings, node.ingestor)
        server.start()
        try:
            yield node, server.url
        finally:
            server.stop()


def sender(tmp_path: Path, shared_data: Path, url: str, token: str) -> tuple[Outbox, Dispatcher, list[Path], Settings]:
    settings = Settings(
        storage={"data_dir": str(tmp_path / "sender")},
        destinations=[{"name": "peer", "type": "dicomweb", "url": url, "auth": {"token": token}}],
        metrics={"enabled": False},
    )
    source = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[0]
    objects = write_result_objects(pydicom.dcmread(source, stop_before_pixels=True), tmp_path, ["SEG", "RTSTRUCT", "SR"])
    outbox = Outbox(tmp_path / "sender")
    outbox.stage(objects, settings.destinations, job_id=1)
    return outbox, Dispatcher(outbox, settings), objects, settings


def test_a_wrong_token_keeps_items_waiting_and_the_right_one_delivers_once(
    tmp_path: Path, recipient: tuple[Any, str], shared_data: Path
) -> None:
    node, url = recipient
    outbox, dispatcher, objects, settings = sender(tmp_path, shared_data, url, "not-the-token-of-anyone")
    first = dispatcher.run_once()
    assert first.sent == 0 and first.refused == 0 and first.destinations_down == ["peer"]
    assert all(i.state is ItemState.PENDING and i.refusals == 0 for i in outbox.items())
    assert outbox.health(["peer"])[0].state is DestinationState.DOWN
    assert node.index.file_counts_by_series() == {}

    settings.destinations[0].auth.token = TOKEN
    outbox.retry_now("peer")
    second = dispatcher.run_once()
    assert second.sent == 3 and all(i.state is ItemState.SENT and i.attempts == 2 for i in outbox.items())
    received = {r.sop_instance_uid: r.calling_ae for uid in node.index.file_counts_by_series() for r in node.index.series_instances(uid)}
    assert sorted(received) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in objects)
    assert set(received.values()) == {"RADNODE1"}
    # Nothing is due any more: a third round sends nothing.
    assert dispatcher.run_once().sent == 0


def test_over_tls_the_certificate_is_checked_against_verify_tls(tmp_path: Path, shared_data: Path) -> None:
    cert, key = tmp_path / "srv.crt", tmp_path / "srv.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    settings = node_settings(
        tmp_path / "recipient",
        dicomweb={
            "enabled": True, "host": "127.0.0.1", "port": free_port(), "tokens": {"RADNODE1": TOKEN},
            "tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)},
        },
    )
    with running_node(settings) as node:
        server = DicomWebServer(settings, node.ingestor)
        server.start()
        try:
            assert server.url.startswith("https://")
            outbox, dispatcher, _objects, sender_settings = sender(tmp_path, shared_data, server.url, TOKEN)
            # The system CAs do not know a self-signed certificate: the destination is down, nothing lost.
            untrusted = dispatcher.run_once()
            assert untrusted.destinations_down == ["peer"] and untrusted.sent == 0
            assert "SSLError" in (outbox.health(["peer"])[0].last_error or "")
            sender_settings.destinations[0].auth.verify_tls = cert
            outbox.retry_now("peer")
            assert dispatcher.run_once().sent == 3
            assert sum(node.index.file_counts_by_series().values()) == 3
        finally:
            server.stop()
