"""The worker's systemd unit (``radnode-worker@.service``), checked with systemd's own tools:
it verifies, stays within the node's exposure target (also with the GPU drop-in), keeps the
node's sandbox, and starts what ``radnode worker`` accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_systemd_units import EXPOSURE_LINE, MAX_EXPOSURE, SYSTEMD_DIR, UNIT, install_unit, run_analyze, unit_settings

WORKER_UNIT = SYSTEMD_DIR / "radnode-worker@.service"
INSTANCE = "radnode-worker@cpu.service"


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    return install_unit(tmp_path, WORKER_UNIT)


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_analyze(unit_dir, INSTANCE, *args)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_worker_unit_verifies_and_stays_within_the_exposure_target(unit_dir: Path, gpu: bool) -> None:
    if gpu:
        dropins = unit_dir / "radnode-worker@.service.d"
        dropins.mkdir()
        (dropins / "gpu.conf").write_text((SYSTEMD_DIR / "dropins" / "gpu.conf").read_text())
    verify = analyze(unit_dir, "verify")
    complaints = [line for line in verify.stderr.splitlines() if "radnode" in line]
    assert verify.returncode == 0 and not complaints, verify.stderr
    report = analyze(unit_dir, "security", "--offline=true", "--no-pager")
    match = EXPOSURE_LINE.search(report.stdout)
    assert match, report.stdout + report.stderr
    print(f"systemd-analyze security {INSTANCE} [{'gpu' if gpu else 'cpu'}]: exposure {match.group(1)}")
    assert float(match.group(1)) <= MAX_EXPOSURE, report.stdout


def test_worker_unit_keeps_the_nodes_sandbox_and_runs_radnode_worker() -> None:
    node = unit_settings(UNIT.read_text())
    worker = unit_settings(WORKER_UNIT.read_text())
    sandbox = [k for k in node if re.match(r"(Protect|Private|Restrict|SystemCall|Capability|NoNewPrivileges|LockPersonality|RemoveIPC|UMask)", k)]
    assert len(sandbox) > 15
    for key in sandbox:
        assert worker.get(key) == node[key], f"{key}: worker {worker.get(key)} != node {node[key]}"
    (exec_start,) = worker["ExecStart"]
    args = exec_start.split()[1:]
    assert args[:1] == ["worker"] and "%i" in exec_start and "--scratch" in args
    scratch = args[args.index("--scratch") + 1]
    assert worker["ReadWritePaths"] == [scratch] and worker["StateDirectory"] == ["radnode-worker/%i"]
    # the command line parses (an unknown option would exit 2 before anything runs)
    help_text = subprocess.run([sys.executable, "-m", "radnode", "worker", "--help"], capture_output=True, text=True, timeout=60).stdout
    for option in [a for a in args if a.startswith("--")]:
        assert option in help_text


def test_install_systemd_with_worker_installs_the_template_and_uninstall_removes_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from radnode.cli import systemd_cmd
    from radnode.cli.main import app
    from radnode.service.install import execute, file_mode, plan_install, plan_uninstall
    from test_install_systemd import EXEC, RecordingRunner, options

    installed = tmp_path / "root" / "etc/systemd/system" / WORKER_UNIT.name
    root = installed.parents[3]
    root.mkdir()
    execute(plan_install(options(root)), root, runner=RecordingRunner(root))
    assert not installed.exists()  # only when asked

    runner = RecordingRunner(root)
    execute(plan_install(options(root, worker=True, gpu=True)), root, runner=runner)
    assert file_mode(installed) == 0o644
    assert f"\nExecStart={EXEC} worker --queues %i " in installed.read_text()
    assert installed.read_text().replace(f"ExecStart={EXEC}", "X") == WORKER_UNIT.read_text().replace(
        "ExecStart=/opt/radnode/.venv/bin/radnode", "X"
    )
    gpu = installed.parent / f"{WORKER_UNIT.name}.d" / "gpu.conf"
    assert gpu.read_text() == (SYSTEMD_DIR / "dropins" / "gpu.conf").read_text()
    # A template has no instance to enable: only the node's unit is enabled.
    assert [c for c in runner.commands if c[0] == "systemctl"] == [["systemctl", f"--root={root}", "enable", "radnode.service"]]

    execute(plan_uninstall(options(root)), root, runner=RecordingRunner(root))
    assert not installed.exists() and not gpu.parent.exists()

    if "install-systemd" not in {c.name for c in app.registered_commands}:
        systemd_cmd.register(app)
    result = CliRunner().invoke(app, ["install-systemd", "--root", str(tmp_path / "cli"), "--exec-start", str(EXEC), "--worker", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"would write /etc/systemd/system/{WORKER_UNIT.name} (0644)" in result.output
