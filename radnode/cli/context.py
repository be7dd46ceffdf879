"""What every command shares: the global options and the settings they select."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from radnode.config import ConfigError, Settings, load_settings
from radnode.config.logs import configure_logging

#: Errors go to stderr so a command's stdout stays machine-readable.
err_console = Console(stderr=True)


@dataclass
class CLIState:
    """Global options, and the settings loaded from them on first use."""

    config_path: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
            configure_logging(self._settings.logging)
        return self._settings


def get_settings(ctx: typer.Context) -> Settings:
    """Load the effective settings for a command, or exit 2 with every bad key listed."""
    state = ctx.find_root().obj
    if not isinstance(state, CLIState):
        state = CLIState()
        ctx.find_root().obj = state
    try:
        return state.settings()
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise  # unreachable: fail() exits


#: Exit code when a command fails on valid-looking input.
EXIT_FAILED = 1
#: Exit code for bad options or unusable input (typer's own usage errors use it too).
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print a clear error (no traceback) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    sys.stdout.flush()
    raise typer.Exit(code)
