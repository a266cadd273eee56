"""Loading configs from JSON files or dicts, by path or by model name, with errors that name
the file and the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ucm.config.errors import ConfigError, _loc_to_key, from_validation_error
from ucm.config.model import GSAOnDeviceModelConfig
from ucm.config.sparse import MethodConfig
from ucm.methods import find_method, method_names

SPARSE_KEY = "ucm_sparse_config"


@dataclass(frozen=True)
class ModelConfigFile:
    """A validated per-model config and where it came from (weights resolve relative to it)."""

    config: GSAOnDeviceModelConfig
    path: Path | None
    #: where it came from, as the engine logs it: "built-in <file>", "file <path>", or the generic
    #: fallback's line (`ucm.config.fallback`); "" where nobody resolved it for a served model
    origin: str = ""

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "inline"

    def check_layers(self, num_layers: int) -> ModelConfigFile:
        """Itself, if it describes a model of `num_layers` layers (the served one); else ConfigError."""
        if self.config.num_hidden_layers != num_layers:
            raise ConfigError(
                self.source,
                "num_hidden_layers",
                f"{self.config.num_hidden_layers} but the served model has {num_layers}",
            )
        return self

    def describe(self) -> str:
        """`origin`, else "built-in <file>" / "file <path>" / "inline" from the path."""
        if self.origin:
            return self.origin
        if self.path is None:
            return "inline"
        return f"built-in {self.path.name}" if is_builtin(self.path) else f"file {self.path}"


class _DuplicateKey(ValueError):
    """A JSON object repeats a key; json.loads would silently keep the last value."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _LongInteger:
    """A JSON integer past Python's default limit for int() (4300 digits). Kept as a marker, not
    converted (int() would refuse with no word of the key), and reported under its key."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


_MAX_INT_DIGITS = 4300  # Python's default int/str conversion limit (sys.get_int_max_str_digits)


def _parse_int(text: str) -> int | _LongInteger:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= _MAX_INT_DIGITS else _LongInteger(digits)


def _find_long_integer(data: Any) -> tuple[tuple, _LongInteger] | None:
    """Where the first over-long integer sits in parsed JSON (a pydantic-style location)."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, _LongInteger):
            return loc, value
        if isinstance(value, dict):
            stack.extend(reversed([((*loc, k), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([((*loc, i), v) for i, v in enumerate(value)]))
    return None


def _parse_json(text: str, source: str, where: str = "<file>") -> Any:
    """json.loads, but every failure (bad syntax, repeated key, absurd nesting, an integer too
    long to read) is a ConfigError."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, where, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _DuplicateKey as exc:
        raise ConfigError(source, exc.key, "appears more than once in the same object") from None
    except RecursionError:
        raise ConfigError(source, where, "not valid JSON: nested too deeply") from None
    except ValueError as exc:  # any other refusal of the decoder
        raise ConfigError(source, where, f"not valid JSON: {exc}") from None
    found = _find_long_integer(data)
    if found is not None:
        loc, long_int = found
        raise ConfigError(
            source,
            _loc_to_key(loc) if loc else where,
            f"not valid JSON here: an integer of {long_int.digits} digits (at most {_MAX_INT_DIGITS} "
            "are read, and every bound is far below that)",
        )
    return data


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "<file>", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "<file>", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # e.g. an embedded NUL byte in the path
        raise ConfigError(str(path), "<file>", f"cannot read: {exc}") from None
    return _parse_json(text, str(path))


def builtin_config_dir() -> Path:
    """Where the shipped per-model JSON files live (package `ucm.model_configs`)."""
    return Path(str(resources.files("ucm.model_configs")))


def is_builtin(path: Path) -> bool:
    """Whether `path` is one of the shipped per-model configs."""
    try:
        return path.resolve().parent == builtin_config_dir().resolve()
    except OSError:
        return False


def list_model_configs() -> list[ModelConfigFile]:
    """Every shipped per-model config, validated, sorted by model name."""
    files = sorted(builtin_config_dir().glob("*.json"))
    return sorted((load_model_config(p) for p in files), key=lambda f: f.config.model_name.lower())


def file_stem(name: str) -> str:
    """A file stem from a model name: 'Qwen2.5-Coder-0.5B-Instruct' -> 'qwen2_5_coder_0_5b_instruct'
    (a HF id's organisation left out)."""
    out = "".join(ch if ch.isalnum() else "_" for ch in name.rsplit("/", 1)[-1].lower())
    return "_".join(part for part in out.split("_") if part) or "model"


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_model_config(name: str) -> Path:
    """Built-in config file for a model name ('Qwen/Qwen3-4B', 'qwen3-4b', a file stem)."""
    want = _normalise(name.rsplit("/", 1)[-1])
    candidates = {}
    for path in sorted(builtin_config_dir().glob("*.json")):
        data = _read_json(path)
        model_name = data.get("model_name", "") if isinstance(data, dict) else ""
        model_name = model_name if isinstance(model_name, str) else ""
        for alias in (path.stem, model_name, model_name.rsplit("/", 1)[-1]):
            if _normalise(alias):
                candidates.setdefault(_normalise(alias), path)
    if want in candidates:
        return candidates[want]
    names = sorted({p.stem for p in candidates.values()})
    raise ConfigError(
        name or repr(name), "<model>", f"no built-in per-model config for this model; known: {', '.join(names)}"
    )


def _resolve_ref(ref: str | Path) -> Path:
    """A config path: an existing file, a bare shipped file name ('qwen3_4b.json'), or a model name."""
    p = Path(ref)
    try:
        p = p.expanduser()
    except RuntimeError:  # '~user' with an unknown user: keep it literal, reading reports it
        pass
    if p.suffix == ".json" and not _exists(p) and len(p.parts) == 1:
        shipped = builtin_config_dir() / p.name
        if _exists(shipped, file=True):
            return shipped
    if p.suffix == ".json" or _exists(p, file=True):
        return p
    return find_model_config(str(ref))  # a model name, also where a folder of that name exists here


def _exists(p: Path, file: bool = False) -> bool:
    """`p.exists()` / `p.is_file()`, False for a name the OS cannot look up (too long, ...): such a
    reference is then a model name, reported as unknown."""
    try:
        return p.is_file() if file else p.exists()
    except OSError:
        return False


def load_model_config(ref: str | Path | dict) -> ModelConfigFile:
    """A per-model config from a path, a built-in model name, or an inline dict."""
    if isinstance(ref, (str, Path)):
        path: Path | None = _resolve_ref(ref)
        data = _read_json(path)
    else:  # inline data; anything but an object is rejected below with a ConfigError
        data, path = ref, None
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


def model_config_data(ref: str | Path | dict, random_hash: bool = False) -> dict:
    """A per-model config as plain data that loads the same anywhere: trained weight paths are
    made absolute (a copy written elsewhere, or passed inline, must not resolve them against
    another directory). `random_hash` swaps trained projections for random orthogonal ones:
    what GSA on device does for a model nobody calibrated, and the baseline trained W is judged
    against."""
    loaded = load_model_config(ref)
    data = loaded.config.model_dump()
    data.update(
        {
            k: str(p.resolve())
            for k, p in loaded.config.weight_paths(loaded.path.parent if loaded.path else None).items()
        }
    )
    if random_hash:
        data.update(hash_weight_type="random", hash_weight=None, hash_weight_kv_lora=None, hash_weight_qk_rope=None)
    return data


def parse_sparse_config(obj: dict | str | Path, source: str | None = None) -> MethodConfig:
    """The one method config in `{"ucm_sparse_config": {METHOD: {...}}}` (or its inner dict),
    an instance of the config class METHOD is registered with (`ucm.methods`).

    Accepts a dict, a JSON string, or a path to a JSON file.
    """
    if isinstance(obj, Path) or (isinstance(obj, str) and not obj.lstrip().startswith("{")):
        source = source or str(obj)
        data = _read_json(Path(obj))
    elif isinstance(obj, str):
        source = source or "inline"
        data = _parse_json(obj, source, "<root>")
    else:
        source, data = source or "inline", obj
    prefix = ""
    if isinstance(data, dict) and SPARSE_KEY in data:
        data, prefix = data[SPARSE_KEY], SPARSE_KEY
    key = prefix or "<root>"
    if not isinstance(data, dict):
        names = method_names()
        raise ConfigError(
            source,
            key,
            f'must be an object like {{"{names[0]}": {{...}}}} (one of {", ".join(names)}), got {type(data).__name__}',
        )
    unknown = [k for k in data if find_method(k) is None]
    if unknown:
        shown = str(unknown[0]) or '""'  # an empty key must still show
        name = f"{prefix}.{shown}" if prefix else shown
        raise ConfigError(source, name, f"unknown sparse method; valid methods: {', '.join(method_names())}")
    if len(data) != 1:
        raise ConfigError(source, key, f"must name exactly one sparse method, got {len(data)}: {sorted(data)}")
    ((method, body),) = data.items()
    where = f"{prefix}.{method}" if prefix else method
    if not isinstance(body, dict):
        raise ConfigError(source, where, f"must be an object of settings, got {type(body).__name__}")
    try:
        return find_method(method).config.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(source, exc, where) from None


def is_sparse_config(data: Any) -> bool:
    """Whether parsed JSON looks like a method config (`ucm_sparse_config` or one method name)."""
    if not isinstance(data, dict):
        return False
    return SPARSE_KEY in data or (len(data) == 1 and find_method(next(iter(data))) is not None)


def check_config_file(path: str | Path) -> ModelConfigFile | MethodConfig:
    """Validate an existing JSON file of either kind (why: `ucm configs check` takes both)."""
    p = Path(path)
    data = _read_json(p)  # a missing file is an error here, never a fallback to a shipped one
    if is_sparse_config(data):
        return parse_sparse_config(p)
    return load_model_config(p)
