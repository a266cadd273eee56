"""Typed configs of ucm's sparse methods, in UCM's user-facing JSON shape, and their
registration (`ucm.methods`).

    {"ucm_sparse_config": {"ESA": {"init_window_sz": 1, "local_window_sz": 2, ...}}}

Exactly one method per config. Window sizes are in KV blocks. `sparse_ratio` is the fraction
of a request's blocks read per decode step, windows included (so it is also the fraction of
the KV bytes a sparse step reads).

Each config class is registered below with its builder (a path into `ucm.sparse`, imported
only when a method is built: parsing a config never imports torch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from ucm.config.errors import KeyedValueError
from ucm.methods import COPY_RATIO_BOOST, MethodSpec, find_method, method_names, register_method

# Upper bounds of every numeric key. No real model or deployment comes near them, and within
# them every count the selection engine derives stays far inside int64 and every allocation
# stays bounded: a value past one would otherwise pass here and fail (OverflowError, an
# exabyte allocation) at the first decode step of a served engine. Bounds that depend on the
# served model and cache (a window longer than `max_model_len / block_size`, a chunk that is
# not a whole number of KV blocks) are checked by `ucm.config.bounds.check_against_model`.
# docs/vllm.md lists them all.
MAX_BLOCKS = 2**20  #: windows, min_blocks, offload margin, must-select chunk indices (KV blocks / chunks)
MAX_RETRIEVAL_STRIDE = 1024  #: decode steps between retrievals (KVStar keeps this many queries)
MAX_LAYERS = 1024  #: layer counts and layer indices
MAX_CONCURRENCY = 2**16  #: decoding rows per step (concurrency thresholds)
MAX_TOKENS = 2**26  #: token counts (sequence-length thresholds)
MAX_BLOCK_SIZE = 4096  #: tokens of one KV block (KVStar's token-merge group divides it)
MAX_CHUNK_SIZE = 2**16  #: tokens of one GSA-on-device selection chunk
MAX_HEAD_DIM = 4096  #: head_dim, kv_lora_rank, qk_rope_head_dim
MAX_HASH_BITS = 4096  #: hash code bits per token and KV head

Ratio = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
CopyBoost = Annotated[float, Field(ge=1.0, le=10.0, allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
BlockCount = Annotated[int, Field(ge=0, le=MAX_BLOCKS)]
Stride = Annotated[int, Field(ge=1, le=MAX_RETRIEVAL_STRIDE)]
LayerIndex = Annotated[int, Field(ge=0, le=MAX_LAYERS - 1)]
#: a layer index as a JSON object's key ("9"), which JSON can only spell as a string
LayerKey = Annotated[int, Strict(False), Field(ge=0, le=MAX_LAYERS - 1)]
#: the windowed methods' per-layer settings ({layer: value}); each layer must exist in the model
PER_LAYER_KEYS = ("layer_sparse_ratio", "layer_repre_inner_token_merge")
Concurrency = Annotated[int, Field(ge=0, le=MAX_CONCURRENCY)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SparseMethodConfig(_Strict):
    """Base of every method's config: strict (unknown keys and wrong types are errors) and
    frozen. `method` is the name the method is registered under (`ucm.methods`)."""

    method: ClassVar[str] = ""
    #: keys whose value must divide the served KV block size (checked at engine start)
    block_size_divisors: ClassVar[tuple[str, ...]] = ()
    #: it has WindowedMethodConfig's keys (`MethodSpec.windowed`, `method_names(windowed=True)`)
    windowed: ClassVar[bool] = False
    #: the per-model JSON the method reads (a path, or a built-in model name; `ucm configure` writes
    #: one for any model): GSA on device its hash settings and dense layers, the windowed methods its
    #: measured copying layers (`ucm.config.copy_layer_defaults`). Unset: the served model's
    #: built-in JSON, found by the model's name, if ucm ships one
    config_file: str | None = None
    #: a local model folder with no per-model JSON (no `config_file`, none built in under its name):
    #: measure it when the engine starts, once (kept under ~/.cache/ucm; `ucm.config.measure_at_start`),
    #: and run the written JSON as `config_file`: its copying layers (`ucm configure --copy-layers-only`)
    #: for ESA, GSA and KVStar with their keys unset; for GSA on device also hash projections trained
    #: on the model (`ucm configure --no-profile`) where the model is small enough
    measure_at_start: bool = True

    @model_validator(mode="after")
    def _config_file_named(self) -> SparseMethodConfig:
        if self.config_file is not None and not self.config_file.strip():
            raise KeyedValueError("config_file", "config_file must be a path or a model name, not an empty string")
        return self


MethodConfig = SparseMethodConfig  # the type of a parsed `ucm_sparse_config`


class WindowedMethodConfig(SparseMethodConfig):
    """Keys shared by the representation-based methods (ESA, GSA, KVStar): windows, a keep
    ratio, a retrieval stride, dense layers, offload."""

    windowed: ClassVar[bool] = True
    init_window_sz: BlockCount = 1
    local_window_sz: BlockCount = 2
    sparse_ratio: Ratio = 0.3
    min_blocks: BlockCount = 4
    retrieval_stride: Stride = 1
    #: offload mode: after prefill only the windows and a fixed number of slot blocks stay on
    #: the device, the rest lives in the KV store (needs `ucm_connectors`; see docs/store.md)
    offload: bool = False
    #: slot blocks beyond the most a layer selects, keeping recently read blocks resident
    offload_margin_blocks: BlockCount = 2
    #: layers that read every block (0-based): the layers whose attention no block selection
    #: captures, found with `ucm profile` (GSA on device sets the same through its model JSON)
    dense_layers: list[LayerIndex] = Field(default_factory=list)
    #: per-layer keep ratios that differ from `sparse_ratio` ({layer: ratio}, 0-based layers):
    #: spend more of the budget on the few layers that copy from the context (a retrieval layer
    #: found with `ucm profile --trace-sample`) and less elsewhere; a ratio of 1 makes the layer
    #: dense. Empty: every sparse layer keeps `sparse_ratio`
    layer_sparse_ratio: dict[LayerKey, Ratio] = Field(default_factory=dict)
    #: on a model whose per-model JSON names its copying layers (`copy_layers`, `ucm configure`) and
    #: with `layer_sparse_ratio` unset: those layers (not dense) keep this many times `sparse_ratio`,
    #: the other sparse layers less, the blocks read unchanged (`ucm.methods.copy_layer_ratios`,
    #: applied by the engine: `ucm.config.copy_layer_defaults`). 1: every sparse layer keeps
    #: `sparse_ratio`. Measured per method (docs/accuracy.md, session 25): GSA and KVStar gain, ESA
    #: (whose groups of 2 tokens hold the needle there) and Quest lose a sample
    copy_layer_boost: CopyBoost = 1.0
    #: decode steps with fewer decoding rows stay dense (selection costs about what it saves on a
    #: single short row). Unset: 2 on the CUDA graph path (one row at 32K tokens was slower sparse
    #: than dense on an H200, docs/cuda.md), 0 elsewhere (GSA on device: its JSON's
    #: gpu_/npu_concurrency_threshold)
    concurrency_threshold: Concurrency | None = None
    #: how the KV heads' scores make one ranking: "sum" (the scorer's sum over KV heads), or
    #: "rank": each KV head scored alone, a block ranked by its best rank in any head, so a
    #: retrieval head's blocks survive the other heads' vote (ESA, GSA, Quest; one scoring per KV
    #: head; issue #20: `ucm profile --trace-sample`, docs/accuracy.md)
    kv_head_combine: Literal["sum", "rank"] = "sum"
    #: > 0: a layer also keeps (within its budget) the `sticky_top` best blocks of each of its previous
    #: `sticky_steps` retrievals, so a block ranked first a few steps ago survives a step whose
    #: query points elsewhere (long verbatim copies, issue #20). 0: a fresh selection only
    sticky_steps: Annotated[int, Field(ge=0, le=64)] = 0
    sticky_top: Annotated[int, Field(ge=1, le=64)] = 2
    #: > 0: a layer also keeps (within its budget) the `bound_guard_top` blocks with the highest
    #: Quest bound for the current query (each block's element-wise min / max of K, kept as keys
    #: are written: 2 x Hkv x D float32 more per block and layer). The bound sees one key along
    #: the query that a mean of K dilutes by the block size: the block a copying head reads
    #: (issue #20). 0: off
    bound_guard_top: Annotated[int, Field(ge=0, le=64)] = 0
    #: tokens per block representation (must divide the KV block size; null: the whole block).
    #: Below the block size a block keeps one representation per group of that many tokens and
    #: scores as its best group, so one key along the query is not diluted by the block's other
    #: keys (issue #20: the key a copying head reads; docs/accuracy.md measures 2-32). Costs
    #: block_size / merge times the whole-block representation's memory and scoring reads.
    #: KVStar: tokens per merged row (its default 2)
    blk_repre_inner_token_merge: Annotated[int, Field(ge=1, le=MAX_BLOCK_SIZE)] | None = 4
    block_size_divisors: ClassVar[tuple[str, ...]] = ("blk_repre_inner_token_merge",)

    @model_validator(mode="after")
    def _check_combinations(self) -> WindowedMethodConfig:
        default = type(self).model_fields["offload_margin_blocks"].default
        if not self.offload and self.offload_margin_blocks != default:  # the default round-trips
            raise KeyedValueError("offload_margin_blocks", "offload_margin_blocks has no effect without offload: true")
        if len(set(self.dense_layers)) != len(self.dense_layers):
            raise KeyedValueError("dense_layers", f"dense_layers lists a layer twice: {self.dense_layers}")
        if both := sorted(set(self.dense_layers) & set(self.layer_sparse_ratio)):
            raise KeyedValueError(
                "layer_sparse_ratio", f"layers {both} are also in dense_layers: give a layer one setting"
            )
        if self.offload and self.bound_guard_top:
            raise KeyedValueError(
                "bound_guard_top", "bound_guard_top cannot be combined with offload: true (not supported yet)"
            )
        if self.offload and any(r >= 1.0 for r in self.layer_sparse_ratio.values()):
            raise KeyedValueError(
                "layer_sparse_ratio",
                "a ratio of 1 (a dense layer) cannot be combined with offload: true (a dense "
                "layer reads every block, so none could leave the device)",
            )
        if self.offload and self.dense_layers:
            raise KeyedValueError(
                "dense_layers",
                "dense_layers cannot be combined with offload: true (a dense "
                "layer reads every block, so none could leave the device)",
            )
        return self


class MeanReprConfig(WindowedMethodConfig):
    """The settings of methods that keep sums of K per group of tokens (ESA, GSA)."""

    #: the dtype of the group sums, which scoring reads every step: "auto" lets the backend pick
    #: (CUDA: float8_e4m3fn for groups of up to 4 tokens, bfloat16 up to 16, else float32; CPU:
    #: float32). float8 is half the bytes of bfloat16 (values saturate at +-448; each group is
    #: rounded once per write, a prompt's groups once); "float32" keeps them exact
    blk_repre_dtype: Literal["auto", "float32", "bfloat16", "float8_e4m3fn"] = "auto"
    #: per-layer tokens per representation that differ from `blk_repre_inner_token_merge`
    #: ({layer: tokens}, each dividing the block size): finer groups for the few layers that copy
    #: from the context (where a group's mean dilutes the key a copying head reads), coarser
    #: ones elsewhere. Empty: every layer keeps `blk_repre_inner_token_merge`
    layer_repre_inner_token_merge: dict[LayerKey, Annotated[int, Field(ge=1, le=MAX_BLOCK_SIZE)]] = Field(
        default_factory=dict
    )
    block_size_divisors: ClassVar[tuple[str, ...]] = ("blk_repre_inner_token_merge", "layer_repre_inner_token_merge")


class ESAConfig(MeanReprConfig):
    """ESA: block = mean of K per KV head (per group of `blk_repre_inner_token_merge` tokens, the
    block scoring as its best group); score = group-mean query . representation."""

    method: ClassVar[str] = "ESA"
    #: 1 (UCM's default is 5): ucm's accuracy is measured re-scoring every step; on Qwen2.5-Coder's
    #: RULER niah_multikey_3 at 4K (25 samples, 0.3) a stride of 5 scored 44 against every step's
    #: 72 and dense's 72 (a long verbatim copy outlives a stale selection; docs/accuracy.md). A
    #: larger stride trades that for less scoring (the CUDA graph path: docs/vllm.md)
    retrieval_stride: Stride = 1


class GSAConfig(MeanReprConfig):
    """GSA: per-head mean representation, max over the GQA group, top-k on the host."""

    method: ClassVar[str] = "GSA"
    copy_layer_boost: CopyBoost = COPY_RATIO_BOOST


class KVStarConfig(WindowedMethodConfig):
    """KVStar: channel-pruned, token-merged representations scored by the recent queries."""

    method: ClassVar[str] = "KVStarMultiStep"
    sparse_ratio: Ratio = 0.25
    copy_layer_boost: CopyBoost = COPY_RATIO_BOOST
    #: 1 (UCM's default is 8; it is also the window of recent queries that score): what ucm's
    #: accuracy runs measure, as for ESA
    retrieval_stride: Stride = 1
    blk_repre_dim_prune_ratio: Ratio = 0.25
    #: tokens merged into one representation row; must divide the KV block size
    blk_repre_inner_token_merge: Annotated[int, Field(ge=1, le=MAX_BLOCK_SIZE)] = 2


class GSAOnDeviceConfig(SparseMethodConfig):
    """GSA on device (HATA): the hash settings live in a per-model JSON (`ucm configs list`).

    `config_file` is a path or a built-in model name; when omitted, the integration looks the
    model up by the name of the model being served (else the generic fallback, `ucm.config.fallback`).
    """

    method: ClassVar[str] = "GSAOnDevice"


class _RegisteredConfigs(Mapping):
    """A read-only view of the registry: method name -> config class (every registered
    method, ucm's and third parties', sorted by name)."""

    def __getitem__(self, name: str) -> type[SparseMethodConfig]:
        spec = find_method(name)
        if spec is None:
            raise KeyError(name)
        return spec.config

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())

    def __repr__(self) -> str:
        return f"METHODS({dict(self)!r})"


METHODS: Mapping[str, type[SparseMethodConfig]] = _RegisteredConfigs()

# ----------------------------------------------------------------------------- the built-in methods
#: what the demo, eval and profile run the windowed methods with, besides the ratio (and the
#: stride and dense layers they choose): one initial block, two local blocks, at least four blocks
_DEMO_WINDOWS = {"init_window_sz": 1, "local_window_sz": 2, "min_blocks": 4}

register_method(
    MethodSpec(
        ESAConfig,
        "ucm.sparse.esa:build",
        strided=True,
        demo=_DEMO_WINDOWS,
        description="mean-of-K block representations (per group of 4 tokens), scored by the GQA-group mean query",
    )
)
register_method(
    MethodSpec(
        GSAConfig,
        "ucm.sparse.gsa:build",
        host_scoring=True,
        demo=_DEMO_WINDOWS,
        description="per-head mean representations (per group of 4 tokens), max over the GQA group, top-k on the host",
    )
)
register_method(
    MethodSpec(
        KVStarConfig,
        "ucm.sparse.kvstar:build",
        strided=True,
        demo={**_DEMO_WINDOWS, "blk_repre_dim_prune_ratio": 0.5, "blk_repre_inner_token_merge": 4},
        description="channel-pruned, token-merged representations scored by the recent queries",
    )
)
register_method(
    MethodSpec(
        GSAOnDeviceConfig,
        "ucm.sparse.gsa_on_device:build",
        model_json=True,
        demo="ucm.sparse.gsa_on_device:demo_config",
        description="GSA on device (HATA): per-token hash codes, Hamming top-k; settings in a per-model JSON",
    )
)
