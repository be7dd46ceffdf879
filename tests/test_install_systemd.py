"""``radnode install-systemd`` / ``uninstall-systemd`` into a temporary root folder.

Most tests run the plan with a runner that only records the commands (and checks that
every file a command names already exists when it runs). One test runs the real
``systemd-sysusers``, ``systemd-tmpfiles`` and ``systemctl`` with ``--root=`` on the
temporary folder, which confines them to it: it proves the commands are right (user
created, owners applied, unit enabled) and that the machine's own /etc is untouched."""

from __future__ import annotations

import os
import pwd
import re
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pytest
from typer.testing import CliRunner

from radnode.config import load_settings
from radnode.service.install import (
    InstallError,
    InstallOptions,
    execute,
    file_mode,
    memory_dropin,
    plan_install,
    plan_uninstall,
    subprocess_runner,
)

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "systemd"
EXEC = PurePosixPath("/opt/radnode/.venv/bin/radnode")


class RecordingRunner:
    """Records commands; fails a command that names a file below root that does not exist."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        for arg in argv:
            if arg.startswith(str(self.root)) and not arg.startswith("--"):
                assert Path(arg).exists(), f"{argv[0]} ran before {arg} was written"
        self.commands.append(list(argv))


def options(root: Path, **overrides: object) -> InstallOptions:
    values: dict[str, object] = {"root": root, "source": SOURCE, "exec_start": EXEC, "user_tool": "sysusers"}
    values.update(overrides)
    return InstallOptions(**values)  # type: ignore[arg-type]


def test_install_writes_files_with_modes_and_runs_confined_commands(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    runner = RecordingRunner(root)
    report = execute(plan_install(options(root, gpu=True, memory_max="32G")), root, runner=runner)

    unit = root / "etc/systemd/system/radnode.service"
    assert file_mode(unit) == 0o644
    assert f"\nExecStart={EXEC} serve\n" in unit.read_text()
    assert unit.read_text().replace(f"ExecStart={EXEC}", "X") == (SOURCE / "radnode.service").read_text().replace(
        "ExecStart=/opt/radnode/.venv/bin/radnode", "X"
    )
    gpu = root / "etc/systemd/system/radnode.service.d/gpu.conf"
    assert gpu.read_text() == (SOURCE / "dropins/gpu.conf").read_text() and file_mode(gpu) == 0o644
    memory = (root / "etc/systemd/system/radnode.service.d/memory.conf").read_text()
    limits = dict(re.findall(r"^(Memory\w+)=(\S+)$", memory, re.MULTILINE))
    assert limits["MemoryMax"] == "32G" and 0 < int(limits["MemoryHigh"]) < 32 * 1024**3

    config = root / "etc/radnode/radnode.yaml"
    assert config.read_text() == (SOURCE / "radnode.yaml.template").read_text()
    assert file_mode(config) == 0o640
    assert load_settings(config).storage.data_dir == Path("/var/lib/radnode")
    for folder in ("etc/radnode", "etc/radnode/tls", "var/lib/radnode"):
        assert file_mode(root / folder) == 0o750, folder
    assert (root / "etc/sysusers.d/radnode.conf").read_text() == (SOURCE / "radnode.sysusers").read_text()
    assert (root / "etc/tmpfiles.d/radnode.conf").read_text() == (SOURCE / "radnode.tmpfiles").read_text()

    assert runner.commands == [
        ["systemd-sysusers", f"--root={root}", f"{root}/etc/sysusers.d/radnode.conf"],
        ["systemd-tmpfiles", "--create", f"--root={root}", f"{root}/etc/tmpfiles.d/radnode.conf"],
        ["systemctl", f"--root={root}", "enable", "radnode.service"],
    ]
    assert len(report) == len(plan_install(options(root, gpu=True, memory_max="32G")))
    assert not list(root.rglob(".*")), "temporary files left behind"


def test_an_existing_configuration_is_never_overwritten(tmp_path: Path) -> None:
    config = tmp_path / "etc/radnode/radnode.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("node:\n  ae_title: SITE_NODE\n")
    config.chmod(0o600)
    report = execute(plan_install(options(tmp_path)), tmp_path, runner=RecordingRunner(tmp_path))
    assert config.read_text() == "node:\n  ae_title: SITE_NODE\n" and file_mode(config) == 0o600
    assert "keep existing /etc/radnode/radnode.yaml" in report


def test_shared_system_folders_keep_their_mode_own_folders_get_theirs(tmp_path: Path) -> None:
    shared = tmp_path / "etc/systemd/system"
    shared.mkdir(parents=True)
    shared.chmod(0o700)
    own = tmp_path / "etc/radnode"
    own.mkdir(parents=True)
    own.chmod(0o777)
    execute(plan_install(options(tmp_path)), tmp_path, runner=RecordingRunner(tmp_path))
    assert file_mode(shared) == 0o700
    assert file_mode(own) == 0o750


def test_plan_for_the_real_system_reloads_enables_and_starts(tmp_path: Path) -> None:
    """Only planned, never executed: the commands a real install runs."""
    plan = plan_install(options(Path("/"), start=True))
    commands = [list(a.argv) for a in plan if hasattr(a, "argv")]
    assert commands == [
        ["systemd-sysusers", "/etc/sysusers.d/radnode.conf"],
        ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/radnode.conf"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "radnode.service"],
    ]
    useradd = plan_install(options(Path("/"), user_tool="useradd"))
    user_command = next(a.argv for a in useradd if hasattr(a, "argv"))
    assert user_command[0] == "useradd" and "--system" in user_command and user_command[-1] == "radnode"


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    def refuse(argv: Sequence[str]) -> None:
        raise AssertionError(f"dry run ran {argv}")

    lines = execute(plan_install(options(tmp_path, gpu=True)), tmp_path, runner=refuse, dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert lines and all(line.startswith("would ") for line in lines)
    assert any("/etc/radnode/radnode.yaml (0640, kept if it exists)" in line for line in lines)


@pytest.mark.parametrize("hidden", ["/home/alice/radnode/.venv/bin/radnode", "/root/.venv/bin/radnode", "/tmp/venv/bin/radnode"])
def test_an_executable_the_sandbox_hides_is_refused(tmp_path: Path, hidden: str) -> None:
    with pytest.raises(InstallError, match="ProtectHome=yes, PrivateTmp=yes"):
        plan_install(options(tmp_path, exec_start=PurePosixPath(hidden)))


def test_memory_dropin_sizes() -> None:
    assert "MemoryMax=75%\n" in memory_dropin("75%") and "MemoryHigh=65%\n" in memory_dropin("75%")
    assert "MemoryHigh=infinity\n" in memory_dropin("infinity")
    high = int(re.search(r"MemoryHigh=(\d+)", memory_dropin("8G")).group(1))  # type: ignore[union-attr]
    assert 6 * 1024**3 < high < 8 * 1024**3
    for bad in ("lots", "8GB", "-1G", "120%", "0"):
        with pytest.raises(InstallError, match="memory"):
            memory_dropin(bad)


def test_uninstall_keeps_configuration_and_data_unless_purged(tmp_path: Path) -> None:
    execute(plan_install(options(tmp_path, gpu=True)), tmp_path, runner=RecordingRunner(tmp_path))
    received = tmp_path / "var/lib/radnode/incoming/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    received.parent.mkdir(parents=True)
    received.write_bytes(b"DICM")
    own_dropin = tmp_path / "etc/systemd/system/radnode.service.d/override.conf"
    own_dropin.write_text("[Service]\nMemoryMax=64G\n")

    runner = RecordingRunner(tmp_path)
    execute(plan_uninstall(options(tmp_path)), tmp_path, runner=runner)
    assert runner.commands == [["systemctl", f"--root={tmp_path}", "disable", "radnode.service"]]
    assert not (tmp_path / "etc/systemd/system/radnode.service").exists()
    assert not (tmp_path / "etc/systemd/system/radnode.service.d/gpu.conf").exists()
    assert own_dropin.exists(), "the administrator's drop-in must stay"
    assert received.read_bytes() == b"DICM" and (tmp_path / "etc/radnode/radnode.yaml").exists()

    runner = RecordingRunner(tmp_path)
    execute(plan_uninstall(options(tmp_path), purge=True), tmp_path, runner=runner)
    for gone in ("var/lib/radnode", "etc/radnode", "etc/systemd/system/radnode.service.d", "etc/sysusers.d/radnode.conf", "etc/tmpfiles.d/radnode.conf"):
        assert not (tmp_path / gone).exists(), gone
    assert runner.commands[-1] == ["userdel", f"--prefix={tmp_path}", "radnode"]
    plan = plan_uninstall(options(Path("/")))
    assert [list(a.argv) for a in plan if hasattr(a, "argv")] == [
        ["systemctl", "disable", "--now", "radnode.service"],
        ["systemctl", "daemon-reload"],
    ]


def test_install_with_the_real_systemd_tools_confined_to_a_root_folder(tmp_path: Path) -> None:
    for tool in ("systemd-sysusers", "systemd-tmpfiles", "systemctl"):
        assert shutil.which(tool), f"{tool} missing (Debian package systemd)"
    assert os.geteuid() == 0, "setting owners in the root folder needs root, as a real install does"
    with pytest.raises(KeyError):
        pwd.getpwnam("radnode")  # precondition: the machine itself has no such user
    root = tmp_path / "root"
    root.mkdir()
    execute(plan_install(options(root)), root, runner=subprocess_runner)

    passwd = (root / "etc/passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("radnode:"))
    uid, gid, home, shell = int(entry[2]), int(entry[3]), entry[5], entry[6]
    assert home == "/var/lib/radnode" and shell == "/usr/sbin/nologin" and uid < 1000
    data = (root / "var/lib/radnode").stat()
    assert (data.st_uid, data.st_gid) == (uid, gid)
    for path in ("etc/radnode", "etc/radnode/tls", "etc/radnode/radnode.yaml"):
        st = (root / path).stat()
        assert (st.st_uid, st.st_gid) == (0, gid), path
    wants = root / "etc/systemd/system/multi-user.target.wants/radnode.service"
    assert wants.is_symlink() and os.readlink(wants).endswith("/etc/systemd/system/radnode.service")
    with pytest.raises(KeyError):
        pwd.getpwnam("radnode")  # the machine's /etc/passwd was not touched

    # A second install is a no-op for the user and keeps the configuration.
    (root / "etc/radnode/radnode.yaml").write_text("node:\n  port: 11113\n")
    execute(plan_install(options(root)), root, runner=subprocess_runner)
    assert (root / "etc/radnode/radnode.yaml").read_text() == "node:\n  port: 11113\n"
    assert sum(line.startswith("radnode:") for line in (root / "etc/passwd").read_text().splitlines()) == 1

    execute(plan_uninstall(options(root)), root, runner=subprocess_runner)
    assert not wants.exists() and not wants.is_symlink()


def test_cli_commands(tmp_path: Path) -> None:
    from radnode.cli import systemd_cmd
    from radnode.cli.main import app

    if "install-systemd" not in {c.name for c in app.registered_commands}:
        systemd_cmd.register(app)
    cli = CliRunner()
    result = cli.invoke(app, ["install-systemd", "--root", str(tmp_path), "--exec-start", str(EXEC), "--gpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would write /etc/systemd/system/radnode.service.d/gpu.conf" in result.output
    assert list(tmp_path.iterdir()) == []
    result = cli.invoke(app, ["install-systemd", "--root", str(tmp_path), "--exec-start", "/home/me/bin/radnode"])
    assert result.exit_code == 1 and "ProtectHome" in result.output
    result = cli.invoke(app, ["install-systemd", "--root", str(tmp_path), "--exec-start", str(EXEC), "--memory-max", "huge", "--dry-run"])
    assert result.exit_code == 1 and "--memory-max" in result.output
    result = cli.invoke(app, ["uninstall-systemd", "--root", str(tmp_path), "--purge", "--dry-run"])
    assert result.exit_code == 0 and "would remove tree /var/lib/radnode" in result.output


def test_installed_configuration_starts_strict_and_says_why_it_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The configuration install-systemd writes refuses every calling AE until the operator
    lists them, and says so at start (``make run``'s defaults stay open, with their warning)."""
    from node_support import echoscu, free_port

    from radnode.node.scp import StorageNode

    root = tmp_path / "root"
    root.mkdir()
    execute(plan_install(options(root)), root, runner=RecordingRunner(root))
    settings = load_settings(root / "etc/radnode/radnode.yaml")
    assert settings.node.strict and settings.node.allowed_calling_aes == []
    settings.node.host = "127.0.0.1"
    settings.node.port = free_port()
    settings.storage.data_dir = tmp_path / "data"
    settings.storage.min_free_gb = 0.01
    settings.metrics.enabled = False
    node = StorageNode(settings)
    with caplog.at_level("WARNING", logger="radnode.node.scp"):
        node.start()
    try:
        assert echoscu(node.port, aet="CT_SCANNER_1").returncode != 0
        assert echoscu(node.port, aet="ANYONE").returncode != 0
    finally:
        node.stop(grace_seconds=5)
    assert any("EVERY association is refused" in r.getMessage() for r in caplog.records)
    assert not any("open node" in r.getMessage() for r in caplog.records)
