"""Loading configs from JSON files or dicts, by path or by model name, with errors that name
the file and the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ucm.config.errors import ConfigError, from_validation_error
from ucm.config.model import GSAOnDeviceModelConfig
from ucm.config.sparse import METHODS, MethodConfig

SPARSE_KEY = "ucm_sparse_config"


@dataclass(frozen=True)
class ModelConfigFile:
    """A validated per-model config and where it came from (weights resolve relative to it)."""

    config: GSAOnDeviceModelConfig
    path: Path | None

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "inline"


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "<file>", f"cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "<file>", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def builtin_config_dir() -> Path:
    """Where the shipped per-model JSON files live (package `ucm.model_configs`)."""
    return Path(str(resources.files("ucm.model_configs")))


def list_model_configs() -> list[ModelConfigFile]:
    """Every shipped per-model config, validated, sorted by model name."""
    files = sorted(builtin_config_dir().glob("*.json"))
    return sorted((load_model_config(p) for p in files), key=lambda f: f.config.model_name.lower())


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_model_config(name: str) -> Path:
    """Built-in config file for a model name ('Qwen/Qwen3-4B', 'qwen3-4b', a file stem)."""
    want = _normalise(name.rsplit("/", 1)[-1])
    candidates = {}
    for path in sorted(builtin_config_dir().glob("*.json")):
        data = _read_json(path)
        model_name = data.get("model_name", "") if isinstance(data, dict) else ""
        for alias in (path.stem, model_name, model_name.rsplit("/", 1)[-1]):
            candidates.setdefault(_normalise(alias), path)
    if want in candidates:
        return candidates[want]
    names = sorted({p.stem for p in candidates.values()})
    raise ConfigError(name, "<model>", f"no built-in GSAOnDevice config for this model; known: {', '.join(names)}")


def load_model_config(ref: str | Path | dict) -> ModelConfigFile:
    """A per-model config from a path, a built-in model name, or an inline dict."""
    if isinstance(ref, dict):
        data, path = ref, None
    else:
        p = Path(ref).expanduser()
        path = p if p.suffix == ".json" or p.exists() else find_model_config(str(ref))
        data = _read_json(path)
    source = str(path) if path else "inline"
    if not isinstance(data, dict):
        raise ConfigError(source, "<root>", f"must be a JSON object, got {type(data).__name__}")
    try:
        cfg = GSAOnDeviceModelConfig.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(source, exc) from None
    loaded = ModelConfigFile(cfg, path)
    for key, wpath in cfg.weight_paths(path.parent if path else None).items():
        if not wpath.is_file():
            raise ConfigError(source, key, f"trained hash weight file not found: {wpath}")
    return loaded


def parse_sparse_config(obj: dict | str | Path, source: str | None = None) -> MethodConfig:
    """The one method config in `{"ucm_sparse_config": {METHOD: {...}}}` (or its inner dict).

    Accepts a dict, a JSON string, or a path to a JSON file.
    """
    if isinstance(obj, Path) or (isinstance(obj, str) and not obj.lstrip().startswith("{")):
        source = source or str(obj)
        data = _read_json(Path(obj))
    elif isinstance(obj, str):
        source = source or "inline"
        try:
            data = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise ConfigError(source, "<root>", f"not valid JSON: {exc.msg}") from exc
    else:
        source, data = source or "inline", obj
    prefix = ""
    if isinstance(data, dict) and SPARSE_KEY in data:
        data, prefix = data[SPARSE_KEY], SPARSE_KEY
    key = prefix or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(source, key, f"must be an object like {{\"ESA\": {{...}}}}, got {type(data).__name__}")
    unknown = [k for k in data if k not in METHODS]
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, name, f"unknown sparse method; valid methods: {', '.join(METHODS)}")
    if len(data) != 1:
        raise ConfigError(source, key, f"must name exactly one sparse method, got {len(data)}: {sorted(data)}")
    (method, body), = data.items()
    where = f"{prefix}.{method}" if prefix else method
    if not isinstance(body, dict):
        raise ConfigError(source, where, f"must be an object of settings, got {type(body).__name__}")
    try:
        return METHODS[method].model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(source, exc, where) from None
