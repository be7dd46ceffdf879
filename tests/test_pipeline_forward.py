"""Forward end to end: a real CT (NSCLC-Radiomics LUNG1-002, 111 slices) sent to the node
is forwarded by a routing rule to Orthanc, unchanged.

The node's listener receives it (DCMTK ``storescu``), the completion queues a forward job
(nothing is copied on the completion thread), the forwarder stages the received files
and the dispatcher sends them as they are. Every element of every slice in Orthanc, the
pixel bytes included, must equal the source; the data set bytes must equal the bytes the
node received.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from radnode.config import Settings
from radnode.node.scp import StorageNode
from radnode.pipeline.jobs import JobKind, JobState
from radnode.pipeline.outbox import ItemState
from radnode.pipeline.service import PipelineService
from radnode.testing.orthanc import OrthancServer, free_port

from node_support import dataset_bytes, storescu
from pipeline_support import wait_for

CASE = Path("nsclc_radiomics") / "LUNG1-002"


def _ct_files(shared_data: Path) -> list[Path]:
    files = []
    for path in sorted((shared_data / CASE).rglob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "CT":
            files.append(path)
    return files


def _assert_same_elements(source: Dataset, copy: Dataset, where: str) -> None:
    """Every element of ``source`` is in ``copy`` with the same value (recursively), and no more."""
    assert [e.tag for e in source] == [e.tag for e in copy], f"{where}: element lists differ"
    for element in source:
        other = copy[element.tag]
        if element.VR == "SQ":
            assert len(element.value) == len(other.value), f"{where} {element.tag}: item count"
            for n, (a, b) in enumerate(zip(element.value, other.value)):
                _assert_same_elements(a, b, f"{where} {element.tag}[{n}]")
        else:
            assert element.value == other.value, f"{where} {element.tag}: {element.value!r} != {other.value!r}"


def test_a_real_ct_is_forwarded_to_orthanc_unchanged(tmp_path: Path, shared_data: Path) -> None:
    sources = _ct_files(shared_data)
    assert len(sources) == 111
    with OrthancServer() as orthanc:
        settings = Settings(
            storage={"data_dir": str(tmp_path / "data"), "min_free_gb": 0.01},
            node={"ae_title": "RADNODE", "host": "127.0.0.1", "port": free_port()},
            series={"quiet_seconds": 1.0, "force_seconds": 120.0},
            destinations=[{"name": "archive", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            routing=[{"name": "forward-ct", "match": {"modality": ["CT"]}, "action": "forward", "destinations": ["archive"]}],
            metrics={"enabled": False},
        )
        node = StorageNode(settings)
        service = PipelineService(settings, completion=node.completion, schedule_completion_checks=False, poll_seconds=0.2)
        node.start()
        service.start()
        try:
            # Implicit VR only, as the files are: the node receives the source's data set bytes.
            sent = storescu(node.port, *sources, aet="SCANNER", extra=("--propose-implicit",))
            assert sent.returncode == 0, sent.stderr[-2000:]
            series_uid = str(pydicom.dcmread(sources[0], stop_before_pixels=True).SeriesInstanceUID)

            job = wait_for(lambda: service.queue.latest_for_series(series_uid, kind=JobKind.FORWARD), 30, 0.1, "a forward job")
            assert job.kind is JobKind.FORWARD
            started = time.monotonic()
            wait_for(
                lambda: len(service.outbox.items(limit=1000)) == 111
                and all(i.state is ItemState.SENT for i in service.outbox.items(limit=1000)),
                120, 0.2, "all 111 slices delivered",
            )
            delivery_seconds = time.monotonic() - started
            assert service.queue.get(job.id).state is JobState.DONE
            assert service.queue.latest_for_series(series_uid) is None  # forwarded, not processed
        finally:
            service.stop(drain_seconds=0)
            node.stop(grace_seconds=1)

        received = {p.name.removesuffix(".dcm"): p for p in (tmp_path / "data" / "incoming").rglob("*.dcm")}
        assert len(received) == 111
        for source in sources:
            original = pydicom.dcmread(source)
            uid = str(original.SOPInstanceUID)
            raw = orthanc.instance_file(uid)
            forwarded = pydicom.dcmread(io.BytesIO(raw))
            _assert_same_elements(original, forwarded, uid)
            assert forwarded.PixelData == original.PixelData
            # The bytes the node received went out unchanged (no decode and re-encode).
            (tmp_path / "f.dcm").write_bytes(raw)
            assert dataset_bytes(tmp_path / "f.dcm") == dataset_bytes(received[uid])
    print(f"forwarded 111 slices in {delivery_seconds:.1f} s after the forward job was queued")
