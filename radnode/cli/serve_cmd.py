"""``radnode serve``: run the DICOM node until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from radnode.cli.context import fail, get_settings
from radnode.config.model import Settings
from radnode.service.roles import ALL_ROLES, PIPELINE_ROLES, Role, RoleBusy, RoleLocks, format_roles, parse_roles

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


def run_node(
    settings: Settings,
    reload: Callable[[], Settings],
    *,
    chain: str | None = None,
    roles: Collection[Role] = ALL_ROLES,
) -> None:
    """Run this process's roles until SIGTERM/SIGINT; SIGHUP re-reads settings via ``reload``.

    ``roles`` (:mod:`radnode.service.roles`) are the parts this process runs; every role's
    lock is taken before anything starts, so a second process with one of them exits 1.
    ``chain`` is the pipeline's chain reference (:class:`~radnode.pipeline.worker.WorkerPool`);
    ``radnode serve`` never sets it (the real chain runs). It exists so that end-to-end
    tests can start this very function with a test chain through Python, not through the
    environment: nothing a process inherits can make the node execute other code.
    Exits through :func:`~radnode.cli.context.fail` when the node cannot start.
    """
    from radnode.node.scp import StorageNode
    from radnode.node.tls import TLSConfigError
    from radnode.pipeline.service import PipelineService
    from radnode.service import SystemdNotifier, reload_settings

    roles = frozenset(roles)
    locks = RoleLocks(Path(settings.storage.data_dir))
    try:
        locks.acquire(roles)
    except RoleBusy as exc:
        fail(str(exc), code=1)
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

    listen, complete = Role.LISTENER in roles, Role.COMPLETION in roles
    node = StorageNode(settings, listen=listen, complete=complete) if listen or complete else None
    pipeline = None
    if roles & PIPELINE_ROLES:
        # The node keeps its own completion timer; the pipeline subscribes to its events.
        pipeline = PipelineService(
            settings,
            completion=node.completion if node is not None and complete else None,
            schedule_completion_checks=False,
            chain=chain,
            roles=roles,
            take_locks=False,
        )
    if node is not None and pipeline is not None:
        pipeline.register_metrics(node.metrics.registry)
        node.add_health_check("pipeline", pipeline.health)

    def stop_all() -> None:
        if pipeline is not None:
            pipeline.stop()
        if node is not None:
            node.stop(grace_seconds=SHUTDOWN_GRACE_SECONDS)
        locks.release()

    try:
        if node is not None:
            node.start()
        if pipeline is not None:
            pipeline.start()
    except TLSConfigError as exc:
        stop_all()
        fail(str(exc), code=2)
    except OSError as exc:
        stop_all()
        fail(f"cannot listen on {settings.node.host}:{settings.node.port}: {exc.strerror or exc}", code=1)
    dashboard = _start_dashboard(settings, node, stop_all) if node is not None and listen else None
    dicomweb = _start_dicomweb(settings, node, stop_all) if node is not None and listen else None
    notifier.ready(_ready_status(settings, node, roles), liveness=watchdog_liveness(node, pipeline))
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
    stop_all()
    notifier.close()


def watchdog_liveness(node: Any, pipeline: Any) -> Callable[[], bool]:
    """What keeps this process's systemd watchdog fed.

    With the listener (or completion) role: the node's own health alone
    (:meth:`~radnode.node.scp.StorageNode.listener_health`), never the pipeline's. A stalled
    scheduler or a stuck worker does not make systemd restart the listener and drop the
    associations of every sender; they show in ``/healthz`` and ``radnode status``.
    A process without those roles follows its pipeline roles' health.
    """
    from radnode.service import liveness_from_health

    if node is not None:
        return liveness_from_health(node.listener_health)
    return lambda: bool(pipeline.health()[0])


def _ready_status(settings: Settings, node: Any, roles: frozenset[Role]) -> str:
    suffix = "" if roles == ALL_ROLES else f" (roles {format_roles(roles)})"
    if node is not None and node.listen:
        return f"{settings.node.ae_title} listening on {settings.node.host}:{node.port}{suffix}"
    return f"{settings.node.ae_title} running{suffix}"


def _start_dashboard(settings: Settings, node: Any, stop_all: Callable[[], None]) -> Any:
    """Start the web dashboard (radnode.web) when enabled; a busy port stops the node with exit 1."""
    if not settings.dashboard.enabled:
        return None
    from radnode.web.server import DashboardServer

    dashboard = DashboardServer(settings, health=node.health)
    try:
        dashboard.start()
    except OSError as exc:
        stop_all()
        fail(f"cannot serve the dashboard on {settings.dashboard.host}:{settings.dashboard.port}: {exc.strerror or exc}", code=1)
    return dashboard


def _start_dicomweb(settings: Settings, node: Any, stop_all: Callable[[], None]) -> Any:
    """Start the STOW-RS receiver (radnode.web.dicomweb) on the node's ingest when enabled."""
    if not settings.dicomweb.enabled:
        return None
    from radnode.web.dicomweb import start_dicomweb

    try:
        return start_dicomweb(settings, node.ingestor)
    except OSError as exc:
        stop_all()
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
        roles: Annotated[
            Optional[str],
            typer.Option(
                "--roles",
                help="Comma-separated roles this process runs: listener, completion, scheduler, dispatch, "
                "workers (default: all). Run the others in other processes on the same data folder.",
            ),
        ] = None,
    ) -> None:
        """Run the node: DICOM listener, series completion, routing, workers, dispatch, scheduler
        (or the --roles given, so each can run as its own process on one data folder).

        Received series complete after series.quiet_seconds without new instances and are
        routed by the rules; processed results are sent to the destinations. Stopping
        refuses new associations, lets open ones and the running job finish or hands the
        job back to the queue, then exits 0.
        """
        from radnode.config import load_settings

        try:
            chosen = ALL_ROLES if roles is None else parse_roles(roles)
        except ValueError as exc:
            fail(f"invalid option: --roles {roles!r}: {exc}", code=2)
        settings = get_settings(ctx)
        _apply_overrides(settings, port, host, ae_title, data_dir)
        run_node(settings, lambda: load_settings(ctx.find_root().obj.config_path), roles=chosen)
        raise typer.Exit(0)
