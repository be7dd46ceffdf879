"""The dashboard as ``radnode serve`` runs it: uvicorn on a thread, real sockets, TLS, warnings."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from node_support import free_port
from web_support import PASSWORD, http_login
from radnode.config.loader import settings_from_mapping
from radnode.web.server import DashboardServer, exposure_warning
from radnode.web.users import UserStore



def _settings(data_dir: Path, **dashboard: object):
    return settings_from_mapping(
        {"storage": {"data_dir": str(data_dir)}, "dashboard": {"host": "127.0.0.1", "port": free_port(), **dashboard}}, source="test"
    )


def test_serves_pages_static_files_and_api_on_a_real_socket(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    UserStore(tmp_path / "data").add("op", "operator", PASSWORD)
    server = DashboardServer(settings, health=lambda: (True, {"listening": True}))
    server.start()
    try:
        base = server.url
        assert base.startswith("http://127.0.0.1:") and server.port > 0
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(base + "api/overview", timeout=10)
        assert denied.value.code == 401
        for asset in ("static/dashboard.css", "static/dashboard.js"):
            with urllib.request.urlopen(base + asset, timeout=10) as response:
                assert response.status == 200 and len(response.read()) > 100
        opener = http_login(base, "op")
        overview = opener.open(base + "api/overview", timeout=10).read().decode()
        assert '"healthy": true' in overview  # the live node's health check, not the data folder
        assert "Overview" in opener.open(base, timeout=10).read().decode()
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_a_busy_port_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        server = DashboardServer(_settings(tmp_path / "data", port=busy.getsockname()[1]))
        with pytest.raises(OSError):
            server.start()


def test_warns_when_reachable_from_the_network_without_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert exposure_warning(_settings(tmp_path, host="127.0.0.1")) is None
    assert exposure_warning(_settings(tmp_path, host="::1")) is None
    assert exposure_warning(_settings(tmp_path, host="localhost")) is None
    warning = exposure_warning(_settings(tmp_path, host="0.0.0.0"))
    assert warning is not None and "without TLS" in warning
    tls = {"enabled": True, "cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}
    assert exposure_warning(_settings(tmp_path, host="0.0.0.0", tls=tls)) is None
    server = DashboardServer(_settings(tmp_path / "data", host="0.0.0.0"))
    with caplog.at_level(logging.WARNING, logger="radnode.web"):
        server.start()
    server.stop()
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_serves_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "srv.crt", tmp_path / "srv.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    settings = _settings(tmp_path / "data", tls={"enabled": True, "cert_file": str(cert), "key_file": str(key)})
    UserStore(tmp_path / "data").add("op", "operator", PASSWORD)
    server = DashboardServer(settings)
    server.start()
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        opener = http_login(server.url, "op", context=context)
        me = opener.open(server.url + "api/me", timeout=10).read().decode()
        assert '"role": "operator"' in me
        with pytest.raises(OSError):  # plain HTTP gets no answer (URLError or a closed connection)
            urllib.request.urlopen(server.url.replace("https", "http") + "login", timeout=5)
    finally:
        server.stop()


def test_config_check_warns_about_a_dashboard_open_to_the_network(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from radnode.cli import app

    quiet = {"node": {"host": "10.0.0.5", "strict": True, "allowed_calling_aes": ["CT1"]}}
    for dashboard, warned in (({}, False), ({"host": "0.0.0.0"}, True), ({"host": "0.0.0.0", "enabled": False}, False)):
        path = tmp_path / "radnode.yaml"
        path.write_text(yaml.safe_dump({**quiet, "dashboard": dashboard}))
        result = CliRunner().invoke(app, ["config", "check", str(path)])
        assert result.exit_code == 0 and ("dashboard bound to 0.0.0.0:8110 without TLS" in result.output) is warned, dashboard
