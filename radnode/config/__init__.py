"""radnode configuration: one pydantic settings model, loaded from YAML and the environment."""

from radnode.config.loader import (
    CONFIG_ENV_VAR,
    ConfigError,
    ConfigProblem,
    load_settings,
    settings_from_mapping,
    settings_to_yaml,
)
from radnode.config.model import Destination, ResultObject, RoutingRule, RuleMatch, Settings

__all__ = [
    "CONFIG_ENV_VAR",
    "ConfigError",
    "ConfigProblem",
    "Destination",
    "ResultObject",
    "RoutingRule",
    "RuleMatch",
    "Settings",
    "load_settings",
    "settings_from_mapping",
    "settings_to_yaml",
]
