"""Offload mode: a long request keeps only a fixed budget of KV blocks on the device.

After prefill, a request's blocks split into three regions by logical position:

    [0, init)            the init window: resident
    [init, middle_end)   the middle: in the KV store, except `S` *slot* blocks kept on the device
    [middle_end, n)      the tail (local window + slack, and the block being written): resident

The scheduler frees the middle blocks that are not slots (vLLM's null-block mechanism) once
they are in the store, and moves `middle_end` forward as decoding fills blocks. Every middle
block is scored through a *virtual* block id (its representation was copied there before
its device block could be reused), so selection sees the whole request. Each layer's slots
hold whichever middle blocks that layer read most recently; a selected block no slot holds
is loaded from the store into the least recently used slot that this step does not need.

This module is the arithmetic both sides share (`OffloadPolicy`) and the worker's residency
bookkeeping (`RequestResidency`, `VirtualBlocks`); it knows nothing of vLLM or of the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: blocks kept beyond the local window at the tail: the one being written and one full block
#: whose step may still be in flight when the scheduler frees (async scheduling)
TAIL_SLACK = 2


@dataclass(frozen=True)
class OffloadPolicy:
    """Budgets of an offloaded request, from the method's windows and ratio (in blocks)."""

    block_size: int
    init_blocks: int
    local_blocks: int
    ratio: float
    min_blocks: int
    margin_blocks: int

    def __post_init__(self) -> None:
        if self.block_size <= 0 or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"bad offload policy: {self}")

    @classmethod
    def from_config(cls, config, block_size: int) -> OffloadPolicy:
        """From an ESA/GSA/KVStar config with `offload` set."""
        return cls(block_size, config.init_window_sz, config.local_window_sz, config.sparse_ratio, config.min_blocks,
                   config.offload_margin_blocks)

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def slots(self, max_tokens: int) -> int:
        """Slot blocks for a request that can grow to `max_tokens`: the most middle blocks a layer
        selects at that length (the selection's budget less the windows it always keeps), plus
        the margin that keeps recently read blocks on the device."""
        n = self.blocks(max_tokens)
        k = min(n, max(math.ceil(n * self.ratio), self.min_blocks))
        return max(0, k - self.init_blocks - max(self.local_blocks, 1)) + self.margin_blocks

    def middle_end(self, processed_tokens: int) -> int:
        """First tail block when `processed_tokens` are computed and committed: everything
        before it (past the init window) is full, committed and outside the local window
        of any step still to run."""
        return processed_tokens // self.block_size - self.local_blocks - 1

    def budget(self, max_tokens: int) -> int:
        """Device blocks an offloaded request holds at most: init + slots + local window + slack."""
        return self.init_blocks + self.slots(max_tokens) + self.local_blocks + 1 + TAIL_SLACK

    def virtual_capacity(self, num_device_blocks: int) -> int:
        """Virtual block ids (representations of middle blocks) to provision: enough for every
        device block's worth of requests at this ratio."""
        return math.ceil(num_device_blocks / self.ratio)


class VirtualBlocks:
    """Ids `[first, first + count)` for middle-block representations, handed out and returned."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self._free = list(range(first + count - 1, first - 1, -1))

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"offload: {n} virtual blocks wanted, {len(self._free)} of {self.count} left "
                               "(the scheduler's accounting and the worker's disagree)")
        out = [self._free.pop() for _ in range(n)]
        return out

    def give_back(self, ids: Sequence[int]) -> None:
        self._free.extend(reversed(list(ids)))

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)


Loader = Callable[[int, list[str], list[int]], list[bool]]


class RequestResidency:
    """Where each block of one offloaded request is, per layer (worker side).

    `slot_of[layer, b - init]` is the slot holding middle block b in that layer (-1: in the store
    only) and `holder[layer, s]` the middle block slot s holds (-1: unknown after a failed load).
    The state is NumPy: it is read per layer and request on every decode step, where arrays this
    small cost a few microseconds per torch op but a fraction of that per NumPy op.
    """

    def __init__(self, num_layers: int, init_blocks: int, slot_positions: Sequence[int],
                 slot_physical: Sequence[int]) -> None:
        if len(slot_positions) != len(slot_physical):
            raise ValueError("one physical block per slot")
        self.init = init_blocks
        self.middle_end = init_blocks
        self.slot_physical = np.asarray(list(slot_physical), dtype=np.int64)
        s = len(slot_positions)
        self.holder = np.tile(np.asarray(list(slot_positions), dtype=np.int64), (num_layers, 1))
        self.slot_of = np.full((num_layers, 0), -1, dtype=np.int64)
        self._initial = list(slot_positions)
        self.last_use = np.zeros((num_layers, s), dtype=np.int64)
        self.virtual: list[int] = []  # virtual id of middle block init + i
        self.store_ids: list[str] = []  # store id of middle block init + i
        self.loads = 0
        self.failed_loads = 0
        self._tick = 0

    @property
    def num_slots(self) -> int:
        return int(self.slot_physical.size)

    def extend_middle(self, virtual_ids: Sequence[int], store_ids: Sequence[str]) -> None:
        """Blocks `[middle_end, middle_end + n)` joined the middle."""
        if len(virtual_ids) != len(store_ids):
            raise ValueError("one store id per virtual block")
        self.virtual.extend(virtual_ids)
        self.store_ids.extend(store_ids)
        self.middle_end += len(virtual_ids)
        grown = np.full((self.slot_of.shape[0], len(self.virtual)), -1, dtype=np.int64)
        grown[:, : self.slot_of.shape[1]] = self.slot_of
        for s, b in enumerate(self._initial):  # slots hold their own blocks until reused
            if b - self.init < grown.shape[1] and b - self.init >= self.slot_of.shape[1]:
                grown[:, b - self.init] = np.where(self.holder[:, s] == b, s, grown[:, b - self.init])
        self.slot_of = grown

    def scoring_row(self, row: torch.Tensor) -> torch.Tensor:
        """A block-table row with the middle blocks replaced by their virtual ids (in place)."""
        if self.virtual:
            row[self.init:self.middle_end] = torch.tensor(self.virtual, dtype=row.dtype, device=row.device)
        return row

    def lookup(self, layer: int, logical: np.ndarray, physical_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(physical ids with -1 for misses, missing logical blocks) for this layer's selected
        `logical` blocks (ascending); marks the held ones used. `physical_row` is the request's
        own block-table row (valid outside the middle)."""
        self._tick += 1
        logical = np.asarray(logical, dtype=np.int64)
        out = np.asarray(physical_row, dtype=np.int64)[np.maximum(logical, 0)]
        lo, hi = np.searchsorted(logical, (self.init, self.middle_end))
        if lo == hi:
            return out, logical[:0]
        mid = logical[lo:hi]
        slots = self.slot_of[layer, mid - self.init]
        held = slots >= 0
        self.last_use[layer, slots[held]] = self._tick
        out[lo:hi] = np.where(held, self.slot_physical[np.maximum(slots, 0)], -1)
        return out, mid[~held]

    def assign(self, layer: int, missing: Sequence[int], busy_physical: np.ndarray) -> list[int]:
        """Slots for the `missing` middle blocks: least recently used first, never one this step
        reads (`busy_physical`). Returns the slots' physical ids (the loads' destinations)."""
        missing = [int(b) for b in missing]
        free = ~np.isin(self.slot_physical, busy_physical)
        order = np.argsort(self.last_use[layer], kind="stable")
        order = order[free[order]]
        if order.size < len(missing):
            raise RuntimeError(f"offload: layer {layer} selected {len(missing)} blocks beyond its "
                               f"{self.num_slots} slots (slots are sized from the same ratio; this is a bug)")
        chosen = order[: len(missing)]
        old = self.holder[layer, chosen]
        self.slot_of[layer, old[old >= 0] - self.init] = -1
        self.holder[layer, chosen] = -1  # unknown until the load lands
        self.last_use[layer, chosen] = self._tick
        self._pending = (layer, chosen, missing)
        return self.slot_physical[chosen].tolist()

    def commit(self, ok: Sequence[bool]) -> None:
        """Record which of the loads `assign` planned arrived."""
        layer, chosen, missing = self._pending
        good = np.asarray(list(ok), dtype=bool)
        self.loads += len(missing)
        self.failed_loads += int((~good).sum())
        slots, blocks = chosen[good], np.asarray(missing, dtype=np.int64)[good]
        self.holder[layer, slots] = blocks
        self.slot_of[layer, blocks - self.init] = slots

    def resolve(self, layer: int, logical, physical_row, loader: Loader) -> np.ndarray:
        """Physical ids for this layer's selected `logical` blocks (ascending), loading the middle
        blocks no slot holds; blocks that fail to load are left out (one request; the worker
        batches requests with lookup/assign/commit)."""
        out, missing = self.lookup(layer, np.asarray(logical), np.asarray(physical_row))
        if missing.size:
            phys = self.assign(layer, missing, out[out >= 0])
            ok = loader(layer, [self.store_ids[b - self.init] for b in missing.tolist()], phys)
            self.commit(ok)
            out = fill_loaded(out, phys, ok)
        return out


def fill_loaded(out: np.ndarray, phys: Sequence[int], ok: Sequence[bool]) -> np.ndarray:
    """`out` (-1 where a block was missing, in ascending logical order, as `phys`) with the loaded
    slots filled in and the blocks that failed to load removed."""
    out = out.copy()
    miss = out < 0
    out[miss] = phys
    if all(ok):
        return out
    keep = np.ones(out.size, dtype=bool)
    keep[np.flatnonzero(miss)[~np.asarray(list(ok), dtype=bool)]] = False
    return out[keep]
