"""Load the settings from YAML and the environment, with errors a person can act on.

pydantic's own messages name the location but not the YAML line and not the rejected
value in a form operators read; :class:`ConfigError` carries one :class:`ConfigProblem`
per bad key with the dotted key, the value, what is allowed and, when the value came from
the file, its line number.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from radnode.config.model import Settings

#: Environment variable naming the YAML file when ``--config`` is not given.
CONFIG_ENV_VAR = "RADNODE_CONFIG"

Location = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigProblem:
    """One invalid setting: where it is, what it was, and what is allowed."""

    key: str
    value: Any
    allowed: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        shown = "<missing>" if self.value is _MISSING else repr(self.value)
        return f"{self.key} = {shown}{where}: {self.allowed}"


class ConfigError(ValueError):
    """The configuration does not validate; ``problems`` lists every bad key."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _yaml_lines(node: yaml.Node, path: Location = ()) -> dict[Location, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    lines: dict[Location, int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            lines.update(_yaml_lines(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_yaml_lines(item, (*path, index)))
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[Location, int]]:
    """Parse a YAML config file, returning its mapping and the line of every key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("<file>", str(path), f"cannot read: {exc.strerror}")]) from exc
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [ConfigProblem("<yaml>", _MISSING, f"not valid YAML: {problem}", line)]) from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [ConfigProblem("<root>", type(data).__name__, "the file must hold a mapping of sections", 1)])
    return data, _yaml_lines(root) if root is not None else {}


def _value_at(data: Mapping[str, Any], loc: Location) -> Any:
    current: Any = data
    for part in loc:
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return current


def _problems(error: ValidationError, data: Mapping[str, Any], lines: Mapping[Location, int]) -> list[ConfigProblem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        value = item.get("input", _MISSING) if item["type"] != "missing" else _MISSING
        if isinstance(value, dict) and loc and _value_at(data, loc) is _MISSING:
            value = _MISSING
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see `radnode config show`)"
        key = ".".join(str(p) for p in loc) or "<root>"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        problems.append(ConfigProblem(key, value, message, line))
    return problems


def settings_from_mapping(data: Mapping[str, Any], source: str = "<mapping>", lines: Mapping[Location, int] | None = None) -> Settings:
    """Validate a mapping (plus environment overrides) into :class:`Settings`."""
    try:
        return Settings(**dict(data))
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc, data, lines or {})) from None


def load_settings(path: Path | str | None = None) -> Settings:
    """Load the effective settings.

    Parameters
    ----------
    path
        YAML file; when ``None`` the file named by ``RADNODE_CONFIG`` is used, and when
        that is unset too, the embedded defaults.

    Raises
    ------
    ConfigError
        When the file cannot be read or parsed, or any value does not validate.
    """
    if path is None:
        env_path = os.environ.get(CONFIG_ENV_VAR)
        path = Path(env_path) if env_path else None
    if path is None:
        return settings_from_mapping({}, source="defaults and environment")
    path = Path(path)
    data, lines = read_yaml(path)
    return settings_from_mapping(data, source=str(path), lines=lines)


def settings_to_yaml(settings: Settings) -> str:
    """Render settings as YAML in the same shape :func:`load_settings` reads."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
