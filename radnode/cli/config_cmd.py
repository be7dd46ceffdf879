"""``radnode config show|check``: see and validate the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from radnode.cli.context import err_console, fail, get_settings
from radnode.config import ConfigError, load_settings, settings_to_yaml


def register(app: typer.Typer) -> None:
    """Add the ``config`` command group."""
    group = typer.Typer(help="Show or validate the configuration.", no_args_is_help=True)

    @group.command("show")
    def show(
        ctx: typer.Context,
        plain: Annotated[bool, typer.Option("--plain", help="No colours (for scripts).")] = False,
    ) -> None:
        """Print the effective configuration (defaults + file + environment) as YAML."""
        text = settings_to_yaml(get_settings(ctx))
        if plain:
            typer.echo(text, nl=False)
        else:
            Console().print(Syntax(text, "yaml", background_color="default"))

    @group.command("check")
    def check(
        file: Annotated[Path, typer.Argument(help="YAML file to validate.", dir_okay=False)],
    ) -> None:
        """Validate FILE (with the current environment overrides); exit 2 if invalid.

        A valid file that leaves the node open (every interface, any calling AE) or shut
        to everyone (strict with an empty allow-list) is still valid, with a warning.
        """
        from radnode.node.access import exposure_warnings

        try:
            settings = load_settings(file)
        except ConfigError as exc:
            fail(str(exc), code=2)
            raise  # unreachable: fail() exits
        from radnode.web.server import exposure_warning

        dashboard_warning = exposure_warning(settings) if settings.dashboard.enabled else None
        from radnode.web.dicomweb import dicomweb_warnings

        dashboard_warnings = [dashboard_warning] if dashboard_warning else []
        for warning in [*exposure_warnings(settings.node), *dashboard_warnings, *dicomweb_warnings(settings)]:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", markup=True, highlight=False, soft_wrap=True)
        typer.echo(f"{file}: configuration is valid")

    app.add_typer(group, name="config")
