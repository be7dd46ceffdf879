"""``radnode config show|check``: see and validate the effective configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax

from radnode.cli.context import fail, get_settings
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
        """Validate FILE (with the current environment overrides); exit 2 if invalid."""
        try:
            load_settings(file)
        except ConfigError as exc:
            fail(str(exc), code=2)
        typer.echo(f"{file}: configuration is valid")

    app.add_typer(group, name="config")
