"""A setting's value as its key's type, from YAML or a `section.key=value` override, and the error of a user
mistake in the settings (`thinkless.train.config` holds the keys; it re-exports `ConfigError`)."""

from __future__ import annotations

import typing


class ConfigError(ValueError):
    """A user mistake in the settings: the CLI prints it as one line, without a traceback."""


def coerce(name: str, value, kind):
    """value as `kind` (bool, int, float, str or a list of one of them), or a ConfigError naming the key."""
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return str(value)
