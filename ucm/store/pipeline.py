"""Stores built from other stores: DRAM in front of POSIX, and a store that stores nothing."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ucm.store.api import BlockId, BlockMissing, Item, KVStore, StoreError, _run_chunk
from ucm.store.dram import DramStore

log = logging.getLogger("ucm.store")


class EmptyStore(KVStore):
    """Always a miss, dumps go nowhere: the overhead of the store path with no I/O."""

    def lookup(self, ids: Sequence[BlockId]) -> list[bool]:
        return [False] * len(ids)

    def _read(self, block_id: BlockId, shard: int, dst: torch.Tensor) -> None:
        raise BlockMissing(f"block {block_id}: the Empty store holds nothing")

    def _write(self, block_id: BlockId, shard: int, src: torch.Tensor) -> None:
        return None


class PipelineStore(KVStore):
    """`cache` (DRAM) in front of `backing` (POSIX).

    lookup: the cache first, the backing store for the cache's misses. load: a cached shard is
    copied from memory; otherwise it is read from the backing store (checked there) and then
    put into the cache. dump: write-through, the cache first (best effort: a full cache is not
    an error), then the backing store, whose failure fails the task.
    """

    def __init__(self, cache: DramStore, backing: KVStore, *, workers: int = 1) -> None:
        if cache.layout != backing.layout:
            raise ValueError("cache and backing store must share one BlockLayout")
        super().__init__(cache.layout, workers)
        self.cache = cache
        self.backing = backing

    def lookup(self, ids: Sequence[BlockId]) -> list[bool]:
        hits = self.cache.lookup(ids)
        miss_at = [i for i, h in enumerate(hits) if not h]
        if miss_at:
            for i, h in zip(miss_at, self.backing.lookup([ids[i] for i in miss_at]), strict=True):
                hits[i] = h
        return hits

    def _begin_load(self, ids: Sequence[BlockId]) -> None:
        self.backing._begin_load(ids)

    def _end_load(self, ids: Sequence[BlockId]) -> None:
        self.backing._end_load(ids)

    def _read(self, block_id: BlockId, shard: int, dst: torch.Tensor) -> None:
        failures = self._read_items([(block_id, shard, dst)])
        if failures:
            raise failures[0][1]

    def _read_items(self, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
        """The cache's hits in one batched pass; only its misses go to the backing store."""
        missed = {block_id for block_id, _ in self.cache._read_items(chunk)}
        if not missed:
            return []
        return _run_chunk(self._read_backing_run, [item for item in chunk if item[0] in missed])

    def _read_backing_run(self, block_id: BlockId, first: int, dsts: list[torch.Tensor]) -> None:
        self.backing._read_run(block_id, first, dsts)
        for k, dst in enumerate(dsts):
            self._fill(block_id, first + k, dst)

    def _write(self, block_id: BlockId, shard: int, src: torch.Tensor) -> None:
        self._fill(block_id, shard, src)
        self.backing._write(block_id, shard, src)

    def _fill(self, block_id: BlockId, shard: int, data: torch.Tensor) -> None:
        try:
            self.cache._write(block_id, shard, data)
        except StoreError as exc:  # a cache that cannot take the block only costs a later read
            log.debug("ucm.store: cache fill of %s skipped: %s", block_id, exc)

    def close(self) -> None:
        super().close()
        self.cache.close()
        self.backing.close()
