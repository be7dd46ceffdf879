"""The review gate below the web: staging (requires_approval and uncertain_contour: hold are one
state), decisions applied to phases staged later, the old ``held`` state, the notice by webhook
and e-mail (real local servers), and what a real Orthanc standing in for the planning system
receives after an approval or a rejection."""

from __future__ import annotations

import io
import json
import logging
import socketserver
import sqlite3
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from radnode.config import Settings
from radnode.config.model import ReviewSettings
from radnode.pipeline.dispatch import Dispatcher
from radnode.pipeline.jobs import JobSpec, Phase
from radnode.pipeline.notify import Notifier
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.review import QUALITY_FILE, approve, reject, stage_phase
from radnode.pipeline.service import RESULTS_DIR
from radnode.testing.orthanc import OrthancServer, free_port

from node_support import wait_until
from pg_support import PgCluster, pg_cluster  # noqa: F401  (session fixture)
from pipeline_support import first_header, write_result_objects
from web_support import NodeData, make_node_data, stage_for_review


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """``database.url`` of the outbox: unset (its SQLite file) or a fresh PostgreSQL database."""
    if request.param == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        return cluster.create_database("o")
    return None


def _objects(tmp_path: Path, shared_data: Path, key: str, kinds: list[str]) -> tuple[Path, dict[str, Path]]:
    header = first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")
    out = tmp_path / "results" / key
    out.mkdir(parents=True)
    return out, {p.stem: p for p in write_result_objects(header, out, kinds, version=key)}


def _settings(tmp_path: Path, **review: object) -> Settings:
    return Settings(
        storage={"data_dir": str(tmp_path / "data")},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1},
            {"name": "physics", "ae_title": "PHYS", "host": "127.0.0.1", "port": 2, "uncertain_contour": "hold"},
            {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 3, "requires_approval": True},
        ],
        review=review,
    )


def test_gate_and_uncertain_hold_share_one_state_and_one_decision(tmp_path: Path, shared_data: Path, database_url: str | None) -> None:
    settings = _settings(tmp_path)
    outbox = Outbox(tmp_path / "data", database_url=database_url)
    out, files = _objects(tmp_path, shared_data, "1", ["SEG", "RTSTRUCT", "SR"])
    (out / QUALITY_FILE).write_text(json.dumps({"required": True}))
    items = stage_phase(outbox, [files["SEG"], files["RTSTRUCT"]], settings.destinations, out, Phase.CONTOURS, job_id=1)
    assert {(i.destination, i.state.value) for i in items} == {
        ("pacs", "pending"), ("physics", "awaiting_review"), ("tps", "awaiting_review")}
    # A certain contour: the hold destination is not held, the gated one still is.
    out2, files2 = _objects(tmp_path, shared_data, "2", ["SEG"])
    items = stage_phase(outbox, [files2["SEG"]], settings.destinations, out2, Phase.CONTOURS, job_id=2)
    assert {(i.destination, i.state.value) for i in items} == {
        ("pacs", "pending"), ("physics", "pending"), ("tps", "awaiting_review")}
    # `radnode jobs release` lets the hold go as it is, never the gated destination's items.
    assert outbox.release(1, except_destinations=["tps"]) == 2
    assert {i.state for i in outbox.items(job_id=1, destination="tps")} == {ItemState.AWAITING_REVIEW}
    # The reviewer rejects: nothing for tps, also not the SR staged after the decision.
    decision = reject(outbox, 1, "dr.ada", "contours of another series")
    assert decision.destinations == ("tps",)
    stage_phase(outbox, [files["SR"]], settings.destinations, out, Phase.REPORT, job_id=1)
    tps = outbox.items(job_id=1, destination="tps")
    assert len(tps) == 3 and {i.state for i in tps} == {ItemState.REJECTED}
    assert "tps" not in outbox.due()
    health = {h.name: h for h in outbox.health()}
    assert health["tps"].rejected == 3 and health["tps"].awaiting_review == 1  # job 2's SEG

    from prometheus_client import CollectorRegistry, generate_latest

    from radnode.pipeline.service import PipelineCollector

    registry = CollectorRegistry()
    registry.register(PipelineCollector(SQLiteJobQueue.in_data_dir(tmp_path / "data"), outbox))
    metrics = generate_latest(registry).decode()
    assert 'radnode_outbox_items{destination="tps",state="awaiting_review"} 1.0' in metrics
    assert 'radnode_outbox_items{destination="tps",state="rejected"} 3.0' in metrics


def test_an_sr_staged_after_a_full_approval_goes(tmp_path: Path, shared_data: Path, database_url: str | None) -> None:
    settings = _settings(tmp_path)
    outbox = Outbox(tmp_path / "data", database_url=database_url)
    out, files = _objects(tmp_path, shared_data, "3", ["SEG", "SR"])  # a gated destination without RTSTRUCT
    stage_phase(outbox, [files["SEG"]], settings.destinations, out, Phase.CONTOURS, job_id=3)
    decision = approve(outbox, 3, "dr.ada", out, comment="fine")
    assert decision.approved and decision.approved_objects == ()
    stage_phase(outbox, [files["SR"]], settings.destinations, out, Phase.REPORT, job_id=3)
    assert {i.state for i in outbox.items(job_id=3, destination="tps")} == {ItemState.PENDING}
    assert {i.object_type for i in outbox.due()["tps"]} == {"SEG", "SR"}


def test_items_held_by_an_older_node_become_awaiting_review(tmp_path: Path, shared_data: Path) -> None:
    outbox = Outbox(tmp_path / "data")
    out, files = _objects(tmp_path, shared_data, "4", ["SEG"])
    outbox.stage([files["SEG"]], _settings(tmp_path).destinations[:1], job_id=4)
    with sqlite3.connect(outbox.db_path) as conn:
        conn.execute("UPDATE items SET state = 'held'")
    assert [i.state for i in Outbox(tmp_path / "data").items(job_id=4)] == [ItemState.AWAITING_REVIEW]


# --- notices -----------------------------------------------------------------------------------


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Webhook.received.append({"type": self.headers["Content-Type"], "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _SMTPSink(socketserver.StreamRequestHandler):
    """The few SMTP commands smtplib sends (RFC 5321), no extensions; keeps each message."""

    messages: list[bytes] = []

    def handle(self) -> None:
        self.wfile.write(b"220 sink ready\r\n")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-sink\r\n250 SIZE 1000000\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                _SMTPSink.messages.append(data)
                self.wfile.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def peers() -> Iterator[tuple[int, int]]:
    web = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    mail = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPSink)
    _Webhook.received.clear()
    _SMTPSink.messages.clear()
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (web, mail)]
    for t in threads:
        t.start()
    try:
        yield web.server_address[1], mail.server_address[1]
    finally:
        for s in (web, mail):
            s.shutdown()
            s.server_close()


def test_a_waiting_job_is_announced_by_webhook_and_mail_once_without_phi(
    tmp_path: Path, shared_data: Path, peers: tuple[int, int]
) -> None:
    web_port, mail_port = peers
    settings = _settings(tmp_path, webhook_url=f"http://127.0.0.1:{web_port}/hook", smtp_host="127.0.0.1",
                         smtp_port=mail_port, mail_to=["physics@hospital.example"], dashboard_url="https://radnode.example/")
    notifier = Notifier(settings.review)
    outbox = Outbox(tmp_path / "data")
    out, files = _objects(tmp_path, shared_data, "5", ["SEG", "SR"])
    seg = dcmread(files["SEG"])
    seg.PatientName, seg.PatientID = "Doe^Jane", "PID-4711"
    seg.save_as(files["SEG"])
    stage_phase(outbox, [files["SEG"]], settings.destinations, out, Phase.CONTOURS, job_id=5,
                source_series_uid="2.25.55", on_awaiting=notifier.awaiting_review)
    assert wait_until(lambda: _Webhook.received and _SMTPSink.messages, timeout=10)
    (hook,) = _Webhook.received
    assert hook["type"] == "application/json"
    assert hook["body"] == {"event": "awaiting_review", "job_id": 5, "series_uid": "2.25.55", "destinations": ["tps"],
                            "url": "https://radnode.example/jobs/5"}
    (raw,) = _SMTPSink.messages
    mail = message_from_bytes(raw)
    assert mail["To"] == "physics@hospital.example" and "job 5 awaits review" in mail["Subject"]
    text = mail.get_payload()
    assert "2.25.55" in text and "tps" in text and "https://radnode.example/jobs/5" in text
    for phi in ("Doe", "Jane", "PID-4711"):
        assert phi not in raw.decode() and phi not in json.dumps(hook["body"])
    # The report phase of the same job announces nothing new.
    stage_phase(outbox, [files["SR"]], settings.destinations, out, Phase.REPORT, job_id=5,
                source_series_uid="2.25.55", on_awaiting=notifier.awaiting_review)
    assert not wait_until(lambda: len(_Webhook.received) > 1, timeout=1.0)


def test_a_dead_webhook_and_mail_server_are_logged_and_never_stop_staging(
    tmp_path: Path, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = free_port()
    review = ReviewSettings(webhook_url=f"http://127.0.0.1:{dead}/", smtp_host="127.0.0.1", smtp_port=dead,
                            mail_to=["a@b.example"], timeout_seconds=2)
    notifier = Notifier(review)
    with caplog.at_level(logging.ERROR, logger="radnode.pipeline.notify"):
        assert notifier.send({"job_id": 6, "series_uid": "2.25.6", "destinations": ["tps"]}) == {
            "webhook": False, "mail": False}
    assert "webhook failed" in caplog.text and "e-mail failed" in caplog.text

    def broken(*args: object) -> None:
        raise RuntimeError("notifier bug")

    outbox = Outbox(tmp_path / "data")
    out, files = _objects(tmp_path, shared_data, "6", ["SEG"])
    items = stage_phase(outbox, [files["SEG"]], _settings(tmp_path).destinations, out, Phase.CONTOURS, job_id=6,
                        on_awaiting=broken)
    assert len(items) == 3 and ItemState.AWAITING_REVIEW in {i.state for i in items}


# --- Orthanc as the planning system ---------------------------------------------------------------


def _rtstructs(server: OrthancServer) -> list[pydicom.Dataset]:
    found = []
    for instance in server.instances():
        ds = pydicom.dcmread(io.BytesIO(server.instance_file(instance["MainDicomTags"]["SOPInstanceUID"])))
        if ds.Modality == "RTSTRUCT":
            found.append(ds)
    return found


def test_orthanc_as_tps_gets_only_the_approved_rtstruct_and_nothing_after_a_reject(tmp_path: Path) -> None:
    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="TPS") as tps:
        destinations = [
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
            {"name": "tps", "ae_title": tps.aet, "host": "127.0.0.1", "port": tps.dicom_port, "objects": ["RTSTRUCT"],
             "requires_approval": True},
        ]
        node: NodeData = make_node_data(tmp_path, destinations=destinations)
        queue = SQLiteJobQueue.in_data_dir(node.data_dir)
        second = queue.enqueue(JobSpec(series_uid=node.series_uid, input_path=node.phantom / "ct", pipeline_version="b"))
        first_uids = stage_for_review(node)
        stage_for_review(node, second.id)
        outbox = Outbox(node.data_dir)
        dispatcher = Dispatcher(outbox, node.settings)
        dispatcher.run_once()
        assert len(_rtstructs(pacs)) == 2 and _rtstructs(tps) == []  # the PACS is not gated

        approve(outbox, node.done_job, "dr.ada", node.data_dir / RESULTS_DIR / str(node.done_job), rejected=["Tumour"],
                comment="GTV redrawn by hand", uid_root=node.settings.output.uid_root)
        reject(outbox, second.id, "dr.ada", "motion artefact")
        for _ in range(2):
            dispatcher.run_once()
        (sent,) = _rtstructs(tps)
        assert sent.SOPInstanceUID != first_uids["RTSTRUCT"]
        assert sent.ApprovalStatus == "APPROVED" and str(sent.ReviewerName) == "dr.ada"
        assert [str(r.ROIName) for r in sent.StructureSetROISequence] == ["Lung right", "Lung left"]
        assert len(_rtstructs(pacs)) == 2  # the approval went only where it was awaited
        assert all(i.attempts <= 1 for i in outbox.items(destination="tps"))
