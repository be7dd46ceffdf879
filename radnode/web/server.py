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
from typing import Any

import uvicorn

from radnode.config import Settings
from radnode.config.model import TLSSettings
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


class UvicornRunner:
    """An ASGI app served by uvicorn on a daemon thread, on a socket bound in :meth:`start`.

    The one way ``radnode serve`` runs its HTTP apps (dashboard, DICOMweb): binding the
    socket first makes a busy port fail the start with ``OSError``, and port 0 picks a
    free one for tests; the TLS settings map onto uvicorn's the same way for every app.
    """

    def __init__(self, app: Any, host: str, port: int, tls: TLSSettings, name: str) -> None:
        self.host, self.requested_port, self.name = host, port, name
        self.scheme = "https" if tls.enabled else "http"
        self.config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(tls.cert_file) if tls.enabled and tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls.enabled and tls.key_file else None,
            ssl_ca_certs=str(tls.ca_file) if tls.enabled and tls.ca_file else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.enabled and tls.require_client_cert else ssl.CERT_NONE,
            lifespan="off",
        )
        self._server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError(f"the {self.name} server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def origin(self) -> str:
        """``scheme://host:port`` of the running server."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind (``OSError`` when the port is taken), then serve on a daemon thread."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.set_inheritable(False)
        self._socket = sock
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])), name=f"radnode-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to finish open requests and stop; close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()


class DashboardServer:
    """The dashboard app served by uvicorn on a background thread."""

    def __init__(self, settings: Settings, health: HealthCheck | None = None) -> None:
        dash = settings.dashboard
        self.settings = settings
        self.app = create_app(settings, health)
        self._runner = UvicornRunner(self.app, dash.host, dash.port, dash.tls, "dashboard")
        self.config = self._runner.config

    @property
    def port(self) -> int:
        return self._runner.port

    @property
    def url(self) -> str:
        return f"{self._runner.origin}/"

    def start(self) -> None:
        """Bind (``OSError`` when the port is taken), then serve on a daemon thread."""
        self._runner.start()
        warning = exposure_warning(self.settings)
        if warning:
            LOGGER.warning("%s", warning)
        LOGGER.info("dashboard on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to finish open requests and stop; close the socket and the audit log."""
        self._runner.stop(timeout)
        self.app.state.audit.close()
