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
    """Where each block of one offloaded request is, per layer (worker side)."""

    def __init__(self, num_layers: int, init_blocks: int, slot_positions: Sequence[int],
                 slot_physical: Sequence[int]) -> None:
        if len(slot_positions) != len(slot_physical):
            raise ValueError("one physical block per slot")
        self.init = init_blocks
        self.middle_end = init_blocks
        self.slot_physical = torch.tensor(list(slot_physical), dtype=torch.int64)
        s = len(slot_positions)
        # holder[layer, slot]: logical block that slot holds in that layer (its own block at first)
        self.holder = torch.tensor(list(slot_positions), dtype=torch.int64).repeat(num_layers, 1)
        self.last_use = torch.zeros(num_layers, s, dtype=torch.int64)
        self.virtual: list[int] = []  # virtual id of middle block init + i
        self.store_ids: list[str] = []  # store id of middle block init + i
        self.loads = 0
        self.failed_loads = 0
        self._tick = 0

    @property
    def num_slots(self) -> int:
        return int(self.slot_physical.numel())

    def extend_middle(self, virtual_ids: Sequence[int], store_ids: Sequence[str]) -> None:
        """Blocks `[middle_end, middle_end + n)` joined the middle."""
        if len(virtual_ids) != len(store_ids):
            raise ValueError("one store id per virtual block")
        self.virtual.extend(virtual_ids)
        self.store_ids.extend(store_ids)
        self.middle_end += len(virtual_ids)

    def scoring_row(self, row: torch.Tensor) -> torch.Tensor:
        """A block-table row with the middle blocks replaced by their virtual ids (in place)."""
        if self.virtual:
            row[self.init:self.middle_end] = torch.tensor(self.virtual, dtype=row.dtype, device=row.device)
        return row

    def resolve(self, layer: int, logical: torch.Tensor, physical_row: torch.Tensor, loader: Loader) -> torch.Tensor:
        """Physical ids for this layer's selected `logical` blocks (ascending); middle blocks no
        slot holds are loaded from the store first. `physical_row` is the request's own block-table
        row (valid outside the middle). Blocks that fail to load are dropped from the result
        (counted in `failed_loads`), never read from a slot holding something else."""
        self._tick += 1
        out = physical_row.index_select(0, logical.clamp(min=0).to(physical_row.device)).to(torch.int64)
        in_middle = (logical >= self.init) & (logical < self.middle_end)
        if not bool(in_middle.any()):
            return out
        held = self.holder[layer]
        mids = logical[in_middle]
        hit = held[None, :] == mids[:, None]  # [m, S]
        found = hit.any(1)
        slot_of = hit.to(torch.int8).argmax(1)
        needed_slots = slot_of[found]
        self.last_use[layer, needed_slots] = self._tick
        missing = mids[~found].tolist()
        ok_mask = torch.ones(mids.numel(), dtype=torch.bool)
        if missing:
            busy = torch.zeros(self.num_slots, dtype=torch.bool)
            busy[needed_slots] = True
            free = [s for s in torch.argsort(self.last_use[layer]).tolist() if not busy[s]]
            if len(free) < len(missing):
                raise RuntimeError(f"offload: layer {layer} selected {len(missing)} blocks beyond its "
                                   f"{self.num_slots} slots (slots are sized from the same ratio; this is a bug)")
            slots = free[: len(missing)]
            ids = [self.store_ids[b - self.init] for b in missing]
            phys = self.slot_physical[slots].tolist()
            ok = loader(layer, ids, phys)
            self.loads += len(missing)
            miss_rows = (~found).nonzero().flatten()
            for j, (b, s, good) in enumerate(zip(missing, slots, ok)):
                if good:
                    self.holder[layer, s] = b
                    self.last_use[layer, s] = self._tick
                    slot_of[miss_rows[j]] = s
                else:
                    self.holder[layer, s] = -1  # its content is unknown now
                    ok_mask[miss_rows[j]] = False
                    self.failed_loads += 1
        mid_phys = self.slot_physical[slot_of]
        out[in_middle] = mid_phys
        if not bool(ok_mask.all()):
            keep = torch.ones_like(logical, dtype=torch.bool)
            keep[in_middle.nonzero().flatten()[~ok_mask]] = False
            out = out[keep]
        return out
