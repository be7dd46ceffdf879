"""Prometheus counters and histograms of the listener, and the HTTP endpoint that serves them.

Each :class:`NodeMetrics` has its own registry (so two nodes in one test process do not
collide); :class:`MetricsServer` serves it on ``metrics.host:metrics.port`` at
``/metrics`` (Prometheus text format) and ``/healthz`` (JSON, 200 when healthy, else 503).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LOGGER = logging.getLogger(__name__)

#: Store latency buckets (seconds): a durable write of a CT slice takes a few milliseconds.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class NodeMetrics:
    """The node's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "radnode_instances_received",
            "Instances acknowledged with Success, by outcome (stored, duplicate, new-version).",
            ["outcome"],
            registry=self.registry,
        )
        self.instances_rejected = Counter(
            "radnode_instances_rejected",
            "C-STORE requests answered with a failure status, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "radnode_received_bytes",
            "Data set bytes received in C-STORE requests.",
            registry=self.registry,
        )
        self.associations = Counter(
            "radnode_associations",
            "Associations by outcome (accepted, rejected, released, aborted).",
            ["outcome"],
            registry=self.registry,
        )
        self.active_associations = Gauge(
            "radnode_active_associations", "Associations currently open.", registry=self.registry
        )
        self.store_seconds = Histogram(
            "radnode_store_duration_seconds",
            "Time from a complete C-STORE request to its status (validate, write, fsync, index).",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.series_completed = Counter(
            "radnode_series_completed",
            "Series (rounds) completed, by reason (expected-count, quiet, force).",
            ["reason"],
            registry=self.registry,
        )
        self.disk_free_bytes = Gauge(
            "radnode_disk_free_bytes", "Free bytes on the data file system.", registry=self.registry
        )

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """A small HTTP server for ``/metrics`` and ``/healthz`` on a daemon thread.

    Parameters
    ----------
    metrics
        What ``/metrics`` serves.
    host, port
        Where to listen (``metrics.host``/``metrics.port``; port 0 picks a free one).
    health
        Returns ``(healthy, details)`` for ``/healthz``.
    """

    def __init__(self, metrics: NodeMetrics, host: str, port: int, health: HealthCheck) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, owner.metrics.exposition())
                elif path == "/healthz":
                    healthy, details = owner.health()
                    body = json.dumps({"status": "ok" if healthy else "unhealthy", **details}).encode()
                    self._send(200 if healthy else 503, "application/json", body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                LOGGER.debug("metrics http: " + format, *args)

        self.metrics = metrics
        self.health = health
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="radnode-metrics", daemon=True)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
