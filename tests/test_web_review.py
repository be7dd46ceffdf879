"""The review gate through the dashboard (Starlette's TestClient): a destination with
``requires_approval`` waits, a reviewer approves (per structure) or rejects on the job page
or the API; login, role and CSRF are enforced; the decision is in the outbox, the audit log,
``/api/jobs/<id>``, the overview and ``radnode status``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from starlette.testclient import TestClient
from typer.testing import CliRunner

from radnode.dicom_io.approval import roi_names
from radnode.pipeline.jobs import JobSpec
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.web import create_app

from web_support import NodeData, csrf_of, make_node_data, stage_for_review

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11999},
    {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 11998, "objects": ["RTSTRUCT", "SEG"],
     "requires_approval": True},
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeData:
    return make_node_data(tmp_path_factory.mktemp("review"), destinations=DESTINATIONS)


@pytest.fixture
def client(node: NodeData) -> Iterator[TestClient]:
    with TestClient(create_app(node.settings), follow_redirects=False) as c:
        yield c


def login(client: TestClient, name: str) -> str:
    from web_support import PASSWORD

    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)


def job_with_contours(node: NodeData, key: str) -> tuple[int, dict[str, str]]:
    """A new job whose RTSTRUCT (lungs + tumour) and SEG are staged for pacs and the gated tps."""
    queue = SQLiteJobQueue.in_data_dir(node.data_dir)
    job = queue.enqueue(JobSpec(series_uid=node.series_uid, input_path=node.phantom / "ct", pipeline_version=key))
    return job.id, stage_for_review(node, job.id)


def states(node: NodeData, job: int) -> dict[tuple[str, str], str]:
    return {(i.destination, i.object_type): i.state.value for i in Outbox(node.data_dir).items(job_id=job)}


def audit_of(client: TestClient, job: int) -> list[dict]:
    return [r for r in client.get("/api/audit", params={"q": "review_"}).json()["records"]
            if r["event"].startswith("review_") and r["detail"].get("job_id") == job]


def test_only_the_gated_destination_waits(client: TestClient, node: NodeData) -> None:
    job, _uids = job_with_contours(node, "wait")
    assert states(node, job) == {("pacs", "SEG"): "pending", ("pacs", "RTSTRUCT"): "pending",
                                 ("tps", "SEG"): "awaiting_review", ("tps", "RTSTRUCT"): "awaiting_review"}
    login(client, "viewer")
    review = client.get(f"/api/jobs/{job}").json()["review"]
    assert review["decision"] is None
    assert review["awaiting"]["destinations"] == ["tps"] and review["awaiting"]["items"] == 2
    assert review["awaiting"]["structures"] == ["Lung right", "Lung left", "Tumour"]
    page = client.get(f"/jobs/{job}").text
    assert 'id="review-waiting"' in page and 'id="review-form"' not in page  # a viewer sees, cannot decide
    overview = client.get("/api/overview").json()
    tps = next(d for d in overview["destinations"] if d["name"] == "tps")
    assert tps["requires_approval"] is True and tps["awaiting_review"] >= 2 and tps["pending"] == 0
    assert job in [r["job_id"] for r in overview["reviews"]["awaiting"]]
    assert f'href="/jobs/{job}#review"' in client.get("/partials/overview").text


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_decisions_need_login_the_reviewer_role_and_csrf(node: NodeData, action: str) -> None:
    job, _uids = job_with_contours(node, f"auth-{action}")
    for url in (f"/api/jobs/{job}/{action}", f"/jobs/{job}/{action}"):
        body = {"reason": "test"}
        with TestClient(create_app(node.settings), follow_redirects=False) as anonymous:
            assert anonymous.post(url, data=body).status_code == 401
        for role in ("viewer", "operator"):
            with TestClient(create_app(node.settings), follow_redirects=False) as weak:
                token = login(weak, role)
                assert weak.post(url, data={**body, "csrf_token": token}).status_code == 403, role
        with TestClient(create_app(node.settings), follow_redirects=False) as reviewer:
            login(reviewer, "reviewer")
            assert reviewer.post(url, data=body).status_code == 403
            assert reviewer.post(url, data={**body, "csrf_token": "forged"}).status_code == 403
            assert reviewer.post(url, json=body, headers={"x-csrf-token": "forged"}).status_code == 403
    assert set(states(node, job).values()) == {"pending", "awaiting_review"}  # nothing decided
    assert Outbox(node.data_dir).review(job) is None


def test_approve_on_the_job_page_leaving_out_the_tumour(client: TestClient, node: NodeData, tmp_path: Path) -> None:
    job, uids = job_with_contours(node, "approve")
    token = login(client, "reviewer")
    page = client.get(f"/jobs/{job}").text
    assert 'id="review-form"' in page and 'value="Tumour"' in page
    response = client.post(f"/jobs/{job}/approve", data={"csrf_token": token, "reject": "Tumour",
                                                          "comment": "lungs good; GTV misses the spiculae"})
    assert response.status_code == 303 and response.headers["location"] == f"/jobs/{job}"
    assert f"job {job} approved by reviewer for tps; left out: Tumour" in client.get(f"/jobs/{job}").text

    items = Outbox(node.data_dir).items(job_id=job)
    by_uid = {(i.sop_instance_uid, i.destination): i for i in items}
    assert by_uid[(uids["RTSTRUCT"], "tps")].state is ItemState.REPLACED
    assert by_uid[(uids["SEG"], "tps")].state is ItemState.REJECTED  # carries the rejected tumour
    assert "Tumour" in by_uid[(uids["SEG"], "tps")].last_error
    assert by_uid[(uids["RTSTRUCT"], "pacs")].state is ItemState.PENDING  # the PACS is not gated
    (approved,) = [i for i in items if i.sop_instance_uid not in uids.values()]
    assert (approved.destination, approved.object_type, approved.state) == ("tps", "RTSTRUCT", ItemState.PENDING)
    ds = pydicom.dcmread(approved.path)
    assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == "reviewer" and ds.ReviewDate
    assert roi_names(ds) == ["Lung right", "Lung left"]
    assert "GTV misses the spiculae" in ds.StructureSetDescription

    decision = client.get(f"/api/jobs/{job}").json()["review"]["decision"]
    assert decision["decision"] == "approved" and decision["reviewer"] == "reviewer"
    assert decision["approved_structures"] == ["Lung right", "Lung left"] and decision["rejected_structures"] == ["Tumour"]
    assert decision["destinations"] == ["tps"] and decision["approved_objects"] == [str(ds.SOPInstanceUID)]
    assert 'id="review-decision"' in client.get(f"/jobs/{job}").text
    (record,) = audit_of(client, job)
    assert record["event"] == "review_approve" and record["outcome"] == "done" and record["time"]
    assert record["detail"]["user"] == "reviewer" and record["detail"]["rejected"] == ["Tumour"]

    again = client.post(f"/api/jobs/{job}/approve", json={}, headers={"x-csrf-token": token})
    assert again.status_code == 409 and "reviewed already" in again.json()["error"]

    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(node.data_dir)}, "destinations": DESTINATIONS}))
    from radnode.cli.main import app

    shown = CliRunner().invoke(app, ["--config", str(config), "status"])
    assert shown.exit_code == 0, shown.output
    decided = shown.output.split("Review decisions")[1]
    assert f" {job} " in decided
    assert "approved" in decided and "reviewer" in decided and "Tumour" in decided
    listed = CliRunner().invoke(app, ["--config", str(config), "jobs", "list"])
    assert listed.exit_code == 0 and "approved by reviewer" in listed.output
    released = CliRunner().invoke(app, ["--config", str(config), "jobs", "release", str(job)])
    assert released.exit_code == 1  # nothing left waiting; the gated destination is never released as is


def test_reject_through_the_api_sends_nothing_and_records_the_reason(client: TestClient, node: NodeData) -> None:
    job, _uids = job_with_contours(node, "reject")
    token = login(client, "reviewer")
    missing = client.post(f"/api/jobs/{job}/reject", json={}, headers={"x-csrf-token": token})
    assert missing.status_code == 400 and "reason" in missing.json()["error"]
    response = client.post(f"/api/jobs/{job}/reject", json={"reason": "wrong patient orientation"},
                           headers={"x-csrf-token": token})
    assert response.status_code == 200, response.text
    assert response.json()["decision"] == "rejected" and response.json()["comment"] == "wrong patient orientation"
    tps = [i for i in Outbox(node.data_dir).items(job_id=job) if i.destination == "tps"]
    assert len(tps) == 2 and {i.state for i in tps} == {ItemState.REJECTED}
    assert all("wrong patient orientation" in (i.last_error or "") for i in tps)
    (record,) = audit_of(client, job)
    assert record["event"] == "review_reject" and record["detail"]["comment"] == "wrong patient orientation"
    assert client.post(f"/api/jobs/{job}/approve", json={}, headers={"x-csrf-token": token}).status_code == 409


def test_approving_everything_lets_the_seg_go_too(client: TestClient, node: NodeData) -> None:
    job, uids = job_with_contours(node, "all")
    token = login(client, "reviewer")
    response = client.post(f"/api/jobs/{job}/approve", json={"comment": "fine"}, headers={"x-csrf-token": token})
    assert response.status_code == 200, response.text
    assert response.json()["rejected_structures"] == []
    got = states(node, job)
    assert got[("tps", "SEG")] == "pending" and got[("tps", "RTSTRUCT")] in ("replaced", "pending")
    tps_rt = [i for i in Outbox(node.data_dir).items(job_id=job, destination="tps") if i.object_type == "RTSTRUCT"]
    assert sorted(i.state.value for i in tps_rt) == ["pending", "replaced"]


@pytest.mark.parametrize("reject", [["../../etc/passwd"], ["x" * 65], ["Lung right"] * 101, [{"a": 1}]])
def test_structure_names_are_checked(client: TestClient, node: NodeData, reject: list) -> None:
    job, _uids = job_with_contours(node, f"names-{len(str(reject))}")
    token = login(client, "reviewer")
    response = client.post(f"/api/jobs/{job}/approve", json={"reject": reject}, headers={"x-csrf-token": token})
    assert response.status_code == 400, response.text
    assert Outbox(node.data_dir).review(job) is None


def test_job_ids_are_checked(client: TestClient, node: NodeData) -> None:
    token = login(client, "reviewer")
    headers = {"x-csrf-token": token}
    for url in ("/api/jobs/99999/approve", "/api/jobs/..%2F1/approve", "/api/jobs/1%2F..%2F2/reject",
                "/jobs/../1/approve", "/api/jobs/-1/approve"):
        assert client.post(url, json={"reason": "x"}, headers=headers).status_code == 404, url
    job, _uids = job_with_contours(node, "body")
    bad = client.post(f"/api/jobs/{job}/approve", content=b"{not json", headers={**headers, "content-type": "application/json"})
    assert bad.status_code == 400
    assert client.post(f"/api/jobs/{node.failed_job}/approve", json={}, headers=headers).status_code == 409  # nothing waits
