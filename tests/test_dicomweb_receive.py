"""STOW-RS into a running node: a real CT over HTTP, duplicates, and every kind of bad request.

The node is the real listener (:class:`~radnode.node.scp.StorageNode`) with its DICOMweb
server (:class:`~radnode.web.dicomweb.DicomWebServer`) on free loopback ports; the client is
``dicomweb-client`` (what a PACS or a script would use) or, for bodies no client would
send, raw HTTP. After a refused request nothing may be left: no file under ``tmp/`` or
``incoming/``, and the index unchanged.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from radnode.node import status
from radnode.node.index import SeriesState
from radnode.node.storage import AUDIT_FILE
from radnode.web.dicomweb import DicomWebServer

from node_support import IBSI_SLICES, free_port, node_settings, running_node, wait_until

TOKEN = "s3cret-token-for-the-ct-scanner"
CT_SERIES_SLICES = 60


@pytest.fixture(scope="module")
def ct_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))
    assert len(files) == CT_SERIES_SLICES
    return files


@pytest.fixture
def node_and_url(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    extra = getattr(request, "param", {})
    sections: dict[str, Any] = {
        "dicomweb": {"enabled": True, "host": "127.0.0.1", "port": free_port(), "tokens": {"CTSCANNER": TOKEN}},
        "series": {"quiet_seconds": 0.5, "force_seconds": 60},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    settings = node_settings(tmp_path / "data", **sections)
    with running_node(settings) as node:
        server = DicomWebServer(settings, node.ingestor)
        server.start()
        try:
            yield node, server.url
        finally:
            server.stop()


def client(url: str, token: str | None = TOKEN) -> DICOMwebClient:
    session = requests.Session()
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token}"
    web = DICOMwebClient(url, session=session)
    web.set_http_retry_params(retry=False)
    return web


def snapshot(node: Any) -> tuple[dict[str, int], list[str], list[str]]:
    """Index counts per series, files under incoming/ and files under tmp/."""
    data = node.store.data_dir
    return (
        node.index.file_counts_by_series(),
        sorted(str(p.relative_to(data)) for p in (data / "incoming").rglob("*") if p.is_file()),
        sorted(p.name for p in (data / "tmp").iterdir()),
    )


def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """POST with exactly these headers and body (a Content-Length may lie)."""
    target = http.client.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        connection.putrequest("POST", f"{target.path}/studies")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "radnode-test-boundary") -> tuple[bytes, str]:
    chunks = []
    for content_type, data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_a_real_ct_over_stow_rs_is_stored_indexed_completed_and_a_resend_is_idempotent(
    node_and_url: tuple[Any, str], ct_files: list[Path]
) -> None:
    node, url = node_and_url
    datasets = [pydicom.dcmread(p) for p in ct_files]
    series_uid = str(datasets[0].SeriesInstanceUID)
    study_uid = str(datasets[0].StudyInstanceUID)

    answer = client(url).store_instances(datasets, study_instance_uid=study_uid)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in datasets}
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL.endswith(f"/studies/{study_uid}")
    counts, incoming, tmp = snapshot(node)
    assert counts == {series_uid: CT_SERIES_SLICES} and len(incoming) == CT_SERIES_SLICES and tmp == []
    # Stored byte for byte as the client encoded them, with the token's name as calling AE.
    first = node.index.series_instances(series_uid)[0]
    stored = pydicom.dcmread(node.store.data_dir / first.path)
    assert stored.file_meta.SourceApplicationEntityTitle == "CTSCANNER" and first.calling_ae == "CTSCANNER"
    # The same series completion as C-STORE: quiet for series.quiet_seconds -> complete.
    assert wait_until(lambda: node.index.series(series_uid).state is SeriesState.COMPLETE, 15, 0.1)

    again = client(url).store_instances(datasets[:5])
    assert len(again.ReferencedSOPSequence) == 5 and "FailedSOPSequence" not in again
    assert snapshot(node) == (counts, incoming, tmp)
    audit = [json.loads(line) for line in (node.store.data_dir / AUDIT_FILE).read_text().splitlines()]
    assert sum(1 for e in audit if e["event"] == "instance-duplicate" and e.get("calling_ae") == "CTSCANNER") == 5


def test_tokens_are_required_and_checked(node_and_url: tuple[Any, str], ct_files: list[Path]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    body, content_type = multipart([("application/dicom", ct_files[0].read_bytes())])
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {TOKEN}"}):
        code, text = raw_post(url, body, {"Content-Type": content_type, "Content-Length": str(len(body)), **headers})
        assert code == 401 and "bearer token" in text
    with pytest.raises(requests.HTTPError) as refused:
        client(url, token="wrong-token-wrong-token").store_instances([pydicom.dcmread(ct_files[0])])
    assert refused.value.response.status_code == 401
    assert snapshot(node) == before


@pytest.mark.parametrize(
    "body, content_type, expected, message",
    [
        (b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM-but-the-body-ends-here", 'multipart/related; type="application/dicom"; boundary=b', 400, "closing boundary"),
        (b"this is not multipart at all", 'multipart/related; type="application/dicom"; boundary=b', 400, "malformed"),
        (b"", 'multipart/related; type="application/dicom"; boundary=b', 400, ""),
        (b"{}", "application/json", 415, "multipart/related"),
    ],
    ids=["truncated", "garbage", "empty", "json"],
)
def test_malformed_bodies_get_400_or_415_and_store_nothing(
    node_and_url: tuple[Any, str], body: bytes, content_type: str, expected: int, message: str
) -> None:
    node, url = node_and_url
    before = snapshot(node)
    code, text = raw_post(url, body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Content-Length": str(len(body))})
    assert code == expected and message in text
    assert snapshot(node) == before


def test_a_non_dicom_part_refuses_the_request_and_stores_none_of_it(node_and_url: tuple[Any, str], ct_files: list[Path]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    body, content_type = multipart([("application/dicom", ct_files[0].read_bytes()), ("text/plain", b"hello")])
    code, text = raw_post(url, body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Content-Length": str(len(body))})
    assert code == 415 and "part 2 is text/plain" in text
    assert snapshot(node) == before


def test_a_part_that_is_not_part10_fails_with_a_reason(node_and_url: tuple[Any, str]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    body, content_type = multipart([("application/dicom", b"\0" * 300)])
    code, text = raw_post(url, body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Content-Length": str(len(body))})
    assert code == 409
    answer = pydicom.Dataset.from_json(json.loads(text))
    assert [int(i.FailureReason) for i in answer.FailedSOPSequence] == [status.CANNOT_UNDERSTAND]
    assert snapshot(node) == before


def test_a_2_gb_content_length_is_refused_before_the_body_is_read(node_and_url: tuple[Any, str]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    code, text = raw_post(
        url, b"--b\r\n",
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "Content-Length": str(2 * 1024**3)},
    )
    assert code == 413 and "max_request_mb" in text
    assert snapshot(node) == before


def test_an_instance_of_another_study_than_the_target_fails_with_a900(node_and_url: tuple[Any, str], ct_files: list[Path]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    with pytest.raises(requests.HTTPError) as refused:
        client(url).store_instances([pydicom.dcmread(ct_files[0])], study_instance_uid="1.2.3.4")
    assert refused.value.response.status_code == 409
    answer = pydicom.Dataset.from_json(refused.value.response.json())
    assert int(answer.FailedSOPSequence[0].FailureReason) == status.DATASET_MISMATCH
    assert snapshot(node) == before


@pytest.mark.parametrize("node_and_url", [{"storage": {"min_free_gb": 1e9}}], indirect=True)
def test_disk_guard_answers_507_with_out_of_resources(node_and_url: tuple[Any, str], ct_files: list[Path]) -> None:
    node, url = node_and_url
    before = snapshot(node)
    with pytest.raises(requests.HTTPError) as refused:
        client(url).store_instances([pydicom.dcmread(p) for p in ct_files[:2]])
    assert refused.value.response.status_code == 507
    answer = pydicom.Dataset.from_json(refused.value.response.json())
    assert [int(i.FailureReason) for i in answer.FailedSOPSequence] == [status.OUT_OF_RESOURCES] * 2
    assert snapshot(node) == before


@pytest.mark.parametrize("node_and_url", [{"node": {"strict": True, "allowed_calling_aes": ["OTHER"]}}], indirect=True)
def test_the_access_rules_apply_to_the_token_name(node_and_url: tuple[Any, str], ct_files: list[Path]) -> None:
    node, url = node_and_url
    with pytest.raises(requests.HTTPError) as refused:
        client(url).store_instances([pydicom.dcmread(ct_files[0])])
    assert refused.value.response.status_code == 403
    assert "CTSCANNER" in refused.value.response.text
    assert node.index.file_counts_by_series() == {}


def test_config_check_warns_about_a_receiver_without_tokens_or_open_without_tls(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from radnode.cli import app

    quiet = {"node": {"host": "127.0.0.1", "strict": True, "allowed_calling_aes": ["CT1"]}, "dashboard": {"enabled": False}}
    cases = (
        ({"enabled": False}, []),
        ({"enabled": True, "tokens": {"CT1": TOKEN}}, []),
        ({"enabled": True}, ["tokens is empty"]),
        ({"enabled": True, "host": "0.0.0.0", "tokens": {"CT1": TOKEN}}, ["without TLS"]),
    )
    for dicomweb, expected in cases:
        path = tmp_path / "radnode.yaml"
        path.write_text(yaml.safe_dump({**quiet, "dicomweb": dicomweb}))
        result = CliRunner().invoke(app, ["config", "check", str(path)])
        assert result.exit_code == 0, result.output
        warned = [line for line in result.output.splitlines() if "DICOMweb" in line or "dicomweb" in line]
        assert len(warned) == len(expected) and all(any(e in w for w in warned) for e in expected), result.output
