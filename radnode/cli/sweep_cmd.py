"""``radnode sweep --from --to [--dry-run]``: fetch and queue CT series never processed.

With ``pacs.retrieve: move`` the archive sends the series to radnode's own AE title, so
``radnode serve`` must be running to receive them; with ``get`` the command receives them
itself. Queued jobs are processed by the running node's workers.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from typing import Annotated, Optional

import typer
from rich.table import Table

from radnode.cli.context import fail, get_settings
from radnode.cli.status_cmd import add_row, stdout_console

DATE_FORMATS = ["%Y-%m-%d", "%Y%m%d"]


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` command."""

    @app.command("sweep")
    def sweep(
        ctx: typer.Context,
        date_from: Annotated[
            Optional[datetime],
            typer.Option("--from", formats=DATE_FORMATS, help="First study date (default: today - sweep.lookback_days)."),
        ] = None,
        date_to: Annotated[
            Optional[datetime], typer.Option("--to", formats=DATE_FORMATS, help="Last study date (default: today).")
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be retrieved.")] = False,
        limit: Annotated[
            Optional[int], typer.Option("--limit", min=1, help="Series to retrieve (default: sweep.max_series_per_run).")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Query the PACS for CT series in a study-date range and queue those never processed."""
        from radnode.pipeline.remote_link import node_queue
        from radnode.pipeline.service import build_sweeper
        from radnode.pipeline.sweep import SweepError

        settings = get_settings(ctx)
        if settings.pacs is None:
            fail("no 'pacs' section in the configuration: the sweep needs ae_title, host and port of the archive", code=2)
        end: date = date_to.date() if date_to else date.today()
        start: date = date_from.date() if date_from else end - timedelta(days=settings.sweep.lookback_days)
        queue = node_queue(settings)
        try:
            report = build_sweeper(settings, queue).run(start, end, dry_run=dry_run, limit=limit)
        except SweepError as exc:
            fail(str(exc), code=1)
            return
        if as_json:
            payload = {
                "run_id": report.run_id,
                "from": start.isoformat(),
                "to": end.isoformat(),
                "dry_run": dry_run,
                "decisions": [
                    {
                        "study_uid": d.candidate.study_instance_uid,
                        "series_uid": d.candidate.series_instance_uid,
                        "study_date": d.candidate.study_date,
                        "instances": d.candidate.instance_count,
                        "take": d.take,
                        "reason": d.reason,
                    }
                    for d in report.decisions
                ],
                "queued": [{"series_uid": s, "job_id": j} for s, j in report.queued],
                "failed": [{"series_uid": s, "error": e} for s, e in report.failed],
                "remaining": report.remaining,
            }
            typer.echo(json.dumps(payload, indent=2))
            return
        title = "would retrieve" if dry_run else "sweep"
        table = Table(title=f"{title} {start}..{end}: {len(report.decisions)} CT series", title_justify="left")
        for column in ("Study date", "Series UID", "Description", "Instances", "Decision", "Reason"):
            table.add_column(column)
        for d in report.decisions:
            c = d.candidate
            add_row(
                table, c.study_date or "-", c.series_instance_uid or "", c.series_description or "", str(c.instance_count or "?"),
                "take" if d.take else "skip", d.reason,
            )
        console = stdout_console()
        console.print(table)
        if dry_run:
            console.print(f"dry run: {len(report.taken)} series would be retrieved, {len(report.skipped)} skipped")
            return
        console.print(
            f"run {report.run_id}: {len(report.queued)} queued, {len(report.failed)} failed, "
            f"{report.remaining} left for the next run"
        )
        for series_uid, error in report.failed:
            console.print(f"not retrieved {series_uid}: {error}", style="red", markup=False, highlight=False)
        if report.failed:
            raise typer.Exit(1)
