"""The generic per-model config of GSA on device: what runs for a model with no per-model JSON.

A model ucm ships no JSON for, served with no `config_file`, gets this instead of a refusal. It
is built from the served model's own shapes (layer count, head dim; for MLA the kv_lora and rope
dims) and nothing measured:

* hash projections: random orthogonal, from a fixed seed (`hash_weight_type: "random"`; the
  engine's seed 0 makes them the same on every start, `ucm.sparse.hashing.hash_projections`);
* `hash_bits`: 128 (the shipped GQA JSONs' value), or the head dim rounded up to a multiple of 8
  where that is larger; for MLA, one bit per dim of each part (as the shipped DeepSeek JSONs);
* `hash_score_method` "hamming": the norm-weighted estimate centres keys on a mean key that
  only `ucm calibrate` measures (without it, on Qwen2.5-Coder 8K, it scored as Hamming does);
* no dense layers: every layer sparse at `FALLBACK_RATIO` (nothing says which layers a shared
  selection starves without `ucm profile`; docs/accuracy.md measures what this costs on SmolLM2);
* `must_select_blocks` [0, -2, -1] (the first and the last two chunks, as every shipped JSON),
  chunk = the KV block size, `chunk_repre_method` "max";
* thresholds: sparse from `FALLBACK_SEQ_LEN_THRESHOLD` tokens (the shipped JSONs' most common
  value), at any concurrency.

`ucm configure` writes a measured config for the model instead (dense layers from the profile,
trained projections); the engine logs which of the two it used.
"""

from __future__ import annotations

FALLBACK_RATIO = 0.3
FALLBACK_SEQ_LEN_THRESHOLD = 2048
FALLBACK_CONCURRENCY_THRESHOLD = 1
FALLBACK_MUST_SELECT = (0, -2, -1)
FALLBACK_MIN_HASH_BITS = 128


def _bits_for(dim: int) -> int:
    return max(FALLBACK_MIN_HASH_BITS, -(-dim // 8) * 8)


def generic_model_config(
    model_name: str,
    num_hidden_layers: int,
    head_dim: int,
    chunk_size: int,
    *,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
) -> dict:
    """The generic per-model config (the module docstring's rules) as JSON-shaped data that
    `ucm.config.loader.load_model_config` validates. MLA when `kv_lora_rank` is given (then
    `head_dim` must be kv_lora_rank + qk_rope_head_dim, as the served cache stores them)."""
    is_mla = kv_lora_rank is not None
    data = {
        "model_name": model_name,
        "is_mla": is_mla,
        "hash_weight_type": "random",
        "num_hidden_layers": num_hidden_layers,
        "gpu_seq_len_threshold": FALLBACK_SEQ_LEN_THRESHOLD,
        "gpu_concurrency_threshold": FALLBACK_CONCURRENCY_THRESHOLD,
        "npu_seq_len_threshold": FALLBACK_SEQ_LEN_THRESHOLD,
        "npu_concurrency_threshold": FALLBACK_CONCURRENCY_THRESHOLD,
        "chunk_size": chunk_size,
        "chunk_repre_method": "max",
        "head_dim": head_dim,
        "hash_bits": _bits_for(head_dim),
        "hash_score_method": "hamming",
        "top_k_ratio_per_layer": [FALLBACK_RATIO] * num_hidden_layers,
        "top_k_index_reuse": [-1] * num_hidden_layers,
        "must_select_blocks": list(FALLBACK_MUST_SELECT),
        "hash_weight": None,
        "kv_lora_rank": None,
        "qk_rope_head_dim": None,
        "hash_bits_kv_lora": None,
        "hash_bits_qk_rope": None,
        "hash_weight_kv_lora": None,
        "hash_weight_qk_rope": None,
    }
    if is_mla:
        rope = qk_rope_head_dim or 0
        bits_kv, bits_rope = -(-kv_lora_rank // 8) * 8, -(-rope // 8) * 8
        data.update(
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=qk_rope_head_dim,
            hash_bits_kv_lora=bits_kv,
            hash_bits_qk_rope=bits_rope,
            hash_bits=bits_kv + bits_rope,
        )
    return data


def fallback_origin(model_name: str) -> str:
    """How the engine's log names the generic fallback."""
    return f"generic fallback (no per-model config for {model_name}): run `ucm configure` for a measured one"
