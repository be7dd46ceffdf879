"""``radnode install-systemd`` / ``radnode uninstall-systemd``: run radnode as a service.

The work is done by :mod:`radnode.service.install`; this module turns options into an
:class:`~radnode.service.install.InstallOptions`, refuses to touch the real system without
root, and prints what was (or, with ``--dry-run``, would be) done.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer

from radnode.cli.context import fail


def register(app: typer.Typer) -> None:
    """Add the ``install-systemd`` and ``uninstall-systemd`` commands."""

    @app.command("install-systemd")
    def install_systemd(
        root: Annotated[
            Path, typer.Option("--root", "--prefix", help="Root folder of the target system (tests, images).", file_okay=False)
        ] = Path("/"),
        source: Annotated[
            Path | None, typer.Option("--source", help="The repository's systemd/ folder (default: beside this installation).")
        ] = None,
        exec_start: Annotated[
            str | None, typer.Option("--exec-start", help="The radnode executable (default: the one of this venv).")
        ] = None,
        gpu: Annotated[bool, typer.Option("--gpu", help="Give the job workers the NVIDIA devices (gpu.conf drop-in).")] = False,
        memory_max: Annotated[
            str | None, typer.Option("--memory-max", help="MemoryMax= for the service, e.g. 32G or 75% (memory.conf drop-in).")
        ] = None,
        worker: Annotated[
            bool, typer.Option("--worker", help="Also install radnode-worker@.service for processing-only worker machines.")
        ] = False,
        enable: Annotated[bool, typer.Option("--enable/--no-enable", help="systemctl enable the unit.")] = True,
        start: Annotated[bool, typer.Option("--start", help="Also start it now (edit the configuration first!).")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps; change nothing.")] = False,
    ) -> None:
        """Install radnode as a systemd service: user, folders, configuration, unit.

        Creates the system user radnode, /etc/radnode (configuration from the template,
        never overwritten), /var/lib/radnode, the unit radnode.service, and enables it.
        See docs/operations.md.
        """
        from radnode.service import install

        options = install.InstallOptions(
            root=root,
            source=source or install.default_source_dir(),
            exec_start=PurePosixPath(exec_start) if exec_start else install.default_exec_start(),
            gpu=gpu,
            memory_max=memory_max,
            worker=worker,
            enable=enable,
            start=start,
            user_tool=install.default_user_tool(),
        )
        _require_root(options.real_root, dry_run)
        if options.real_root and not dry_run and not Path(options.exec_start).is_file():
            fail(f"{options.exec_start} does not exist: install radnode into that venv first or pass --exec-start", code=2)
        try:
            plan = install.plan_install(options)
            install.execute(plan, options.root, echo=typer.echo, dry_run=dry_run)
        except install.InstallError as exc:
            fail(str(exc), code=1)
        if not dry_run:
            config = "/" + str(install.CONFIG_PATH)
            typer.echo(
                f"installed. Next: edit {config} (node.allowed_calling_aes, destinations), "
                f"check it with `radnode config check {config}`, then `systemctl start radnode`."
            )
            if worker:
                typer.echo(
                    f"worker unit installed. On a worker machine: put database.url into /{install.WORKER_CONFIG_PATH} "
                    "(mode 0640, root:radnode), then `systemctl enable --now radnode-worker@cpu` (one instance per queue)."
                )

    @app.command("uninstall-systemd")
    def uninstall_systemd(
        root: Annotated[
            Path, typer.Option("--root", "--prefix", help="Root folder of the target system (tests, images).", file_okay=False)
        ] = Path("/"),
        purge: Annotated[
            bool, typer.Option("--purge", help="Also delete /etc/radnode, /var/lib/radnode (all received data!) and the user.")
        ] = False,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --purge deletes data.")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps; change nothing.")] = False,
    ) -> None:
        """Stop, disable and remove the radnode service.

        Configuration, data and the radnode user stay unless --purge is given.
        """
        from radnode.service import install

        options = install.InstallOptions(root=root, source=install.default_source_dir())
        _require_root(options.real_root, dry_run)
        if purge and not dry_run and not yes:
            data = options.root / install.DATA_DIR
            typer.confirm(f"--purge deletes {data} with every received series and result. Continue?", abort=True)
        try:
            install.execute(install.plan_uninstall(options, purge=purge), options.root, echo=typer.echo, dry_run=dry_run)
        except install.InstallError as exc:
            fail(str(exc), code=1)


def _require_root(real_root: bool, dry_run: bool) -> None:
    if real_root and not dry_run and os.geteuid() != 0:
        fail("changing the system's services needs root: run with sudo (or use --dry-run / --root DIR)", code=1)
