"""``radnode worker``: run jobs from the shared PostgreSQL queue on this machine."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from radnode.cli.context import fail, get_settings
from radnode.config import Settings

LOGGER = logging.getLogger(__name__)


def parse_queues(text: str) -> list[str]:
    """``"cpu,gpu"`` -> ``["cpu", "gpu"]``; empty names are an error."""
    names = [name.strip() for name in text.split(",")]
    if not names or any(not name for name in names):
        raise ValueError(f"--queues {text!r}: give comma-separated queue names, e.g. cpu,gpu")
    return names


def run_worker(
    settings: Settings, scratch: Path, queues: list[str], *, ae_title: str, jobs: int = 1, chain: str | None = None
) -> None:
    """Claim and run jobs until SIGTERM/SIGINT; a running job finishes or goes back to the queue.

    ``chain`` exists for end-to-end tests only (``radnode worker`` never sets it), like
    :func:`radnode.cli.serve_cmd.run_node`'s.
    """
    from radnode.pipeline.remote_worker import RemoteWorkerPool

    if not settings.database.url:
        fail("radnode worker needs database.url (RADNODE_DATABASE__URL=postgresql://user@host/db)", code=2)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOGGER.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pool = RemoteWorkerPool(settings, scratch, queues, ae_title=ae_title, jobs=jobs, chain=chain)
    except Exception as exc:  # no database, wrong credentials, no schema rights
        fail(f"cannot start the worker: {exc}", code=1)
        return
    pool.start()
    while not stop.wait(1.0):
        pass
    pool.stop(drain_seconds=10.0)


def register(app: typer.Typer) -> None:
    """Add the ``worker`` command."""

    @app.command("worker")
    def worker(
        ctx: typer.Context,
        scratch: Annotated[Path, typer.Option("--scratch", help="Local folder for fetched series and results.")],
        queues: Annotated[str, typer.Option("--queues", help="Comma-separated queues to take jobs from.")] = "cpu",
        ae_title: Annotated[str, typer.Option("--ae-title", help="Our AE title when fetching from the node (must be allowed there).")] = "RADWORKER",
        jobs: Annotated[int, typer.Option("--jobs", min=1, max=16, help="Concurrent jobs (one per GPU).")] = 1,
    ) -> None:
        """Run processing jobs from the shared PostgreSQL database (database.url) on this machine.

        Series are fetched from the node with C-GET, processed in --scratch, and the
        results handed back to the node, which delivers them. Needs nothing of the
        node's data folder.
        """
        settings = get_settings(ctx)
        try:
            names = parse_queues(queues)
        except ValueError as exc:
            fail(str(exc), code=2)
            return
        run_worker(settings, scratch, names, ae_title=ae_title, jobs=jobs)
        raise typer.Exit(0)
