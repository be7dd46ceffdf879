"""``radnode serve``: run the DICOM node until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from radnode.cli.context import fail, get_settings
from radnode.config.model import Settings

LOGGER = logging.getLogger("radnode.serve")

#: Seconds open associations get to finish after SIGTERM before they are aborted.
SHUTDOWN_GRACE_SECONDS = 10.0


def _apply_overrides(
    settings: Settings, port: int | None, host: str | None, ae_title: str | None, data_dir: Path | None
) -> None:
    """Apply command-line overrides, validated like the file (exit 2 naming the setting)."""
    overrides = (
        (settings.node, "node", "port", port),
        (settings.node, "node", "host", host),
        (settings.node, "node", "ae_title", ae_title),
        (settings.storage, "storage", "data_dir", data_dir),
    )
    for section, section_name, key, value in overrides:
        if value is None:
            continue
        try:
            setattr(section, key, value)
        except ValidationError as exc:
            reasons = "; ".join(e["msg"] for e in exc.errors(include_url=False))
            fail(f"invalid option: {section_name}.{key} = {value!r}: {reasons}", code=2)


def run_node(settings: Settings, reload: Callable[[], Settings], *, chain: str | None = None) -> None:
    """Run listener and pipeline until SIGTERM/SIGINT; SIGHUP re-reads settings via ``reload``.

    ``chain`` is the pipeline's chain reference (:class:`~radnode.pipeline.worker.WorkerPool`);
    ``radnode serve`` never sets it (the real chain runs). It exists so that end-to-end
    tests can start this very function with a test chain through Python, not through the
    environment: nothing a process inherits can make the node execute other code.
    Exits through :func:`~radnode.cli.context.fail` when the node cannot start.
    """
    from radnode.node.scp import StorageNode
    from radnode.node.tls import TLSConfigError
    from radnode.pipeline.service import PipelineBusy, PipelineService
    from radnode.service import SystemdNotifier, liveness_from_health, reload_settings

    stop = threading.Event()
    # A no-op outside systemd; unsets NOTIFY_SOCKET so worker processes never notify.
    notifier = SystemdNotifier.from_environment()
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    node = StorageNode(settings)
    # The node keeps its own completion timer; the pipeline subscribes to its events.
    pipeline = PipelineService(settings, completion=node.completion, schedule_completion_checks=False, chain=chain)
    pipeline.register_metrics(node.metrics.registry)
    node.add_health_check("pipeline", pipeline.health)
    try:
        node.start()
    except TLSConfigError as exc:
        node.stop()
        fail(str(exc), code=2)
    except OSError as exc:
        node.stop()
        fail(f"cannot listen on {settings.node.host}:{settings.node.port}: {exc.strerror or exc}", code=1)
    try:
        pipeline.start()
    except PipelineBusy as exc:
        node.stop()
        fail(str(exc), code=1)
    dashboard = _start_dashboard(settings, node, pipeline)
    dicomweb = _start_dicomweb(settings, node, pipeline)
    notifier.ready(
        f"{settings.node.ae_title} listening on {settings.node.host}:{node.port}",
        liveness=liveness_from_health(node.health),
    )
    while not stop.wait(1.0):
        if reload_requested.is_set():
            # SIGHUP: new routing rules and destinations, associations untouched.
            reload_requested.clear()
            notifier.reloading()
            outcome = reload_settings(settings, reload)
            LOGGER.info("reload: %s", outcome.summary())
            notifier.ready(outcome.summary())
    notifier.stopping()
    if dashboard is not None:
        dashboard.stop()
    if dicomweb is not None:
        dicomweb.stop()
    # The pipeline first: it finishes or re-queues jobs while the node's index is open.
    pipeline.stop()
    node.stop(grace_seconds=SHUTDOWN_GRACE_SECONDS)
    notifier.close()


def _start_dashboard(settings: Settings, node: Any, pipeline: Any) -> Any:
    """Start the web dashboard (radnode.web) when enabled; a busy port stops the node with exit 1."""
    if not settings.dashboard.enabled:
        return None
    from radnode.web.server import DashboardServer

    dashboard = DashboardServer(settings, health=node.health)
    try:
        dashboard.start()
    except OSError as exc:
        pipeline.stop()
        node.stop()
        fail(f"cannot serve the dashboard on {settings.dashboard.host}:{settings.dashboard.port}: {exc.strerror or exc}", code=1)
    return dashboard


def _start_dicomweb(settings: Settings, node: Any, pipeline: Any) -> Any:
    """Start the STOW-RS receiver (radnode.web.dicomweb) on the node's ingest when enabled."""
    if not settings.dicomweb.enabled:
        return None
    from radnode.web.dicomweb import start_dicomweb

    try:
        return start_dicomweb(settings, node.ingestor)
    except OSError as exc:
        pipeline.stop()
        node.stop()
        fail(f"cannot serve DICOMweb on {settings.dicomweb.host}:{settings.dicomweb.port}: {exc.strerror or exc}", code=1)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command."""

    @app.command("serve")
    def serve(
        ctx: typer.Context,
        port: Annotated[Optional[int], typer.Option("--port", "-p", help="Override node.port.")] = None,
        host: Annotated[Optional[str], typer.Option("--host", help="Override node.host.")] = None,
        ae_title: Annotated[Optional[str], typer.Option("--ae-title", help="Override node.ae_title.")] = None,
        data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Override storage.data_dir.")] = None,
    ) -> None:
        """Run the node: DICOM listener, series completion, routing, workers, dispatch, scheduler.

        Received series complete after series.quiet_seconds without new instances and are
        routed by the rules; processed results are sent to the destinations. Stopping
        refuses new associations, lets open ones and the running job finish or hands the
        job back to the queue, then exits 0.
        """
        from radnode.config import load_settings

        settings = get_settings(ctx)
        _apply_overrides(settings, port, host, ae_title, data_dir)
        run_node(settings, lambda: load_settings(ctx.find_root().obj.config_path))
        raise typer.Exit(0)
