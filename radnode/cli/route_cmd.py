"""``radnode route --explain DIR``: which routing rule a series folder matches, and why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from radnode.cli.context import fail, get_settings
from radnode.config import ConfigError, load_settings

#: Exit code when DIR holds no readable DICOM file.
EXIT_NO_DICOM = 1


def register(app: typer.Typer) -> None:
    """Add the ``route`` command."""

    @app.command("route")
    def route(
        ctx: typer.Context,
        explain: Annotated[
            Path,
            typer.Option(
                "--explain",
                metavar="DIR",
                help="Folder with the files of a series (nested folders are read too).",
                exists=True,
                file_okay=False,
            ),
        ],
        calling_ae: Annotated[
            Optional[str],
            typer.Option("--calling-ae", help="Calling AE title to assume (rules may match on it)."),
        ] = None,
        rules: Annotated[
            Optional[Path],
            typer.Option(
                "--rules",
                help="YAML file whose 'routing' (and 'destinations') to use instead of the configuration's.",
                dir_okay=False,
                exists=True,
            ),
        ] = None,
    ) -> None:
        """Print, for each series found in DIR, every rule with each condition and the action chosen."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        from radnode.node.header import InstanceHeader
        from radnode.node.routing import evaluate, format_decision

        if rules is not None:
            try:
                settings = load_settings(rules)
            except ConfigError as exc:
                fail(str(exc), code=2)
        else:
            settings = get_settings(ctx)

        series: dict[str, tuple[InstanceHeader, set[str]]] = {}
        skipped = 0
        for path in sorted(p for p in explain.rglob("*") if p.is_file()):
            try:
                header = InstanceHeader.from_dataset(dcmread(path, stop_before_pixels=True))
            except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError):
                skipped += 1
                continue
            key = header.series_instance_uid or "<no SeriesInstanceUID>"
            first, sops = series.setdefault(key, (header, set()))
            sops.add(header.sop_instance_uid or str(path))
        if not series:
            fail(f"no readable DICOM file in {explain}", code=EXIT_NO_DICOM)
        blocks = []
        for header, sops in series.values():
            facts = replace(header, instance_count=len(sops), calling_ae=calling_ae)
            decision = evaluate(settings.routing, facts, settings.output.uid_root)
            blocks.append(format_decision(decision, facts))
        typer.echo("\n\n".join(blocks))
        if skipped:
            typer.echo(f"\n({skipped} non-DICOM file(s) skipped)")
