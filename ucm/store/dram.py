"""Host-memory block cache (UCM's `UcmDramStore`, the "Cache" stage of a pipeline).

Bounded by `capacity` bytes (`max_cache_size`), least recently used first out. A block is one
flat uint8 buffer of `block_nbytes`, allocated once and reused when a block is evicted (pinned
when CUDA is available, so that a later `.to(device, non_blocking=True)` is a real DMA). A
block is visible once all of its shards are in; partial blocks count towards the capacity and
are evicted like the others. A reader keeps a reference to the buffer it copies from, so an
eviction during a copy cannot tear it (the buffer is only reused once nobody holds it).
Bytes move through `copy_host_bytes`: one call per chunk of a task, every pair checked before the
first byte moves, each pair one NumPy copy on the calling worker's thread with the GIL released.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ucm.store.api import BlockId, BlockLayout, BlockMissing, Item, KVStore, StoreFull


def copy_host_bytes(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """dst[:] = src for each pair of uint8 host tensors of one size, on the calling thread only.

    Not `Tensor.copy_`, which fans out to torch's intra-op threads (from several store workers on
    a busy machine their barriers cost 10-80x); NumPy copies on this thread and releases the GIL,
    so the store's workers copy in parallel. Every pair is checked before the first byte moves: a
    bad pair copies nothing.
    """
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_host_bytes: {len(dsts)} destinations but {len(srcs)} sources")
    for d, s in zip(dsts, srcs, strict=True):
        if d.numel() != s.numel() or d.dtype != torch.uint8 or s.dtype != torch.uint8:
            raise ValueError(
                "copy_host_bytes takes uint8 tensors of one size, "
                f"got {d.dtype}[{d.numel()}] and {s.dtype}[{s.numel()}]"
            )
        if d.device.type != "cpu" or s.device.type != "cpu":
            raise ValueError(f"copy_host_bytes takes host tensors, got {d.device} and {s.device}")
    for d, s in zip(dsts, srcs, strict=True):
        np.copyto(d.numpy(), s.numpy())


@dataclass
class _Entry:
    buf: torch.Tensor  # [block_nbytes] uint8
    filled: list[bool]
    count: int = 0

    def complete(self) -> bool:
        return self.count == len(self.filled)


class DramStore(KVStore):
    """LRU cache of whole blocks in host memory."""

    def __init__(
        self,
        layout: BlockLayout,
        capacity: int,
        *,
        workers: int = 1,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(layout, workers)
        if capacity < layout.block_nbytes:
            raise StoreFull(f"max_cache_size {capacity} B is smaller than one block ({layout.block_nbytes} B)")
        self.capacity = capacity
        self.max_blocks = capacity // layout.block_nbytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._entries: OrderedDict[BlockId, _Entry] = OrderedDict()
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def used_bytes(self) -> int:
        with self._lock:
            return len(self._entries) * self.layout.block_nbytes

    def lookup(self, ids: Sequence[BlockId]) -> list[bool]:
        """A hit also counts as a use: a lookup is the prelude to a load."""
        out = []
        with self._lock:
            for block_id in ids:
                e = self._entries.get(block_id)
                hit = e is not None and e.complete()
                if hit:
                    self._entries.move_to_end(block_id)
                out.append(hit)
        return out

    def _read(self, block_id: BlockId, shard: int, dst: torch.Tensor) -> None:
        failures = self._read_items([(block_id, shard, dst)])
        if failures:
            raise failures[0][1]

    def _write(self, block_id: BlockId, shard: int, src: torch.Tensor) -> None:
        failures = self._write_items([(block_id, shard, src)])
        if failures:
            raise failures[0][1]

    def _read_items(self, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
        """A whole chunk under one lock, then one `copy_host_bytes` call for all of it."""
        n = self.layout.shard_nbytes
        failures: list[tuple[BlockId, BaseException]] = []
        dsts, srcs, held = [], [], []
        with self._lock:
            for block_id, shard, dst in chunk:
                e = self._entries.get(block_id)
                if e is None or not e.complete():
                    self.misses += 1
                    failures.append((block_id, BlockMissing(f"block {block_id} is not in the DRAM cache")))
                    continue
                self._entries.move_to_end(block_id)
                self.hits += 1
                held.append(e.buf)  # a held buffer is never handed to another block (see _take_buffer)
                dsts.append(dst)
                srcs.append(e.buf[shard * n : (shard + 1) * n])
        copy_host_bytes(dsts, srcs)
        del held
        return failures

    def _write_items(self, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
        n = self.layout.shard_nbytes
        failures: list[tuple[BlockId, BaseException]] = []
        dsts, srcs, filled, held = [], [], [], []
        with self._lock:
            for block_id, shard, src in chunk:
                e = self._entries.get(block_id)
                if e is None:
                    try:
                        buf = self._take_buffer()
                    except StoreFull as exc:
                        failures.append((block_id, exc))
                        continue
                    e = self._entries[block_id] = _Entry(buf, [False] * self.layout.num_shards)
                elif e.complete():  # same id, same bytes
                    self._entries.move_to_end(block_id)
                    continue
                held.append(e.buf)
                dsts.append(e.buf[shard * n : (shard + 1) * n])
                srcs.append(src)
                filled.append((e, shard))
        copy_host_bytes(dsts, srcs)
        del held
        with self._lock:
            for e, shard in filled:
                if not e.filled[shard]:
                    e.filled[shard] = True
                    e.count += 1
        return failures

    def _take_buffer(self) -> torch.Tensor:
        """A block buffer: a new one while under the bound, else the least recently used one's."""
        if len(self._entries) < self.max_blocks:
            if self._free:
                return self._free.pop()
            return torch.empty(self.layout.block_nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        if not self._entries:
            raise StoreFull("DRAM cache cannot hold a single block")
        victim = next(iter(self._entries))  # least recently used
        buf = self._entries.pop(victim).buf
        # reuse only if no reader or writer still holds it (the refs left: `buf` and the call's argument)
        if sys.getrefcount(buf) <= 2:
            return buf
        return torch.empty(self.layout.block_nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
