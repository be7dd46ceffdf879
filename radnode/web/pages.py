"""The HTML pages: each renders the data of :mod:`radnode.web.data` with a Jinja2 template."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from radnode.web import data
from radnode.web.api import (
    int_param, job_or_404, jobs_query, overlay_response, review_action, route_test, settings_of, steer,
)
from radnode.web.auth import audit, check_csrf, csrf_token, current_user, log_in, log_out, users
from radnode.web.users import User

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _when(timestamp: float | None) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


templates.env.filters["when"] = _when


class LoginRequired(Exception):
    """A page was asked for without a session: the app redirects to the login page."""


def viewer(request: Request) -> User:
    user = current_user(request)
    if user is None:
        raise LoginRequired()
    return user


def render(request: Request, name: str, user: User | None, **context: Any) -> Response:
    flash = request.session.pop("flash", None) if user else None
    return templates.TemplateResponse(
        request, name, {"user": user, "csrf": csrf_token(request), "flash": flash, **context}
    )


async def login_form(request: Request) -> Response:
    return render(request, "login.html", None, next=_safe_next(request.query_params.get("next")), error=None)


def _safe_next(target: str | None) -> str:
    """Only local paths (``/jobs/3``), never ``//evil`` or a full URL: no open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


async def login(request: Request) -> Response:
    await check_csrf(request)
    form = await request.form()
    name, password = str(form.get("username") or "")[:64], str(form.get("password") or "")
    target = _safe_next(str(form.get("next") or "/"))
    throttle = request.app.state.login_throttle
    if throttle.blocked(name):
        audit(request, "dashboard_login", "throttled", name)
        response = render(request, "login.html", None, next=target, error="Too many failed logins; try again in a few minutes.")
        response.status_code = 429
        return response
    user = users(request).authenticate(name, password)
    audit(request, "dashboard_login", "failure" if user is None else "success", name)
    if user is None:
        throttle.failed(name)
        response = render(request, "login.html", None, next=target, error="Unknown user or wrong password.")
        response.status_code = 401
        return response
    throttle.succeeded(name)
    log_in(request, user)
    return RedirectResponse(target, status_code=303)


async def logout(request: Request) -> Response:
    await check_csrf(request)
    log_out(request)
    return RedirectResponse("/login", status_code=303)


async def overview_page(request: Request) -> Response:
    user = viewer(request)
    settings = settings_of(request)
    status = data.redact(data.overview(settings, request.app.state.health), user, settings)
    return render(request, "overview.html", user, status=status)


async def overview_partial(request: Request) -> Response:
    user = viewer(request)
    settings = settings_of(request)
    status = data.redact(data.overview(settings, request.app.state.health), user, settings)
    # A fragment: rendered without render(), which would consume a pending flash message.
    return templates.TemplateResponse(request, "_overview_live.html", {"user": user, "status": status})


async def jobs_page(request: Request) -> Response:
    from radnode.pipeline.jobs import JobState

    user = viewer(request)
    settings = settings_of(request)
    listing = data.redact(data.list_jobs(settings, **jobs_query(request)), user, settings)
    return render(request, "jobs.html", user, listing=listing, all_states=[s.value for s in JobState])


async def job_page(request: Request) -> Response:
    user = viewer(request)
    detail = data.redact(job_or_404(request), user, settings_of(request))
    return render(request, "job.html", user, d=detail)


async def job_action(request: Request) -> Response:
    action = request.path_params["action"]
    if action not in ("retry", "cancel", "approve", "reject"):
        raise HTTPException(404, "unknown action")
    try:
        if action in ("approve", "reject"):
            decision = await review_action(request, action)
            left_out = decision["rejected_structures"] if decision["decision"] == "approved" else []
            message = (f"job {decision['job_id']} {decision['decision']} by {decision['reviewer']} for "
                       f"{', '.join(decision['destinations'])}" + (f"; left out: {', '.join(left_out)}" if left_out else ""))
        else:
            message = await steer(request, action)
    except HTTPException as exc:
        if exc.status_code not in (400, 409):
            raise
        message = str(exc.detail)
    request.session["flash"] = message
    return RedirectResponse(f"/jobs/{request.path_params['job_id']}", status_code=303)


async def rules_page(request: Request) -> Response:
    user = viewer(request)
    result, error = None, None
    if request.method == "POST":
        try:
            result = await route_test(request)
        except HTTPException as exc:
            if exc.status_code in (401, 403):
                raise
            error = str(exc.detail)
    return render(request, "rules.html", user, rules=data.rules(settings_of(request)), result=result, error=error)


async def audit_page(request: Request) -> Response:
    user = viewer(request)
    result = data.audit(
        settings_of(request),
        event=request.query_params.get("event", ""),
        query=request.query_params.get("q", "")[:200],
        limit=int_param(request, "limit", 200),
    )
    return render(request, "audit.html", user, audit=result)


def login_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)


routes = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/", overview_page),
    Route("/partials/overview", overview_partial),
    Route("/jobs", jobs_page),
    Route("/jobs/{job_id:int}", job_page),
    Route("/jobs/{job_id:int}/overlays/{name}", overlay_response),
    Route("/jobs/{job_id:int}/{action}", job_action, methods=["POST"]),
    Route("/rules", rules_page, methods=["GET", "POST"]),
    Route("/audit", audit_page),
]
