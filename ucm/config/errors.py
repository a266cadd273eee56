"""One error type for every bad config, naming the file and the key."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A config was rejected. The message names the source (file or 'inline') and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.detail = message
        super().__init__(f"{source}: key '{key}': {message}")


def _loc_to_key(loc: tuple) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += ("." if key else "") + str(part)
    return key or "<root>"


def from_validation_error(source: str, err: ValidationError, prefix: str = "") -> ConfigError:
    """Turn pydantic's report into a ConfigError about the first offending key."""
    first = err.errors()[0]
    key = _loc_to_key(tuple(first.get("loc", ())))
    cause = (first.get("ctx") or {}).get("error")
    if key == "<root>" and getattr(cause, "key", None):  # a cross-field check names its key
        key = cause.key
    if prefix:
        key = f"{prefix}.{key}" if key != "<root>" else prefix
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key (not part of the schema; check its spelling)"
    elif "input" in first and first.get("type") != "missing":
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    return ConfigError(source, key, msg)
