"""``radnode users add|list``: the dashboard's local users (argon2 hashes in the data folder)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from radnode.cli.context import fail, get_settings


def _read_password(from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a hidden prompt."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def register(app: typer.Typer) -> None:
    """Add the ``users`` command group."""
    users_app = typer.Typer(help="Dashboard users: add and list.", no_args_is_help=True)
    app.add_typer(users_app, name="users")

    @users_app.command("add")
    def add(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Login name (A-Z a-z 0-9 _ . @ -).")],
        role: Annotated[str, typer.Option("--role", "-r", help="viewer (read), operator (retry/cancel), reviewer (also approves).")],
        password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")] = False,
        replace: Annotated[bool, typer.Option("--replace", help="Change role and password of an existing user.")] = False,
    ) -> None:
        """Add a dashboard user (the password is asked for, or read with --password-stdin)."""
        from radnode.web.users import ROLES, UserError, UserStore

        if role not in ROLES:
            fail(f"role {role!r} unknown; allowed: {', '.join(ROLES)}", code=2)
        settings = get_settings(ctx)
        password = _read_password(password_stdin)
        try:
            user = UserStore(Path(settings.storage.data_dir).resolve()).add(name, role, password, replace=replace)
        except UserError as exc:
            fail(str(exc), code=1)
            return
        typer.echo(f"user {user.name} ({user.role}) saved")

    @users_app.command("list")
    def list_users(ctx: typer.Context) -> None:
        """List dashboard users and their roles."""
        from radnode.web.users import UserStore

        settings = get_settings(ctx)
        for user in UserStore(Path(settings.storage.data_dir).resolve()).list():
            typer.echo(f"{user.name}\t{user.role}")
