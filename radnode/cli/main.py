"""Assemble the typer application from the command modules."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from radnode import __version__
from radnode.cli.context import CLIState
from radnode.config import CONFIG_ENV_VAR

app = typer.Typer(
    name="radnode",
    help="DICOM node and batch processor for lung-cancer CT.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"radnode {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            "-c",
            envvar=CONFIG_ENV_VAR,
            help=f"YAML configuration file (or ${CONFIG_ENV_VAR}). Environment "
            "variables RADNODE_<SECTION>__<KEY> override it.",
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """radnode: receive CT over DICOM, segment lungs and tumour, compute radiomics, send results back."""
    ctx.obj = CLIState(config_path=config)


#: Modules that contribute commands; each exposes ``register(app: typer.Typer)``.
COMMAND_MODULES: tuple[str, ...] = (
    "radnode.cli.config_cmd",
    "radnode.cli.phantom_cmd",
    "radnode.cli.process_cmd",
    "radnode.cli.serve_cmd",
    "radnode.cli.route_cmd",
    "radnode.cli.status_cmd",
    "radnode.cli.jobs_cmd",
    "radnode.cli.sweep_cmd",
    "radnode.cli.systemd_cmd",
    "radnode.cli.train_cmd",
    "radnode.cli.evaluate_cmd",
    "radnode.cli.classifier_cmd",  # extends the train and evaluate groups
    "radnode.cli.features_cmd",
    "radnode.cli.research_cmd",
    "radnode.cli.users_cmd",
    "radnode.cli.worker_cmd",
    "radnode.cli.db_cmd",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
