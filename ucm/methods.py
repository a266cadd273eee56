"""The sparse-method registry: the one place that knows which methods exist.

Every method is one `MethodSpec`: its config class (whose `method` class attribute is the name
users write in `{"ucm_sparse_config": {NAME: {...}}}`), its builder, a few flags the
integration and the tools read, and the settings the demo, eval and profile run it with.
Config parsing, `build_sparse_method`, the vLLM connector, the CLI (`demo`, `eval`,
`profile`), tests and benchmarks ask this registry; nothing else spells a method's name.

    register_method(MethodSpec(MyConfig, "my_pkg.my_method:build", strided=True, demo={...}))

Registration is explicit (a call, usually at the bottom of the module that defines the
config class) and idempotent: registering an equal spec again is a no-op, registering a
different spec under a taken name is an error. The builder may be a callable or a
"module:function" path imported on first build, so that the config layer (which parses
configs without importing torch) can know a method whose algorithm imports torch.

Where methods come from, loaded on the first query:
  * `BUILTIN_MODULES`: the modules that register ucm's own methods;
  * the `ucm.methods` entry-point group of installed distributions: an entry point names a
    module whose import registers its methods, or a `MethodSpec` object, or a function that
    registers them. This is how a third-party method reaches vLLM's worker processes;
  * `register_method` from anywhere (e.g. a script before it starts an in-process engine).

This module imports nothing heavy (no torch, no pydantic): `ucm.config` uses it.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

logger = logging.getLogger("ucm.methods")

#: modules whose import registers ucm's built-in methods (light: no torch)
BUILTIN_MODULES: tuple[str, ...] = ("ucm.config.sparse", "ucm.config.quest")
#: entry-point group through which installed distributions add methods
ENTRY_POINT_GROUP = "ucm.methods"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
#: names the tools use for something else ("dense" is the eval's and demo's baseline)
_RESERVED = frozenset({"dense"})


@dataclass(frozen=True)
class DemoRequest:
    """What `ucm demo`, `ucm eval` and `ucm profile` ask a method's config for.

    ratio             the fraction of blocks read per decode step
    workdir           where a method may write files its config names (a per-model JSON copy);
                      None: it must name only existing files
    dense_layers      layers kept dense (empty: the method's own choice)
    retrieval_stride  decode steps between retrievals, for methods with `strided` set
    model             the served model's per-model JSON (a path or a shipped model name), for
                      methods with `model_json` set
    model_config      a per-model JSON that replaces `model` (a path, a name or its data), e.g.
                      one `ucm calibrate` wrote; None: `model`'s shipped one
    copy_layers       the model's measured copying layers (its JSON's `copy_layers`): methods with
                      per-layer groups keep `copy_layer_keys`, methods whose `copy_layer_boost`
                      defaults above 1 `copy_layer_budget_keys` (with `num_layers`), except in
                      `dense_layers` (empty: neither, so an engine runs the served model's own,
                      `ucm.config.copy_layer_defaults`)
    num_layers        the model's layer count (needed with `copy_layers` by the budgets)
    """

    ratio: float
    workdir: Path | None = None
    dense_layers: tuple[int, ...] = ()
    retrieval_stride: int = 1
    model: str = ""
    model_config: str | Path | dict | None = None
    copy_layers: tuple[int, ...] = ()
    num_layers: int = 0


#: tokens per representation in a copying layer (`ucm.copy_layers`); whole blocks elsewhere
COPY_GROUP_TOKENS = 2


def copy_layer_keys(copy_layers: Sequence[int], tokens: int = COPY_GROUP_TOKENS) -> dict[str, Any]:
    """The config keys (ESA, GSA) that give `copy_layers` groups of `tokens` tokens and every other
    layer one representation per block: a copying head reads one key, which a group's mean
    dilutes less the smaller the group (docs/accuracy.md, session 22)."""
    return {
        "blk_repre_inner_token_merge": None,
        "layer_repre_inner_token_merge": {str(layer): tokens for layer in copy_layers},
    }


#: a copying layer's keep ratio as a multiple of the sparse layers' mean (`copy_layer_ratios`): GSA on
#: device's per-model JSONs (`ucm configure`) and the default `copy_layer_boost` of GSA and KVStar;
#: the other sparse layers give up what these take, so the blocks read stay the same. Measured
#: (Qwen2.5-Coder-0.5B, RULER, 25 samples, 38.9% of the blocks read, docs/accuracy.md): GSA on
#: device niah_multikey_3 at 4K 60 -> 76 (dense 72, session 24); GSA niah_multikey_2 at 8K 80 -> 88
#: and KVStar 84 -> 88 (dense 92, session 25)
COPY_RATIO_BOOST = 5 / 3


def copy_layer_ratios(
    num_layers: int, dense: Sequence[int], copy: Sequence[int], ratio: float, boost: float = COPY_RATIO_BOOST
) -> list[float]:
    """Per-layer ratios whose sparse layers average `ratio`: 1 in the `dense` layers, `ratio *
    boost` (at most 1) in the copying layers that are not dense, what is left spread evenly over
    the other sparse layers. The copying layers' share shrinks where it would leave those less than
    a third of `ratio` (a model where most layers copy)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if boost < 1:
        raise ValueError(f"boost must be >= 1, got {boost}")
    for name, layers in (("dense", dense), ("copy", copy)):
        if any(not 0 <= layer < num_layers for layer in layers):
            raise ValueError(f"{name} layers {sorted(layers)} must lie in [0, {num_layers})")
    dense_set = set(dense)
    sparse = [layer for layer in range(num_layers) if layer not in dense_set]
    boosted = sorted(set(copy) - dense_set)
    rest = [layer for layer in sparse if layer not in boosted]
    high = min(1.0, ratio * boost) if rest else ratio
    if rest:  # rest * low + boosted * high = ratio * sparse, with low >= ratio / 3
        high = min(high, (ratio * len(sparse) - ratio / 3 * len(rest)) / max(len(boosted), 1))
    low = (ratio * len(sparse) - high * len(boosted)) / len(rest) if rest else ratio
    out = [1.0] * num_layers
    for layer in boosted:
        out[layer] = round(high, 6)
    for layer in rest:
        out[layer] = round(low, 6)
    return out


def copy_layer_budget_keys(
    num_layers: int, dense: Sequence[int], copy: Sequence[int], ratio: float, boost: float
) -> dict[str, Any]:
    """The config key (windowed methods) that gives the copying layers `boost` times the sparse
    layers' mean ratio `ratio` (`copy_layer_ratios`): `layer_sparse_ratio` for every sparse layer;
    empty where there is nothing to move (boost 1, or no copying layer that is not dense)."""
    dense_set = set(dense)
    if boost == 1 or not set(copy) - dense_set:
        return {}
    ratios = copy_layer_ratios(num_layers, dense, copy, ratio, boost)
    return {"layer_sparse_ratio": {str(layer): r for layer, r in enumerate(ratios) if layer not in dense_set}}


DemoBuilder = Callable[[Any, DemoRequest], dict]


@dataclass(frozen=True)
class MethodSpec:
    """One sparse method.

    config        its config class: a pydantic model (ucm's are `ucm.config.sparse.SparseMethodConfig`
                  subclasses) whose class attribute `method` is the method's name
    builder       `(config, shapes, ctx) -> SparseMethod` (`ctx`: `ucm.sparse.factory.BuildContext`),
                  or its "module:function" path, imported on first use
    description   one line for `--help` and docs
    strided       it retrieves every `retrieval_stride` steps and the demo and eval set that
                  stride (`ucm eval --retrieval-stride`)
    model_json    it reads its settings from a per-model JSON (`ucm configs list`) named by its
                  `config_file` key or found by the served model's name: resolved and checked at
                  engine start, and it keeps that JSON's dense layers
    host_scoring  it scores on the host with the CPU backend outside the batch (CUDA graph)
                  path: the CPU kernels are built at engine start
    demo          the settings the demo, eval and profile run it with: a dict of keys added to
                  the ratio (windowed methods: `sparse_ratio`, and `retrieval_stride` when
                  `strided`, `dense_layers` when given), or a `(config_class, DemoRequest) -> dict`
                  function or its "module:function" path; None: the config's defaults plus the ratio
    """

    config: type
    builder: Callable[..., Any] | str
    description: str = ""
    strided: bool = False
    model_json: bool = False
    host_scoring: bool = False
    demo: Mapping[str, Any] | DemoBuilder | str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.demo, Mapping):  # frozen and hashable-free: a private read-only copy
            object.__setattr__(self, "demo", MappingProxyType(dict(self.demo)))

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def windowed(self) -> bool:
        """Its config has the shared window/ratio keys (`WindowedMethodConfig`): init and local
        windows, `sparse_ratio`, `min_blocks`, `dense_layers`, offload. Read from the config
        class's `windowed` flag: this module sits below `ucm.config` and never imports it."""
        return bool(getattr(self.config, "windowed", False))

    @property
    def takes_copy_groups(self) -> bool:
        """Its config keeps per-layer groups (ESA, GSA): it runs a model's copying layers with
        `copy_layer_keys`."""
        return "layer_repre_inner_token_merge" in getattr(self.config, "model_fields", {})

    @property
    def copy_layer_boost(self) -> float:
        """Its config's default `copy_layer_boost` (1 where it has none): above 1, it runs a model's
        copying layers with a larger share of the budget (`copy_layer_budget_keys`)."""
        field = getattr(self.config, "model_fields", {}).get("copy_layer_boost")
        return 1.0 if field is None else float(field.default)

    @property
    def takes_copy_layers(self) -> bool:
        """It runs a model's measured copying layers differently: with per-layer groups, budgets, or both."""
        return self.takes_copy_groups or self.copy_layer_boost > 1

    def build(self, config: Any, shapes: Any, ctx: Any) -> Any:
        """The ready-to-run `SparseMethod` of a parsed `config` for the model's `shapes`."""
        return _resolve(self.builder)(config, shapes, ctx)

    def demo_config(self, request: DemoRequest) -> dict:
        """The body of `{NAME: body}` the demo, eval and profile run this method with."""
        if self.demo is not None and not isinstance(self.demo, Mapping):
            return _resolve(self.demo)(self.config, request)
        body: dict[str, Any] = dict(self.demo or {})
        fields = getattr(self.config, "model_fields", {})
        if "sparse_ratio" in fields:
            body["sparse_ratio"] = request.ratio
        if self.strided and "retrieval_stride" in fields:
            body["retrieval_stride"] = request.retrieval_stride
        if request.dense_layers and "dense_layers" in fields:
            body["dense_layers"] = list(request.dense_layers)
        copy = [layer for layer in request.copy_layers if layer not in request.dense_layers]
        if copy and self.takes_copy_groups:  # a layer kept dense reads every block: no groups
            body.update(copy_layer_keys(copy))
        if copy and self.copy_layer_boost > 1 and "sparse_ratio" in fields:
            layers, boost = request.num_layers, self.copy_layer_boost
            if layers <= max(copy):
                raise ValueError(f"{self.name}: copy_layers {copy} need the model's layer count, got {layers}")
            body.update(copy_layer_budget_keys(layers, request.dense_layers, copy, request.ratio, boost))
        return body

    def _same(self, other: MethodSpec) -> bool:
        return self == other and _demo_key(self.demo) == _demo_key(other.demo)


def _demo_key(demo: Any) -> Any:
    return dict(demo) if isinstance(demo, Mapping) else demo


def _resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, MethodSpec] = {}
_LOCK = threading.RLock()
_builtins_loaded = False
_plugins_loaded = False


def _load_builtins() -> None:
    """Import the built-in modules once (their imports register ucm's methods)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _LOCK:
        if _builtins_loaded:
            return
        _builtins_loaded = True  # first: those imports call register_method, which comes back here
        try:
            for module in BUILTIN_MODULES:
                importlib.import_module(module)
        except BaseException:
            _builtins_loaded = False
            raise


def _load() -> None:
    """The built-in methods, then the entry points' (once)."""
    global _plugins_loaded
    _load_builtins()
    if _plugins_loaded:
        return
    with _LOCK:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        _load_entry_points()


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # noqa: BLE001 - broken metadata of some distribution: ucm's methods still work
        logger.warning("ucm: cannot read the %r entry points: %s", ENTRY_POINT_GROUP, exc)
        return
    for ep in found:
        try:
            obj = ep.load()
            if isinstance(obj, MethodSpec):
                register_method(obj)
            elif callable(obj) and not isinstance(obj, type):
                obj()
            # a module: importing it registered its methods
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not take every engine down
            logger.warning(
                "ucm: sparse-method plugin %r (%s) failed to load: %s: %s", ep.name, ep.value, type(exc).__name__, exc
            )


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add `spec` under its config's `method` name; returns it. Registering an equal spec again
    is a no-op; another spec under a taken name raises ValueError."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    name = getattr(spec.config, "method", None)
    if not isinstance(name, str) or not _NAME.match(name) or name.lower() in _RESERVED:
        raise ValueError(
            f"{getattr(spec.config, '__name__', spec.config)!r}.method must be a name of letters, "
            f"digits and '_' starting with a letter (not 'dense'), got {name!r}"
        )
    if not callable(getattr(spec.config, "model_validate", None)):
        raise TypeError(f"the config of {name!r} must be a pydantic model class (ucm.config.sparse.SparseMethodConfig)")
    for what, target in (("builder", spec.builder), ("demo", spec.demo)):
        if isinstance(target, str) and (":" not in target or not all(target.partition(":")[::2])):
            raise ValueError(f"{name}: {what} path must be 'module:function', got {target!r}")
    _load_builtins()  # a third party cannot take a built-in's name by registering first
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None:
            if old._same(spec):
                return old
            raise ValueError(
                f"sparse method {name!r} is already registered with another spec "
                f"({old.config.__module__}.{old.config.__qualname__}); pick another name"
            )
        _REGISTRY[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (tests and plugins that registered one for a while); unknown names raise KeyError."""
    _load()
    with _LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"no sparse method {name!r} is registered")
        del _REGISTRY[name]


def find_method(name: str) -> MethodSpec | None:
    """The spec registered as `name`, or None."""
    _load()
    return _REGISTRY.get(name) if isinstance(name, str) else None


def get_method(name: str) -> MethodSpec:
    """The spec registered as `name`; KeyError naming the valid ones otherwise."""
    spec = find_method(name)
    if spec is None:
        raise KeyError(f"unknown sparse method {name!r}; valid methods: {', '.join(method_names())}")
    return spec


def methods(**flags: bool) -> tuple[MethodSpec, ...]:
    """Every registered spec, by name, keeping those whose attributes equal `flags`
    (e.g. `methods(strided=True)`, `methods(model_json=False, windowed=True)`)."""
    _load()
    with _LOCK:
        specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return tuple(s for s in specs if all(getattr(s, k) == v for k, v in flags.items()))


def method_names(**flags: bool) -> tuple[str, ...]:
    """The names of `methods(**flags)`, sorted."""
    return tuple(s.name for s in methods(**flags))


def spec_of(config: Any) -> MethodSpec:
    """The spec of a parsed method config (an instance of a registered config class)."""
    spec = find_method(getattr(type(config), "method", None))
    if spec is None or not isinstance(config, spec.config):
        raise TypeError(
            f"{type(config).__name__} is not the config class of a registered sparse method; "
            f"registered: {', '.join(method_names())}"
        )
    return spec


def base_method(name: str) -> str:
    """The method a result's setting name starts with: "ESA+dense/s4" -> "ESA" (the eval's
    and profile's variants add '+...' and '/...' to the method's name)."""
    return re.split(r"[+/@]", name, maxsplit=1)[0]


def split_method_setting(setting: str) -> list[str]:
    """A benchmark's `METHOD[:RATIO][:KEY=VALUE...]` split at the colons outside a JSON object
    value (`layer_repre_inner_token_merge={"9": 2}` stays one part)."""
    return re.split(r":(?![^{]*})", setting)


def method_key_values(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLIs' `--method-key`) as a dict of method config keys: the value is
    read as JSON (8, true, "x"), else kept as a bare string (rank). ValueError names an item
    without '='."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--method-key {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
