"""The dashboard (radnode.web) through Starlette's TestClient: every page and API route,
login, roles, CSRF, traversal attempts, overlay PNGs, and ``radnode users add``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from radnode.node.audit import read_audit
from radnode.pipeline.jobs import JobSpec, JobState
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.web import create_app
from radnode.web.users import UserStore

from web_support import PASSWORD, NodeData, csrf_of, make_node_data

PAGES = ["/", "/partials/overview", "/jobs", "/rules", "/audit"]
API_GETS = ["/api/me", "/api/overview", "/api/jobs", "/api/rules", "/api/audit"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeData:
    return make_node_data(tmp_path_factory.mktemp("web"))


@pytest.fixture
def client(node: NodeData) -> Iterator[TestClient]:
    with TestClient(create_app(node.settings), follow_redirects=False) as c:
        yield c


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Log in through the form; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/jobs"})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/jobs"
    return csrf_of(client.get("/").text)


def new_job(node: NodeData, uid_tail: str) -> int:
    queue = SQLiteJobQueue.in_data_dir(node.data_dir)
    return queue.enqueue(JobSpec(series_uid=f"1.2.826.0.1.3680043.99.{uid_tail}", input_path=node.data_dir,
                                 pipeline_version="test")).id


# --- login and sessions ------------------------------------------------------------------------


def test_pages_redirect_to_login_and_api_answers_401_without_a_session(client: TestClient, node: NodeData) -> None:
    for path in [*PAGES, f"/jobs/{node.done_job}"]:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    for path in [*API_GETS, f"/api/jobs/{node.done_job}", f"/api/jobs/{node.done_job}/overlays/axial.png",
                 f"/jobs/{node.done_job}/overlays/axial.png"]:
        response = client.get(path)
        assert response.status_code == 401, path
        if path.startswith("/api/"):
            assert response.json()["status"] == 401


def test_every_response_forbids_framing_and_sniffing(client: TestClient, node: NodeData) -> None:
    login(client, "viewer")
    for path in ("/login", "/", "/api/overview", f"/jobs/{node.done_job}/overlays/axial.png", "/static/dashboard.js", "/jobs/0"):
        headers = client.get(path).headers
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path


def test_login_needs_csrf_and_the_right_password(client: TestClient, node: NodeData) -> None:
    client.get("/login")
    assert client.post("/login", data={"username": "viewer", "password": PASSWORD}).status_code == 403
    token = csrf_of(client.get("/login").text)
    wrong = client.post("/login", data={"username": "viewer", "password": "not the password", "csrf_token": token})
    assert wrong.status_code == 401 and "wrong password" in wrong.text
    unknown = client.post("/login", data={"username": "nobody", "password": PASSWORD, "csrf_token": token})
    assert unknown.status_code == 401
    failures = [r for r in read_audit(node.data_dir / "audit" / "audit.jsonl") if r["event"] == "dashboard_login"]
    assert {"user": "nobody"} in [r["detail"] for r in failures if r["outcome"] == "failure"]
    assert all("not the password" not in json.dumps(r) for r in failures)
    assert client.get("/api/me").status_code == 401


def test_password_guessing_is_throttled_per_user_name(node: NodeData) -> None:
    UserStore(node.data_dir).add("guessed", "viewer", PASSWORD)
    with TestClient(create_app(node.settings), follow_redirects=False) as c:
        token = csrf_of(c.get("/login").text)
        for attempt in range(5):
            wrong = c.post("/login", data={"username": "guessed", "password": f"guess {attempt}", "csrf_token": token})
            assert wrong.status_code == 401
        right = c.post("/login", data={"username": "guessed", "password": PASSWORD, "csrf_token": token})
        assert right.status_code == 429 and c.get("/api/me").status_code == 401
        login(c, "viewer")  # other users are not locked out
    throttled = [r for r in read_audit(node.data_dir / "audit" / "audit.jsonl") if r.get("outcome") == "throttled"]
    assert [r["detail"]["user"] for r in throttled] == ["guessed"]


def test_login_rotates_the_csrf_token_and_logout_ends_the_session(client: TestClient) -> None:
    before = csrf_of(client.get("/login").text)
    after = login(client, "viewer")
    assert after != before
    assert client.get("/api/me").json() == {"name": "viewer", "role": "viewer", "csrf_token": after}
    assert client.post("/logout", data={}).status_code == 403  # without CSRF
    assert client.post("/logout", data={"csrf_token": after}).status_code == 303
    assert client.get("/api/me").status_code == 401


def test_login_never_redirects_off_site(client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)
    for target in ("//evil.example/x", "https://evil.example/", "\\\\evil"):
        response = client.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": token, "next": target})
        assert response.headers["location"] == "/", target
        token = csrf_of(client.get("/").text)


def test_a_removed_user_is_logged_out_at_once(node: NodeData, tmp_path: Path) -> None:
    store = UserStore(node.data_dir)
    store.add("temp", "operator", PASSWORD)
    with TestClient(create_app(node.settings), follow_redirects=False) as c:
        login(c, "temp")
        assert c.get("/api/me").status_code == 200
        with store._connect() as conn:
            conn.execute("UPDATE users SET disabled = 1 WHERE name = 'temp'")
        assert c.get("/api/me").status_code == 401


def test_a_trusted_proxy_header_names_the_user_and_nobody_else_can_set_it(node: NodeData) -> None:
    settings = node.settings.model_copy(deep=True)
    settings.dashboard.proxy_user_header = "X-Remote-User"
    untrusted = settings.model_copy(deep=True)
    settings.dashboard.trusted_proxies = ["testclient"]  # the address Starlette's TestClient connects from
    untrusted.dashboard.trusted_proxies = ["10.0.0.1"]
    with TestClient(create_app(settings), follow_redirects=False) as c:
        assert c.get("/api/me", headers={"X-Remote-User": "operator"}).json()["role"] == "operator"
        assert c.get("/api/me", headers={"X-Remote-User": "not-a-user"}).status_code == 401
        job = new_job(node, "9.1")
        token = c.get("/api/me", headers={"X-Remote-User": "operator"}).json()["csrf_token"]
        assert c.post(f"/api/jobs/{job}/cancel", headers={"X-Remote-User": "operator"}).status_code == 403  # CSRF still
        ok = c.post(f"/api/jobs/{job}/cancel", headers={"X-Remote-User": "operator", "x-csrf-token": token})
        assert ok.status_code == 200
    with TestClient(create_app(untrusted), follow_redirects=False) as c:
        assert c.get("/api/me", headers={"X-Remote-User": "operator"}).status_code == 401


# --- pages ----------------------------------------------------------------------------------


def test_overview_shows_queue_destinations_disk_and_errors(client: TestClient, node: NodeData) -> None:
    login(client, "viewer")
    html = client.get("/").text
    assert "Disk free" in html and "pacs" in html and "127.0.0.1:11999" in html
    assert "the phantom broke" in html  # the failed job is a recent error
    assert 'data-refresh="/partials/overview"' in html
    assert node.series_uid in html.split('id="open-series"')[1]  # the phantom series, still receiving
    partial = client.get("/partials/overview")
    assert partial.status_code == 200 and "<html" not in partial.text and "Destinations" in partial.text
    api = client.get("/api/overview").json()
    assert api["jobs"]["counts"]["done"] >= 1 and api["jobs"]["counts"]["failed"] >= 1
    assert api["destinations"][0]["name"] == "pacs"
    assert api["disk"]["free_gb"] > 0 and api["health"] is None
    assert any("the phantom broke" in e["error"] for e in api["recent_errors"])


def test_jobs_list_filters_searches_and_pages(client: TestClient, node: NodeData) -> None:
    login(client, "viewer")
    html = client.get("/jobs").text
    assert f'href="/jobs/{node.done_job}"' in html and node.series_description in html
    done = client.get("/api/jobs", params={"state": "done"}).json()
    assert {j["state"] for j in done["jobs"]} == {"done"} and node.done_job in [j["id"] for j in done["jobs"]]
    found = client.get("/api/jobs", params={"q": node.series_description}).json()
    assert [j["id"] for j in found["jobs"]] == [node.done_job]
    assert found["jobs"][0]["series"]["instances"] == 24
    assert client.get("/api/jobs", params={"q": "no such text anywhere"}).json()["jobs"] == []
    first = client.get("/api/jobs", params={"per_page": 1}).json()
    second = client.get("/api/jobs", params={"per_page": 1, "page": 2}).json()
    assert first["has_next"] and first["jobs"][0]["id"] != second["jobs"][0]["id"]
    assert client.get("/api/jobs", params={"state": "exploded"}).status_code == 400
    assert client.get("/api/jobs", params={"page": "x"}).status_code == 400
    assert "failed" in client.get("/jobs", params={"state": "failed"}).text


def test_job_page_renders_result_json_for_people(client: TestClient, node: NodeData) -> None:
    login(client, "viewer")
    html = client.get(f"/jobs/{node.done_job}").text
    r = node.result
    assert 'id="demo-label"' in html and "demo — not for clinical use" in html
    assert "raseg-demo" in html and "0.3" in html and "radnode-lungmask-classical" in html
    assert "thick_slices_noted" in html
    assert f"{r['regions'][0]['volume_ml']:.2f}" in html and f"{r['regions'][0]['hu_mean']:.0f}" in html
    assert "EGFR" in html and "0.73" in html and "mutant" in html
    assert "5.678" in html
    for name in ("axial.png", "coronal.png", "sagittal.png", "grid.png"):
        assert f'src="/jobs/{node.done_job}/overlays/{name}"' in html
    assert "Retry" not in html  # a viewer gets no buttons
    api = client.get(f"/api/jobs/{node.done_job}").json()
    assert api["result"] == r and api["demo_models"] == ["tumour"]
    assert api["overlays"] == ["axial.png", "coronal.png", "sagittal.png", "grid.png"]


def test_overlay_pngs_are_served_and_show_the_tumour_outline(client: TestClient, node: NodeData) -> None:
    login(client, "viewer")
    for prefix in ("/jobs", "/api/jobs"):
        response = client.get(f"{prefix}/{node.done_job}/overlays/axial.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert image.size == (128, 128)
        assert (230, 40, 40) in {c for _, c in image.getcolors(1 << 16)}  # tumour red drawn
    assert client.get(f"/jobs/{node.failed_job}/overlays/axial.png").status_code == 404  # no results


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/..%2F..%2Fetc%2Fpasswd", "/jobs/../../etc/passwd", "/api/jobs/1%2F..%2F..", "/jobs/-1",
        "/jobs/{job}/overlays/..%2F..%2Fresult.json", "/jobs/{job}/overlays/..%2Fresult.json",
        "/jobs/{job}/overlays/result.json", "/jobs/{job}/overlays/%2Fetc%2Fpasswd", "/api/jobs/{job}/overlays/%2E%2E",
        "/jobs/{job}/overlays/axial.png%00.txt", "/jobs/99999", "/api/jobs/99999",
    ],
)
def test_traversal_strings_in_ids_and_file_names_are_404(client: TestClient, node: NodeData, path: str) -> None:
    login(client, "viewer")
    response = client.get(path.replace("{job}", str(node.done_job)))
    assert response.status_code in (400, 404), response.text
    assert "root:" not in response.text and '"status": "done"' not in response.text


def test_rules_page_and_the_tester(client: TestClient, node: NodeData) -> None:
    token = login(client, "viewer")
    html = client.get("/rules").text
    rules = client.get("/api/rules").json()
    assert rules["rules"] and all(rule["name"] in html for rule in rules["rules"])
    dicom = next((node.phantom / "ct").rglob("*.dcm")).read_bytes()
    by_file = client.post("/api/rules/test", files={"file": ("x.dcm", dicom)}, data={"calling_ae": "CTSCANNER"},
                          headers={"x-csrf-token": token}).json()
    by_series = client.post("/api/rules/test", data={"series_uid": node.series_uid}, headers={"x-csrf-token": token}).json()
    for result in (by_file, by_series):
        assert result["series_uid"] == node.series_uid and result["action"] in ("process", "forward", "ignore")
        assert result["explain"].splitlines()[0] == f"series {node.series_uid}"
        assert [c["rule"] for c in result["checks"]] == [r["name"] for r in rules["rules"]][: len(result["checks"])]
    assert by_series["checks"][0]["conditions"] and "calling_ae=CTSCANNER" in by_series["explain"]
    page = client.post("/rules", data={"series_uid": node.series_uid, "csrf_token": token})
    assert page.status_code == 200 and f"series {node.series_uid}" in page.text
    assert client.post("/api/rules/test", files={"file": ("x.txt", b"not dicom")}, headers={"x-csrf-token": token}).status_code == 400
    assert client.post("/api/rules/test", data={"series_uid": "1.2.3.404"}, headers={"x-csrf-token": token}).status_code == 404
    assert client.post("/api/rules/test", data={"series_uid": node.series_uid}).status_code == 403  # no CSRF


def test_audit_is_filterable(client: TestClient) -> None:
    login(client, "viewer")
    everything = client.get("/api/audit").json()
    listener = [r for r in everything["records"] if r.get("source") != "dashboard"]
    assert [r["event"] for r in listener] == ["instance_stored", "association", "association"]
    rejected = client.get("/api/audit", params={"event": "association", "q": "INTRUDER"}).json()["records"]
    assert len(rejected) == 1 and rejected[0]["reason"] == "unknown calling AE"
    html = client.get("/audit", params={"q": "INTRUDER"}).text
    assert "10.9.9.9" in html and "CTSCANNER" not in html.split('id="audit"')[1]


# --- state changes: 401, 403, CSRF, and the rules of `radnode jobs` ------------------------------


@pytest.mark.parametrize("action", ["retry", "cancel"])
def test_state_changes_need_login_role_and_csrf(node: NodeData, action: str) -> None:
    job = new_job(node, f"7.{action}")
    for prefix in ("/api/jobs", "/jobs"):
        url = f"{prefix}/{job}/{action}"
        with TestClient(create_app(node.settings), follow_redirects=False) as anonymous:
            assert anonymous.post(url).status_code == 401
        with TestClient(create_app(node.settings), follow_redirects=False) as viewer:
            token = login(viewer, "viewer")
            assert viewer.post(url, headers={"x-csrf-token": token}).status_code == 403
        with TestClient(create_app(node.settings), follow_redirects=False) as operator:
            token = login(operator, "operator")
            assert operator.post(url).status_code == 403
            assert operator.post(url, headers={"x-csrf-token": "forged"}).status_code == 403
            assert operator.post(url, data={"csrf_token": "forged"}).status_code == 403
    assert SQLiteJobQueue.in_data_dir(node.data_dir).get(job).state is JobState.QUEUED  # nothing changed


def test_operator_cancels_and_retries_with_the_cli_rules(client: TestClient, node: NodeData) -> None:
    job = new_job(node, "8.1")
    token = login(client, "operator")
    queue = SQLiteJobQueue.in_data_dir(node.data_dir)
    nothing = client.post(f"/api/jobs/{job}/retry", headers={"x-csrf-token": token})
    assert nothing.status_code == 409 and "can be retried" in nothing.json()["error"]
    cancelled = client.post(f"/api/jobs/{job}/cancel", headers={"x-csrf-token": token})
    assert cancelled.status_code == 200 and queue.get(job).state is JobState.CANCELLED
    assert client.post(f"/api/jobs/{job}/cancel", headers={"x-csrf-token": token}).status_code == 409
    page = client.post(f"/jobs/{job}/retry", data={"csrf_token": token})
    assert page.status_code == 303 and page.headers["location"] == f"/jobs/{job}"
    assert queue.get(job).state is JobState.QUEUED
    assert "queued again" in client.get(f"/jobs/{job}").text  # the flash message
    assert client.post("/api/jobs/99999/retry", headers={"x-csrf-token": token}).status_code == 404
    assert "Retry" in client.get(f"/jobs/{job}").text
    actions = [r for r in client.get("/api/audit", params={"q": "operator"}).json()["records"]
               if r["event"].startswith("job_") and r["detail"]["job_id"] == job]
    assert [(r["event"], r["outcome"]) for r in reversed(actions)] == [
        ("job_retry", "refused"), ("job_cancel", "done"), ("job_cancel", "refused"), ("job_retry", "done")
    ]
    logins = client.get("/api/audit", params={"event": "dashboard_login"}).json()["records"]
    assert {"user": "operator"} in [r["detail"] for r in logins if r["outcome"] == "success"]


def test_reviewer_may_do_what_an_operator_may(client: TestClient, node: NodeData) -> None:
    job = new_job(node, "8.2")
    token = login(client, "reviewer")
    assert client.post(f"/api/jobs/{job}/cancel", headers={"x-csrf-token": token}).status_code == 200


# --- PHI ------------------------------------------------------------------------------------


def test_viewers_see_no_patient_names(node: NodeData) -> None:
    from radnode.web.data import REDACTED, redact
    from radnode.web.users import User

    record = {"jobs": [{"PatientName": "DOE^JANE", "series": {"PatientID": "123", "modality": "CT"}}]}
    assert redact(record, User("v", "viewer"), node.settings) == {
        "jobs": [{"PatientName": REDACTED, "series": {"PatientID": REDACTED, "modality": "CT"}}]
    }
    assert redact(record, User("o", "operator"), node.settings) == record


# --- the CLI ----------------------------------------------------------------------------------


def test_users_add_from_stdin_then_log_in(node: NodeData, tmp_path: Path) -> None:
    from radnode.cli import app

    config = tmp_path / "radnode.yaml"
    config.write_text(json.dumps({"storage": {"data_dir": str(node.data_dir)}}))
    runner = CliRunner()
    result = runner.invoke(app, ["--config", str(config), "users", "add", "alice", "--role", "operator", "--password-stdin"],
                           input="a long enough secret\n")
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["--config", str(config), "users", "add", "alice", "--role", "viewer", "--password-stdin"],
                          input="another long secret\n")
    assert again.exit_code == 1 and "exists" in again.output
    short = runner.invoke(app, ["--config", str(config), "users", "add", "bob", "--role", "viewer", "--password-stdin"], input="short\n")
    assert short.exit_code == 1
    bad_role = runner.invoke(app, ["--config", str(config), "users", "add", "bob", "--role", "admin", "--password-stdin"], input="x" * 12 + "\n")
    assert bad_role.exit_code == 2
    stored = (node.data_dir / "users.sqlite").read_bytes()
    assert b"a long enough secret" not in stored and b"$argon2id$" in stored
    with TestClient(create_app(node.settings), follow_redirects=False) as c:
        login(c, "alice", "a long enough secret")
        assert c.get("/api/me").json()["role"] == "operator"
