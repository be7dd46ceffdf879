"""Sessions, roles and CSRF for the dashboard.

A signed session cookie (Starlette's ``SessionMiddleware``, itsdangerous underneath)
carries only the user name and a CSRF token; the user's role is read from the users
table on every request, so removing a user or lowering a role takes effect at once.
Every state-changing request goes through :func:`authorise`: no user → 401, too weak
a role → 403, no or wrong CSRF token → 403, in that order.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request

from radnode.web.users import User, UserStore

SECRET_FILE = "dashboard.secret"
SESSION_COOKIE = "radnode_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def session_secret(data_dir: Path) -> str:
    """The cookie-signing key, generated into ``<data_dir>/dashboard.secret`` (0600) on first start.

    A key kept on disk lets sessions survive a restart; deleting the file logs everyone out.
    """
    path = Path(data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) < 32:
            raise RuntimeError(f"{path} holds a key shorter than 32 characters; delete it to make a new one")
        return secret
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secret + "\n")
    return secret


class LoginThrottle:
    """Refuse a user name after ``limit`` failed logins within ``window`` seconds (password guessing).

    Per name, not per address: a guesser behind many addresses is stopped too. In memory:
    a restart forgets it, which costs a guesser a node restart per ``limit`` tries.
    """

    def __init__(self, limit: int = 5, window: float = 300.0) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> deque[float]:
        failures = self._failures[name]
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def blocked(self, name: str) -> bool:
        with self._lock:
            return len(self._recent(name, time.monotonic())) >= self.limit

    def failed(self, name: str) -> None:
        with self._lock:
            self._recent(name, time.monotonic()).append(time.monotonic())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


def users(request: Request) -> UserStore:
    return request.app.state.users  # type: ignore[no-any-return]


def proxy_user_name(request: Request) -> str | None:
    """The user a trusted reverse proxy vouches for (``dashboard.proxy_user_header``), else ``None``.

    Only from the addresses in ``dashboard.trusted_proxies``: anyone else could set the header.
    """
    dash = request.app.state.settings.dashboard
    client = request.client.host if request.client else None
    if not dash.proxy_user_header or client not in dash.trusted_proxies:
        return None
    return request.headers.get(dash.proxy_user_header) or None


def current_user(request: Request) -> User | None:
    """The logged-in user (session, or a trusted proxy's header), re-read from the users table.

    A proxy-named user must exist in the table too: the role always comes from radnode.
    """
    name = proxy_user_name(request) or request.session.get("user")
    return users(request).get(name) if isinstance(name, str) else None


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made on first use; forms carry it as a hidden field)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def audit(request: Request, event: str, outcome: str, user: str, **detail: object) -> None:
    """One dashboard action in the node's audit log: who (a dashboard user, never a patient), what, result."""
    request.app.state.audit.record(event, source="dashboard", outcome=outcome, detail={"user": user, **detail})


def log_in(request: Request, user: User) -> None:
    """Start a fresh session for ``user`` (a new CSRF token, so one seen before login is useless)."""
    request.session.clear()
    request.session["user"] = user.name
    csrf_token(request)


def log_out(request: Request) -> None:
    request.session.clear()


async def check_csrf(request: Request) -> None:
    """403 unless the header or form field carries this session's CSRF token."""
    expected = request.session.get("csrf")
    supplied = request.headers.get(CSRF_HEADER)
    if supplied is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        supplied = value if isinstance(value, str) else None
    if not isinstance(expected, str) or not supplied or not secrets.compare_digest(expected, supplied):
        raise HTTPException(403, "missing or invalid CSRF token")


def require(request: Request, role: str) -> User:
    """The logged-in user when their role is ``role`` or above: 401 when nobody, 403 when too weak."""
    user = current_user(request)
    if user is None:
        raise HTTPException(401, "log in first")
    if not user.has_role(role):
        raise HTTPException(403, f"needs role {role} (you are {user.role})")
    return user


async def authorise(request: Request, role: str) -> User:
    """For state-changing requests: logged in (401), role (403), then CSRF (403)."""
    user = require(request, role)
    await check_csrf(request)
    return user
