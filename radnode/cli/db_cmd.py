"""``radnode db``: move an embedded SQLite node to PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radnode.cli.context import fail, get_settings


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group."""
    db = typer.Typer(help="The node's database: move from SQLite to PostgreSQL.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @db.command("init")
    def init(
        url: Annotated[str, typer.Option("--url", help="Owner's URL, postgresql://radnode_owner@host/radnode.")],
        node_role: Annotated[str, typer.Option("--node-role", help="Role the node logs in with.")] = "radnode_node",
        worker_role: Annotated[str, typer.Option("--worker-role", help="Role the workers log in with.")] = "radnode_worker",
    ) -> None:
        """Create radnode's tables as their owner and grant the node and worker roles least privilege.

        The node's role reads and writes rows but cannot create, alter or drop tables; the
        worker's role can only claim and finish jobs and hand results back.
        """
        from radnode.pipeline.database import is_postgres_url, redact
        from radnode.pipeline.pg_roles import init_database

        if not is_postgres_url(url):
            fail("--url must be a postgresql:// URL", code=2)
        try:
            statements = init_database(url, node_role, worker_role)
        except Exception as exc:
            fail(f"initialising {redact(url)} failed: {exc}", code=1)
            return
        for statement in statements:
            typer.echo(statement)
        typer.echo(f"schema ready in {redact(url)}; node role {node_role}, worker role {worker_role}")

    @db.command("migrate")
    def migrate(
        ctx: typer.Context,
        to: Annotated[str, typer.Option("--to", help="Target database URL, postgresql://user@host:5432/db.")],
    ) -> None:
        """Copy the job queue, outbox rows, series index and audit trail of storage.data_dir into an
        empty PostgreSQL database (node stopped).

        Afterwards set database.url to the same URL (RADNODE_DATABASE__URL) and start the node.
        """
        from radnode.pipeline.database import is_postgres_url, redact
        from radnode.pipeline.migrate import MigrationError, check_index_target, migrate_index, migrate_queue

        if not is_postgres_url(to):
            fail("--to must be a postgresql:// URL", code=2)
        settings = get_settings(ctx)
        try:
            check_index_target(to)  # refuse before the queue is copied
            report = migrate_queue(
                Path(settings.storage.data_dir), to, settings.database.profile_queues, settings.database.default_queue
            )
            index = migrate_index(Path(settings.storage.data_dir), to)
        except MigrationError as exc:
            fail(str(exc), code=1)
            return
        except Exception as exc:  # connection refused, authentication, permissions
            fail(f"migration to {redact(to)} failed: {exc}", code=1)
            return
        typer.echo(
            f"migrated {report.jobs} job(s), {report.attempts} attempt(s) and {report.outbox_items} outbox item(s) to {redact(to)}; "
            "now set database.url to this URL and start the node"
        )
        typer.echo(
            f"migrated {index.series} series, {index.instances} instance row(s), "
            f"{index.completion_failures} completion failure(s) and {index.audit_records} audit record(s)"
        )
