"""Bounds of a config that depend on the served model and its KV cache.

The schemas (`ucm.config.sparse`, `ucm.config.model`) bound every numeric key by a constant.
What fits one deployment depends on it: a window of 600 blocks is fine at `max_model_len`
131072 and block size 16, and meaningless at 4096. `check_against_model` rejects such values
with a ConfigError naming the source and the key, before any request is served. It runs at
engine start (the vLLM connector), in `ucm configs check --max-model-len N --block-size B`, and
wherever a caller knows the deployment. Every argument is optional: a check runs when what it
needs is known.

    windows (init_window_sz, local_window_sz), min_blocks and, with offload, offload_margin_blocks:
        at most ceil(max_model_len / block_size) blocks, the longest request's length
    dense_layers: each < the model's layer count
    a method's `block_size_divisors` (KVStar: blk_repre_inner_token_merge): divide the block size
    per-model JSON (GSA on device): num_hidden_layers and head_dim equal the model's;
        chunk_size a multiple of the block size and at most max_model_len; every
        must_select_blocks index within ceil(max_model_len / chunk_size) chunks
"""

from __future__ import annotations

import math

from ucm.config.errors import ConfigError
from ucm.config.loader import ModelConfigFile
from ucm.config.sparse import PER_LAYER_KEYS, MethodConfig, WindowedMethodConfig


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _longest(max_model_len: int, block_size: int) -> str:
    return f"the longest request (max_model_len {max_model_len} / block size {block_size})"


def check_sparse_against_model(
    config: MethodConfig,
    *,
    max_model_len: int | None = None,
    block_size: int | None = None,
    num_layers: int | None = None,
    source: str = "inline",
    prefix: str = "",
) -> None:
    """The method config's keys against the deployment (see the module doc). Keys are named
    `{prefix}.{method}.{key}` (`prefix` as where the config sat, e.g. 'ucm_sparse_config')."""
    for name, value in (("max_model_len", max_model_len), ("block_size", block_size), ("num_layers", num_layers)):
        _positive(name, value)
    where = f"{prefix}.{config.method}" if prefix else config.method
    if isinstance(config, WindowedMethodConfig):  # a per-model JSON's method has its numbers there
        _check_windows(config, where, max_model_len, block_size, num_layers, source)
    for key, value in divisor_values(config):
        if block_size is not None and block_size % value:
            raise ConfigError(source, f"{where}.{key}", f"{value} must divide the KV block size {block_size}")


def layer_values(config: WindowedMethodConfig) -> list[tuple[str, int]]:
    """(key, layer) of every layer the config names: `dense_layers[i]` and, per per-layer key,
    `key[layer]`."""
    out = [(f"dense_layers[{i}]", layer) for i, layer in enumerate(config.dense_layers)]
    for key in PER_LAYER_KEYS:
        out += [(f"{key}[{layer}]", layer) for layer in getattr(config, key, {})]
    return out


def divisor_values(config: MethodConfig) -> list[tuple[str, int]]:
    """(key, value) of every set `block_size_divisors` key; a per-layer dict gives one entry per
    layer, named `key[layer]`."""
    out = []
    for key in config.block_size_divisors:
        value = getattr(config, key)
        if isinstance(value, dict):
            out += [(f"{key}[{layer}]", v) for layer, v in value.items()]
        elif value is not None:  # None: the whole block
            out.append((key, value))
    return out


def _check_windows(
    config: WindowedMethodConfig,
    where: str,
    max_model_len: int | None,
    block_size: int | None,
    num_layers: int | None,
    source: str,
) -> None:
    if max_model_len is not None and block_size is not None:
        max_blocks = -(-max_model_len // block_size)
        keys = ["init_window_sz", "local_window_sz", "min_blocks"] + (
            ["offload_margin_blocks"] if config.offload else []
        )
        for key in keys:
            value = getattr(config, key)
            if value > max_blocks:
                raise ConfigError(
                    source,
                    f"{where}.{key}",
                    f"{value} blocks is more than the {max_blocks} blocks of {_longest(max_model_len, block_size)}",
                )
    if num_layers is not None:
        for key, layer in layer_values(config):
            if layer >= num_layers:
                raise ConfigError(
                    source,
                    f"{where}.{key}",
                    f"layer {layer} does not exist: the model has {num_layers} layers (0-based)",
                )


def check_model_config_against_model(
    loaded: ModelConfigFile,
    *,
    max_model_len: int | None = None,
    block_size: int | None = None,
    num_layers: int | None = None,
    head_dim: int | None = None,
) -> None:
    """A GSA-on-device per-model config against the deployment (see the module doc); errors
    name the config's file."""
    for name, value in (
        ("max_model_len", max_model_len),
        ("block_size", block_size),
        ("num_layers", num_layers),
        ("head_dim", head_dim),
    ):
        _positive(name, value)
    m, src = loaded.config, loaded.source
    if num_layers is not None and m.num_hidden_layers != num_layers:
        raise ConfigError(src, "num_hidden_layers", f"{m.num_hidden_layers} but the model has {num_layers} layers")
    if head_dim is not None and m.head_dim != head_dim:
        raise ConfigError(src, "head_dim", f"{m.head_dim} but the model's head dim is {head_dim}")
    if block_size is not None and m.chunk_size % block_size:
        raise ConfigError(src, "chunk_size", f"{m.chunk_size} is not a multiple of the KV block size {block_size}")
    if max_model_len is None:
        return
    if m.chunk_size > max_model_len:
        raise ConfigError(
            src,
            "chunk_size",
            f"{m.chunk_size} tokens is longer than max_model_len {max_model_len}: "
            "every request would be one chunk, always read whole",
        )
    max_chunks = math.ceil(max_model_len / m.chunk_size)
    for i, u in enumerate(m.must_select_blocks):
        if not -max_chunks <= u < max_chunks:
            raise ConfigError(
                src,
                f"must_select_blocks[{i}]",
                f"chunk {u} is outside the {max_chunks} chunks of the longest request "
                f"(max_model_len {max_model_len} / chunk_size {m.chunk_size})",
            )


def check_against_model(
    config: MethodConfig | None,
    *,
    max_model_len: int | None = None,
    block_size: int | None = None,
    num_layers: int | None = None,
    head_dim: int | None = None,
    model_config: ModelConfigFile | None = None,
    source: str = "inline",
    prefix: str = "",
) -> None:
    """Both checks: the method config (`source`/`prefix` name where it came from) and, for GSA
    on device, its resolved per-model config `model_config`. Raises ConfigError naming the
    source and the key of the first value the deployment cannot run."""
    if config is not None:
        check_sparse_against_model(
            config,
            max_model_len=max_model_len,
            block_size=block_size,
            num_layers=num_layers,
            source=source,
            prefix=prefix,
        )
    if model_config is not None:
        check_model_config_against_model(
            model_config, max_model_len=max_model_len, block_size=block_size, num_layers=num_layers, head_dim=head_dim
        )
