"""systemd notifications over a real ``AF_UNIX`` datagram socket (what systemd listens on),
the SIGHUP configuration reload, and ``radnode serve`` as systemd runs it: READY=1 once
it listens, watchdog pings, reload without dropping an association, STOPPING=1 and exit 0
on SIGTERM."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from radnode.config import Settings, load_settings
from radnode.service import (
    SystemdNotifier,
    liveness_from_health,
    reload_settings,
    watchdog_interval,
)

#: AF_UNIX socket paths are limited to 108 bytes (sun_path).
MAX_SOCKET_PATH = 100


class NotifyListener:
    """Plays systemd's side: a bound datagram socket that records every message."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []

    @property
    def env_value(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float, value: str = "1") -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(deadline - time.monotonic())
            if fields is not None and fields.get(key) == value:
                return self.messages[-1]
        raise AssertionError(f"no {key}={value} within {timeout}s; received {[m for _, m in self.messages]}")

    def collect(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


def _socket_path(tmp_path: Path) -> str:
    path = tmp_path / "notify.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        path = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp")) / "notify.sock"
    return str(path)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(_socket_path(tmp_path))
    yield sock
    sock.close()


def pings(messages: list[tuple[float, dict[str, str]]]) -> list[float]:
    return [t for t, fields in messages if fields.get("WATCHDOG") == "1"]


# --- the protocol ----------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_noop() -> None:
    env = {"WATCHDOG_USEC": "1000000"}
    notifier = SystemdNotifier.from_environment(env)
    assert not notifier.enabled and notifier.watchdog_seconds is None
    assert notifier.ready("x") is False and notifier.status("y") is False and notifier.stopping() is False
    assert not any(t.name == "radnode-watchdog" for t in threading.enumerate())
    notifier.close()


def test_ready_status_and_stopping_arrive_and_environment_is_unset(listener: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": listener.env_value, "OTHER": "kept"}
    notifier = SystemdNotifier.from_environment(env)
    assert env == {"OTHER": "kept"}, "NOTIFY_SOCKET must not reach the job processes"
    assert notifier.ready("RADNODE listening on 0.0.0.0:11112")
    assert listener.receive(2) == {"READY": "1", "STATUS": "RADNODE listening on 0.0.0.0:11112"}
    assert notifier.status("3 jobs\nqueued")
    assert listener.receive(2) == {"STATUS": "3 jobs queued"}
    assert notifier.extend_timeout(2.5)
    assert listener.receive(2) == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert notifier.reloading()
    reloading = listener.receive(2)
    assert reloading is not None and reloading["RELOADING"] == "1"
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 5
    assert notifier.stopping()
    assert listener.receive(2) == {"STOPPING": "1", "STATUS": "stopping"}
    notifier.close()
    with pytest.raises(ValueError, match="KEY=VALUE"):
        SystemdNotifier(listener.env_value).notify("READY")


def test_abstract_namespace_socket() -> None:
    sock = NotifyListener(b"\0radnode-test-" + uuid.uuid4().hex.encode())
    try:
        notifier = SystemdNotifier(sock.env_value)
        assert notifier.ready()
        assert sock.receive(2) == {"READY": "1"}
        notifier.close()
    finally:
        sock.close()


def test_unsupported_address_and_send_failures_do_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert not SystemdNotifier("vsock:2:1234").enabled
    assert "NOTIFY_SOCKET" in caplog.text
    # Nobody listens on this path: the send fails, is logged, and returns False.
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.WARNING):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert "sd_notify READY failed" in caplog.text
    failures = [r for r in caplog.records if "failed" in r.getMessage() and "sd_notify" in r.getMessage()]
    assert len(failures) == 1, "one warning per outage, not one per ping"
    notifier.close()


def test_watchdog_interval_follows_watchdog_usec_and_pid() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_watchdog_pings_at_half_the_timeout_only_while_alive(listener: NotifyListener) -> None:
    usec = 300_000  # pings expected every 0.15 s
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": str(usec)})
    alive = threading.Event()
    alive.set()
    notifier.ready("up", liveness=alive.is_set)
    listener.wait_for("READY", 2)
    healthy = pings(listener.collect(1.2))
    gaps = [b - a for a, b in itertools.pairwise(healthy)]
    assert len(healthy) >= 5, f"only {len(healthy)} pings in 1.2 s"
    assert 0.12 <= statistics.median(gaps) <= 0.25, gaps

    alive.clear()
    listener.collect(0.2)  # a ping already under way may still arrive
    assert pings(listener.collect(0.6)) == [], "pinged while the node reported not alive"
    alive.set()
    assert len(pings(listener.collect(0.5))) >= 2, "pings did not resume"

    notifier.stopping()
    listener.wait_for("STOPPING", 2)
    assert pings(listener.collect(0.5)) == [], "pinged after STOPPING=1"
    notifier.close()


def test_liveness_ignores_disk_space_but_not_the_listener_or_pipeline() -> None:
    state = {"listening": True, "disk_ok": False, "free_bytes": 0, "pipeline": {"ok": True, "jobs": {}}}
    alive = liveness_from_health(lambda: (False, state))
    assert alive(), "a full disk must not make systemd restart the node"
    state["pipeline"] = {"ok": False}
    assert not alive()
    state["pipeline"] = {"ok": True}
    state["listening"] = False
    assert not alive()


def test_a_stalled_scheduler_does_not_stop_the_listeners_watchdog(tmp_path: Path, listener: NotifyListener) -> None:
    """The wiring ``radnode serve`` uses: the watchdog follows the listener's own health;
    a pipeline part that stalls shows in /healthz but never gets the listener restarted."""
    from radnode.cli.serve_cmd import watchdog_liveness
    from radnode.node.scp import StorageNode
    from radnode.pipeline.service import PipelineService

    settings = Settings.model_validate(
        {
            "node": {"host": "127.0.0.1", "port": _free_port(), "strict": False},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_gb": 0.01},
            "metrics": {"enabled": False},
            "dashboard": {"enabled": False},
        }
    )
    node = StorageNode(settings)
    pipeline = PipelineService(settings, completion=node.completion, schedule_completion_checks=False)
    node.add_health_check("pipeline", pipeline.health)
    node.start()
    pipeline.start()
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "300000"})
    try:
        notifier.ready("up", liveness=watchdog_liveness(node, pipeline))
        listener.wait_for("READY", 2)
        assert len(pings(listener.collect(0.6))) >= 2, "no pings while everything is healthy"

        pipeline.scheduler.stop()  # the scheduler stalls; the listener still answers
        healthy, details = node.health()
        assert not healthy and details["pipeline"]["ok"] is False, details
        assert len(pings(listener.collect(0.8))) >= 3, "a stalled scheduler stopped the listener's watchdog"

        node.stop()  # now the listener itself is gone: the pings must stop
        listener.collect(0.2)
        assert pings(listener.collect(0.6)) == [], "pinged after the listener stopped"
    finally:
        notifier.stopping()
        notifier.close()
        pipeline.stop()
        node.stop()


# --- SIGHUP reload ---------------------------------------------------------------------------


def _config(path: Path, data_dir: Path, port: int, destinations: list[dict[str, object]], routing: list[dict[str, object]], level: str = "INFO") -> Path:
    config = {
        "node": {"host": "127.0.0.1", "port": port, "strict": False},
        "storage": {"data_dir": str(data_dir), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120},
        "routing": routing,
        "destinations": destinations,
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
        "logging": {"level": level},
    }
    path.write_text(yaml.safe_dump(config))
    return path


PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11120, "objects": ["SEG", "SR"]}
TPS = {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 11121, "objects": ["RTSTRUCT"]}
FORWARD_CT_TO_PACS = [{"name": "fwd", "match": {"modality": ["CT"]}, "action": "forward", "destinations": ["pacs"]}]
PROCESS_CT_FOR_TPS = [{"name": "proc", "match": {"modality": ["CT"]}, "action": "process", "destinations": ["tps"]}]


def test_reload_swaps_routing_and_destinations_in_the_live_settings(tmp_path: Path) -> None:
    from radnode.node.routing import evaluate
    from radnode.node.series_attributes import SeriesAttributes

    path = _config(tmp_path / "radnode.yaml", tmp_path / "data", 11112, [PACS], FORWARD_CT_TO_PACS)
    live = load_settings(path)
    node_section = live.node
    facts = SeriesAttributes.from_json({"Modality": "CT"}, 100, "SCANNER")
    assert evaluate(live.routing, facts, live.output.uid_root).action == "forward"

    # New rules name a new destination and drop the old one: set one after the other,
    # either order would fail the cross-check; the reload must apply them together.
    _config(path, tmp_path / "data", 11113, [TPS], PROCESS_CT_FOR_TPS, level="DEBUG")
    outcome = reload_settings(live, lambda: load_settings(path))
    assert outcome.ok and set(outcome.applied) == {"routing", "destinations", "logging.level"}
    assert outcome.needs_restart == ("node",), "the port only changes at restart"
    decision = evaluate(live.routing, facts, live.output.uid_root)
    assert decision.action == "process" and live.routing[0].destinations == ["tps"]
    assert live.destination("tps").objects[0].value == "RTSTRUCT"
    with pytest.raises(KeyError):
        live.destination("pacs")
    assert live.node is node_section and live.node.port == 11112
    assert logging.getLogger().level == logging.DEBUG
    assert "restart to apply: node" in outcome.summary()
    logging.getLogger().setLevel(logging.WARNING)


def test_reload_of_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    path = _config(tmp_path / "radnode.yaml", tmp_path / "data", 11112, [PACS], FORWARD_CT_TO_PACS)
    live = load_settings(path)
    before = live.model_dump(mode="json")
    broken = [{"name": "bad", "action": "forward", "destinations": ["nowhere"]}]
    _config(path, tmp_path / "data", 11112, [PACS], broken)
    outcome = reload_settings(live, lambda: load_settings(path))
    assert not outcome.ok and "nowhere" in (outcome.error or "")
    assert outcome.summary().startswith("reload failed")
    assert live.model_dump(mode="json") == before
    assert isinstance(live, Settings)


# --- radnode serve under a (simulated) systemd -----------------------------------------------

#: The real CLI; adds ``serve`` if the application does not list it yet.
CLI = """
from radnode.cli.main import app
from radnode.cli import serve_cmd
if "serve" not in {c.name for c in app.registered_commands}:
    serve_cmd.register(app)
app(prog_name="radnode")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _echo_association(port: int):  # type: ignore[no-untyped-def]
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="SDTEST")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="RADNODE")


def _start_serve(config: Path, listener: NotifyListener, log: Path, watchdog_usec: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, "--config", str(config), "serve"], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def _wait_ready(listener: NotifyListener, log: Path) -> None:
    """Wait for READY=1; a timeout shows the end of the serve log (why it never got ready)."""
    try:
        listener.wait_for("READY", 30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nserve log:\n{log.read_text()[-3000:]}") from None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_serve_reports_ready_pings_and_stops_on_sigterm(tmp_path: Path, listener: NotifyListener) -> None:
    port = _free_port()
    config = _config(tmp_path / "radnode.yaml", tmp_path / "data", port, [], [{"name": "all", "action": "ignore"}])
    log = tmp_path / "serve.log"
    proc = _start_serve(config, listener, log, watchdog_usec=600_000)
    try:
        _wait_ready(listener, log)
        # READY=1 means the listener already accepts associations.
        assoc = _echo_association(port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert len(pings(listener.collect(1.0))) >= 2, "no watchdog pings at WATCHDOG_USEC/2"

        proc.send_signal(signal.SIGTERM)
        stopping_at, _ = listener.wait_for("STOPPING", 10)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
        late = [t for t in pings(listener.messages) if t > stopping_at]
        assert not late, "watchdog pinged after STOPPING=1"
    finally:
        _stop(proc)


def test_serve_reloads_on_sighup_without_dropping_an_association(tmp_path: Path, listener: NotifyListener) -> None:
    port = _free_port()
    config = _config(tmp_path / "radnode.yaml", tmp_path / "data", port, [PACS], FORWARD_CT_TO_PACS)
    log = tmp_path / "serve.log"
    proc = _start_serve(config, listener, log, watchdog_usec=10_000_000)
    try:
        _wait_ready(listener, log)
        assoc = _echo_association(port)
        assert assoc.is_established
        _config(config, tmp_path / "data", port, [TPS], PROCESS_CT_FOR_TPS)
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING", 10)
        _, ready = listener.wait_for("READY", 10)
        assert "routing" in ready.get("STATUS", "") and "destinations" in ready.get("STATUS", ""), ready
        # The association opened before the reload is still usable.
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert proc.poll() is None, "serve exited on SIGHUP"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    finally:
        _stop(proc)
