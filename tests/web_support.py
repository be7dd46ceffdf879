"""A node data folder for the dashboard tests, built from a real phantom series.

The index holds the phantom's instances (as the listener indexes them), the queue holds
jobs driven through the queue's own transitions, the finished job has a result.json and
overlay PNGs rendered from the phantom's CT and ground-truth masks, and the audit log has
records written by :class:`~radnode.node.audit.AuditLog`.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
from pydicom import dcmread

from radnode.config import Settings
from radnode.config.loader import settings_from_mapping
from radnode.dicom_io.overlays import OVERLAY_DIR, render_overlays
from radnode.dicom_io.regions import Region, RegionKind
from radnode.dicom_io.series import load_series
from radnode.node.audit import AuditLog
from radnode.node.header import InstanceHeader
from radnode.node.index import InstanceRecord, NodeIndex
from radnode.node.storage import INDEX_FILE
from radnode.phantom.generate import generate_phantom
from radnode.pipeline.jobs import JobSpec
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.service import RESULTS_DIR
from radnode.web.users import UserStore

PASSWORD = "correct horse battery"


@dataclass
class NodeData:
    settings: Settings
    data_dir: Path
    phantom: Path
    series_uid: str
    series_description: str
    done_job: int
    failed_job: int
    result: dict


def make_node_data(root: Path, dashboard: dict | None = None, destinations: list[dict] | None = None) -> NodeData:
    phantom = root / "phantom"
    generate_phantom(phantom, seed=3, slices=24, tumors=1, matrix=128, tumor_types=["solid"])
    data_dir = root / "data"
    settings = settings_from_mapping(
        {"storage": {"data_dir": str(data_dir)}, "dashboard": dashboard or {},
         "destinations": destinations or [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11999}]},
        source="test",
    )
    data_dir.mkdir(parents=True)

    files = sorted((phantom / "ct").rglob("*.dcm"))
    index = NodeIndex(data_dir / INDEX_FILE)
    for i, path in enumerate(files):
        header = InstanceHeader.from_dataset(dcmread(path, stop_before_pixels=True))
        record = InstanceRecord(
            header.sop_instance_uid, 1, header.series_instance_uid, header.study_instance_uid, header.sop_class_uid,
            "1.2.840.10008.1.2.1", header.modality, "CTSCANNER", "127.0.0.1", str(path), path.stat().st_size, 1000.0 + i,
        )
        index.add_instance(record, header.to_json(), None)
    index.close()
    first = dcmread(files[0], stop_before_pixels=True)
    series_uid, description = str(first.SeriesInstanceUID), str(first.get("SeriesDescription", ""))

    queue = SQLiteJobQueue.in_data_dir(data_dir)
    done = queue.enqueue(JobSpec(series_uid=series_uid, study_uid=str(first.StudyInstanceUID), input_path=phantom / "ct",
                                 pipeline_version="test", instance_count=len(files), calling_ae="CTSCANNER"))
    assert queue.claim("w1", 60) is not None
    failed = queue.enqueue(JobSpec(series_uid="1.2.826.0.1.3680043.99.2", input_path=root, pipeline_version="test"))

    series = load_series(phantom / "ct")
    volume = sitk.GetArrayFromImage(series.image)
    x, y, z = series.image.GetSpacing()
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "lungs.nii.gz")))
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "tumor.nii.gz"))) > 0
    regions = [
        Region.of_kind(RegionKind.LUNG_RIGHT, lungs == 1), Region.of_kind(RegionKind.LUNG_LEFT, lungs == 2),
        Region.of_kind(RegionKind.TUMOUR, tumour),
    ]
    out = data_dir / RESULTS_DIR / str(done.id)
    render_overlays(volume, (z, y, x), regions, out / OVERLAY_DIR)
    voxel_ml = x * y * z / 1000.0
    result = {
        "status": "done", "radnode_version": "test", "pipeline_version": "test", "error": None,
        "qc": {"passed": True, "issues": [{"code": "thick_slices_noted", "severity": "warning", "message": "slices 2.5 mm"}]},
        "models": {
            "lung_mask": {"method": "radnode-lungmask-classical", "version": "1"},
            "tumour": {"method": "raseg-demo", "version": "0.3", "demo": True, "notes": []},
        },
        "regions": [
            {"name": "Tumour", "volume_ml": round(float(tumour.sum()) * voxel_ml, 2), "max_diameter_mm": 23.4,
             "hu_mean": float(volume[tumour].mean()), "voxels": int(tumour.sum())},
        ],
        "mutations": {"predictions": [{"endpoint": "EGFR", "probability": 0.731, "threshold": 0.5, "classifier_name": "egfr-demo",
                                       "classifier_version": "2", "demo": True, "negative_class": "wild type",
                                       "positive_class": "mutant"}], "errors": {}},
        "stages": [{"name": "lung_mask", "seconds": 1.234, "status": "done"}, {"name": "tumour", "seconds": 5.678, "status": "done"}],
        "warnings": [], "outputs": {},
    }
    (out / "result.json").write_text(json.dumps(result))
    queue.complete(done.id, "w1", {"status": "done"})
    assert queue.claim("w2", 60) is not None
    queue.fail(failed.id, "w2", "chain_error", "ValueError: the phantom broke", retryable=False)

    audit = AuditLog(data_dir / "audit" / "audit.jsonl")
    audit.record("association", calling_ae="CTSCANNER", peer_address="127.0.0.1", result="accepted")
    audit.record("association", calling_ae="INTRUDER", peer_address="10.9.9.9", result="rejected", reason="unknown calling AE")
    audit.record("instance_stored", calling_ae="CTSCANNER", series_instance_uid=series_uid, status="success")
    audit.close()

    store = UserStore(data_dir)
    for role in ("viewer", "operator", "reviewer"):
        store.add(role, role, PASSWORD)
    return NodeData(settings, data_dir, phantom, series_uid, description, done.id, failed.id, result)


def http_login(base: str, name: str, password: str = PASSWORD, context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """Log in over HTTP as a browser would: GET the form, POST it with its CSRF token and the cookie."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    token = csrf_of(opener.open(base + "login", timeout=10).read().decode())
    body = urllib.parse.urlencode({"username": name, "password": password, "csrf_token": token}).encode()
    with opener.open(base + "login", data=body, timeout=10) as response:
        assert "/login" not in response.url, f"login as {name} failed"
    return opener


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)



def stage_for_review(node: NodeData, job_id: int | None = None) -> dict[str, str]:
    """Write the done job's real RTSTRUCT (lungs + tumour of the phantom) and a SEG header into
    its results and stage them as the node does; returns SOP Instance UIDs by modality.

    Destinations with ``requires_approval`` get the items ``awaiting_review``.
    """
    from radnode.dicom_io.regions import AlgorithmInfo
    from radnode.dicom_io.rtstruct_writer import build_rtstruct
    from radnode.pipeline.jobs import Phase
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.review import stage_phase

    from pipeline_support import write_result_objects

    job_id = node.done_job if job_id is None else job_id
    out = node.data_dir / RESULTS_DIR / str(job_id)
    out.mkdir(parents=True, exist_ok=True)
    series = load_series(node.phantom / "ct")
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(node.phantom / "truth" / "lungs.nii.gz")))
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(node.phantom / "truth" / "tumor.nii.gz"))) > 0
    regions = [Region.of_kind(RegionKind.LUNG_RIGHT, lungs == 1), Region.of_kind(RegionKind.LUNG_LEFT, lungs == 2),
               Region.of_kind(RegionKind.TUMOUR, tumour)]
    rt = build_rtstruct(series, regions, AlgorithmInfo(name="raseg-demo", version=f"0.3.{job_id}", model_versions={}, demo=True),
                        node.settings.output)
    rt_path = out / "RTSTRUCT.dcm"
    rt.save_as(rt_path, enforce_file_format=True)
    (seg_path,) = write_result_objects(dcmread(sorted((node.phantom / "ct").rglob("*.dcm"))[0], stop_before_pixels=True),
                                       out, ["SEG"], version=f"web-{job_id}")
    stage_phase(Outbox(node.data_dir), [seg_path, rt_path], node.settings.destinations, out, Phase.CONTOURS,
                job_id=job_id, source_series_uid=node.series_uid)
    return {"RTSTRUCT": str(rt.SOPInstanceUID), "SEG": str(dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)}
