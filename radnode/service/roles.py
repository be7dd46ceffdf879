"""The roles of a node, so that each can run as its own process on one data folder.

``radnode serve`` runs all of them in one process by default; ``--roles`` picks a subset:

* ``listener``: the DICOM listener (C-STORE/C-ECHO SCP), ingest, the index, metrics and
  the dashboard;
* ``completion``: the series-completion timer and routing: complete series become jobs;
* ``scheduler``: lease recovery, retention, the nightly sweep;
* ``dispatch``: the outbox's C-STORE to destinations, and forward jobs;
* ``workers``: the worker pool that runs processing jobs in child processes.

The processes share nothing but files under ``storage.data_dir``: the index
(``radnode.sqlite``), the job queue, the outbox, the scheduler's store, the audit log.
Where one role tells another about new work in-process (the listener waking the completion
timer, a staged phase waking the dispatcher), the other role also polls those files at a
short interval, so a role in another process finds the work a moment later.

Each role runs in at most one process per data folder: :class:`RoleLocks` holds an
exclusive ``flock`` on ``<data_dir>/locks/<role>.lock`` for as long as the process runs
it, which is what makes start-up recovery (re-queueing jobs left running) safe.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import IO

#: Folder under the data folder with one lock file per role.
LOCK_DIR = "locks"


class Role(StrEnum):
    """One part of the node that can run in a process of its own."""

    LISTENER = "listener"
    COMPLETION = "completion"
    SCHEDULER = "scheduler"
    DISPATCH = "dispatch"
    WORKERS = "workers"


#: Every role: what ``radnode serve`` runs without ``--roles``.
ALL_ROLES: frozenset[Role] = frozenset(Role)
#: Roles the pipeline service runs (the listener is the node's).
PIPELINE_ROLES: frozenset[Role] = frozenset({Role.COMPLETION, Role.SCHEDULER, Role.DISPATCH, Role.WORKERS})


def parse_roles(text: str) -> frozenset[Role]:
    """``"listener,completion"`` as roles; a ``ValueError`` names an unknown one."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--roles names no role")
    known = {role.value for role in Role}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(r.value for r in Role)}")
    return frozenset(Role(name) for name in names)


def format_roles(roles: Iterable[Role]) -> str:
    """Roles in their canonical order, comma-separated (for logs and status lines)."""
    chosen = set(roles)
    return ",".join(role.value for role in Role if role in chosen)


class RoleBusy(RuntimeError):
    """Another process already runs one of the roles on this data folder."""


class RoleLocks:
    """Exclusive locks on ``<data_dir>/locks/<role>.lock``, one per role this process runs."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = Path(data_dir) / LOCK_DIR
        self._handles: dict[Role, IO[str]] = {}

    @property
    def held(self) -> frozenset[Role]:
        return frozenset(self._handles)

    def acquire(self, roles: Iterable[Role]) -> None:
        """Take the lock of every role (all or none); :class:`RoleBusy` names a taken one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        taken: list[Role] = []
        try:
            for role in sorted(set(roles) - set(self._handles)):
                path = self.folder / f"{role.value}.lock"
                handle = path.open("a+")
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    handle.close()
                    raise RoleBusy(
                        f"another radnode process already runs the {role.value} role on {self.folder.parent} "
                        f"(lock {path}); use a different storage.data_dir or stop the other process"
                    ) from exc
                self._handles[role] = handle
                taken.append(role)
        except BaseException:
            self.release(taken)
            raise

    def release(self, roles: Iterable[Role] | None = None) -> None:
        """Give up the locks of ``roles`` (default: all held)."""
        for role in list(self._handles) if roles is None else list(roles):
            handle = self._handles.pop(role, None)
            if handle is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
