"""Per-model config of GSA on device (HATA), one JSON file per model in `configs/`.

Every key changes behaviour or is rejected; keys that do not apply to the model (the MLA keys
of a GQA model, weight paths with random weights) must be null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ucm.config.errors import KeyedValueError
from ucm.config.sparse import (
    MAX_BLOCKS,
    MAX_CHUNK_SIZE,
    MAX_HASH_BITS,
    MAX_HEAD_DIM,
    MAX_LAYERS,
    MAX_TOKENS,
    Concurrency,
    Ratio,
)

Bits = Annotated[int, Field(ge=8, le=MAX_HASH_BITS, multiple_of=8)]
Dim = Annotated[int, Field(ge=1, le=MAX_HEAD_DIM)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]


class GSAOnDeviceModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_name: Annotated[str, Field(min_length=1)]
    is_mla: bool
    hash_weight_type: Literal["random", "trained"]
    num_hidden_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    # Sparse decode runs only for requests at least this long, in steps with at least this many
    # decoding requests (below either, decode is weight-bound and stays dense). "npu_*" applies
    # on Ascend, "gpu_*" on every other device.
    gpu_seq_len_threshold: Tokens
    gpu_concurrency_threshold: Concurrency
    npu_seq_len_threshold: Tokens
    npu_concurrency_threshold: Concurrency
    # selection granularity in tokens: a multiple of the KV block size (checked against the
    # served cache by ucm.config.bounds.check_against_model)
    chunk_size: Annotated[int, Field(ge=1, le=MAX_CHUNK_SIZE)]
    # how a chunk's token similarities become its score: max similarity = min hamming distance
    chunk_repre_method: Literal["max", "min", "mean"]
    head_dim: Dim
    hash_bits: Bits
    # how a token's codes meet the query's: "hamming" sums the XOR-popcount distance over query
    # heads; "norm_cosine" estimates q . k per head from it, |q| |k| cos(pi d / bits), keys
    # hashed and measured minus the trained file's mean key (`key_center`, `ucm calibrate`)
    # where it has one (`ucm.ops.hash_cosine`; 2 bytes more a token and KV head). GQA only
    hash_score_method: Literal["hamming", "norm_cosine"] = "hamming"
    top_k_ratio_per_layer: list[Ratio]  # 1 = dense layer
    top_k_index_reuse: list[Annotated[int, Field(ge=-1, le=MAX_LAYERS - 1)]]  # -1, or an earlier sparse layer
    must_select_blocks: list[
        Annotated[int, Field(ge=-MAX_BLOCKS, le=MAX_BLOCKS)]
    ]  # chunk indices, negative from the end
    hash_weight: str | None = None
    kv_lora_rank: Dim | None = None
    qk_rope_head_dim: Dim | None = None
    hash_bits_kv_lora: Bits | None = None
    hash_bits_qk_rope: Bits | None = None
    hash_weight_kv_lora: str | None = None
    hash_weight_qk_rope: str | None = None
    # the layers measured to copy from the context (`ucm configure`: `ucm.copy_layers`, each
    # layer's best induction head), dense ones included (a method keeping a layer dense skips
    # it); ESA and GSA keep groups of 2 tokens there and whole blocks elsewhere
    # (`ucm.methods.copy_layer_keys`, `ucm.config.copy_layer_defaults`). null: not measured
    copy_layers: list[Annotated[int, Field(ge=0, le=MAX_LAYERS - 1)]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GSAOnDeviceModelConfig:
        n = self.num_hidden_layers
        for key in ("top_k_ratio_per_layer", "top_k_index_reuse"):
            got = len(getattr(self, key))
            if got != n:
                raise _KeyError(key, f"has {got} entries but num_hidden_layers is {n}")
        if self.copy_layers is not None:
            if len(set(self.copy_layers)) != len(self.copy_layers):
                raise _KeyError("copy_layers", f"lists a layer twice: {self.copy_layers}")
            if outside := [layer for layer in self.copy_layers if layer >= n]:
                raise _KeyError("copy_layers", f"layers {outside} are past the last layer ({n - 1})")
        for i, j in enumerate(self.top_k_index_reuse):
            if j == -1:
                continue
            if j >= i:
                raise _KeyError(f"top_k_index_reuse[{i}]", f"layer {i} can only reuse an earlier layer, not {j}")
            if self.top_k_ratio_per_layer[i] >= 1.0:
                raise _KeyError(f"top_k_index_reuse[{i}]", f"layer {i} is dense (ratio 1) and cannot reuse layer {j}")
            if self.top_k_ratio_per_layer[j] >= 1.0:
                raise _KeyError(f"top_k_index_reuse[{i}]", f"layer {j} is dense (ratio 1): nothing to reuse")
            if self.top_k_index_reuse[j] != -1:
                raise _KeyError(f"top_k_index_reuse[{i}]", f"layer {j} itself reuses layer {self.top_k_index_reuse[j]}")
        if len(set(self.must_select_blocks)) != len(self.must_select_blocks):
            raise _KeyError("must_select_blocks", f"has duplicates: {self.must_select_blocks}")
        mla_keys = ("kv_lora_rank", "qk_rope_head_dim", "hash_bits_kv_lora", "hash_bits_qk_rope")
        if self.is_mla:
            for key in mla_keys:
                if getattr(self, key) is None:
                    raise _KeyError(key, "is required when is_mla is true")
            if self.head_dim != self.kv_lora_rank + self.qk_rope_head_dim:
                raise _KeyError(
                    "head_dim",
                    f"{self.head_dim} != kv_lora_rank + qk_rope_head_dim = {self.kv_lora_rank + self.qk_rope_head_dim}",
                )
            if self.hash_bits != self.hash_bits_kv_lora + self.hash_bits_qk_rope:
                raise _KeyError(
                    "hash_bits",
                    f"{self.hash_bits} != hash_bits_kv_lora + hash_bits_qk_rope = "
                    f"{self.hash_bits_kv_lora + self.hash_bits_qk_rope}",
                )
            if self.hash_score_method != "hamming":
                raise _KeyError("hash_score_method", "must be 'hamming' for MLA (two projections a token)")
            if self.hash_weight is not None:
                raise _KeyError("hash_weight", "must be null for MLA (use hash_weight_kv_lora / hash_weight_qk_rope)")
            weight_keys = ("hash_weight_kv_lora", "hash_weight_qk_rope")
        else:
            for key in (*mla_keys, "hash_weight_kv_lora", "hash_weight_qk_rope"):
                if getattr(self, key) is not None:
                    raise _KeyError(key, "applies to MLA models only; must be null when is_mla is false")
            weight_keys = ("hash_weight",)
        for key in weight_keys:
            path = getattr(self, key)
            if self.hash_weight_type == "trained" and path is None:
                raise _KeyError(key, "is required when hash_weight_type is 'trained'")
            if self.hash_weight_type == "random" and path is not None:
                raise _KeyError(key, "must be null when hash_weight_type is 'random' (set it to 'trained' to load it)")
        return self

    # ------------------------------------------------------------------ derived
    def weight_paths(self, base_dir: Path | None) -> dict[str, Path]:
        """Trained weight files by key, resolved against the config file's directory."""
        keys = ("hash_weight_kv_lora", "hash_weight_qk_rope") if self.is_mla else ("hash_weight",)
        out = {}
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                try:
                    p = Path(value).expanduser()
                except RuntimeError:  # '~user' with an unknown user: report the path as not found
                    p = Path(value)
                out[key] = p if p.is_absolute() or base_dir is None else base_dir / p
        return out


_KeyError = KeyedValueError  # a cross-field check failed on `key`; the loader reports it with the file name
