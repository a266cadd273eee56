"""Build a store from a validated connector config (plain values: this layer knows no vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ucm.store.api import BlockLayout, KVStore, StoreError
from ucm.store.dram import DramStore
from ucm.store.pipeline import EmptyStore, PipelineStore
from ucm.store.posix import PosixStore

Pipeline = Literal["Cache|Posix", "Posix", "Cache", "Empty"]

#: the stage stack each UCM connector name stands for (UcmPipelineStore: store_pipeline picks)
CONNECTOR_PIPELINES: dict[str, Pipeline] = {
    "UcmNfsStore": "Posix",
    "UcmDramStore": "Cache",
    "UcmPipelineStore": "Cache|Posix",
}


@dataclass(frozen=True)
class StoreSpec:
    """What to build. Sizes are bytes; `kv_block_size`, when given, must match the layout."""

    pipeline: Pipeline
    storage_backends: tuple[str, ...] = ()
    storage_capacity: int | None = None
    max_cache_size: int | None = None
    use_direct: bool = False
    workers: int = 1
    kv_block_size: int | None = None


def build_store(spec: StoreSpec, layout: BlockLayout) -> KVStore:
    """A store for one model layout; raises StoreError when the spec cannot serve it."""
    if spec.kv_block_size is not None and spec.kv_block_size != layout.block_nbytes:
        raise StoreError(
            f"kv_block_size is {spec.kv_block_size} B but a block of this model is "
            f"{layout.block_nbytes} B ({layout.num_shards} x {layout.shard_shape} {layout.dtype})"
        )
    stages = spec.pipeline.split("|")
    if spec.pipeline == "Empty":
        return EmptyStore(layout, spec.workers)
    posix = cache = None
    if "Posix" in stages:
        if not spec.storage_backends:
            raise StoreError(f"store_pipeline {spec.pipeline!r} needs storage_backends (a directory)")
        posix = PosixStore(
            spec.storage_backends,
            layout,
            workers=spec.workers,
            capacity=spec.storage_capacity,
            use_direct=spec.use_direct,
        )
    if "Cache" in stages:
        if spec.max_cache_size is None:
            raise StoreError(f"store_pipeline {spec.pipeline!r} needs max_cache_size (bytes of host memory)")
        cache = DramStore(layout, spec.max_cache_size, workers=spec.workers)
    if cache is not None and posix is not None:
        return PipelineStore(cache, posix, workers=spec.workers)
    store = cache or posix
    assert store is not None
    return store
