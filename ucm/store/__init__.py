"""KV block store: content-addressed blocks, per-layer shards, async load/dump (docs/store.md).

A core layer: it knows nothing of vLLM. The connector builds a store with `build_store`.
"""

from ucm.store.api import (
    BlockCorrupt,
    BlockId,
    BlockLayout,
    BlockMissing,
    KVStore,
    StoreError,
    StoreFull,
    Task,
    TaskFailed,
    block_hash,
    host_buffer,
    prefix_block_hashes,
    root_hash,
    scoped_id,
)
from ucm.store.dram import DramStore
from ucm.store.factory import CONNECTOR_PIPELINES, StoreSpec, build_store
from ucm.store.pipeline import EmptyStore, PipelineStore
from ucm.store.posix import PosixStore

__all__ = [
    "CONNECTOR_PIPELINES",
    "BlockCorrupt",
    "BlockId",
    "BlockLayout",
    "BlockMissing",
    "DramStore",
    "EmptyStore",
    "KVStore",
    "PipelineStore",
    "PosixStore",
    "StoreError",
    "StoreFull",
    "StoreSpec",
    "Task",
    "TaskFailed",
    "block_hash",
    "build_store",
    "host_buffer",
    "prefix_block_hashes",
    "root_hash",
    "scoped_id",
]
