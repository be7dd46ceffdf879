"""The node's pure parts without a network: UIDs, File Meta, header parsing, access rules,
routing rules, series completion and the audit allow-list."""

from __future__ import annotations

import subprocess
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from node_support import IBSI_SLICES, dataset_bytes

from radnode.config.model import NodeSettings, RoutingRule, RuleMatch
from radnode.node.access import AccessPolicy
from radnode.node.audit import AuditLog, read_audit
from radnode.node.header import HeaderError, parse_header
from radnode.node.index import NodeIndex
from radnode.node.routing import evaluate, format_decision
from radnode.node.series_attributes import SeriesAttributes
from radnode.node.status import RejectReason, RejectResult, RejectSource
from radnode.node.storage import (
    InstanceStore,
    InvalidUIDError,
    encode_file_meta,
    validate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# --- UIDs and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["../../etc/x", "1.2/3", "1..2", "1.02.3", "", "1.2.a", "1." + "2" * 63, ".1.2", "1.2.", None, 12],
)
def test_invalid_uids_are_refused(value: object) -> None:
    with pytest.raises(InvalidUIDError) as info:
        validate_uid(value, "SOPInstanceUID")
    assert "SOPInstanceUID" in str(info.value)


def test_valid_uid_loses_its_padding() -> None:
    assert validate_uid("1.2.840.10008.1.2\x00", "TransferSyntaxUID") == "1.2.840.10008.1.2"
    assert validate_uid("0.0", "X") == "0.0"
    uid = "1." + "2" * 62
    assert validate_uid(uid, "X") == uid


def test_instance_path_refuses_traversal(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    with pytest.raises(InvalidUIDError):
        store.instance_path("1.2", "1.3", "../../etc/x")
    path = store.instance_path("1.2", "1.3", "1.4", version=2)
    assert path == store.incoming / "1.2" / "1.3" / "1.4_v2.dcm"


# --- Part 10 files ------------------------------------------------------------------------------


def test_written_file_is_part10_with_exact_bytes(shared_data: Path, tmp_path: Path) -> None:
    source = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[3]
    original = pydicom.dcmread(source)
    body = dataset_bytes(source)
    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    meta = encode_file_meta(original.SOPClassUID, original.SOPInstanceUID, original.file_meta.TransferSyntaxUID, "SCANNER1")
    final = store.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    stored = store.write_instance(final, [meta, body])

    assert stored.size == final.stat().st_size
    assert dataset_bytes(final) == body
    copy = pydicom.dcmread(final)
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert copy.file_meta.SourceApplicationEntityTitle.strip() == "SCANNER1"
    assert np.array_equal(copy.pixel_array, original.pixel_array)
    assert list(store.tmp_dir.iterdir()) == []
    # DCMTK agrees that the File Meta is well formed.
    dump = subprocess.run(["dcmdump", "-q", str(final)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert "MediaStorageSOPInstanceUID" in dump.stdout


def test_clean_temporary_removes_leftovers(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    (store.tmp_dir / "abc.part").write_bytes(b"half a file")
    assert store.clean_temporary() == 1
    assert list(store.tmp_dir.iterdir()) == []


# --- header parsing -----------------------------------------------------------------------------


def test_parse_header_implicit_and_deflated(shared_data: Path, tmp_path: Path) -> None:
    source = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[0]
    original = pydicom.dcmread(source, stop_before_pixels=True)
    header = parse_header(dataset_bytes(source), original.file_meta.TransferSyntaxUID)
    assert header.sop_instance_uid == original.SOPInstanceUID
    assert header.series_instance_uid == original.SeriesInstanceUID
    assert header.study_instance_uid == original.StudyInstanceUID
    assert header.modality == original.Modality
    assert header.slice_thickness == pytest.approx(float(original.SliceThickness))
    assert header.image_type == tuple(original.ImageType)
    assert not header.has_file_meta_elements

    deflated = tmp_path / "deflated.dcm"
    subprocess.run(["dcmconv", "+td", str(source), str(deflated)], check=True)
    meta = pydicom.dcmread(deflated, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    inflated = parse_header(dataset_bytes(deflated), meta.TransferSyntaxUID)
    assert inflated.sop_instance_uid == original.SOPInstanceUID
    assert inflated.series_instance_uid == original.SeriesInstanceUID


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_fast_header_scanner_agrees_with_pydicom(shared_data: Path, tmp_path: Path, transfer_syntax: str) -> None:
    from pydicom.dataset import Dataset

    from radnode.node.header import _parse, _scan_header

    sources = [
        sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[0],
        next((shared_data / "ibsi_ct_phantom" / "dicom" / "mask").glob("*.dcm")),
        next((shared_data / "nsclc_radiomics" / "LUNG1-002" / "RTSTRUCT").rglob("*.dcm")),
    ]
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    for number, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        # Undefined-length sequences (nested) before the attributes we read.
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator = "T-D3000", "SRT"
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
        item.PurposeOfReferenceCodeSequence = [inner]
        item.PurposeOfReferenceCodeSequence.is_undefined_length = True
        ds.ReferencedImageSequence = [item, item]
        ds.ReferencedImageSequence.is_undefined_length = True
        ds.SeriesDescription = "Thorax Lunge nativ"
        ds.SpecificCharacterSet = "ISO_IR 100"
        if number == 0:
            ds.SeriesDescription = "Thorax ü 1.0"  # Latin-1, decoded with the character set
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
        body = dataset_bytes(path)
        fast, _ = _scan_header(memoryview(body), implicit, True)
        slow, _ = _parse(body, implicit, True)
        assert fast == slow, source
        assert fast == parse_header(body, transfer_syntax)
        assert fast.sop_instance_uid == ds.SOPInstanceUID and fast.series_description == ds.SeriesDescription


def test_parse_header_rejects_garbage() -> None:
    rng = np.random.default_rng(7)
    garbage = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    with pytest.raises(HeaderError):
        parse_header(b"\x08\x00\x18\x00" + garbage, "1.2.840.10008.1.2.1.99")
    try:
        header = parse_header(garbage, "1.2.840.10008.1.2.1")
    except HeaderError:
        return
    assert header.sop_instance_uid is None or header.series_instance_uid is None


# --- access control -----------------------------------------------------------------------------


def test_access_policy_decisions() -> None:
    strict = AccessPolicy(
        NodeSettings(ae_title="RADNODE", strict=True, allowed_calling_aes=["PACS"], allowed_hosts=["10.1.0.0/16", "127.0.0.1"])
    )
    ok = strict.check("PACS", "RADNODE", "127.0.0.1")
    assert ok.accepted and not ok.unlisted_calling_ae

    unknown = strict.check("INTRUDER", "RADNODE", "127.0.0.1")
    assert not unknown.accepted
    assert (unknown.result, unknown.source, unknown.reason) == (
        RejectResult.PERMANENT,
        RejectSource.SERVICE_USER,
        RejectReason.CALLING_AE_NOT_RECOGNIZED,
    )
    assert strict.check("PACS", "OTHER", "127.0.0.1").reason == RejectReason.CALLED_AE_NOT_RECOGNIZED
    host = strict.check("PACS", "RADNODE", "192.168.1.5")
    assert not host.accepted and host.reason == RejectReason.NO_REASON_GIVEN
    assert strict.check("PACS", "RADNODE", "10.1.200.3").accepted
    assert strict.check("PACS", "RADNODE", "::ffff:10.1.2.3").accepted

    lenient = AccessPolicy(NodeSettings(ae_title="RADNODE"))
    anyone = lenient.check("WHOEVER", "RADNODE", "192.168.1.5")
    assert anyone.accepted and anyone.unlisted_calling_ae and lenient.accepts_any_calling_ae
    assert not lenient.check("WHOEVER", "NOTME", "192.168.1.5").accepted


# --- routing ------------------------------------------------------------------------------------


def _ct_facts(**changes: object) -> SeriesAttributes:
    values: dict[str, object] = dict(
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.1",
        sop_class_uid=CT_IMAGE_STORAGE,
        modality="CT",
        body_part_examined="CHEST",
        series_description="Thorax 1.0 B31f",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness=1.0,
        station_name="CT-ROOM-2",
        study_date="20240517",
        manufacturer="SIEMENS",
        instance_count=120,
        calling_ae="CT2",
    )
    values.update(changes)
    return SeriesAttributes(**values)  # type: ignore[arg-type]


RULES = [
    RoutingRule(name="skip-scouts", match=RuleMatch(image_type_contains="derived"), action="ignore"),
    RoutingRule(
        name="thin-chest",
        match=RuleMatch(
            modality=["ct"],
            body_part="chest|lung",
            series_description=r"thorax",
            slice_thickness_min=0.5,
            slice_thickness_max=2.0,
            min_instances=50,
            calling_ae=["CT1", "CT2"],
            station_name=r"^CT-ROOM",
            study_date_from=date(2024, 1, 1),
            study_date_to=date(2024, 12, 31),
        ),
        action="process",
        profile="lung",
    ),
    RoutingRule(name="everything-else", action="ignore"),
]


def test_rule_matches_when_every_condition_holds() -> None:
    decision = evaluate(RULES, _ct_facts(), "2.25")
    assert (decision.action, decision.rule_name, decision.profile) == ("process", "thin-chest", "lung")
    thin = decision.checks[1]
    assert len(thin.conditions) == 8 and all(c.passed for c in thin.conditions)


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"modality": "MR"}, "modality"),
        ({"body_part_examined": "ABDOMEN"}, "body_part"),
        ({"body_part_examined": None}, "body_part"),
        ({"series_description": "Abdomen"}, "series_description"),
        ({"slice_thickness": 5.0}, "slice_thickness"),
        ({"slice_thickness": 0.4}, "slice_thickness"),
        ({"instance_count": 49}, "min_instances"),
        ({"calling_ae": "PACS"}, "calling_ae"),
        ({"station_name": "MR-1"}, "station_name"),
        ({"study_date": "20231231"}, "study_date"),
        ({"study_date": None}, "study_date"),
    ],
)
def test_each_condition_can_fail(change: dict[str, object], failing: str) -> None:
    decision = evaluate(RULES, _ct_facts(**change), "2.25")
    assert decision.action == "ignore" and decision.rule_name == "everything-else"
    failed = [c.name for c in decision.checks[1].conditions if not c.passed]
    assert failed == [failing]
    text = format_decision(decision, _ct_facts(**change))
    assert f"[FAIL] {failing}" in text


def test_first_matching_rule_wins() -> None:
    decision = evaluate(RULES, _ct_facts(image_type=("DERIVED", "SECONDARY", "AXIAL")), "2.25")
    assert decision.rule_name == "skip-scouts" and decision.action == "ignore"


def test_loop_guard_and_non_image_series_are_never_processed() -> None:
    ours = _ct_facts(series_instance_uid="2.25.1234", sop_instance_uid="2.25.99", manufacturer="radnode")
    decision = evaluate(RULES, ours, "2.25")
    assert decision.action == "ignore" and decision.guard and "loop guard" in decision.guard
    assert decision.checks[1].matched and decision.checks[1].blocked_by
    # Same UID root but another manufacturer: not ours, processed.
    assert evaluate(RULES, _ct_facts(series_instance_uid="2.25.1234"), "2.25").action == "process"
    # Software Versions naming radnode (as the writers set it) is recognised too...
    by_software = _ct_facts(series_instance_uid="2.25.1234", software_versions=("radnode 0.1.0",))
    assert evaluate(RULES, by_software, "2.25").action == "ignore"
    # ...but the synthetic phantom is input to process, not radnode's own output.
    phantom = _ct_facts(
        series_instance_uid="2.25.1234", manufacturer="radnode-phantom", software_versions=("radnode-phantom 0.1.0",)
    )
    assert evaluate(RULES, phantom, "2.25").action == "process"

    for facts in (
        _ct_facts(sop_class_uid=SEG_STORAGE, modality="SEG"),
        _ct_facts(modality="RTSTRUCT", sop_class_uid="1.2.840.10008.5.1.4.1.1.481.3"),
        _ct_facts(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
    ):
        rules = [RoutingRule(name="all", action="process")]
        assert evaluate(rules, facts, "2.25").action == "ignore"
    forward = [
        RoutingRule(name="all", action="process"),
        RoutingRule(name="send-on", match=RuleMatch(modality=["SEG"]), action="forward", destinations=["archive"]),
    ]
    seg = evaluate(forward, _ct_facts(sop_class_uid=SEG_STORAGE, modality="SEG"), "2.25")
    assert (seg.action, seg.destinations) == ("forward", ("archive",))


# --- series completion --------------------------------------------------------------------------

# The index's completion tests run on both backends: tests/test_index_contract.py.


# --- audit --------------------------------------------------------------------------------------


def test_audit_refuses_fields_outside_allow_list(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.record("instance-stored", sop_instance_uid="1.2.3", calling_ae="CT1")
    with pytest.raises(ValueError, match="patient_name"):
        audit.record("instance-stored", patient_name="DOE^JANE")
    audit.close()
    (entry,) = read_audit(tmp_path / "audit.jsonl")
    assert entry["event"] == "instance-stored" and entry["sop_instance_uid"] == "1.2.3"


# --- listener hygiene ---------------------------------------------------------------------------


# The node process's imports are checked on a running node: tests/test_node_serve.py
# (test_the_node_process_never_imports_torch_or_the_models).


def test_fast_path_swaps_only_the_classes_it_knows() -> None:
    import socket

    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.transport import AssociationSocket

    from radnode.node.fastpath import RecvIntoSocket, SelectingDUL, tune_association

    with socket.socket() as raw:
        assoc = Association(AE(), "acceptor")
        assoc.set_socket(AssociationSocket(assoc, client_socket=raw))
        assert tune_association(assoc) is True
        assert type(assoc.dul) is SelectingDUL and type(assoc.dul.socket) is RecvIntoSocket
        assert tune_association(assoc) is False  # already tuned: left alone


def test_fast_path_answers_c_store_itself_only_when_given_a_handler() -> None:
    import socket

    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.transport import AssociationSocket

    from radnode.node.fastpath import StoreDIMSE, tune_association

    with socket.socket() as raw:
        plain = Association(AE(), "acceptor")
        plain.set_socket(AssociationSocket(plain, client_socket=raw))
        assert tune_association(plain) is True
        assert type(plain.dimse) is DIMSEServiceProvider
        handled = Association(AE(), "acceptor")
        handled.set_socket(AssociationSocket(handled, client_socket=raw))
        assert tune_association(handled, lambda assoc, command, fragments: (0, None)) is True
        assert type(handled.dimse) is StoreDIMSE


@pytest.mark.parametrize(
    ("version", "supported"), [("3.0.4", True), ("3.0.9", True), ("3.1.0", False), ("4.0.0", False), ("2.1.1", False), ("dev", False)]
)
def test_fast_path_is_limited_to_the_tested_pynetdicom_series(version: str, supported: bool) -> None:
    import pynetdicom

    from radnode.node.fastpath import pynetdicom_supported

    assert pynetdicom_supported(version) is supported
    assert pynetdicom_supported(pynetdicom.__version__)  # the pinned release in the venv


@pytest.mark.parametrize(("status_code", "comment"), [(0x0000, None), (0xA700, "Out of resources: free disk"), (0xC000, "odd")])
def test_c_store_response_is_encoded_as_pynetdicom_encodes_it(status_code: int, comment: str | None) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from radnode.node.fastpath import encode_c_store_rsp

    sop_class, sop_instance = CT_IMAGE_STORAGE, "1.2.826.0.1.3680043.8.498.1234567"  # odd length: padded
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status_code
    if comment:
        response.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (pdata,) = list(message.encode_msg(1, 0))
    ((context_id, fragment),) = pdata.presentation_data_value_list
    assert context_id == 1 and fragment[0] == 0x03  # one fragment: command, last
    assert encode_c_store_rsp(sop_class, sop_instance, 7, status_code, comment) == bytes(fragment[1:])


def test_header_of_a_fragmented_data_set_equals_the_whole(shared_data: Path) -> None:
    from radnode.node.header import parse_header_fragments

    source = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[5]
    transfer_syntax = pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
    body = dataset_bytes(source)
    whole = parse_header(body, transfer_syntax)
    assert whole.series_instance_uid is not None
    for size in (64, 1000, 16_378, len(body) // 2 + 1):  # the header spans pieces, then not
        pieces = [memoryview(body)[i : i + size] for i in range(0, len(body), size)]
        assert parse_header_fragments(pieces, transfer_syntax) == whole


def test_many_small_fragments_are_written_exactly(tmp_path: Path) -> None:
    import os

    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    rng = np.random.default_rng(3)
    count = os.sysconf("SC_IOV_MAX") + 500  # more pieces than one writev takes
    pieces = [rng.integers(0, 256, 37, dtype=np.uint8).tobytes() for _ in range(count)]
    final = store.instance_path("1.2", "1.3", "1.4")
    stored = store.write_instance(final, pieces)
    assert final.read_bytes() == b"".join(pieces) and stored.size == 37 * count


def test_files_without_index_rows_are_indexed_at_start_up(shared_data: Path, tmp_path: Path) -> None:
    """storage.index_sync = normal: rows a power loss rolls back come back from the files."""
    from node_support import node_settings

    from radnode.node.scp import INDEX_FILE, StorageNode

    sources = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:3]
    data = tmp_path / "data"
    settings = node_settings(data)
    assert settings.storage.index_sync == "normal"
    node = StorageNode(settings)
    written = []
    for source in sources:  # durable files whose index commits were "lost"
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, "SCANNER1")
        final = node.store.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        node.store.write_instance(final, [meta, dataset_bytes(source)])
        written.append((ds, final))
    series_uid = written[0][0].SeriesInstanceUID
    assert node.index.series_instances(series_uid) == []
    node.start()
    node.stop(grace_seconds=1)

    index = NodeIndex(data / INDEX_FILE)
    rows = {r.sop_instance_uid: r for r in index.series_instances(series_uid)}
    series = index.series(series_uid)
    index.close()
    assert set(rows) == {ds.SOPInstanceUID for ds, _ in written}
    for ds, final in written:
        assert rows[ds.SOPInstanceUID].path == final.relative_to(data).as_posix()
        assert rows[ds.SOPInstanceUID].calling_ae == "SCANNER1"
        assert rows[ds.SOPInstanceUID].size == final.stat().st_size
    assert series is not None and series.instance_count == 3
    recovered = [r for r in read_audit(data / "audit" / "audit.jsonl") if r["event"] == "instance-recovered"]
    assert len(recovered) == 3


def test_index_sync_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="index_sync"):
        NodeIndex(tmp_path / "x.sqlite", "fast")  # type: ignore[arg-type]


def test_c_store_request_command_is_read_as_pynetdicom_encodes_it() -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    from radnode.node.fastpath import parse_c_store_rq

    request = C_STORE()
    request.MessageID = 513
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567"
    request.Priority = 2
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 9
    request.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdvs = [pdv for pdata in message.encode_msg(1, 0) for pdv in pdata.presentation_data_value_list]
    command = b"".join(bytes(data[1:]) for _, data in pdvs if data[0] & 1)  # command fragments
    # pynetdicom writes 0x0001 for "a data set follows" (anything but 0x0101, PS3.7 E.1).
    assert parse_c_store_rq(command) == (513, 0x0001, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
    assert parse_c_store_rq(command[:-3]) is None  # truncated

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo_message = C_ECHO_RQ()
    echo_message.primitive_to_message(echo)
    pdvs = [pdv for pdata in echo_message.encode_msg(1, 0) for pdv in pdata.presentation_data_value_list]
    assert parse_c_store_rq(b"".join(bytes(data[1:]) for _, data in pdvs)) is None


@pytest.mark.parametrize("staged_ae", ["SCANNER1", "OTHER"])
def test_staged_file_is_committed_only_when_it_holds_exactly_the_instance(
    shared_data: Path, tmp_path: Path, staged_ae: str
) -> None:
    from radnode.node.ingest import Ingestor, StoreRequest

    source = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[7]
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    body = dataset_bytes(source)
    pieces = tuple(memoryview(body)[i : i + 30_000] for i in range(0, len(body), 30_000))
    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    index = NodeIndex(tmp_path / "data" / "index.sqlite", "normal")
    ingestor = Ingestor(store, index, AuditLog(tmp_path / "data" / "audit.jsonl"))
    staged = store.temporary(prefix=encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax, staged_ae))
    for piece in pieces:
        staged.append_quietly(piece)
    staged_inode = staged.path.stat().st_ino

    request = StoreRequest(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax, "SCANNER1", "127.0.0.1", pieces)
    outcome = ingestor.ingest(request, staged)
    index.close()

    assert outcome.outcome == "stored" and outcome.path is not None
    assert dataset_bytes(outcome.path) == body
    assert pydicom.dcmread(outcome.path).file_meta.SourceApplicationEntityTitle.strip() == "SCANNER1"
    assert not staged.is_open and list(store.tmp_dir.iterdir()) == []
    # The staged file became the instance only when its File Meta was the right one.
    assert (outcome.path.stat().st_ino == staged_inode) is (staged_ae == "SCANNER1")
