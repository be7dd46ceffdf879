"""The listener against real peers: DCMTK echoscu/storescu (and pynetdicom where DCMTK
cannot send what we need, e.g. garbage bytes), real CT from ../shared/data."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from node_support import (
    IBSI_SLICES,
    copy_series,
    dataset_bytes,
    dcmtk_env,
    echoscu,
    node_settings,
    running_node,
    storescu,
    wait_until,
)
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from radnode.node import status
from radnode.node.audit import read_audit
from radnode.node.completion import SeriesCompleted
from radnode.node.index import NodeIndex
from radnode.node.storage import encode_file_meta

SUCCESS_LINE = "Received Store Response (Success)"
#: The setting's environment override; `make test` runs these tests again with it "false".
FAST_RECEIVE_ENV = "RADNODE_NODE__FAST_RECEIVE"


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))
    assert len(files) == 60
    return files


def _audit(data_dir: Path) -> list[dict]:
    return read_audit(data_dir / "audit" / "audit.jsonl")


def _metric(exposition: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text format."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def _incoming_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "incoming").rglob("*.dcm"))


def test_real_ct_series_is_stored_indexed_completed_and_counted(ibsi: list[Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = node_settings(data, series={"quiet_seconds": 0.5, "force_seconds": 30}, metrics={"enabled": True})
    events: list[SeriesCompleted] = []
    with running_node(settings) as node:
        node.subscribe(events.append)
        echo = echoscu(node.port)
        assert echo.returncode == 0, echo.stderr

        sent = storescu(node.port, ibsi[0].parent)
        assert sent.returncode == 0, sent.stderr
        assert (sent.stdout + sent.stderr).count(SUCCESS_LINE) == 60

        assert wait_until(lambda: len(events) == 1, timeout=10)
        event = events[0]
        first = pydicom.dcmread(ibsi[0], stop_before_pixels=True)
        assert event.series_instance_uid == first.SeriesInstanceUID
        assert (event.instance_count, event.reason, event.calling_ae) == (60, "quiet", "STORESCU")

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
        health = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/healthz", timeout=5)
        assert health.status == 200 and json.load(health)["status"] == "ok"

    assert 'radnode_instances_received_total{outcome="stored"} 60.0' in metrics
    assert 'radnode_associations_total{outcome="accepted"} 2.0' in metrics
    assert 'radnode_series_completed_total{reason="quiet"} 1.0' in metrics
    assert "radnode_store_duration_seconds_count 60.0" in metrics
    total_bytes = sum(len(dataset_bytes(f)) for f in ibsi)
    assert _metric(metrics, "radnode_received_bytes_total") == total_bytes

    stored = _incoming_files(data)
    assert len(stored) == 60
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in ibsi}
    index = NodeIndex(data / "radnode.sqlite")
    rows = index.series_instances(first.SeriesInstanceUID)
    assert len(rows) == 60 and {r.calling_ae for r in rows} == {"STORESCU"}
    for path in stored:
        assert path.parent == data / "incoming" / first.StudyInstanceUID / first.SeriesInstanceUID
        sop = path.name.removesuffix(".dcm")
        assert dataset_bytes(path) == dataset_bytes(by_uid[sop])  # exactly the bytes sent
    row = rows[0]
    assert (data / row.path).stat().st_size == row.size and row.peer_address == "127.0.0.1"
    assert index.series(first.SeriesInstanceUID).state.value == "complete"
    index.close()

    audit_text = (data / "audit" / "audit.jsonl").read_text()
    assert "PAT1" not in audit_text  # the PatientName of this CT never reaches the audit log
    kinds = [e["event"] for e in _audit(data)]
    assert kinds.count("instance-stored") == 60 and kinds.count("series-complete") == 1


def test_compressed_transfer_syntaxes_are_stored_as_received(ibsi: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "compressed"
    src.mkdir()
    # name: (DCMTK compressor, storescu option that proposes the file's transfer syntax)
    tools = {
        "jpeg-ls": (["dcmcjpls"], "-xt"),
        "jpeg-ls-near": (["dcmcjpls", "+en"], "-xu"),
        "rle": (["dcmcrle"], "-xr"),
        "jpeg-lossless": (["dcmcjpeg"], "-xs"),
        "jpeg-baseline": (["dcmcjpeg", "+eb"], "-xy"),
        "jpeg-extended": (["dcmcjpeg", "+ee"], "-xx"),
        "deflate": (["dcmconv", "+td"], "-xd"),
    }
    proposals = {}
    for number, (name, (tool, option)) in enumerate(tools.items()):
        subprocess.run([*tool, str(ibsi[number]), str(src / f"{name}.dcm")], check=True)
        proposals[src / f"{name}.dcm"] = option
    j2k = pydicom.dcmread(ibsi[len(tools)])
    j2k.compress(JPEG2000Lossless)  # no DCMTK JPEG 2000 encoder here; pydicom + OpenJPEG
    j2k.save_as(src / "j2k.dcm")
    proposals[src / "j2k.dcm"] = "-xv"
    expected = {}
    for path in proposals:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[ds.SOPInstanceUID] = (ds.file_meta.TransferSyntaxUID, dataset_bytes(path))
    assert len({ts for ts, _ in expected.values()}) == 8

    data = tmp_path / "data"
    with running_node(node_settings(data)) as node:
        for path, option in proposals.items():
            sent = storescu(node.port, path, extra=("-R", option))
            assert SUCCESS_LINE in sent.stdout + sent.stderr, sent.stdout + sent.stderr

    stored = _incoming_files(data)
    assert len(stored) == 8
    for path in stored:
        ds = pydicom.dcmread(path)
        transfer_syntax, body = expected[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            # storescu re-deflates and pads the stream to an even length (PS3.5 §A.5).
            assert dataset_bytes(path) in (body, body + b"\x00")
        else:
            assert dataset_bytes(path) == body
        assert ds.pixel_array.shape == (201, 204)


def test_unknown_peers_are_rejected_and_audited(tmp_path: Path) -> None:
    data = tmp_path / "strict"
    settings = node_settings(data, node={"strict": True, "allowed_calling_aes": ["GOODSCU"]})
    with running_node(settings) as node:
        assert echoscu(node.port, aet="GOODSCU").returncode == 0
        bad_calling = echoscu(node.port, aet="BADSCU")
        bad_called = echoscu(node.port, aet="GOODSCU", aec="SOMEONE")
    assert bad_calling.returncode != 0 and "Calling AE Title Not Recognized" in bad_calling.stderr
    assert "Rejected Permanent, Source: Service User" in bad_calling.stderr
    assert bad_called.returncode != 0 and "Called AE Title Not Recognized" in bad_called.stderr

    hosts = tmp_path / "hosts"
    with running_node(node_settings(hosts, node={"allowed_hosts": ["10.20.0.0/16"]})) as node:
        bad_host = echoscu(node.port)
    assert bad_host.returncode != 0 and "No Reason" in bad_host.stderr

    # node.max_associations: a second association while one is open is refused (transient,
    # service provider (presentation), local limit exceeded; PS3.8 Table 9-21).
    busy = tmp_path / "busy"
    with running_node(node_settings(busy, node={"max_associations": 1})) as node:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(CTImageStorage)
        holder = ae.associate("127.0.0.1", node.port, ae_title="RADNODE")
        assert holder.is_established
        try:
            over_limit = echoscu(node.port)
        finally:
            holder.release()
        assert echoscu(node.port).returncode == 0
    assert over_limit.returncode != 0 and "Local Limit Exceeded" in over_limit.stderr
    assert "Rejected Transient" in over_limit.stderr
    (limit,) = [e for e in _audit(busy) if e["event"] == "association-rejected"]
    assert (limit["result"], limit["source"], limit["reason"]) == (2, 3, 2)

    rejected = [e for e in _audit(data) + _audit(hosts) if e["event"] == "association-rejected"]
    assert [(e["calling_ae"], e["result"], e["source"], e["reason"]) for e in rejected] == [
        ("BADSCU", 1, 1, 3),
        ("GOODSCU", 1, 1, 7),
        ("ECHOSCU", 1, 1, 1),
    ]
    assert all(e["peer_address"] == "127.0.0.1" for e in rejected)


def test_duplicates_same_bytes_idempotent_different_bytes_kept(ibsi: list[Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(ibsi[5])
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(changed)
    with running_node(node_settings(data)) as node:
        for path in (ibsi[5], ibsi[5], changed):
            sent = storescu(node.port, path)
            assert SUCCESS_LINE in sent.stdout + sent.stderr
    stored = _incoming_files(data)
    sop = ds.SOPInstanceUID
    assert [p.name for p in stored] == [f"{sop}.dcm", f"{sop}_v2.dcm"]
    assert dataset_bytes(stored[0]) == dataset_bytes(ibsi[5])
    assert np.array_equal(pydicom.dcmread(stored[1]).pixel_array, pixels)
    index = NodeIndex(data / "radnode.sqlite")
    assert [v.version for v in index.instance_versions(sop)] == [1, 2]
    assert index.series(ds.SeriesInstanceUID).instance_count == 1
    index.close()
    outcomes = [e.get("outcome") for e in _audit(data) if e["event"].startswith("instance-")]
    assert outcomes == ["stored", "duplicate", "new-version"]


def test_disk_guard_refuses_and_writes_nothing(ibsi: list[Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_node(node_settings(data, storage={"min_free_gb": 1e9})) as node:
        sent = storescu(node.port, ibsi[0])
        assert node.health()[0] is False
    assert "Refused: OutOfResources" in sent.stdout + sent.stderr
    assert _incoming_files(data) == []
    assert list((data / "quarantine").iterdir()) == [] and list((data / "tmp").iterdir()) == []
    (entry,) = [e for e in _audit(data) if e["event"] == "instance-rejected"]
    assert entry["status"] == f"0x{status.OUT_OF_RESOURCES:04X}" and entry["reason"] == "disk-full"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uids_are_rejected_and_quarantined(ibsi: list[Path], tmp_path: Path) -> None:
    evil_sop = tmp_path / "evil-sop.dcm"
    ds = pydicom.dcmread(ibsi[0])
    ds.SOPInstanceUID = "../../etc/x"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(evil_sop)
    evil_series = tmp_path / "evil-series.dcm"
    ds = pydicom.dcmread(ibsi[1])
    ds.SeriesInstanceUID = "../../../outside"
    ds.save_as(evil_series)

    data = tmp_path / "deep" / "data"
    with running_node(node_settings(data)) as node:
        sent = storescu(node.port, evil_sop, evil_series)
        ok = storescu(node.port, ibsi[2])  # and the node keeps serving
    assert (sent.stdout + sent.stderr).count("Error: CannotUnderstand") == 2
    assert SUCCESS_LINE in ok.stdout + ok.stderr
    assert len(_incoming_files(data)) == 1
    assert not (tmp_path / "etc").exists() and not (tmp_path / "outside").exists()
    assert not (data.parent / "outside").exists()
    reasons = sorted(json.loads(p.read_text())["detail"].split(" ")[0] for p in (data / "quarantine").glob("*.json"))
    assert reasons == ["Affected", "SeriesInstanceUID"]
    assert len(list((data / "quarantine").glob("*.dcm"))) == 2
    statuses = [e["status"] for e in _audit(data) if e["event"] == "instance-rejected"]
    assert statuses == [f"0x{status.INVALID_UID:04X}"] * 2


def _send_raw(port: int, path: Path) -> int:
    """C-STORE a Part 10 file's data set bytes as they are (pynetdicom, no decoding)."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
        assert assoc.is_established
        response = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(response.Status)


def test_bad_data_gets_named_failures_and_node_keeps_serving(ibsi: list[Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    explicit = "1.2.840.10008.1.2.1"
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(encode_file_meta(CTImageStorage, "1.2.3.4.5", explicit) + rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())

    ct = pydicom.dcmread(ibsi[0])
    ct.file_meta.TransferSyntaxUID = explicit
    body_path = tmp_path / "explicit.dcm"
    ct.save_as(body_path, enforce_file_format=True)
    body = dataset_bytes(body_path)
    mismatch = tmp_path / "mismatch.dcm"  # command says MR, the data set is CT
    mismatch.write_bytes(encode_file_meta(MRImageStorage, ct.SOPInstanceUID, explicit) + body)
    # A File Meta element inside the data set. It must follow the first element: a sender
    # (pydicom, DCMTK) takes any leading group 0002 elements for the file's own meta.
    group2 = tmp_path / "group2.dcm"
    stray = bytes.fromhex("0200100055491400") + b"1.2.840.10008.1.2.1\x00"
    first_end = 8 + int.from_bytes(body[6:8], "little")
    assert body[4:6] in (b"CS", b"SH", b"LO", b"DA", b"TM", b"UI")  # a short-form first element
    group2.write_bytes(
        encode_file_meta(CTImageStorage, ct.SOPInstanceUID, explicit) + body[:first_end] + stray + body[first_end:]
    )

    data = tmp_path / "data"
    with running_node(node_settings(data)) as node:
        codes = [_send_raw(node.port, p) for p in (garbage, mismatch, group2)]
        assert echoscu(node.port).returncode == 0
        assert _send_raw(node.port, body_path) == status.SUCCESS
    assert codes[0] in (status.CANNOT_UNDERSTAND, status.MISSING_ATTRIBUTE)
    assert codes[1:] == [status.DATASET_MISMATCH, status.NONCONFORMANT_META]
    quarantined = sorted((data / "quarantine").glob("*.json"))
    assert len(quarantined) == 3
    assert {json.loads(p.read_text())["status"] for p in quarantined} == {f"0x{c:04X}" for c in codes}
    assert all(p.with_suffix(".dcm").stat().st_size > 50_000 for p in quarantined)
    assert len(_incoming_files(data)) == 1


def test_eight_concurrent_storescu_processes(ibsi: list[Path], tmp_path: Path) -> None:
    series = [copy_series(ibsi[k], tmp_path / f"series{k}", 15) for k in range(8)]
    data = tmp_path / "data"
    with running_node(node_settings(data)) as node:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda s: storescu(node.port, *s[2], aet=f"SCU{s[1][-4:]}"), series))
        assert wait_until(lambda: node.index.series(series[-1][1]) is not None, 5)
    for result in results:
        assert result.returncode == 0, result.stderr
        assert (result.stdout + result.stderr).count(SUCCESS_LINE) == 15
    index = NodeIndex(data / "radnode.sqlite")
    for study, series_uid, files in series:
        record = index.series(series_uid)
        assert record is not None and record.instance_count == 15
        folder = data / "incoming" / study / series_uid
        assert sorted(dataset_bytes(p) for p in folder.glob("*.dcm")) == sorted(dataset_bytes(f) for f in files)
    index.close()
    assert list((data / "tmp").iterdir()) == []


def _make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder.mkdir()
    p = {name: folder / name for name in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "cli.key", "cli.csr", "cli.crt", "ext.cnf")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=radnode test CA",
        "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]))
    p["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, cn in (("srv", "localhost"), ("cli", "test-scu")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(p[f"{who}.key"]), "-out", str(p[f"{who}.csr"]))
        run("x509", "-req", "-in", str(p[f"{who}.csr"]), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(p["ext.cnf"]), "-out", str(p[f"{who}.crt"]))
    return p


def test_tls_with_client_certificates(ibsi: list[Path], tmp_path: Path) -> None:
    pki = _make_pki(tmp_path / "pki")
    tls = {"enabled": True, "cert_file": str(pki["srv.crt"]), "key_file": str(pki["srv.key"]),
           "ca_file": str(pki["ca.crt"]), "require_client_cert": True}
    data = tmp_path / "data"
    with running_node(node_settings(data, node={"tls": tls})) as node:
        secure = storescu(node.port, ibsi[0], extra=("+tls", str(pki["cli.key"]), str(pki["cli.crt"]), "+cf", str(pki["ca.crt"])))
        anonymous = storescu(node.port, ibsi[1], extra=("+tla", "+cf", str(pki["ca.crt"])))
        plain = storescu(node.port, ibsi[2])
    assert secure.returncode == 0 and SUCCESS_LINE in secure.stdout + secure.stderr, secure.stderr
    assert anonymous.returncode != 0 and SUCCESS_LINE not in anonymous.stdout + anonymous.stderr
    assert plain.returncode != 0
    assert len(_incoming_files(data)) == 1
    (accepted,) = [e for e in _audit(data) if e["event"] == "association-accepted"]
    assert accepted["tls"] is True


def test_every_receive_path_stores_the_exact_bytes(ibsi: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast path with small PDUs (the header spans PDVs), a peer whose maximum PDU is too
    small for our one-PDU response (it must be fragmented), and pynetdicom's own path."""
    # Both paths, whatever RADNODE_NODE__FAST_RECEIVE says for the rest of the module
    # (the environment overrides settings, as for an operator).
    monkeypatch.setenv(FAST_RECEIVE_ENV, "true")
    files = ibsi[10:14]
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(f) for f in files}

    def check(data: Path) -> None:
        stored = _incoming_files(data)
        assert sorted(p.name.removesuffix(".dcm") for p in stored) == sorted(expected)
        for path in stored:
            assert dataset_bytes(path) == expected[path.name.removesuffix(".dcm")]
        index = NodeIndex(data / "radnode.sqlite")
        assert {r.sop_instance_uid for r in index.series_instances(next(iter(_series_of(files))))} == set(expected)
        index.close()

    with running_node(node_settings(tmp_path / "small-pdu")) as node:
        assert node.fast_receive is True
        sent = storescu(node.port, *files, extra=("--max-send-pdu", "4096"))
        assert (sent.stdout + sent.stderr).count(SUCCESS_LINE) == len(files), sent.stdout + sent.stderr
    check(tmp_path / "small-pdu")

    with running_node(node_settings(tmp_path / "tiny-peer")) as node:
        ae = AE(ae_title="TINYSCU")
        ae.add_requested_context(CTImageStorage, pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        lengths: list[int] = []

        def on_pdu(event: Any) -> None:
            if isinstance(event.pdu, P_DATA_TF):
                lengths.append(event.pdu.pdu_length)

        assoc = ae.associate(  # a maximum PDU below the length of our C-STORE-RSP command set
            "127.0.0.1", node.port, ae_title="RADNODE", max_pdu=64, evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)]
        )
        assert assoc.is_established
        codes = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
        assoc.release()
        assert codes == [status.SUCCESS] * len(files)
        assert len(lengths) > len(files) and max(lengths) <= 64  # each response in several PDUs
    check(tmp_path / "tiny-peer")

    monkeypatch.setenv(FAST_RECEIVE_ENV, "false")
    with running_node(node_settings(tmp_path / "pynetdicom")) as node:
        assert node.fast_receive is False
        sent = storescu(node.port, *files)
        assert (sent.stdout + sent.stderr).count(SUCCESS_LINE) == len(files), sent.stdout + sent.stderr
    check(tmp_path / "pynetdicom")


def _series_of(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}


def test_sender_killed_mid_transfer_leaves_nothing_behind(ibsi: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data set is written to tmp/ while it arrives (the fast path streams it there;
    pynetdicom's own path holds it in memory until complete); a transfer cut short must not
    leave that file (or anything in incoming/) behind, and the node keeps serving."""
    monkeypatch.setenv(FAST_RECEIVE_ENV, "true")
    big = pydicom.dcmread(ibsi[0])
    big.Rows, big.Columns = 4096, 4096  # 32 MB: long enough to be caught mid-transfer
    big.PixelData = np.zeros((4096, 4096), np.uint16).tobytes()
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "big.dcm"
    big.save_as(path)
    data = tmp_path / "data"
    with running_node(node_settings(data)) as node:
        sender = subprocess.Popen(
            ["storescu", "--max-send-pdu", "4096", "-aec", "RADNODE", "127.0.0.1", str(node.port), str(path)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            staged = wait_until(lambda: any((data / "tmp").iterdir()), timeout=30, interval=0.001)
            sender.kill()
        finally:
            sender.wait(10)
        assert staged, "the transfer never started"
        assert wait_until(lambda: not any((data / "tmp").iterdir()), timeout=10)
        assert _incoming_files(data) == []
        sent = storescu(node.port, ibsi[1])
        assert SUCCESS_LINE in sent.stdout + sent.stderr
    assert len(_incoming_files(data)) == 1


@pytest.mark.parametrize("break_it", ["dul-class", "make_target", "version"])
def test_fast_path_self_test_falls_back_to_pynetdicom_with_a_warning(
    break_it: str, ibsi: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the pynetdicom internals the fast path relies on are not as expected, the node
    says so at start and receives through pynetdicom's ordinary path, storing the same bytes."""
    monkeypatch.setenv(FAST_RECEIVE_ENV, "true")
    import pynetdicom
    import pynetdicom.association
    from pynetdicom.dul import DULServiceProvider

    from radnode.node import fastpath

    if break_it == "dul-class":  # pynetdicom restructured its DUL: the class is not the one subclassed
        class RestructuredDUL(DULServiceProvider):
            pass

        monkeypatch.setattr(pynetdicom.association, "DULServiceProvider", RestructuredDUL)
    elif break_it == "make_target":  # an internal helper the fast path imports is gone
        monkeypatch.setattr(fastpath, "make_target", None)
    else:  # a release outside the tested series
        monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert fastpath.self_test() is not None
    files = ibsi[20:23]
    with caplog.at_level("WARNING", logger="radnode.node.scp"):
        with running_node(node_settings(tmp_path / "data")) as node:
            assert node.fast_receive is False
            sent = storescu(node.port, *files)
            assert (sent.stdout + sent.stderr).count(SUCCESS_LINE) == len(files), sent.stdout + sent.stderr
    assert any("self-test failed" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    stored = {p.name.removesuffix(".dcm"): dataset_bytes(p) for p in _incoming_files(tmp_path / "data")}
    assert stored == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(f) for f in files}


def test_fast_path_self_test_passes_on_the_pinned_pynetdicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radnode.node import fastpath

    assert fastpath.self_test() is None
    monkeypatch.delenv(FAST_RECEIVE_ENV, raising=False)
    with running_node(node_settings(tmp_path / "data", node={"fast_receive": True})) as node:
        assert node.fast_receive is True
    with running_node(node_settings(tmp_path / "plain", node={"fast_receive": False})) as node:
        assert node.fast_receive is False
    monkeypatch.setenv(FAST_RECEIVE_ENV, "false")  # as `make test` runs the node tests a second time
    with running_node(node_settings(tmp_path / "env", node={"fast_receive": True})) as node:
        assert node.fast_receive is False
