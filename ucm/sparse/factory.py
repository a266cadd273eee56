"""Build a ready-to-run `SparseMethod` from a validated config and the model's shapes.

Which builder runs is the registry's business (`ucm.methods`): each method's spec names its
builder, `(config, shapes, ctx) -> SparseMethod`. What the builders share lives here: the
`BuildContext` they get, the selection engine of the windowed methods (`windowed_method`),
and the lookup of a per-model JSON (`resolve_model_config`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ucm.config.bounds import divisor_values, layer_values
from ucm.config.errors import ConfigError
from ucm.config.fallback import fallback_origin
from ucm.config.loader import ModelConfigFile, find_model_config, load_model_config, parse_sparse_config
from ucm.config.sparse import MethodConfig, WindowedMethodConfig
from ucm.methods import spec_of
from ucm.ops.contract import SparseOps
from ucm.ops.registry import get_ops
from ucm.sparse.base import BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.quest_bound import bound_guard_scorer
from ucm.sparse.selection import BlockSelector, LayerPolicy

DeviceKind = Literal["gpu", "npu"]


@dataclass(frozen=True)
class BuildContext:
    """What a builder may use besides the config and the shapes (see `build_sparse_method`)."""

    ops: SparseOps
    model_name: str | None = None
    device_kind: DeviceKind = "gpu"
    host_ops: SparseOps | None = None
    model_config: ModelConfigFile | dict | None = None
    seed: int = 0
    host_scoring: bool = True

    def host(self) -> SparseOps:
        """The ops of host-side scoring: `host_ops`, else the CPU backend."""
        return self.host_ops or get_ops("cpu")

    def model_json(self, config: MethodConfig) -> ModelConfigFile:
        """The per-model JSON of a `model_json` method: `model_config` when given, else the one its
        config names (or the served model's, by `model_name`)."""
        if self.model_config is None:
            return resolve_model_config(config, self.model_name)
        if isinstance(self.model_config, ModelConfigFile):
            return self.model_config
        return load_model_config(self.model_config)


def build_sparse_method(
    config: MethodConfig | dict | str | Path,
    shapes: ModelShapes,
    ops: SparseOps | None = None,
    *,
    model_name: str | None = None,
    device_kind: DeviceKind = "gpu",
    host_ops: SparseOps | None = None,
    model_config: ModelConfigFile | dict | None = None,
    seed: int = 0,
    host_scoring: bool = True,
) -> SparseMethod:
    """The method named by `config` (a parsed config, or UCM's JSON dict/string/path), built by
    the builder its registry entry names.

    `ops` defaults to the probed backend; `host_ops` (host-side top-k, GSA) to the CPU backend.
    For methods with a per-model JSON (GSA on device): `model_name` finds the built-in JSON when
    the config names no file, `device_kind` picks its gpu_* or npu_* thresholds, and
    `model_config` (a loaded per-model config or its dict) overrides both; `seed` seeds random
    hash projections. `host_scoring=False` keeps host-scoring methods' representations and
    scoring on the device (the CUDA graph decode path, where no step may wait on the host).
    """
    if isinstance(config, (dict, str, Path)):
        config = parse_sparse_config(config)
    spec = spec_of(config)
    ctx = BuildContext(ops or get_ops(), model_name, device_kind, host_ops, model_config, seed, host_scoring)
    return spec.build(config, shapes, ctx)


def windowed_method(
    config: WindowedMethodConfig, shapes: ModelShapes, ops: SparseOps, scorer: Callable[[], BlockScorer]
) -> SparseMethod:
    """A windowed method (`WindowedMethodConfig`): its windows, ratio and dense layers drive the
    shared selection engine; `scorer()` makes its block scorer."""
    policy = LayerPolicy(
        ratio=config.sparse_ratio,
        min_units=config.min_blocks,
        init_units=config.init_window_sz,
        local_units=config.local_window_sz,
    )
    for key, layer in layer_values(config):
        check(
            "inline",
            f"{config.method}.{key}",
            layer < shapes.num_layers,
            f"layer {layer} does not exist: the model has {shapes.num_layers} layers (0-based)",
        )
    dense = LayerPolicy(ratio=1.0)
    policies = [
        dense
        if layer in config.dense_layers
        else replace(policy, ratio=config.layer_sparse_ratio[layer])
        if layer in config.layer_sparse_ratio
        else policy
        for layer in range(shapes.num_layers)
    ]
    selector = BlockSelector(policies, shapes.block_size, ops)
    check_block_size_divisors(config, shapes)
    built = scorer()
    check(
        "inline",
        f"{config.method}.kv_head_combine",
        config.kv_head_combine == "sum" or built.kv_heads_additive,
        f"{config.kv_head_combine!r} needs a scorer whose score adds up KV heads; {config.method}'s does not: "
        "it supports 'sum' only",
    )
    guard = bound_guard_scorer(config, shapes, ops, getattr(built, "repr_device", None))
    return SparseMethod(
        config.method,
        built,
        selector,
        config.retrieval_stride,
        concurrency_threshold=config.concurrency_threshold,
        kv_head_combine=config.kv_head_combine,
        sticky_steps=config.sticky_steps,
        sticky_top=config.sticky_top,
        bound_guard=guard,
        bound_guard_top=config.bound_guard_top,
    )


def check_block_size_divisors(config: MethodConfig, shapes: ModelShapes) -> None:
    """The config's `block_size_divisors` keys divide the KV block size (a ConfigError naming the key)."""
    for key, value in divisor_values(config):
        check(
            "inline",
            f"{config.method}.{key}",
            shapes.block_size % value == 0,
            f"{value} must divide the KV block size {shapes.block_size}",
        )


def resolve_model_config(
    config: MethodConfig, model_name: str | None, fallback: Callable[[], dict] | None = None
) -> ModelConfigFile:
    """The per-model JSON a `model_json` method's config uses: its `config_file` (a path or a
    built-in model name), else the built-in config of the served model (`model_name` may be a HF
    id or a local model directory: its last path component is matched), else, where `fallback`
    is given, the generic config it returns (`ucm.config.fallback.generic_model_config`, built
    from the served model's shapes). A named `config_file` that does not load stays an error:
    the fallback only stands in for a model nobody wrote a config for. The result's `origin`
    says which of the three it is (the engine logs it)."""
    config_file = getattr(config, "config_file", None)
    if config_file is not None:
        loaded = load_model_config(config_file)
        return replace(loaded, origin=loaded.describe())
    if model_name:
        try:
            path = find_model_config(str(model_name).rstrip("/"))
        except ConfigError:
            if fallback is None:
                raise
        else:
            loaded = load_model_config(path)
            return replace(loaded, origin=loaded.describe())
    if fallback is None:
        raise ConfigError(
            "inline", f"{config.method}.config_file", "name a per-model config file or model (see `ucm configs list`)"
        )
    return replace(load_model_config(fallback()), origin=fallback_origin(model_name or "this model"))


def check(source: str, key: str, ok: bool, message: str) -> None:
    """Raise ConfigError(source, key, message) unless `ok`."""
    if not ok:
        raise ConfigError(source, key, message)
