"""Run the dashboard inside ``radnode serve``: uvicorn on a daemon thread, like the metrics server.

The socket is bound in :meth:`DashboardServer.start` (so a busy port fails the start with a
clear message, and port 0 picks a free one for tests); uvicorn then serves on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import threading

import uvicorn

from radnode.config import Settings
from radnode.web.app import create_app
from radnode.web.data import HealthCheck

LOGGER = logging.getLogger("radnode.web")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: Settings) -> str | None:
    """The start-up warning for a dashboard others can reach over plain HTTP, else ``None``."""
    dash = settings.dashboard
    if is_loopback(dash.host) or dash.tls.enabled:
        return None
    return (
        f"dashboard bound to {dash.host}:{dash.port} without TLS: passwords and session cookies cross the "
        "network in clear text; set dashboard.tls (cert_file, key_file) or bind to 127.0.0.1 behind a TLS proxy"
    )


class DashboardServer:
    """The dashboard app served by uvicorn on a background thread."""

    def __init__(self, settings: Settings, health: HealthCheck | None = None) -> None:
        dash = settings.dashboard
        tls = dash.tls
        self.settings = settings
        self.config = uvicorn.Config(
            create_app(settings, health),
            log_level="warning",
            access_log=False,
            ssl_certfile=str(tls.cert_file) if tls.enabled and tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls.enabled and tls.key_file else None,
            ssl_ca_certs=str(tls.ca_file) if tls.enabled and tls.ca_file else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.enabled and tls.require_client_cert else ssl.CERT_NONE,
            lifespan="off",
        )
        self.app = self.config.app
        self._server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the dashboard is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.dashboard.tls.enabled else "http"
        return f"{scheme}://{self.settings.dashboard.host}:{self.port}/"

    def start(self) -> None:
        """Bind (``OSError`` when the port is taken), then serve on a daemon thread."""
        dash = self.settings.dashboard
        family = socket.AF_INET6 if ":" in dash.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((dash.host, dash.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.set_inheritable(False)
        self._socket = sock
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])), name="radnode-dashboard", daemon=True
        )
        self._thread.start()
        warning = exposure_warning(self.settings)
        if warning:
            LOGGER.warning("%s", warning)
        LOGGER.info("dashboard on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to finish open requests and stop; close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self.app.state.audit.close()
