"""Configuration: YAML + environment layering, and errors that name key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from radnode.cli import app
from radnode.config import ConfigError, load_settings


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not see an operator's RADNODE_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("RADNODE_") and name != "RADNODE_SHARED_DATA":
            monkeypatch.delenv(name)


def test_embedded_defaults_are_what_make_run_documents() -> None:
    settings = load_settings(None)
    assert settings.node.ae_title == "RADNODE"
    assert settings.node.port == 11112
    assert settings.storage.data_dir == Path("radnode-data")
    assert settings.series.quiet_seconds == 60
    assert settings.node.strict is False


def test_yaml_values_are_read(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {
            "node": {"ae_title": "LUNGNODE", "port": 11200, "allowed_calling_aes": ["PACS", "CT1"]},
            "destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104, "objects": ["RTSTRUCT"]}],
        },
    )
    settings = load_settings(cfg)
    assert settings.node.ae_title == "LUNGNODE"
    assert settings.node.allowed_calling_aes == ["PACS", "CT1"]
    assert [o.value for o in settings.destination("tps").objects] == ["RTSTRUCT"]


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"node": {"port": 11200}, "series": {"quiet_seconds": 30}})
    monkeypatch.setenv("RADNODE_NODE__PORT", "11113")
    monkeypatch.setenv("RADNODE_SERIES__QUIET_SECONDS", "3")
    settings = load_settings(cfg)
    assert settings.node.port == 11113
    assert settings.series.quiet_seconds == 3


def test_config_file_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"node": {"ae_title": "FROMENV"}})
    monkeypatch.setenv("RADNODE_CONFIG", str(cfg))
    assert load_settings(None).node.ae_title == "FROMENV"


def test_bad_values_name_key_value_allowed_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node:\n  port: 70000\n  ae_title: WAY_TOO_LONG_AE_TITLE_X\nseries:\n  quite_seconds: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    problems = {p.key: p for p in caught.value.problems}
    assert set(problems) == {"node.port", "node.ae_title", "series.quite_seconds"}
    assert problems["node.port"].value == 70000
    assert problems["node.port"].line == 2
    assert "65535" in problems["node.port"].allowed
    assert problems["node.ae_title"].line == 3
    assert "1-16" in problems["node.ae_title"].allowed
    assert "unknown key" in problems["series.quite_seconds"].allowed
    assert "node.port = 70000 (line 2)" in str(caught.value)


def test_cross_section_rules_are_checked(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {"routing": [{"name": "fw", "action": "forward", "destinations": ["nowhere"]}]},
    )
    with pytest.raises(ConfigError, match="unknown destinations"):
        load_settings(cfg)
    cfg = write_yaml(tmp_path / "c2.yaml", {"series": {"quiet_seconds": 100, "force_seconds": 10}})
    with pytest.raises(ConfigError, match="force_seconds"):
        load_settings(cfg)
    cfg = write_yaml(tmp_path / "c3.yaml", {"sweep": {"enabled": True}})
    with pytest.raises(ConfigError, match="pacs"):
        load_settings(cfg)


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("node:\n  port: 1\n   ae_title: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert caught.value.problems[0].line is not None
    assert "YAML" in caught.value.problems[0].allowed


def test_bad_environment_value_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"node\.port = 'not-a-port'"):
        load_settings(None)


def test_cli_show_prints_effective_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADNODE_NODE__PORT", "11999")
    result = CliRunner().invoke(app, ["config", "show", "--plain"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["node"]["port"] == 11999
    assert shown["node"]["ae_title"] == "RADNODE"
    # What `show` prints must load back to the same settings.
    assert load_settings(None).model_dump(mode="json") == shown


def test_cli_check_accepts_good_and_rejects_bad(tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "good.yaml", {"node": {"port": 11113}})
    bad = write_yaml(tmp_path / "bad.yaml", {"node": {"port": 0}})
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", str(good)])
    assert ok.exit_code == 0 and "valid" in ok.stdout
    ko = runner.invoke(app, ["config", "check", str(bad)])
    assert ko.exit_code == 2
    assert "node.port = 0" in ko.output
    missing = runner.invoke(app, ["config", "check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_cli_check_warns_about_an_open_or_shut_node(tmp_path: Path) -> None:
    runner = CliRunner()
    default = runner.invoke(app, ["config", "check", str(write_yaml(tmp_path / "default.yaml", {}))])
    assert default.exit_code == 0 and "valid" in default.stdout
    assert "open node: listening on every interface (0.0.0.0) and accepting ANY calling AE title" in default.output
    strict = {"node": {"host": "10.0.0.5", "strict": True, "allowed_calling_aes": ["CT1"]}}
    closed = runner.invoke(app, ["config", "check", str(write_yaml(tmp_path / "strict.yaml", strict))])
    assert closed.exit_code == 0 and "warning" not in closed.output
    shut = runner.invoke(app, ["config", "check", str(write_yaml(tmp_path / "shut.yaml", {"node": {"strict": True}}))])
    assert shut.exit_code == 0 and "EVERY association is refused" in shut.output and "open node" not in shut.output


def test_global_config_option_is_used(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"node": {"ae_title": "OPTNODE"}})
    result = CliRunner().invoke(app, ["--config", str(cfg), "config", "show", "--plain"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["node"]["ae_title"] == "OPTNODE"
