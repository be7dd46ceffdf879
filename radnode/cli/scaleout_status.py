"""The scale-out part of ``radnode status`` (``database.url`` set): workers and queue depths."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from radnode.config import Settings

#: A worker whose last heartbeat is older than this is shown as lost.
LOST_AFTER_SECONDS = 120.0


def collect(settings: Settings) -> dict[str, Any] | None:
    """Workers (host, queues, device, last heartbeat, current job), claimable jobs per queue,
    and handed-back results not staged yet; ``None`` on the embedded SQLite setup."""
    url = settings.database.url
    if not url:
        return None
    from radnode.pipeline.database import redact
    from radnode.pipeline.pg_queue import PostgresJobQueue
    from radnode.pipeline.pg_shared import SharedState

    shared = SharedState(url)
    node = shared.node()
    workers = [
        {
            "worker_id": w["worker_id"], "host": w["host"], "queues": w["queues"], "device": w["device"],
            "pipeline_version": w["pipeline_version"], "current_job": w["current_job"],
            "last_heartbeat_seconds_ago": round(float(w["age_seconds"]), 1),
            "lost": float(w["age_seconds"]) > LOST_AFTER_SECONDS,
        }
        for w in shared.workers()
    ]
    return {
        "database": redact(url),
        "node": None if node is None else {"ae_title": node.ae_title, "host": node.host, "port": node.port},
        "workers": workers,
        "queue_depths": PostgresJobQueue(url).queue_depths(),
        "results_waiting_for_node": shared.pending_count(),
    }


def render(section: dict[str, Any] | None, console: Console) -> None:
    """Tables for :func:`collect`'s data (nothing on SQLite)."""
    if section is None:
        return
    console.print(Text(f"shared database {section['database']}"))
    table = Table(title="Workers", title_justify="left")
    for column in ("Worker", "Host", "Queues", "Device", "Last heartbeat", "Current job"):
        table.add_column(column)
    for w in section["workers"]:
        beat = f"{w['last_heartbeat_seconds_ago']:.0f} s ago" + (" (lost)" if w["lost"] else "")
        table.add_row(*(Text(str(c)) for c in (w["worker_id"], w["host"], w["queues"], w["device"], beat, w["current_job"] or "-")))
    if not section["workers"]:
        table.add_row("(no worker has registered)", "", "", "", "", "")
    console.print(table)
    table = Table(title="Queue depth (claimable jobs)", title_justify="left")
    table.add_column("Queue")
    table.add_column("Jobs", justify="right")
    for name, depth in section["queue_depths"].items():
        table.add_row(Text(name), str(depth))
    if not section["queue_depths"]:
        table.add_row("(empty)", "0")
    console.print(table)
    console.print(f"results handed back, waiting for the node to stage: {section['results_waiting_for_node']}")
