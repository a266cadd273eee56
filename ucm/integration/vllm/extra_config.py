"""UCM's `kv_connector_extra_config`, validated when the engine starts.

    {"ucm_sparse_config": {"ESA": {...}},            # one sparse method (optional)
     "ucm_connectors": [{"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {...}}]}

UCM's older single-store shape (`ucm_connector_name` + `ucm_connector_config` at the top) is
accepted too. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ucm.config.errors import ConfigError, from_validation_error
from ucm.config.loader import SPARSE_KEY, parse_sparse_config
from ucm.config.sparse import MethodConfig
from ucm.store.factory import CONNECTOR_PIPELINES, StoreSpec

SOURCE = "kv_connector_extra_config"


class StoreSettings(BaseModel):
    """Settings of a KV store (`ucm.store`, docs/store.md). Sizes are bytes.

    storage_backends     directory (or directories, blocks spread by id) of the POSIX stage
    storage_capacity     bytes the POSIX stage may hold; least recently used blocks go first (None: unbounded)
    kv_block_size        bytes of one block over all layers; checked against the served model when the store starts
    use_direct           O_DIRECT for the POSIX stage (falls back, with a warning, where the file system refuses it)
    transferStreamNumber I/O worker threads
    store_pipeline       "Cache|Posix" | "Posix" | "Cache" | "Empty" (UcmPipelineStore; the others imply theirs)
    max_cache_size       bytes of host memory of the Cache stage
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    storage_backends: str | list[str] | None = None
    storage_capacity: int | None = Field(default=None, ge=1)
    kv_block_size: int | None = Field(default=None, ge=1)
    use_direct: bool = False
    transfer_stream_number: int = Field(default=1, ge=1, alias="transferStreamNumber")
    store_pipeline: Literal["Cache|Posix", "Posix", "Cache", "Empty"] | None = None
    max_cache_size: int | None = Field(default=None, ge=1)


class _StoreKeyError(ValueError):
    """A cross-field check failed on `key` (reported with that key by from_validation_error)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class StoreConnector(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ucm_connector_name: Literal["UcmNfsStore", "UcmPipelineStore", "UcmDramStore"]
    ucm_connector_config: StoreSettings = StoreSettings()

    @property
    def pipeline(self) -> str:
        """The stage stack: UcmNfsStore = Posix, UcmDramStore = Cache, UcmPipelineStore = store_pipeline."""
        implied = CONNECTOR_PIPELINES[self.ucm_connector_name]
        if self.ucm_connector_name == "UcmPipelineStore":
            return self.ucm_connector_config.store_pipeline or implied
        return implied

    @model_validator(mode="after")
    def _consistent(self) -> StoreConnector:
        """Every key given must matter for the stages chosen; the stages' required keys must be there."""
        cfg = self.ucm_connector_config
        key = "ucm_connector_config."
        implied = CONNECTOR_PIPELINES[self.ucm_connector_name]
        if self.ucm_connector_name != "UcmPipelineStore" and cfg.store_pipeline not in (None, implied):
            raise _StoreKeyError(
                key + "store_pipeline",
                f"{self.ucm_connector_name} is the {implied!r} pipeline; "
                f"use UcmPipelineStore for {cfg.store_pipeline!r}",
            )
        stages = self.pipeline.split("|")
        posix, cache = "Posix" in stages, "Cache" in stages
        for name, needed in (("storage_backends", posix), ("max_cache_size", cache)):
            given = getattr(cfg, name) is not None
            if needed and not given:
                raise _StoreKeyError(key + name, f"required by the {self.pipeline!r} pipeline")
        unused = {"storage_backends": posix, "storage_capacity": posix, "use_direct": posix, "max_cache_size": cache}
        for name, used in unused.items():
            value = getattr(cfg, name)
            if not used and value not in (None, False):
                raise _StoreKeyError(key + name, f"has no effect in the {self.pipeline!r} pipeline; remove it")
        backends = cfg.storage_backends
        if isinstance(backends, list) and (not backends or not all(backends)):
            raise _StoreKeyError(key + "storage_backends", "must name at least one directory, none empty")
        if backends == "":
            raise _StoreKeyError(key + "storage_backends", "must not be empty")
        roots = _roots(backends)
        if len(set(roots)) != len(roots):
            raise _StoreKeyError(
                key + "storage_backends",
                f"names one directory twice ({', '.join(roots)} after ~ "
                "expansion and normalisation): its capacity would be counted twice",
            )
        return self

    def to_spec(self) -> StoreSpec:
        """Plain values for `ucm.store.build_store` (which checks kv_block_size against the model)."""
        cfg = self.ucm_connector_config
        roots = _roots(cfg.storage_backends)
        return StoreSpec(
            pipeline=self.pipeline,
            storage_backends=roots,  # type: ignore[arg-type]
            storage_capacity=cfg.storage_capacity,
            max_cache_size=cfg.max_cache_size,
            use_direct=cfg.use_direct,
            workers=cfg.transfer_stream_number,
            kv_block_size=cfg.kv_block_size,
        )


def _roots(backends: str | list[str] | None) -> tuple[str, ...]:
    """The store's directories, `~` expanded and normalised (`/kv` and `/kv/` are one)."""
    listed = () if backends is None else (backends,) if isinstance(backends, str) else tuple(backends)
    return tuple(os.path.normpath(os.path.expanduser(b)) for b in listed)


@dataclass(frozen=True)
class UCMExtraConfig:
    sparse: MethodConfig | None = None
    stores: tuple[StoreConnector, ...] = field(default_factory=tuple)


_KNOWN = (SPARSE_KEY, "ucm_connectors", "ucm_connector_name", "ucm_connector_config")


def parse_extra_config(extra: dict[str, Any] | None) -> UCMExtraConfig:
    """Validate the whole extra config; raises ConfigError naming the offending key."""
    extra = dict(extra or {})
    unknown = [k for k in extra if k not in _KNOWN]
    if unknown:
        raise ConfigError(SOURCE, unknown[0], f"unknown key; valid keys: {', '.join(_KNOWN)}")
    sparse = None
    if SPARSE_KEY in extra:
        sparse = parse_sparse_config({SPARSE_KEY: extra[SPARSE_KEY]}, source=SOURCE)
    raw_stores: list[Any] = []
    if "ucm_connectors" in extra:
        if not isinstance(extra["ucm_connectors"], list):
            raise ConfigError(SOURCE, "ucm_connectors", "must be a list of {ucm_connector_name, ucm_connector_config}")
        raw_stores = list(extra["ucm_connectors"])
    if "ucm_connector_name" in extra or "ucm_connector_config" in extra:
        if "ucm_connectors" in extra:
            raise ConfigError(
                SOURCE, "ucm_connector_name", "give either ucm_connectors or ucm_connector_name, not both"
            )
        raw_stores = [{k: extra[k] for k in ("ucm_connector_name", "ucm_connector_config") if k in extra}]
    stores = []
    for i, raw in enumerate(raw_stores):
        try:
            stores.append(StoreConnector.model_validate(raw))
        except ValidationError as exc:
            raise from_validation_error(SOURCE, exc, f"ucm_connectors[{i}]") from None
    return UCMExtraConfig(sparse, tuple(stores))
