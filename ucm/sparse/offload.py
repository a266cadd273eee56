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
bookkeeping (`Residency`, `VirtualBlocks`); it knows nothing of vLLM or of the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
        """From an ESA/GSA/KVStar config with `offload` set. A request keeps on the device what its
        greediest layer reads: the ratio is the largest of `sparse_ratio` and `layer_sparse_ratio`'s."""
        return cls(
            block_size,
            config.init_window_sz,
            config.local_window_sz,
            max([config.sparse_ratio, *config.layer_sparse_ratio.values()]),
            config.min_blocks,
            config.offload_margin_blocks,
        )

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
            raise RuntimeError(
                f"offload: {n} virtual blocks wanted, {len(self._free)} of {self.count} left "
                "(the scheduler's accounting and the worker's disagree)"
            )
        out = [self._free.pop() for _ in range(n)]
        return out

    def give_back(self, ids: Sequence[int]) -> None:
        self._free.extend(reversed(list(ids)))

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)


Loader = Callable[[int, list[str], list[int]], list[bool]]


@dataclass
class OffloadedRequest:
    """One offloaded request as the worker sees it: its slot blocks and its middle."""

    init: int
    slot_physical: np.ndarray  # [S] device blocks this request may load into
    virtual: list[int] = field(default_factory=list)  # virtual id of middle block init + i
    virtual_row: torch.Tensor | None = None  # `virtual` as a tensor, rebuilt when the middle grows
    loads: int = 0
    failed_loads: int = 0

    @property
    def middle_end(self) -> int:
        return self.init + len(self.virtual)

    def scoring_row(self, row: torch.Tensor) -> torch.Tensor:
        """A block-table row with the middle blocks replaced by their virtual ids (in place)."""
        if self.virtual:
            if self.virtual_row is None or self.virtual_row.numel() != len(self.virtual):  # the middle grew
                self.virtual_row = torch.tensor(self.virtual, dtype=torch.int64)
            row[self.init : self.middle_end] = self.virtual_row  # copy_ casts and moves
        return row


class Residency:
    """Which slot holds which middle block, per layer, for every offloaded request of a worker.

    Every middle block of every request has its own virtual id, and every slot is its own
    device block, so the maps are global arrays: `slot_of[layer, v]` is the device block holding
    virtual block v in that layer (-1: in the store only) and `holder[layer, p]` the virtual
    block device block p holds (-1: none, or unknown after a failed load). A layer's selection
    over all rows then resolves in a handful of NumPy operations whatever the batch; Python
    runs per row only where a row misses blocks (a new retrieval's changes). Indices into both
    arrays are offsets from the first virtual id.
    """

    def __init__(self, num_layers: int, init_blocks: int, virtual: VirtualBlocks, num_device_blocks: int) -> None:
        self.init_blocks = init_blocks
        self.virtual = virtual
        self.slot_of = np.full((num_layers, virtual.count), -1, dtype=np.int64)
        self.holder = np.full((num_layers, num_device_blocks), -1, dtype=np.int64)
        self.last_use = np.zeros((num_layers, num_device_blocks), dtype=np.int64)
        self.store_id = np.empty(virtual.count, dtype=object)
        self.requests: dict[str, OffloadedRequest] = {}
        self._tick = 0

    # ---------------------------------------------------------------- membership
    def extend(
        self,
        req_id: str,
        store_ids: Sequence[str],
        slot_positions: Sequence[int] | None = None,
        slot_physical: Sequence[int] | None = None,
    ) -> list[int]:
        """Blocks `[middle_end, middle_end + n)` of `req_id` joined its middle: their virtual ids.
        The first call names the request's slots (logical positions in the middle and their
        device blocks), which hold their own blocks in every layer until reused."""
        req = self.requests.get(req_id)
        new = req is None
        if new:
            if slot_positions is None or slot_physical is None or len(slot_positions) != len(slot_physical):
                raise RuntimeError(f"offload: first update of {req_id} names no slots (one device block per slot)")
            req = OffloadedRequest(self.init_blocks, np.asarray(list(slot_physical), dtype=np.int64))
        ids = self.virtual.take(len(store_ids))
        first = self.virtual.first
        at = np.asarray(ids, dtype=np.int64) - first
        self.store_id[at] = list(store_ids)
        self.slot_of[:, at] = -1
        req.virtual.extend(ids)
        if new:
            self.requests[req_id] = req
            for pos, phys in zip(slot_positions, req.slot_physical.tolist(), strict=True):
                if not req.init <= pos < req.middle_end:
                    raise RuntimeError(f"offload: slot at block {pos} is outside the middle of {req_id}")
                v = req.virtual[pos - req.init] - first
                self.slot_of[:, v] = phys
                self.holder[:, phys] = v
                self.last_use[:, phys] = 0
        return ids

    def drop(self, req_id: str) -> OffloadedRequest | None:
        """Forget a request: its virtual ids go back, its slots hold nothing."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        at = np.asarray(req.virtual, dtype=np.int64) - self.virtual.first
        self.slot_of[:, at] = -1
        self.store_id[at] = None
        self.holder[:, req.slot_physical] = -1
        self.last_use[:, req.slot_physical] = 0
        self.virtual.give_back(req.virtual)
        return req

    # ---------------------------------------------------------------- per layer
    def resolve(
        self, layer: int, table: np.ndarray, kept: np.ndarray, owners: Sequence[OffloadedRequest | None], loader: Loader
    ) -> tuple[np.ndarray, np.ndarray]:
        """(device block table, kept counts) for one layer's selection `table` [B, M] (the first
        `kept[r]` entries of row r: device ids, and virtual ids for middle blocks), loading the
        middle blocks no slot holds into that row's least recently used slots this step does
        not read. Blocks that fail to load are left out of their row."""
        self._tick += 1
        kept_in = kept
        first, count = self.virtual.first, self.virtual.count
        valid = np.arange(table.shape[1])[None, :] < kept[:, None]
        v = table.astype(np.int64, copy=False) - first
        virt = valid & (v >= 0) & (v < count)
        if not virt.any():
            return table, kept
        at = v[virt]
        phys = self.slot_of[layer, at]
        held = phys >= 0
        self.last_use[layer, phys[held]] = self._tick
        out = table.astype(np.int64, copy=True)
        out[virt] = phys
        if held.all():
            return out, kept
        rows, cols = np.nonzero(virt)
        miss_rows, miss_cols, miss_v = rows[~held], cols[~held], at[~held]
        plan: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for r in np.unique(miss_rows).tolist():
            req = owners[r]
            if req is None:
                raise RuntimeError(f"offload: row {r} reads a virtual block but is not offloaded")
            mine = miss_rows == r
            need_v, need_c = miss_v[mine], miss_cols[mine]
            cand = req.slot_physical
            free = cand[~np.isin(cand, out[r, : kept[r]])]
            chosen = free[np.argsort(self.last_use[layer, free], kind="stable")][: need_v.size]
            if chosen.size < need_v.size:
                raise RuntimeError(
                    f"offload: layer {layer} selected {need_v.size} blocks beyond its "
                    f"{cand.size} slots (slots are sized from the greediest layer's ratio; this is a bug)"
                )
            old = self.holder[layer, chosen]
            self.slot_of[layer, old[old >= 0]] = -1
            self.holder[layer, chosen] = -1  # unknown until the load lands
            self.last_use[layer, chosen] = self._tick
            plan.append((r, need_c, need_v, chosen))
        dst = np.concatenate([p[3] for p in plan])
        ok = np.asarray(
            loader(layer, self.store_id[np.concatenate([p[2] for p in plan])].tolist(), dst.tolist()), dtype=bool
        )
        at_ok = 0
        for r, need_c, need_v, chosen in plan:
            got = ok[at_ok : at_ok + chosen.size]
            at_ok += chosen.size
            req = owners[r]
            req.loads += chosen.size
            self.holder[layer, chosen[got]] = need_v[got]
            self.slot_of[layer, need_v[got]] = chosen[got]
            out[r, need_c] = chosen
            if not got.all():
                if kept is kept_in:
                    kept = kept.copy()
                req.failed_loads += int((~got).sum())
                row = np.delete(out[r, : kept[r]], need_c[~got])
                out[r, : row.size] = row
                out[r, row.size :] = 0
                kept[r] = row.size
        return out, kept
