"""``radnode status``: what the node holds and does, from its data folder.

Reads the listener's index (series receiving / complete), the job queue, the outbox
(destinations and their health, failed deliveries), the scheduler's job store (next runs)
and the sweep's progress. Read-only: it opens only databases that exist, so it is safe
to run beside ``radnode serve`` and on a node that never ran.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from radnode.cli import scaleout_status
from radnode.cli.context import get_settings
from radnode.config import Settings

#: How many rows each list shows unless ``--limit`` says otherwise.
DEFAULT_LIMIT = 10


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0.0, now - timestamp)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _short(text: str | None, width: int = 70) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def add_row(table: Table, *cells: str | Text) -> None:
    """Add a row whose strings are shown literally (UIDs, errors and triggers contain ``[``)."""
    table.add_row(*(cell if isinstance(cell, Text) else Text(str(cell)) for cell in cells))


def collect_status(settings: Settings, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Everything ``radnode status`` shows, as JSON-ready data."""
    from radnode.node.index import SeriesState, open_existing_index
    from radnode.node.status import format_status
    from radnode.pipeline.outbox import ItemState, Outbox, outbox_exists
    from radnode.pipeline.queue import QUEUE_FILE, SQLiteJobQueue, open_queue
    from radnode.pipeline.scheduler import read_next_runs
    from radnode.pipeline.sweep_store import SWEEP_DB, SweepStore

    data_dir = Path(settings.storage.data_dir).resolve()
    status: dict[str, Any] = {"data_dir": str(data_dir), "generated_at": time.time()}

    series: dict[str, Any] = {"counts": {s.value: 0 for s in SeriesState}, "open": [], "stuck": []}
    index = open_existing_index(data_dir, settings.database.url)
    if index is not None:
        try:
            for state in SeriesState:
                records = index.series_in_state(state)
                series["counts"][state.value] = len(records)
                if state is not SeriesState.PROCESSED:
                    series["open"] += [
                        {
                            "series_uid": r.series_instance_uid,
                            "state": r.state.value,
                            "modality": r.modality,
                            "instances": r.instance_count,
                            "expected": r.expected_count,
                            "calling_ae": r.calling_ae,
                            "last_received_at": r.last_received_at,
                            "completion_reason": r.completion_reason,
                        }
                        for r in records
                    ]
            series["stuck"] = [
                {
                    "series_uid": f.series_instance_uid,
                    "subscriber": f.subscriber,
                    "round": f.round,
                    "attempts": f.attempts,
                    "first_failed_at": f.first_failed_at,
                    "next_attempt_at": f.next_attempt_at,
                    "last_error": f.last_error,
                }
                for f in index.completion_failures()
            ]
        finally:
            index.close()
    series["open"] = sorted(series["open"], key=lambda r: -r["last_received_at"])[:limit]
    status["series"] = series

    jobs: dict[str, Any] = {"counts": {}, "recent": [], "queue_age_seconds": None}
    outbox = (
        Outbox(data_dir, database_url=settings.database.url)
        if outbox_exists(data_dir, settings.database.url) else None
    )
    if settings.database.url or (data_dir / QUEUE_FILE).exists():
        queue = open_queue(data_dir, settings.database.url) if settings.database.url else SQLiteJobQueue(data_dir / QUEUE_FILE)
        jobs["counts"] = {state.value: n for state, n in queue.counts().items()}
        oldest = queue.oldest_waiting_since()
        jobs["queue_age_seconds"] = round(time.time() - oldest, 1) if oldest is not None else None
        for job in queue.list(limit=limit):
            entry = job.to_dict()
            entry.pop("traceback", None)
            entry["delivery"] = (
                {phase: {s.value: n for s, n in per.items()} for phase, per in outbox.job_delivery(job.id).items()}
                if outbox is not None
                else {}
            )
            jobs["recent"].append(entry)
        jobs["review_required"] = review_required(queue, outbox, limit)
    status["jobs"] = jobs

    configured = {d.name: d for d in settings.destinations}
    destinations = []
    failed_items = []
    health_by_name = {h.name: h for h in (outbox.health(configured) if outbox is not None else [])}
    for name in list(configured) + [n for n in health_by_name if n not in configured]:
        dest = configured.get(name)
        h = health_by_name.get(name)
        destinations.append(
            {
                "name": name,
                "address": (dest.url if dest.type == "dicomweb" else f"{dest.ae_title}@{dest.host}:{dest.port}")
                if dest else "(no longer configured)",
                "objects": [o.value for o in dest.objects] if dest else [],
                "state": h.state.value if h else "unknown",
                "pending": h.pending if h else 0,
                "sent": h.sent if h else 0,
                "failed": h.failed if h else 0,
                "held": h.held if h else 0,
                "awaiting_review": h.awaiting_review if h else 0,
                "rejected": h.rejected if h else 0,
                "requires_approval": dest.requires_approval if dest else False,
                "uncertain_contour": dest.uncertain_contour.value if dest else None,
                "consecutive_failures": h.consecutive_failures if h else 0,
                "last_success_at": h.last_success_at if h else None,
                "last_failure_at": h.last_failure_at if h else None,
                "last_error": h.last_error if h else None,
            }
        )
    if outbox is not None:
        for item in outbox.items(states=[ItemState.FAILED], limit=limit):
            failed_items.append(
                {
                    "id": item.id,
                    "job_id": item.job_id,
                    "object": item.object_type,
                    "sop_instance_uid": item.sop_instance_uid,
                    "destination": item.destination,
                    "status": format_status(item.last_status),
                    "error": item.last_error,
                    "attempts": item.attempts,
                }
            )
    status["destinations"] = destinations
    status["failed_deliveries"] = failed_items
    status["reviews"] = review_gate(outbox, limit)

    status["schedule"] = [
        {"task": r.name, "trigger": r.trigger, "next_run": r.next_run.isoformat() if r.next_run else None}
        for r in sorted(read_next_runs(data_dir), key=lambda r: r.name)
    ]
    runs = SweepStore(data_dir).runs(1) if (data_dir / SWEEP_DB).exists() else []
    status["last_sweep"] = runs[0] if runs else None
    status["scaleout"] = scaleout_status.collect(settings)
    status["contour_agreement"] = contour_agreement(data_dir, limit)
    return status


def review_gate(outbox: Any, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Jobs whose deliveries await a reviewer, and the latest review decisions (newest first)."""
    from radnode.pipeline.outbox import ItemState

    if outbox is None:
        return {"awaiting": [], "decided": []}
    waiting: dict[int, dict[str, Any]] = {}
    for item in outbox.items(states=[ItemState.AWAITING_REVIEW], limit=10000):
        row = waiting.setdefault(item.job_id or 0, {
            "job_id": item.job_id, "series_uid": item.source_series_uid, "destinations": [], "objects": [],
            "items": 0, "since": item.created_at,
        })
        row["items"] += 1
        row["since"] = min(row["since"], item.created_at)
        for key, value in (("destinations", item.destination), ("objects", item.object_type)):
            if value not in row[key]:
                row[key].append(value)
    awaiting = sorted(waiting.values(), key=lambda r: r["since"])[:limit]
    return {"awaiting": awaiting, "decided": [d.to_dict() for d in outbox.reviews(limit)]}


def contour_agreement(data_dir: Path, limit: int) -> dict[str, Any]:
    """Agreement of radnode's tumour contours with clinicians' GTVs: per model, and the newest cases."""
    from radnode.pipeline.agreement import AgreementStore

    store = AgreementStore.existing(data_dir)
    if store is None:
        return {"models": [], "recent": []}
    return {"models": [m.to_dict() for m in store.summary()], "recent": store.cases(limit)}


def review_required(queue: Any, outbox: Any, limit: int) -> list[dict[str, Any]]:
    """Done jobs whose tumour contour was flagged uncertain, newest first, with held deliveries."""
    from radnode.pipeline.jobs import JobState
    from radnode.pipeline.outbox import ItemState
    from radnode.pipeline.review import REVIEW_WINDOW, job_review

    rows = []
    for job in queue.list(states=[JobState.DONE], limit=REVIEW_WINDOW):
        review = job_review(job)
        if not review.get("required"):
            continue
        held = outbox.items(job_id=job.id, states=[ItemState.HELD]) if outbox is not None else []
        rows.append({
            "job_id": job.id, "series_uid": job.series_uid, "finished_at": job.finished_at,
            "flag": (review.get("flags") or [""])[0], "score": review.get("tumour_quality_score"),
            "threshold": review.get("threshold"), "reasons": review.get("reasons") or [],
            "held": sorted({i.destination for i in held}), "held_items": len(held),
        })
        if len(rows) >= limit:
            break
    return rows


def render(status: dict[str, Any], console: Console) -> None:
    """Print the status as rich tables."""
    now = status["generated_at"]
    console.print(f"[bold]radnode status[/] — data in {escape(status['data_dir'])}")

    counts = status["series"]["counts"]
    table = Table(title="Series", title_justify="left")
    for state in counts:
        table.add_column(state, justify="right")
    add_row(table, *(str(counts[s]) for s in counts))
    console.print(table)
    if status["series"]["open"]:
        table = Table(title="Series receiving / complete", title_justify="left")
        for column in ("Series UID", "State", "Modality", "Instances", "Calling AE", "Last instance"):
            table.add_column(column)
        for row in status["series"]["open"]:
            expected = f"/{row['expected']}" if row["expected"] else ""
            add_row(table, 
                row["series_uid"], row["state"], row["modality"] or "-", f"{row['instances']}{expected}",
                row["calling_ae"], _ago(row["last_received_at"], now),
            )
        console.print(table)
    if status["series"]["stuck"]:
        table = Table(title="Stuck series (complete, but routing/queueing failed; retried with backoff)", title_justify="left")
        for column in ("Series UID", "Round", "Failed in", "Attempts", "Failing since", "Next try", "Last error"):
            table.add_column(column)
        for row in status["series"]["stuck"]:
            add_row(table,
                row["series_uid"], str(row["round"]), row["subscriber"].rsplit(".", 1)[-1], str(row["attempts"]),
                _ago(row["first_failed_at"], now), _when(row["next_attempt_at"]), _short(row["last_error"], 60),
            )
        console.print(table)

    scaleout_status.render(status.get("scaleout"), console)
    jobs = status["jobs"]
    table = Table(title="Jobs by state", title_justify="left")
    for state in jobs["counts"] or {"(no jobs yet)": 0}:
        table.add_column(state, justify="right")
    add_row(table, *(str(n) for n in (jobs["counts"] or {"-": "-"}).values()))
    console.print(table)
    if jobs["queue_age_seconds"] is not None:
        console.print(f"oldest waiting job queued {jobs['queue_age_seconds']:.0f} s ago")
    if jobs["recent"]:
        table = Table(title="Recent jobs", title_justify="left")
        for column in ("ID", "State", "Source", "Series UID", "Attempts", "Phases (delivery)", "Finished", "Reason"):
            table.add_column(column)
        for job in jobs["recent"]:
            phases = []
            for phase, record in job["phases"].items():
                delivery = job["delivery"].get(phase, {})
                sent, total = delivery.get("sent", 0), sum(delivery.values())
                suffix = f" {sent}/{total} sent" if total else ""
                phases.append(f"{phase}: {record['state']}{suffix}")
            reason = job["reason"] or ""
            if job["error"]:
                reason = f"{reason}: {_short(job['error'], 60)}" if reason else _short(job["error"], 60)
            add_row(table, 
                str(job["id"]), job["state"], job["source"] + (f" ({job['kind']})" if job.get("kind", "process") != "process" else ""),
                job["series_uid"],
                f"{job['attempts']}/{job['max_attempts']}", "; ".join(phases), _ago(job["finished_at"], now), reason,
            )
        console.print(table)

    if jobs.get("review_required"):
        table = Table(title="Tumour contour uncertain — review required (radnode jobs release JOB_ID sends held deliveries)",
                      title_justify="left")
        for column in ("Job", "Series UID", "Score", "Threshold", "Why", "Held for", "Finished"):
            table.add_column(column)
        for row in jobs["review_required"]:
            score = f"{row['score']:.2f}" if row["score"] is not None else "-"
            add_row(table, str(row["job_id"]), row["series_uid"], Text(score, style="red"), str(row["threshold"]),
                    ", ".join(row["reasons"]), ", ".join(row["held"]) or "-", _ago(row["finished_at"], now))
        console.print(table)

    reviews = status.get("reviews") or {}
    if reviews.get("awaiting"):
        table = Table(title="Awaiting review (approve or reject on the dashboard's job page)", title_justify="left")
        for column in ("Job", "Series UID", "Destinations", "Objects", "Items", "Waiting since"):
            table.add_column(column)
        for row in reviews["awaiting"]:
            add_row(table, str(row["job_id"]), row["series_uid"] or "-", ", ".join(row["destinations"]),
                    ", ".join(row["objects"]), str(row["items"]), _ago(row["since"], now))
        console.print(table)
    if reviews.get("decided"):
        table = Table(title="Review decisions", title_justify="left")
        for column in ("Job", "Decision", "Reviewer", "When", "Approved", "Rejected", "Destinations", "Comment / reason"):
            table.add_column(column)
        for row in reviews["decided"]:
            colour = "green" if row["decision"] == "approved" else "red"
            add_row(table, str(row["job_id"]), Text(row["decision"], style=colour), row["reviewer"],
                    _when(row["decided_at"]), ", ".join(row["approved_structures"]) or "-",
                    ", ".join(row["rejected_structures"]) or "-", ", ".join(row["destinations"]),
                    _short(row["comment"], 50))
        console.print(table)

    table = Table(title="Destinations", title_justify="left")
    for column in ("Name", "Address", "Objects", "Health", "Pending", "Awaiting review", "Sent", "Failed", "Last success",
                   "Last error"):
        table.add_column(column)
    for dest in status["destinations"]:
        colour = {"up": "green", "down": "red"}.get(dest["state"], "yellow")
        add_row(table, 
            dest["name"] + (" (review)" if dest.get("requires_approval") else ""), dest["address"],
            ",".join(dest["objects"]), Text(dest["state"], style=colour),
            str(dest["pending"]), str(dest.get("held", 0)), str(dest["sent"]), str(dest["failed"]),
            _ago(dest["last_success_at"], now), _short(dest["last_error"], 50),
        )
    if not status["destinations"]:
        add_row(table, "(none configured)", "", "", "", "", "", "", "", "", "")
    console.print(table)
    if status["failed_deliveries"]:
        table = Table(title="Failed deliveries (radnode jobs retry JOB_ID re-arms them)", title_justify="left")
        for column in ("Item", "Job", "Object", "Destination", "Status", "Attempts", "Error"):
            table.add_column(column)
        for item in status["failed_deliveries"]:
            add_row(table, 
                str(item["id"]), str(item["job_id"] or "-"), item["object"], item["destination"], item["status"],
                str(item["attempts"]), _short(item["error"], 50),
            )
        console.print(table)

    table = Table(title="Scheduled", title_justify="left")
    for column in ("Task", "Trigger", "Next run"):
        table.add_column(column)
    for row in status["schedule"]:
        add_row(table, row["task"], row["trigger"], row["next_run"] or "paused")
    if not status["schedule"]:
        add_row(table, "(the node has not run yet)", "", "")
    console.print(table)

    sweep = status["last_sweep"]
    if sweep is None:
        console.print("last sweep: never")
    else:
        line = (
            f"last sweep: run {sweep['id']} over {sweep['date_from']}..{sweep['date_to']}, {sweep['state']}, "
            f"started {_when(sweep['started_at'])}; {sweep['found']} CT series found, {sweep['skipped']} skipped, "
            f"{sweep['queued']} queued, {sweep['failed']} failed"
        )
        console.print(line, markup=False, highlight=False)
    render_agreement(status.get("contour_agreement") or {}, console)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_agreement(agreement: dict[str, Any], console: Console) -> None:
    """The per-model summary of agreement with clinicians' GTVs (nothing when no case had one)."""
    if not agreement.get("models"):
        console.print("tumour contour vs clinician GTV: no case with a clinician RTSTRUCT yet")
        return
    table = Table(title="Tumour contour vs clinician GTV (per model)", title_justify="left")
    for column in ("Model", "Version", "Cases", "Dice mean", "Dice median", "HD95 mean (mm)", "Volume ratio mean"):
        table.add_column(column)
    for row in agreement["models"]:
        add_row(table, row["model"], row["version"], str(row["cases"]), _fmt(row["dice_mean"]), _fmt(row["dice_median"]),
                _fmt(row["hd95_mean_mm"], 1), _fmt(row["volume_ratio_mean"]))
    console.print(table)


def stdout_console() -> Console:
    """A console for tables; wide when stdout is not a terminal, so UIDs are not wrapped."""
    console = Console()
    return console if console.is_terminal else Console(width=250)


def register(app: typer.Typer) -> None:
    """Add the ``status`` command."""

    @app.command("status")
    def status(
        ctx: typer.Context,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
        limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Rows per list.")] = DEFAULT_LIMIT,
    ) -> None:
        """Show series, jobs by state, destinations and their health, next scheduled runs, last sweep."""
        settings = get_settings(ctx)
        snapshot = collect_status(settings, limit)
        if as_json:
            typer.echo(json.dumps(snapshot, indent=2, default=str))
            return
        render(snapshot, stdout_console())
