"""UCM's `kv_connector_extra_config`, validated when the engine starts.

    {"ucm_sparse_config": {"ESA": {...}},            # one sparse method (optional)
     "ucm_connectors": [{"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {...}}]}

UCM's older single-store shape (`ucm_connector_name` + `ucm_connector_config` at the top) is
accepted too. Unknown keys are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ucm.config.errors import ConfigError, from_validation_error
from ucm.config.loader import SPARSE_KEY, parse_sparse_config
from ucm.config.sparse import MethodConfig

SOURCE = "kv_connector_extra_config"


class StoreSettings(BaseModel):
    """Settings of a KV store (the store itself is issue "KV store"; the keys are checked now)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    storage_backends: str | list[str] | None = None
    kv_block_size: int | None = Field(default=None, ge=1)
    use_direct: bool = False
    transfer_stream_number: int = Field(default=1, ge=1, alias="transferStreamNumber")
    store_pipeline: Literal["Cache|Posix", "Posix", "Cache", "Empty"] | None = None
    max_cache_size: int | None = Field(default=None, ge=1)


class StoreConnector(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ucm_connector_name: Literal["UcmNfsStore", "UcmPipelineStore", "UcmDramStore"]
    ucm_connector_config: StoreSettings = StoreSettings()


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
            raise ConfigError(SOURCE, "ucm_connector_name", "give either ucm_connectors or ucm_connector_name, not both")
        raw_stores = [{k: extra[k] for k in ("ucm_connector_name", "ucm_connector_config") if k in extra}]
    stores = []
    for i, raw in enumerate(raw_stores):
        try:
            stores.append(StoreConnector.model_validate(raw))
        except ValidationError as exc:
            raise from_validation_error(SOURCE, exc, f"ucm_connectors[{i}]") from None
    return UCMExtraConfig(sparse, tuple(stores))
