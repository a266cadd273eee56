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


class KeyedValueError(ValueError):
    """A cross-field check in a schema validator failed on `key`: `from_validation_error` names
    that key (pydantic alone would blame the whole object)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def _loc_to_key(loc: tuple) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += ("." if key else "") + (str(part) or '""')  # an empty key must still show
    return key or "<root>"


def _short_repr(value: object, limit: int = 80) -> str:
    """The offending value, cut short so a whole list or object does not flood the message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"  # str() may refuse it
    try:
        text = repr(value)
    except ValueError:  # e.g. an integer inside a list past Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation_error(source: str, err: ValidationError, prefix: str = "") -> ConfigError:
    """Turn pydantic's report into a ConfigError about the first offending key."""
    first = err.errors()[0]
    key = _loc_to_key(tuple(first.get("loc", ())))
    cause = (first.get("ctx") or {}).get("error")
    cross_field = key == "<root>" and bool(getattr(cause, "key", None))
    if cross_field:  # a cross-field check names its key; its input is the whole object: not shown
        key = cause.key
    if prefix:
        key = f"{prefix}.{key}" if key != "<root>" else prefix
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key (not part of the schema; check its spelling)"
    elif first.get("type") == "invalid_key":
        msg = "keys must be strings"
    elif "input" in first and first.get("type") != "missing" and not cross_field:
        msg = f"{msg} (got {_short_repr(first['input'])})"
    msg = msg.removeprefix("Value error, ")
    return ConfigError(source, key, msg)
