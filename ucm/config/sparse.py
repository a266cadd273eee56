"""Typed configs of the four sparse methods, in UCM's user-facing JSON shape.

    {"ucm_sparse_config": {"ESA": {"init_window_sz": 1, "local_window_sz": 2, ...}}}

Exactly one method per config. Window sizes are in KV blocks. `sparse_ratio` is the fraction
of a request's blocks read per decode step, windows included (so it is also the fraction of
the KV bytes a sparse step reads).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Ratio = Annotated[float, Field(gt=0.0, le=1.0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WindowedMethodConfig(_Strict):
    """Keys shared by the representation-based methods (ESA, GSA, KVStar)."""

    method: ClassVar[str] = ""
    init_window_sz: NonNegInt = 1
    local_window_sz: NonNegInt = 2
    sparse_ratio: Ratio = 0.3
    min_blocks: NonNegInt = 4
    retrieval_stride: PosInt = 1
    #: offload mode: after prefill only the windows and a fixed number of slot blocks stay on
    #: the device, the rest lives in the KV store (needs `ucm_connectors`; see docs/store.md)
    offload: bool = False
    #: slot blocks beyond the most a layer selects, keeping recently read blocks resident
    offload_margin_blocks: NonNegInt = 2
    #: layers that read every block (0-based): the layers whose attention no block selection
    #: captures, found with `ucm profile` (GSA on device sets the same through its model JSON)
    dense_layers: list[NonNegInt] = Field(default_factory=list)
    #: decode steps with fewer decoding rows stay dense (selection costs about what it saves on a
    #: single short row). Unset: 2 on the CUDA graph path (one row at 32K tokens was slower sparse
    #: than dense on an H200, docs/cuda.md), 0 elsewhere (GSA on device: its JSON's
    #: gpu_/npu_concurrency_threshold)
    concurrency_threshold: NonNegInt | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> WindowedMethodConfig:
        default = type(self).model_fields["offload_margin_blocks"].default
        if not self.offload and self.offload_margin_blocks != default:  # the default round-trips
            raise ValueError("offload_margin_blocks has no effect without offload: true")
        if len(set(self.dense_layers)) != len(self.dense_layers):
            raise ValueError(f"dense_layers lists a layer twice: {self.dense_layers}")
        if self.offload and self.dense_layers:
            raise ValueError("dense_layers cannot be combined with offload: true (a dense layer reads every "
                             "block, so none could leave the device)")
        return self


class ESAConfig(WindowedMethodConfig):
    """ESA: block = mean of K per KV head; score = group-mean query . representation."""

    method: ClassVar[str] = "ESA"
    retrieval_stride: PosInt = 5


class GSAConfig(WindowedMethodConfig):
    """GSA: per-head mean representation, max over the GQA group, top-k on the host."""

    method: ClassVar[str] = "GSA"


class KVStarConfig(WindowedMethodConfig):
    """KVStar: channel-pruned, token-merged representations scored by the recent queries."""

    method: ClassVar[str] = "KVStarMultiStep"
    sparse_ratio: Ratio = 0.25
    retrieval_stride: PosInt = 8
    blk_repre_dim_prune_ratio: Ratio = 0.25
    blk_repre_inner_token_merge: PosInt = 2


class GSAOnDeviceConfig(_Strict):
    """GSA on device (HATA): the hash settings live in a per-model JSON (`ucm configs list`).

    `config_file` is a path or a built-in model name; when omitted, the integration looks the
    model up by the name of the model being served.
    """

    method: ClassVar[str] = "GSAOnDevice"
    config_file: str | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> GSAOnDeviceConfig:
        if self.config_file is not None and not self.config_file.strip():
            raise ValueError("config_file must be a path or a model name, not an empty string")
        return self


MethodConfig = ESAConfig | GSAConfig | KVStarConfig | GSAOnDeviceConfig

METHODS: dict[str, type[_Strict]] = {
    "ESA": ESAConfig,
    "GSA": GSAConfig,
    "GSAOnDevice": GSAOnDeviceConfig,
    "KVStarMultiStep": KVStarConfig,
}
