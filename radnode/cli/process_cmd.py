"""``radnode process INPUT --out DIR``: the whole processing chain, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from radnode.cli.context import EXIT_FAILED, fail, get_settings

#: Exit codes distinguish "the data was refused" from "radnode broke".
EXIT_REJECTED = 3


def register(app: typer.Typer) -> None:
    """Add the ``process`` command."""

    @app.command("process")
    def process(
        ctx: typer.Context,
        input_path: Annotated[
            Path,
            typer.Argument(
                metavar="INPUT",
                help="Folder holding one CT series (any file order, nested folders) or a DICOMDIR.",
                exists=True,
            ),
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for result.json and objects.")],
    ) -> None:
        """Run the processing chain on one CT series and write the results to --out."""
        from radnode.pipeline.chain import RESULT_FILE, run_chain

        settings = get_settings(ctx)
        console = Console(stderr=True)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
        ) as bar:
            tasks: dict[str, int] = {}

            def hook(stage: str, state: str) -> None:
                if state == "start":
                    tasks[stage] = bar.add_task(stage, total=1)
                else:
                    bar.update(tasks[stage], completed=1, description=f"{stage} [{state}]")

            result = run_chain(input_path, out, settings, progress=hook)
        if result.status == "rejected":
            fail(f"series rejected by QC: {result.error} (details in {out / RESULT_FILE})", code=EXIT_REJECTED)
        if result.status != "done":
            fail(f"processing failed: {result.error} (details in {out / RESULT_FILE})", code=EXIT_FAILED)
        typer.echo(f"{out / RESULT_FILE}")
