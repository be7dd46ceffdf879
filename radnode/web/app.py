"""The dashboard's ASGI application: routes, sessions, static files, error pages."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radnode.config import Settings
from radnode.node.audit import AuditLog
from radnode.node.storage import AUDIT_FILE
from radnode.web import api, pages
from radnode.web.auth import SESSION_COOKIE, LoginThrottle, session_secret
from radnode.web.data import HealthCheck, data_dir
from radnode.web.users import UserStore

STATIC_DIR = Path(__file__).parent / "static"
#: Every response: no framing (clickjacking of the retry/approve buttons), no MIME sniffing,
#: and only this origin's scripts, styles and images (the pages have no inline script).
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return api.DumpResponse({"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code)
    return PlainTextResponse(f"{exc.status_code}: {exc.detail}", status_code=exc.status_code)


async def _login_required(request: Request, exc: Exception) -> Response:
    return pages.login_redirect(request)


def create_app(settings: Settings, health: HealthCheck | None = None) -> Starlette:
    """The dashboard for the node whose settings are ``settings``.

    ``health`` is the live node's ``/healthz`` check when run inside ``radnode serve``;
    without it the overview shows what the data folder says (as ``radnode status`` does).
    """
    folder = data_dir(settings)
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=session_secret(folder),
            session_cookie=SESSION_COOKIE,
            max_age=int(settings.dashboard.session_hours * 3600),
            same_site="strict",
            https_only=settings.dashboard.tls.enabled,
        )
    ]
    app = Starlette(
        routes=[*pages.routes, *api.routes, Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")],
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, pages.LoginRequired: _login_required},
    )
    app.state.settings = settings
    app.state.health = health
    app.state.users = UserStore(folder)
    app.state.login_throttle = LoginThrottle()
    app.state.audit = AuditLog(folder / AUDIT_FILE, settings.database.url)  # appends beside the listener's records (O_APPEND lines)
    return app
