"""Build a ready-to-run `SparseMethod` from a validated config and the model's shapes."""

from __future__ import annotations

from typing import Literal

import torch

from ucm.config.errors import ConfigError
from ucm.config.loader import ModelConfigFile, find_model_config, load_model_config, parse_sparse_config
from ucm.config.sparse import ESAConfig, GSAConfig, GSAOnDeviceConfig, KVStarConfig, MethodConfig
from ucm.ops.contract import SparseOps
from ucm.ops.registry import get_ops
from ucm.sparse.base import BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.esa import ESAScorer
from ucm.sparse.gsa import GSAScorer
from ucm.sparse.gsa_on_device import HashScorer
from ucm.sparse.hashing import load_trained_hash, random_orthogonal_hash
from ucm.sparse.kvstar import KVStarScorer
from ucm.sparse.selection import BlockSelector, LayerPolicy

DeviceKind = Literal["gpu", "npu"]


def build_sparse_method(
    config: MethodConfig | dict | str,
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
    """The method named by `config` (a parsed config, or UCM's JSON dict/string/path).

    `ops` defaults to the probed backend; `host_ops` (GSA's host top-k) to the CPU backend.
    `model_name` finds the built-in GSAOnDevice config when the config names no file.
    `device_kind` picks the gpu_* or npu_* thresholds of a GSAOnDevice model config.
    `model_config` (a loaded per-model config or its dict) overrides both for GSAOnDevice.
    `host_scoring=False` keeps GSA's representations and scoring on the device (the CUDA graph
    decode path, where no step may wait on the host); it changes no other method.
    """
    if not isinstance(config, (ESAConfig, GSAConfig, KVStarConfig, GSAOnDeviceConfig)):
        config = parse_sparse_config(config)
    ops = ops or get_ops()
    if isinstance(config, GSAOnDeviceConfig):
        if model_config is None:
            model_config = resolve_model_config(config, model_name)
        elif not isinstance(model_config, ModelConfigFile):
            model_config = load_model_config(model_config)
        return _build_hata(model_config, shapes, ops, device_kind, seed)
    policy = LayerPolicy(
        ratio=config.sparse_ratio,
        min_units=config.min_blocks,
        init_units=config.init_window_sz,
        local_units=config.local_window_sz,
    )
    for layer in config.dense_layers:
        _check("inline", f"{config.method}.dense_layers", layer < shapes.num_layers,
               f"layer {layer} does not exist: the model has {shapes.num_layers} layers (0-based)")
    dense = LayerPolicy(ratio=1.0)
    policies = [dense if layer in config.dense_layers else policy for layer in range(shapes.num_layers)]
    selector = BlockSelector(policies, shapes.block_size, ops)
    scorer: BlockScorer
    if isinstance(config, ESAConfig):
        scorer = ESAScorer(shapes, ops)
    elif isinstance(config, GSAConfig):
        scorer = GSAScorer(shapes, ops, (host_ops or get_ops("cpu")) if host_scoring else None)
    else:
        if shapes.block_size % config.blk_repre_inner_token_merge:
            raise ConfigError(
                "inline",
                "KVStarMultiStep.blk_repre_inner_token_merge",
                f"{config.blk_repre_inner_token_merge} must divide the KV block size {shapes.block_size}",
            )
        scorer = KVStarScorer(
            shapes, ops, config.blk_repre_dim_prune_ratio, config.blk_repre_inner_token_merge, config.retrieval_stride
        )
    return SparseMethod(config.method, scorer, selector, config.retrieval_stride,
                        concurrency_threshold=config.concurrency_threshold)


def resolve_model_config(config: GSAOnDeviceConfig, model_name: str | None) -> ModelConfigFile:
    """The per-model JSON a GSAOnDevice config uses: its `config_file` (a path or a built-in
    model name), else the built-in config of the served model (`model_name` may be a HF id or
    a local model directory: its last path component is matched)."""
    if config.config_file is not None:
        return load_model_config(config.config_file)
    if not model_name:
        raise ConfigError("inline", "GSAOnDevice.config_file",
                          "name a per-model config file or model (see `ucm configs list`)")
    return load_model_config(find_model_config(str(model_name).rstrip("/")))


def _check(source: str, key: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(source, key, message)


def hash_projections(loaded: ModelConfigFile, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per layer, the hash projections of a per-model config: one [D, bits] (GQA) or two (MLA:
    kv_lora, rope). Trained files are loaded and checked (readable, shape, finite values); a bad
    one is a ConfigError naming the file and key (`ucm configs check` runs this too)."""
    m, src = loaded.config, loaded.source
    splits = [(m.kv_lora_rank, m.hash_bits_kv_lora, "hash_weight_kv_lora"),
              (m.qk_rope_head_dim, m.hash_bits_qk_rope, "hash_weight_qk_rope")] if m.is_mla \
        else [(m.head_dim, m.hash_bits, "hash_weight")]
    paths = m.weight_paths(loaded.path.parent if loaded.path else None)
    per_part = []
    for part, (dim, bits, key) in enumerate(splits):
        if m.hash_weight_type == "trained":
            try:
                per_part.append(load_trained_hash(paths[key], m.num_hidden_layers, dim, bits, key))
            except ValueError as exc:
                raise ConfigError(src, key, str(exc)) from None
        else:
            per_part.append([random_orthogonal_hash(dim, bits, seed * 1_000_003 + layer * 7 + part)
                             for layer in range(m.num_hidden_layers)])
    return [[part[layer] for part in per_part] for layer in range(m.num_hidden_layers)]


def _build_hata(
    loaded: ModelConfigFile, shapes: ModelShapes, ops: SparseOps, device_kind: DeviceKind, seed: int
) -> SparseMethod:
    m, src = loaded.config, loaded.source
    _check(src, "num_hidden_layers", m.num_hidden_layers == shapes.num_layers,
           f"{m.num_hidden_layers} but the model has {shapes.num_layers} layers")
    _check(src, "head_dim", m.head_dim == shapes.head_dim, f"{m.head_dim} but the model's head dim is {shapes.head_dim}")
    _check(src, "is_mla", m.is_mla == shapes.is_mla, f"{m.is_mla} but the model {'is' if shapes.is_mla else 'is not'} MLA")
    if m.is_mla:
        _check(src, "kv_lora_rank", m.kv_lora_rank == shapes.kv_lora_rank,
               f"{m.kv_lora_rank} but the model's is {shapes.kv_lora_rank}")
    _check(src, "chunk_size", m.chunk_size % shapes.block_size == 0,
           f"{m.chunk_size} is not a multiple of the KV block size {shapes.block_size}")

    weights = hash_projections(loaded, seed)

    policies = [
        LayerPolicy(ratio=ratio, must_select=tuple(m.must_select_blocks), reuse_from=reuse)
        for ratio, reuse in zip(m.top_k_ratio_per_layer, m.top_k_index_reuse)
    ]
    selector = BlockSelector(policies, shapes.block_size, ops, unit_blocks=m.chunk_size // shapes.block_size)
    scorer = HashScorer(shapes, ops, weights, m.chunk_repre_method)
    seq_thr, conc_thr = (
        (m.npu_seq_len_threshold, m.npu_concurrency_threshold) if device_kind == "npu"
        else (m.gpu_seq_len_threshold, m.gpu_concurrency_threshold)
    )
    return SparseMethod("GSAOnDevice", scorer, selector, 1, seq_len_threshold=seq_thr, concurrency_threshold=conc_thr)
