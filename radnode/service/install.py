"""Install radnode as a systemd service, and remove it again.

An installation is a *plan*: a list of small actions (make a directory, write a file,
run a command) built from the files in the repository's ``systemd/`` folder and then
executed in order. Keeping the plan separate from its execution gives three things:
``--dry-run`` prints exactly what would happen; a test builds the plan for a temporary root
folder and runs it with a command runner that only records; and the order is visible in
one place:

1. ``/etc/sysusers.d/radnode.conf``, then ``systemd-sysusers``: the system user and group
   ``radnode`` (only created when missing);
2. ``/etc/tmpfiles.d/radnode.conf``, the folders ``/etc/radnode``, ``/etc/radnode/tls``,
   ``/var/lib/radnode``, the configuration from the template (never over an existing
   one), then ``systemd-tmpfiles --create``: owners and modes of all of them (again at
   every boot);
3. the unit ``/etc/systemd/system/radnode.service`` with ``ExecStart=`` pointing at this
   installation's ``radnode``, and the drop-ins asked for (GPU, memory limit);
4. with ``--worker``, the template unit ``/etc/systemd/system/radnode-worker@.service``
   for processing-only worker machines (:mod:`radnode.pipeline.remote_worker`), with the
   GPU drop-in too when asked; a template has no instance to enable, so the operator
   enables ``radnode-worker@<queue>`` once ``/etc/radnode/worker.yaml`` holds the
   database URL;
5. ``systemctl daemon-reload`` and ``systemctl enable radnode.service``.

With a root other than ``/`` (``--root``), the systemd tools get ``--root=`` so they
change files below it only, ``daemon-reload`` is skipped and the unit is not started.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import radnode
from radnode import durable

#: The unit, as systemd knows it.
UNIT_NAME = "radnode.service"
#: System user and group the service runs as (``User=`` in the unit, sysusers.d file).
SERVICE_USER = "radnode"
#: Where the unit's ``ExecStart=`` points in the shipped file (the documented layout).
DEFAULT_EXEC_START = PurePosixPath("/opt/radnode/.venv/bin/radnode")

# Installed paths, relative to the root folder (``/`` on a real machine).
UNIT_PATH = PurePosixPath("etc/systemd/system") / UNIT_NAME
DROPIN_DIR = PurePosixPath("etc/systemd/system") / f"{UNIT_NAME}.d"
CONFIG_DIR = PurePosixPath("etc/radnode")
CONFIG_PATH = CONFIG_DIR / "radnode.yaml"
TLS_DIR = CONFIG_DIR / "tls"
DATA_DIR = PurePosixPath("var/lib/radnode")
SYSUSERS_PATH = PurePosixPath("etc/sysusers.d/radnode.conf")
TMPFILES_PATH = PurePosixPath("etc/tmpfiles.d/radnode.conf")
#: The worker's template unit (one instance per queue list: ``radnode-worker@cpu``).
WORKER_UNIT_NAME = "radnode-worker@.service"
WORKER_UNIT_PATH = PurePosixPath("etc/systemd/system") / WORKER_UNIT_NAME
WORKER_DROPIN_DIR = PurePosixPath("etc/systemd/system") / f"{WORKER_UNIT_NAME}.d"
#: Configuration the worker unit reads (``database.url`` only; written by the operator).
WORKER_CONFIG_PATH = CONFIG_DIR / "worker.yaml"
#: The workers' scratch folders (``StateDirectory=radnode-worker/%i``).
WORKER_DATA_DIR = PurePosixPath("var/lib/radnode-worker")
#: Drop-ins this installer writes (and the uninstaller removes); others are the admin's.
GPU_DROPIN = "gpu.conf"
MEMORY_DROPIN = "memory.conf"
MANAGED_DROPINS = (GPU_DROPIN, MEMORY_DROPIN)

# Source files in the repository's systemd/ folder.
SOURCE_UNIT = "radnode.service"
SOURCE_TEMPLATE = "radnode.yaml.template"
SOURCE_SYSUSERS = "radnode.sysusers"
SOURCE_TMPFILES = "radnode.tmpfiles"
SOURCE_GPU_DROPIN = "dropins/gpu.conf"
SOURCE_WORKER_UNIT = "radnode-worker@.service"
REQUIRED_SOURCES = (SOURCE_UNIT, SOURCE_TEMPLATE, SOURCE_SYSUSERS, SOURCE_TMPFILES, SOURCE_GPU_DROPIN)

# Modes: the configuration may hold peer addresses and TLS paths; only root and the
# service's group read it. The data folder holds patient images: owner and group only.
MODE_UNIT = 0o644
MODE_SYSTEM_CONF = 0o644
MODE_CONFIG_DIR = 0o750
MODE_CONFIG_FILE = 0o640
MODE_DATA_DIR = 0o750

#: Folders ``ProtectHome=yes`` / ``PrivateTmp=yes`` hide from the service: a venv there
#: cannot be its ``ExecStart=``.
HIDDEN_FROM_SERVICE = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"), PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))

#: ``MemoryMax=`` values: bytes with an optional K/M/G/T suffix (base 1024), a
#: percentage of physical memory, or ``infinity`` (systemd.resource-control(5)).
MEMORY_PATTERN = re.compile(r"^(?:(\d+)([KMGT]?)|(\d{1,2}|100)%|infinity)$")
#: ``MemoryHigh=`` (throttling starts) as a fraction of ``MemoryMax=`` (OOM kill).
MEMORY_HIGH_FRACTION = 7 / 8
_SUFFIX_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}

_EXEC_START_LINE = re.compile(r"^ExecStart=(\S+)", re.MULTILINE)


class InstallError(RuntimeError):
    """The installation cannot go on; the message says what to fix."""


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MakeDir:
    """Create a folder (and its parents) with ``mode``.

    An existing folder gets ``mode`` too when it is radnode's own (``own``); shared system
    folders such as ``/etc/systemd/system`` are only created when missing, never changed.
    """

    path: PurePosixPath
    mode: int
    own: bool = True

    def describe(self) -> str:
        return f"mkdir {_abs(self.path)} ({self.mode:04o}{'' if self.own else ', if missing'})"


@dataclass(frozen=True)
class WriteFile:
    """Write ``content`` with ``mode``; with ``keep_existing`` an existing file is left alone."""

    path: PurePosixPath
    content: str
    mode: int
    keep_existing: bool = False

    def describe(self) -> str:
        keep = ", kept if it exists" if self.keep_existing else ""
        return f"write {_abs(self.path)} ({self.mode:04o}{keep})"


@dataclass(frozen=True)
class RunCommand:
    """Run a command; with ``allow_failure`` a non-zero exit is reported, not fatal."""

    argv: tuple[str, ...]
    allow_failure: bool = False

    def describe(self) -> str:
        return "run " + " ".join(self.argv) + (" (failure tolerated)" if self.allow_failure else "")


@dataclass(frozen=True)
class RemovePath:
    """Remove a file, an empty folder (``only_if_empty``) or a whole tree (``tree``)."""

    path: PurePosixPath
    tree: bool = False
    only_if_empty: bool = False

    def describe(self) -> str:
        what = "tree " if self.tree else ("empty folder " if self.only_if_empty else "")
        return f"remove {what}{_abs(self.path)}"


Action = MakeDir | WriteFile | RunCommand | RemovePath
Runner = Callable[[Sequence[str]], None]


def _abs(path: PurePosixPath) -> str:
    return "/" + str(path)


# --- options and sources -----------------------------------------------------------------


@dataclass(frozen=True)
class InstallOptions:
    """What to install, and where.

    Attributes
    ----------
    root
        Root folder of the target system (``/``, or a temporary folder in tests).
    source
        The repository's ``systemd/`` folder with the unit, template, sysusers and tmpfiles files.
    exec_start
        The ``radnode`` executable of the virtual environment (``ExecStart=``).
    gpu
        Install the GPU drop-in (``/dev/nvidia*`` for the job workers).
    memory_max
        ``MemoryMax=`` for a drop-in (``16G``, ``75%``, ``infinity``); ``None`` keeps the unit's.
    enable, start
        ``systemctl enable`` the unit / also start it (``enable --now``; real root only).
    worker
        Also install the worker template unit ``radnode-worker@.service`` (with the GPU
        drop-in when ``gpu``); its instances are enabled by the operator.
    user_tool
        ``sysusers`` (``systemd-sysusers``) or ``useradd`` where systemd-sysusers is missing.
    """

    root: Path = Path("/")
    source: Path = field(default_factory=lambda: default_source_dir())
    exec_start: PurePosixPath = DEFAULT_EXEC_START
    gpu: bool = False
    memory_max: str | None = None
    enable: bool = True
    start: bool = False
    worker: bool = False
    user_tool: str = "sysusers"

    @property
    def real_root(self) -> bool:
        """Whether this changes the running system (root ``/``)."""
        return self.root.resolve() == Path("/")


def default_source_dir() -> Path:
    """The ``systemd/`` folder of the checkout radnode runs from (``/opt/radnode/systemd``)."""
    return Path(radnode.__file__).resolve().parents[1] / "systemd"


def default_exec_start() -> PurePosixPath:
    """``radnode`` beside the running interpreter (the venv's), else the documented path."""
    import sys

    candidate = Path(sys.executable).parent / "radnode"
    return PurePosixPath(candidate) if candidate.is_file() else DEFAULT_EXEC_START


def default_user_tool() -> str:
    """``sysusers`` when ``systemd-sysusers`` exists (any systemd >= 215), else ``useradd``."""
    return "sysusers" if shutil.which("systemd-sysusers") else "useradd"


def read_source(source: Path, name: str) -> str:
    """Read one file of the ``systemd/`` folder, or explain where it was looked for."""
    path = source / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(
            f"cannot read {path}: {exc.strerror or exc}; --source must be the repository's systemd/ "
            f"folder holding {', '.join(REQUIRED_SOURCES)}"
        ) from exc


def render_unit(text: str, exec_start: PurePosixPath) -> str:
    """The unit text with ``ExecStart=`` running ``exec_start`` (arguments kept)."""
    if not exec_start.is_absolute():
        raise InstallError(f"ExecStart must be an absolute path, got {exec_start}")
    rendered, count = _EXEC_START_LINE.subn(lambda m: f"ExecStart={exec_start}", text, count=1)
    if count != 1:
        raise InstallError(f"the unit {SOURCE_UNIT} has no ExecStart= line to point at {exec_start}")
    return rendered


def check_exec_start(exec_start: PurePosixPath) -> None:
    """Refuse an executable the sandbox would hide (``ProtectHome=``, ``PrivateTmp=``)."""
    for hidden in HIDDEN_FROM_SERVICE:
        if exec_start == hidden or hidden in exec_start.parents:
            raise InstallError(
                f"{exec_start} is under {hidden}, which radnode.service hides from the service "
                "(ProtectHome=yes, PrivateTmp=yes); install radnode in /opt/radnode/.venv "
                "(docs/operations.md, 'Installing') and pass --exec-start /opt/radnode/.venv/bin/radnode"
            )


def memory_dropin(memory_max: str) -> str:
    """A drop-in with ``MemoryMax=`` and ``MemoryHigh=`` at 7/8 of it.

    ``MemoryHigh=`` makes the kernel reclaim and throttle first, so a large job slows down
    before the OOM killer ends it at ``MemoryMax=`` (with ``OOMPolicy=continue`` it takes
    the job process, which the pipeline retries; the listener stays up).
    """
    value = memory_max.strip()
    match = MEMORY_PATTERN.match(value)
    if match is None:
        raise InstallError(
            f"--memory-max {memory_max!r} is not a systemd memory size: use bytes with an "
            "optional K, M, G or T suffix (16G), a percentage of RAM (75%), or infinity"
        )
    number, suffix, percent = match.groups()
    if number is not None:
        size = int(number) * 1024 ** _SUFFIX_POWER[suffix]
        if size <= 0:
            raise InstallError(f"--memory-max must be positive, got {memory_max!r}")
        high = str(int(size * MEMORY_HIGH_FRACTION))
    elif percent is not None:
        high = f"{max(1, int(int(percent) * MEMORY_HIGH_FRACTION))}%"
    else:
        high = "infinity"
    return (
        "# Written by `radnode install-systemd --memory-max`; change it with a new install\n"
        "# or `systemctl edit radnode`.\n"
        "[Service]\n"
        f"MemoryHigh={high}\n"
        f"MemoryMax={value}\n"
    )


# --- plans --------------------------------------------------------------------------------


def _root_flag(options: InstallOptions) -> list[str]:
    return [] if options.real_root else [f"--root={options.root}"]


def _host_path(options: InstallOptions, path: PurePosixPath) -> str:
    # The sysusers/tmpfiles tools do not prefix explicit file arguments with --root.
    return str(options.root / path) if not options.real_root else _abs(path)


def _user_command(options: InstallOptions) -> tuple[str, ...]:
    if options.user_tool == "sysusers":
        return ("systemd-sysusers", *_root_flag(options), _host_path(options, SYSUSERS_PATH))
    if options.user_tool == "useradd":
        prefix = [] if options.real_root else [f"--prefix={options.root}"]
        return (
            "useradd", *prefix, "--system", "--user-group", "--no-create-home",
            f"--home-dir={_abs(DATA_DIR)}", "--shell=/usr/sbin/nologin", SERVICE_USER,
        )
    raise InstallError(f"user_tool must be 'sysusers' or 'useradd', got {options.user_tool!r}")


def plan_install(options: InstallOptions) -> list[Action]:
    """The actions that install radnode as a service (see the module docstring)."""
    check_exec_start(options.exec_start)
    unit = render_unit(read_source(options.source, SOURCE_UNIT), options.exec_start)
    plan: list[Action] = []
    # 1. user and group
    plan.append(MakeDir(SYSUSERS_PATH.parent, 0o755, own=False))
    plan.append(WriteFile(SYSUSERS_PATH, read_source(options.source, SOURCE_SYSUSERS), MODE_SYSTEM_CONF))
    user = _user_command(options)
    # useradd fails when the user exists; systemd-sysusers is idempotent.
    plan.append(RunCommand(user, allow_failure=options.user_tool == "useradd"))
    # 2. folders, configuration, owners
    plan.append(MakeDir(TMPFILES_PATH.parent, 0o755, own=False))
    plan.append(WriteFile(TMPFILES_PATH, read_source(options.source, SOURCE_TMPFILES), MODE_SYSTEM_CONF))
    plan.append(MakeDir(CONFIG_DIR, MODE_CONFIG_DIR))
    plan.append(MakeDir(TLS_DIR, MODE_CONFIG_DIR))
    plan.append(MakeDir(DATA_DIR, MODE_DATA_DIR))
    plan.append(WriteFile(CONFIG_PATH, read_source(options.source, SOURCE_TEMPLATE), MODE_CONFIG_FILE, keep_existing=True))
    plan.append(RunCommand(("systemd-tmpfiles", "--create", *_root_flag(options), _host_path(options, TMPFILES_PATH))))
    # 3. unit and drop-ins
    plan.append(MakeDir(UNIT_PATH.parent, 0o755, own=False))
    plan.append(WriteFile(UNIT_PATH, unit, MODE_UNIT))
    if options.gpu or options.memory_max is not None:
        plan.append(MakeDir(DROPIN_DIR, 0o755))
    if options.gpu:
        plan.append(WriteFile(DROPIN_DIR / GPU_DROPIN, read_source(options.source, SOURCE_GPU_DROPIN), MODE_UNIT))
    if options.memory_max is not None:
        plan.append(WriteFile(DROPIN_DIR / MEMORY_DROPIN, memory_dropin(options.memory_max), MODE_UNIT))
    # 4. the worker's template unit
    if options.worker:
        worker_unit = render_unit(read_source(options.source, SOURCE_WORKER_UNIT), options.exec_start)
        plan.append(WriteFile(WORKER_UNIT_PATH, worker_unit, MODE_UNIT))
        if options.gpu:
            plan.append(MakeDir(WORKER_DROPIN_DIR, 0o755))
            plan.append(WriteFile(WORKER_DROPIN_DIR / GPU_DROPIN, read_source(options.source, SOURCE_GPU_DROPIN), MODE_UNIT))
    # 5. systemd
    if options.real_root:
        plan.append(RunCommand(("systemctl", "daemon-reload")))
    if options.enable:
        now = ["--now"] if options.start and options.real_root else []
        plan.append(RunCommand(("systemctl", *_root_flag(options), "enable", *now, UNIT_NAME)))
    return plan


def plan_uninstall(options: InstallOptions, purge: bool = False) -> list[Action]:
    """The actions that remove the service; configuration, data and user stay unless ``purge``."""
    plan: list[Action] = []
    if options.real_root:
        plan.append(RunCommand(("systemctl", "disable", "--now", UNIT_NAME), allow_failure=True))
    else:
        plan.append(RunCommand(("systemctl", *_root_flag(options), "disable", UNIT_NAME), allow_failure=True))
    plan.append(RemovePath(UNIT_PATH))
    plan.extend(RemovePath(DROPIN_DIR / name) for name in MANAGED_DROPINS)
    # The admin's own drop-ins (systemctl edit) stay, unless everything goes.
    plan.append(RemovePath(DROPIN_DIR, tree=purge, only_if_empty=not purge))
    # The worker template, if it was installed (its enabled instances are the admin's to disable).
    plan.append(RemovePath(WORKER_UNIT_PATH))
    plan.append(RemovePath(WORKER_DROPIN_DIR / GPU_DROPIN))
    plan.append(RemovePath(WORKER_DROPIN_DIR, tree=purge, only_if_empty=not purge))
    if purge:
        plan.append(RemovePath(CONFIG_DIR, tree=True))
        plan.append(RemovePath(DATA_DIR, tree=True))
        plan.append(RemovePath(WORKER_DATA_DIR, tree=True))
        plan.append(RemovePath(TMPFILES_PATH))
        plan.append(RemovePath(SYSUSERS_PATH))
        prefix = [] if options.real_root else [f"--prefix={options.root}"]
        plan.append(RunCommand(("userdel", *prefix, SERVICE_USER), allow_failure=True))
    if options.real_root:
        plan.append(RunCommand(("systemctl", "daemon-reload")))
    return plan


# --- execution ----------------------------------------------------------------------------


def subprocess_runner(argv: Sequence[str]) -> None:
    """Run a command; raise :class:`InstallError` with its output when it fails."""
    try:
        completed = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise InstallError(f"{argv[0]} not found: is this a systemd machine? ({' '.join(argv)})") from exc
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        raise InstallError(f"`{' '.join(argv)}` failed with exit {completed.returncode}: {output}")


def execute(
    plan: Sequence[Action],
    root: Path,
    runner: Runner = subprocess_runner,
    echo: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Run ``plan`` below ``root``; return one line per action saying what was done.

    With ``dry_run`` nothing is touched and the lines say what would be done.
    """
    report: list[str] = []

    def say(line: str) -> None:
        report.append(line)
        if echo is not None:
            echo(line)

    for action in plan:
        if dry_run:
            say(f"would {action.describe()}")
            continue
        if isinstance(action, RunCommand):
            try:
                runner(action.argv)
            except InstallError as exc:
                if not action.allow_failure:
                    raise
                say(f"{action.describe()}: {exc}")
                continue
            say(action.describe())
            continue
        target = _below(root, action.path)
        if isinstance(action, MakeDir):
            existed = target.is_dir()
            target.mkdir(parents=True, exist_ok=True)
            if action.own or not existed:
                os.chmod(target, action.mode)
            say(action.describe())
        elif isinstance(action, WriteFile):
            if action.keep_existing and (target.exists() or target.is_symlink()):
                say(f"keep existing {_abs(action.path)}")
                continue
            _write_atomic(target, action.content, action.mode)
            say(action.describe())
        elif isinstance(action, RemovePath) and _remove(target, action):
            say(action.describe())
    return report


def _below(root: Path, path: PurePosixPath) -> Path:
    """``root/path``, refusing anything that would leave ``root`` (``..``, links are not followed)."""
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise InstallError(f"refusing install path {path!r}: must be relative, without '..'")
    return root / path


def _write_atomic(target: Path, content: str, mode: int) -> None:
    durable.write_text(target, content, mode)


def _remove(target: Path, action: RemovePath) -> bool:
    if not (target.exists() or target.is_symlink()):
        return False
    if action.tree and target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
        return True
    if target.is_dir() and not target.is_symlink():
        if any(target.iterdir()):
            if action.only_if_empty:
                return False
            raise InstallError(f"{target} is a non-empty folder; not removed")
        target.rmdir()
        return True
    target.unlink()
    return True


def file_mode(path: Path) -> int:
    """Permission bits of ``path`` (for reports and tests)."""
    return stat.S_IMODE(path.stat().st_mode)
