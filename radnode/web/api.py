"""``/api/…``: the dashboard's data as JSON, from the same functions the pages render."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from radnode.config import Settings
from radnode.web import data
from radnode.web.auth import audit, authorise, require


class DumpResponse(JSONResponse):
    """JSON that also writes paths, enums and times (as ``radnode status --json`` does)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=str, ensure_ascii=False).encode("utf-8")


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def int_param(request: Request, name: str, default: int) -> int:
    """A query parameter that must be an integer (400 otherwise, never a 500)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer") from None


def jobs_query(request: Request) -> dict[str, Any]:
    """The filters of the jobs list, as :func:`radnode.web.data.list_jobs` takes them (400 on a bad state)."""
    from radnode.pipeline.jobs import JobState

    states = [s for s in request.query_params.getlist("state") if s]
    unknown = [s for s in states if s not in {j.value for j in JobState}]
    if unknown:
        raise HTTPException(400, f"unknown state {unknown}; allowed: {', '.join(j.value for j in JobState)}")
    return {
        "states": states,
        "query": request.query_params.get("q", "").strip()[:200],
        "page": int_param(request, "page", 1),
        "per_page": int_param(request, "per_page", 25),
    }


def job_or_404(request: Request) -> dict[str, Any]:
    try:
        return data.job_detail(settings_of(request), request.path_params["job_id"])
    except data.NotFound as exc:
        raise HTTPException(404, str(exc)) from None


def overlay_response(request: Request) -> FileResponse:
    """One overlay PNG (only the renderer's file names; anything else is 404)."""
    require(request, "viewer")
    try:
        path = data.overlay_file(settings_of(request), request.path_params["job_id"], request.path_params["name"])
    except data.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


async def steer(request: Request, action: str) -> str:
    """Retry or cancel (operator role, CSRF): the message, 404 for an unknown job, 409 when not allowed."""
    from radnode.pipeline.queue import InvalidTransition, JobNotFound

    user = await authorise(request, "operator")
    job_id = request.path_params["job_id"]
    try:
        message = data.retry(settings_of(request), job_id) if action == "retry" else data.cancel(settings_of(request), job_id)
    except JobNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except InvalidTransition as exc:
        audit(request, f"job_{action}", "refused", user.name, job_id=job_id, reason=str(exc))
        raise HTTPException(409, str(exc)) from None
    audit(request, f"job_{action}", "done", user.name, job_id=job_id)
    return message


async def review_action(request: Request, action: str) -> dict[str, Any]:
    """Approve or reject (reviewer role, CSRF): the decision; 404 unknown job, 400 bad input, 409 not allowed.

    Fields (form or JSON): ``reject`` (structure names left out of an approval), ``comment``
    (approval) or ``reason`` (rejection; ``comment`` is accepted too).
    """
    from radnode.pipeline.outbox import ReviewError

    user = await authorise(request, "reviewer")
    job_id = request.path_params["job_id"]
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        raw = body.get("reject") or []
        raw = raw if isinstance(raw, list) else [raw]
        text = body.get("reason") or body.get("comment") or ""
    else:
        form = await request.form()
        raw = form.getlist("reject")
        text = form.get("reason") or form.get("comment") or ""
    try:
        rejected = data.structure_names(raw)
        if not isinstance(text, str):
            raise ValueError("comment and reason must be text")
        decision = data.review_decide(settings_of(request), job_id, user, action, rejected, text)
    except data.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ReviewError as exc:
        audit(request, f"review_{action}", "refused", user.name, job_id=job_id, reason=str(exc))
        raise HTTPException(409, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    audit(request, f"review_{action}", "done", user.name, job_id=job_id, decision=decision["decision"],
          approved=decision["approved_structures"], rejected=decision["rejected_structures"],
          destinations=decision["destinations"], comment=decision["comment"],
          approved_objects=decision["approved_objects"])
    return decision


async def route_test(request: Request) -> dict[str, Any]:
    """The rule tester: a multipart ``file`` (one DICOM instance) or a ``series_uid`` the node received."""
    await authorise(request, "viewer")
    form = await request.form()
    upload = form.get("file")
    calling_ae = str(form.get("calling_ae") or "").strip() or None
    series_uid = str(form.get("series_uid") or "").strip()
    try:
        if upload is not None and not isinstance(upload, str):
            content = await upload.read()
            if content:
                return data.explain_upload(settings_of(request), content, calling_ae)
        if series_uid:
            return data.explain_series(settings_of(request), series_uid)
    except data.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    raise HTTPException(400, "send a DICOM file (field 'file') or a received series UID (field 'series_uid')")


async def api_overview(request: Request) -> DumpResponse:
    user = require(request, "viewer")
    settings = settings_of(request)
    return DumpResponse(data.redact(data.overview(settings, request.app.state.health), user, settings))


async def api_jobs(request: Request) -> DumpResponse:
    user = require(request, "viewer")
    settings = settings_of(request)
    return DumpResponse(data.redact(data.list_jobs(settings, **jobs_query(request)), user, settings))


async def api_job(request: Request) -> DumpResponse:
    user = require(request, "viewer")
    return DumpResponse(data.redact(job_or_404(request), user, settings_of(request)))


async def api_retry(request: Request) -> DumpResponse:
    return DumpResponse({"message": await steer(request, "retry")})


async def api_cancel(request: Request) -> DumpResponse:
    return DumpResponse({"message": await steer(request, "cancel")})


async def api_approve(request: Request) -> DumpResponse:
    return DumpResponse(await review_action(request, "approve"))


async def api_reject(request: Request) -> DumpResponse:
    return DumpResponse(await review_action(request, "reject"))


async def api_rules(request: Request) -> DumpResponse:
    require(request, "viewer")
    return DumpResponse(data.rules(settings_of(request)))


async def api_rules_test(request: Request) -> DumpResponse:
    return DumpResponse(await route_test(request))


async def api_audit(request: Request) -> DumpResponse:
    require(request, "viewer")
    result = data.audit(
        settings_of(request),
        event=request.query_params.get("event", ""),
        query=request.query_params.get("q", "")[:200],
        limit=int_param(request, "limit", 200),
    )
    return DumpResponse(result)


async def api_me(request: Request) -> DumpResponse:
    from radnode.web.auth import csrf_token

    user = require(request, "viewer")
    return DumpResponse({"name": user.name, "role": user.role, "csrf_token": csrf_token(request)})


routes = [
    Route("/api/me", api_me),
    Route("/api/overview", api_overview),
    Route("/api/jobs", api_jobs),
    Route("/api/jobs/{job_id:int}", api_job),
    Route("/api/jobs/{job_id:int}/overlays/{name}", overlay_response),
    Route("/api/jobs/{job_id:int}/retry", api_retry, methods=["POST"]),
    Route("/api/jobs/{job_id:int}/cancel", api_cancel, methods=["POST"]),
    Route("/api/jobs/{job_id:int}/approve", api_approve, methods=["POST"]),
    Route("/api/jobs/{job_id:int}/reject", api_reject, methods=["POST"]),
    Route("/api/rules", api_rules),
    Route("/api/rules/test", api_rules_test, methods=["POST"]),
    Route("/api/audit", api_audit),
]
