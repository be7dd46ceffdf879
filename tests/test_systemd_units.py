"""The systemd unit, its drop-ins and the configuration template, checked with systemd's
own tools (``systemd-analyze verify`` and ``security``), and the unit's sandbox applied
for real to radnode's numerical stack: a seccomp filter with the unit's address families
(and write-xor-execute memory when the unit asks for it), ``/proc`` mounted as the unit
would mount it, and every system call made checked against the unit's
``SystemCallFilter=``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radnode.config import load_settings
from radnode.service.install import DEFAULT_EXEC_START, memory_dropin, render_unit

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "radnode.service"
TEMPLATE = SYSTEMD_DIR / "radnode.yaml.template"
#: The issue's target for ``systemd-analyze security`` (0 = fully sandboxed, 10 = exposed).
MAX_EXPOSURE = 3.0
EXPOSURE_LINE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ")


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def last(settings: dict[str, list[str]], key: str) -> str:
    assert key in settings, f"radnode.service has no {key}="
    return settings[key][-1]


def seconds(value: str) -> float:
    """A systemd time span such as ``90s``, ``5min`` or ``1min 30s`` in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def install_unit(tmp_path: Path, unit: Path) -> Path:
    """A folder holding ``unit`` as installed, with ``ExecStart=`` at a stub (verify wants an executable)."""
    stub = tmp_path / "venv" / "bin" / "radnode"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    folder = tmp_path / "units"
    folder.mkdir()
    (folder / unit.name).write_text(render_unit(unit.read_text(), stub))
    return folder


def run_analyze(unit_dir: Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze ARGS TARGET`` reading units (and their drop-ins) from ``unit_dir`` first."""
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"}
    return subprocess.run(["systemd-analyze", *args, target], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The node's unit as installed."""
    return install_unit(tmp_path, UNIT)


def add_dropin(unit_dir: Path, name: str, text: str) -> None:
    dropins = unit_dir / "radnode.service.d"
    dropins.mkdir(exist_ok=True)
    # An ExecStart= in a drop-in points at the stub too, as install-systemd's would.
    stub = unit_dir.parent / "venv" / "bin" / "radnode"
    (dropins / name).write_text(text.replace("/opt/radnode/.venv/bin/radnode", str(stub)))


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_analyze(unit_dir, str(unit_dir / "radnode.service"), *args)


def exposure(unit_dir: Path) -> tuple[float, str]:
    result = analyze(unit_dir, "security", "--offline=true", "--no-pager")
    match = EXPOSURE_LINE.search(result.stdout)
    assert match, f"no exposure line in systemd-analyze security output:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), result.stdout


def assert_verifies(unit_dir: Path) -> None:
    result = analyze(unit_dir, "verify")
    complaints = [line for line in result.stderr.splitlines() if "radnode" in line]
    assert result.returncode == 0 and not complaints, f"systemd-analyze verify:\n{result.stderr}"


DROPIN_VARIANTS = {
    "base": {},
    "gpu": {"gpu.conf": (SYSTEMD_DIR / "dropins" / "gpu.conf").read_text()},
    "port-104": {"privileged-port.conf": (SYSTEMD_DIR / "dropins" / "privileged-port.conf").read_text()},
    "ip-allow": {"ip-allow.conf": (SYSTEMD_DIR / "dropins" / "ip-allow.conf.example").read_text()},
    "memory": {"memory.conf": memory_dropin("32G")},
    "roles": {"roles.conf": (SYSTEMD_DIR / "dropins" / "roles-listener.conf.example").read_text()},
}


@pytest.mark.parametrize("variant", list(DROPIN_VARIANTS))
def test_unit_and_dropins_verify_and_stay_within_exposure_target(unit_dir: Path, variant: str) -> None:
    for name, text in DROPIN_VARIANTS[variant].items():
        add_dropin(unit_dir, name, text)
    assert_verifies(unit_dir)
    level, report = exposure(unit_dir)
    print(f"systemd-analyze security radnode.service [{variant}]: exposure {level}")
    assert level <= MAX_EXPOSURE, report
    if variant == "base":
        for check in ("PrivateDevices=", "PrivateUsers=", "ProtectSystem=", "NoNewPrivileges=", "SystemCallFilter=~@privileged"):
            assert re.search(rf"✓ {re.escape(check)}", report), f"{check} not satisfied:\n{report}"
    if variant == "gpu":
        assert "✗ PrivateDevices=" in report and "char-nvidia-frontend:rw" in report, report
    if variant == "port-104":
        assert "✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE" in report, report


def test_a_weakened_unit_fails_the_exposure_target(unit_dir: Path) -> None:
    """The exposure check can fail: the same unit without its sandbox is far above 3.0."""
    unit = unit_dir / "radnode.service"
    kept = [line for line in unit.read_text().splitlines() if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability", "NoNewPrivileges", "ReadWritePaths"))]
    unit.write_text("\n".join(kept) + "\n")
    level, _ = exposure(unit_dir)
    assert level > MAX_EXPOSURE


def test_unit_matches_the_node_it_runs(unit_dir: Path) -> None:
    """Settings that must agree with the code and the configuration template."""
    from radnode.cli.serve_cmd import SHUTDOWN_GRACE_SECONDS
    from radnode.pipeline.service import DRAIN_SECONDS
    from radnode.pipeline.child import KILL_GRACE_SECONDS

    unit = unit_settings(UNIT.read_text())
    assert last(unit, "Type") == "notify" and last(unit, "NotifyAccess") == "main"
    assert last(unit, "ExecStart") == f"{DEFAULT_EXEC_START} serve"
    assert last(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(unit, "KillMode") == "mixed", "SIGTERM must reach radnode serve only; it stops its job processes"
    assert last(unit, "Restart") == "on-failure" and last(unit, "User") == "radnode"
    env = dict(item.split("=", 1) for item in unit["Environment"])
    assert env["RADNODE_CONFIG"] == "/etc/radnode/radnode.yaml"
    # Environment variables override the file: the unit must not silently pin a setting.
    assert [k for k in env if k.startswith("RADNODE_") and k != "RADNODE_CONFIG"] == []
    # The template's data folder is the unit's state directory, the only writable path.
    template = load_settings(TEMPLATE)
    state_dir = Path("/var/lib") / last(unit, "StateDirectory")
    assert template.storage.data_dir == state_dir
    assert unit["ReadWritePaths"] == [str(state_dir)]
    # A graceful stop: listener grace, job drain, then the job's kill grace, with margin.
    needed = SHUTDOWN_GRACE_SECONDS + DRAIN_SECONDS + KILL_GRACE_SECONDS
    assert seconds(last(unit, "TimeoutStopSec")) >= needed + 30
    assert 10 <= seconds(last(unit, "WatchdogSec")) <= 600
    assert last(unit, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert last(unit, "CapabilityBoundingSet") == ""
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert last(unit, "UMask") == "0027"


# --- the sandbox applied to the real stack -------------------------------------------------

#: Installs a seccomp filter like the unit's (address families; write-xor-execute memory when
#: MDWE is set), then runs the work the job processes do: torch (oneDNN JIT: conv3d, LSTM),
#: SimpleITK, a spawned child, TCP and AF_UNIX sockets. Prints one JSON line.
PROBE = r'''
import ctypes, errno, json, multiprocessing, os, socket, struct, sys

def seccomp(families, mdwe):
    LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
    ALLOW, EPERM, EAFNO = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.EAFNOSUPPORT
    MMAP, MPROTECT, PKEY_MPROTECT, SOCKET = 9, 10, 329, 41          # x86_64 numbers
    items = [(LD, 0, 0, 4), (JEQ, 0, "allow", 0xC000003E), (LD, 0, 0, 0), (JEQ, "sock", 0, SOCKET)]
    if mdwe:
        items += [(JEQ, "mmap", 0, MMAP), (JEQ, "mprot", 0, MPROTECT), (JEQ, "mprot", 0, PKEY_MPROTECT)]
    items += [(JEQ, "allow", "allow", 0)]
    if mdwe:
        items += ["mmap", (LD, 0, 0, 32), (AND, 0, 0, 6), (JEQ, "eperm", "allow", 6),
                  "mprot", (LD, 0, 0, 32), (AND, 0, 0, 4), (JEQ, "eperm", "allow", 4)]
    items += ["sock", (LD, 0, 0, 16)] + [(JEQ, "allow", 0, f) for f in families] + [(RET, 0, 0, EAFNO)]
    items += ["eperm", (RET, 0, 0, EPERM), "allow", (RET, 0, 0, ALLOW)]
    labels, pc = {}, 0
    for item in items:
        if isinstance(item, str): labels[item] = pc
        else: pc += 1
    code, pc = b"", 0
    for item in items:
        if isinstance(item, str): continue
        op, jt, jf, k = item
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        code += struct.pack("HBBI", op, jt, jf, k); pc += 1
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(code)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0                              # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(Prog(pc, ctypes.cast(buf, ctypes.c_void_p))), 0, 0) == 0, ctypes.get_errno()

def child(conn):
    conn.send(os.getpid()); conn.close()

def main():
    config = json.loads(sys.argv[1])
    if config["sandbox"]:
        seccomp(config["families"], config["mdwe"])
    out = {}
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close(); out["netlink"] = "allowed"
    except OSError as exc:
        out["netlink"] = exc.errno
    import numpy as np, torch, SimpleITK as sitk
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with torch.no_grad():
        torch.nn.Conv3d(1, 4, 3, padding=1)(torch.randn(1, 1, 16, 32, 32))
        torch.nn.LSTM(8, 8)(torch.randn(3, 1, 8))
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(np.random.rand(8, 32, 32).astype("float32")), 1.0)
    listener = socket.create_server(("127.0.0.1", 0)); listener.close()
    socket.getaddrinfo("localhost", 104, type=socket.SOCK_STREAM)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); notify.close()
    ctx = multiprocessing.get_context("spawn"); a, b = ctx.Pipe()
    proc = ctx.Process(target=child, args=(b,)); proc.start(); a.recv(); proc.join(30)
    out["spawned_exit"] = proc.exitcode
    print("PROBE " + json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
'''

FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}


def syscall_groups() -> dict[str, set[str]]:
    """``@group -> members`` from ``systemd-analyze syscall-filter`` (nested groups kept as names)."""
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif line.startswith(" ") and current is not None and not line.strip().startswith("#"):
            current.add(line.strip())
        elif line.startswith("#"):
            current = None
    return groups


def expand(name: str, groups: dict[str, set[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    assert name in groups, f"unknown system call group {name}"
    return set().union(*(expand(member, groups) for member in groups[name]))


def allowed_syscalls(unit: dict[str, list[str]]) -> set[str]:
    """What the unit's ``SystemCallFilter=`` lines allow (allow list, then deny lists)."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for entry in unit["SystemCallFilter"]:
        names = entry.lstrip("~").split()
        members = set().union(*(expand(name, groups) for name in names))
        allowed = allowed - members if entry.startswith("~") else allowed | members
    return allowed


def run_probe(tmp_path: Path, sandbox: bool, unit: dict[str, list[str]]) -> tuple[dict[str, object], set[str]]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    config = {
        "sandbox": sandbox,
        "families": [FAMILIES[f] for f in last(unit, "RestrictAddressFamilies").split()],
        "mdwe": last(unit, "MemoryDenyWriteExecute") in ("yes", "true", "1"),
    }
    trace = tmp_path / ("strace.txt" if sandbox else "strace-plain.txt")
    command = [sys.executable, str(script), json.dumps(config)]
    if sandbox:
        # /proc as the unit mounts it (ProcSubset=, ProtectProc=), in a private pid and mount
        # namespace owned by a user namespace (PrivateUsers=); strace records every system call.
        options = ["subset=pid"] if last(unit, "ProcSubset") == "pid" else []
        if last(unit, "ProtectProc") != "default":
            options.append(f"hidepid={last(unit, 'ProtectProc')}")
        inner = f"mount -t proc -o {','.join(options) or 'defaults'} proc /proc && exec strace -f -qq -c -o {trace} " + " ".join(
            f"'{part}'" for part in command
        )
        command = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "sh", "-c", inner]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, f"probe failed (sandbox={sandbox}):\n{result.stdout}\n{result.stderr[-4000:]}"
    syscalls: set[str] = set()
    if sandbox:
        for row in trace.read_text().splitlines():
            fields = row.split()
            if fields and fields[-1] not in ("syscall", "total") and not fields[-1].startswith("-"):
                syscalls.add(fields[-1])
    return json.loads(lines[0].removeprefix("PROBE ")), syscalls


def test_numerical_stack_runs_inside_the_units_sandbox(tmp_path: Path) -> None:
    """torch, SimpleITK, spawned job processes and sockets work under the unit's
    restrictions, torch keeps its vectorised kernels, and every system call they make is
    in the unit's ``SystemCallFilter=``. (Setting MemoryDenyWriteExecute=yes fails this:
    oneDNN's LSTM cannot create its JIT kernel; ProcSubset=pid drops torch to DEFAULT.)"""
    for tool in ("strace", "unshare"):
        assert shutil.which(tool), f"{tool} is needed for this test (Debian packages strace, util-linux)"
    unit = unit_settings(UNIT.read_text())
    plain, _ = run_probe(tmp_path, sandbox=False, unit=unit)
    boxed, syscalls = run_probe(tmp_path, sandbox=True, unit=unit)
    assert boxed["netlink"] != "allowed", "the seccomp filter did not apply RestrictAddressFamilies"
    assert boxed["spawned_exit"] == 0
    assert boxed["cpu_capability"] == plain["cpu_capability"], "the sandbox changed torch's CPU kernels"
    assert syscalls, "strace recorded no system calls"
    outside = sorted(syscalls - allowed_syscalls(unit))
    assert not outside, f"system calls outside SystemCallFilter= (they would fail with EPERM): {outside}"
