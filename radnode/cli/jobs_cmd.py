"""``radnode jobs list|show|retry|cancel|release``: look at and steer the job queue.

Works on the node's data folder, beside a running ``radnode serve``: a retried job is
claimed by the running workers within seconds; a cancelled running job is stopped at its
worker's next heartbeat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from radnode.cli.context import fail, get_settings
from radnode.cli.status_cmd import _ago, _short, add_row, stdout_console

if TYPE_CHECKING:
    from radnode.pipeline.jobs import Job
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.queue import JobQueue

#: Exit status when the job id does not exist (1 = the job exists but the action is not allowed).
EXIT_NOT_FOUND = 3


def _stores(ctx: typer.Context) -> tuple[JobQueue, Outbox]:
    """The node's job queue and outbox (opened lazily: ``radnode --help`` stays fast)."""
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.remote_link import node_queue

    settings = get_settings(ctx)
    data_dir = Path(settings.storage.data_dir).resolve()
    return node_queue(settings), Outbox(data_dir, database_url=settings.database.url)


def _job_or_exit(queue: JobQueue, job_id: int) -> Job:
    """The job with ``job_id``, or exit with EXIT_NOT_FOUND naming it."""
    from radnode.pipeline.queue import JobNotFound

    try:
        return queue.get(job_id)
    except JobNotFound as exc:
        fail(str(exc), code=EXIT_NOT_FOUND)
        raise  # unreachable: fail() exits


def _review_cell(job: Job, outbox: Outbox) -> str:
    """``uncertain`` when the job's tumour contour needs review, deliveries awaiting review, the decision."""
    from radnode.pipeline.outbox import ItemState
    from radnode.pipeline.review import job_review

    parts = ["uncertain"] if job_review(job).get("required") else []
    held = len(outbox.items(job_id=job.id, states=[ItemState.AWAITING_REVIEW]))
    if held:
        parts.append(f"{held} held")
    decision = outbox.review(job.id)
    if decision is not None:
        parts.append(f"{decision.decision} by {decision.reviewer}")
    return ", ".join(parts)


def register(app: typer.Typer) -> None:
    """Add the ``jobs`` command group."""
    jobs_app = typer.Typer(help="List, inspect, retry, cancel and release processing jobs.", no_args_is_help=True)
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.command("list")
    def list_jobs(
        ctx: typer.Context,
        state: Annotated[
            Optional[list[str]],
            typer.Option("--state", "-s", help="Only jobs in this state (repeatable): queued, running, retrying, done, failed, cancelled."),
        ] = None,
        limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most jobs to list (newest first).")] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """List jobs, newest first."""
        import time

        from radnode.pipeline.jobs import JobState

        states = None
        if state:
            try:
                states = [JobState(s.lower()) for s in state]
            except ValueError:
                fail(f"unknown state in --state {state}; allowed: {', '.join(s.value for s in JobState)}", code=2)
        queue, _outbox = _stores(ctx)
        jobs = queue.list(states=states, limit=limit)
        if as_json:
            typer.echo(json.dumps([j.to_dict() for j in jobs], indent=2, default=str))
            return
        now = time.time()
        table = Table(title=f"{len(jobs)} job(s)", title_justify="left")
        for column in ("ID", "State", "Priority", "Source", "Series UID", "Attempts", "Created", "Runtime", "Review",
                       "Reason"):
            table.add_column(column)
        for job in jobs:
            runtime = job.runtime_seconds()
            add_row(
                table, str(job.id), job.state.value, str(job.priority), job.source.value, job.series_uid,
                f"{job.attempts}/{job.max_attempts}", _ago(job.created_at, now),
                f"{runtime:.1f} s" if runtime is not None else "-", _review_cell(job, _outbox),
                _short(job.reason or job.error, 50),
            )
        stdout_console().print(table)

    @jobs_app.command("show")
    def show(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
        """Show one job: attempts, phases, deliveries, error and traceback."""
        from radnode.node.status import format_status

        queue, outbox = _stores(ctx)
        job = _job_or_exit(queue, job_id)
        console = stdout_console()
        plain = {"markup": False, "highlight": False}
        console.print(f"job {job.id} {job.state.value} — series {job.series_uid} ({job.source.value}, priority {job.priority})", **plain)
        console.print(f"input {job.input_path}; pipeline {job.pipeline_version}; profile {job.profile}", **plain)
        for phase, record in job.phases.items():
            console.print(f"phase {phase}: {record['state']} ({record.get('objects', 0)} object(s))", **plain)
        attempts = Table(title="Attempts", title_justify="left")
        for column in ("#", "Worker", "Outcome", "Reason", "Seconds", "Error"):
            attempts.add_column(column)
        for attempt in queue.attempts(job.id):
            seconds = attempt["finished_at"] - attempt["started_at"] if attempt["finished_at"] else None
            add_row(
                attempts, str(attempt["attempt"]), attempt["worker_id"] or "-", attempt["outcome"] or "running",
                attempt["reason"] or "", f"{seconds:.1f}" if seconds is not None else "-", _short(attempt["error"], 60),
            )
        console.print(attempts)
        items = outbox.items(job_id=job.id)
        if items:
            deliveries = Table(title="Deliveries", title_justify="left")
            for column in ("Item", "Object", "SOP Instance UID", "Destination", "State", "Attempts", "Status", "Error"):
                deliveries.add_column(column)
            for item in items:
                add_row(
                    deliveries, str(item.id), item.object_type, item.sop_instance_uid, item.destination, item.state.value,
                    str(item.attempts), format_status(item.last_status), _short(item.last_error, 40),
                )
            console.print(deliveries)
        if job.error:
            console.print(f"error ({job.reason}): {job.error}", style="red", **plain)
        if job.traceback:
            console.print(job.traceback, **plain)

    @jobs_app.command("retry")
    def retry(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
        """Re-queue a failed or cancelled job, and re-arm its failed deliveries."""
        from radnode.pipeline.queue import JobNotFound
        from radnode.pipeline.steering import NothingToRetry, retry_job

        queue, outbox = _stores(ctx)
        try:
            typer.echo(retry_job(queue, outbox, job_id).message())
        except JobNotFound as exc:
            fail(str(exc), code=EXIT_NOT_FOUND)
        except NothingToRetry as exc:
            fail(str(exc), code=1)

    @jobs_app.command("release")
    def release(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
        """Send a job's held deliveries as they are (uncertain_contour: hold; a person looked at them).

        Destinations with requires_approval keep waiting: they get only a reviewer's approved
        copy (dashboard job page or /api/jobs/ID/approve).
        """
        queue, outbox = _stores(ctx)
        job = _job_or_exit(queue, job_id)
        gated = [d.name for d in get_settings(ctx).destinations if d.requires_approval]
        released = outbox.release(job.id, except_destinations=gated)
        if not released:
            fail(f"job {job.id} has no held delivery"
                 + (f" (those for {', '.join(gated)} need a reviewer's approval in the dashboard)" if gated else ""), code=1)
        typer.echo(f"job {job.id}: {released} held delivery(ies) released; the running node sends them within 30 s")

    @jobs_app.command("cancel")
    def cancel(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
        """Cancel a queued, retrying or running job (a running one is stopped within seconds)."""
        from radnode.pipeline.queue import InvalidTransition, JobNotFound
        from radnode.pipeline.steering import cancel_job

        queue, _outbox = _stores(ctx)
        try:
            job = cancel_job(queue, job_id)
        except JobNotFound as exc:
            fail(str(exc), code=EXIT_NOT_FOUND)
            return
        except InvalidTransition as exc:
            fail(str(exc), code=1)
            return
        typer.echo(f"job {job.id} cancelled (series {job.series_uid})")
