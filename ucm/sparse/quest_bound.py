"""Quest's block statistics and bound: each block keeps the element-wise min and max of its keys
per KV head (per group of `merge` tokens, `ucm.ops.subblocks`), and a query head's score of
a block is sum over channels of max(q * min, q * max), an upper bound of q . k over every key of
the block. The method built on it is `ucm.sparse.quest`; windowed methods use the same bound as
their guard (`bound_guard_top`).
"""

from __future__ import annotations

from typing import Any

import torch

from ucm.ops.contract import GroupReduce, SparseOps
from ucm.ops.subblocks import sub_block_ids
from ucm.sparse.base import GroupedScorer, ModelShapes

__all__ = ["BlockMinMax", "QuestScorer", "bound_guard_scorer"]


class BlockMinMax:
    """Running element-wise min and max of the keys written to each physical block of one layer,
    per group of `merge` tokens (default: the block size, one group): mins, maxs [NB * R, Hkv, D]
    on `device` (sub-block b * R + r, `ucm.ops.subblocks`) in the backend's
    `group_bounds_dtype` for the model's keys (exact: float32, or the keys' own half precision on
    the GPU), folded in by `ops.block_minmax_update` with `merge` as its block size.

    Both start at 0 (a block never written scores 0 against any query, as a zero mean-of-K
    would); a group's first write (its offset 0) restarts it."""

    def __init__(self, shapes: ModelShapes, device: torch.device, ops: SparseOps, merge: int | None = None) -> None:
        self.merge = merge or shapes.block_size
        if self.merge < 1 or shapes.block_size % self.merge:
            raise ValueError(f"merge={self.merge} must divide the block size {shapes.block_size}")
        self.groups = shapes.block_size // self.merge
        n, h, d = shapes.num_blocks * self.groups, shapes.num_kv_heads, shapes.head_dim
        self.block_size = shapes.block_size
        self.device = device
        self.ops = ops
        dtype = ops.group_bounds_dtype(device, shapes.key_dtype)
        self.mins = torch.zeros(n, h, d, device=device, dtype=dtype)
        self.maxs = torch.zeros(n, h, d, device=device, dtype=dtype)

    def update(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Fold keys [T, Hkv, D] written at slot_mapping [T] (negative = padding) in."""
        self.ops.block_minmax_update(self.mins, self.maxs, key, slot_mapping, self.merge)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The statistics of blocks `src` into blocks `dst`."""
        src = sub_block_ids(src.to(self.device), self.groups)
        dst = sub_block_ids(dst.to(self.device), self.groups)
        self.mins.index_copy_(0, dst, self.mins.index_select(0, src))
        self.maxs.index_copy_(0, dst, self.maxs.index_select(0, src))

    def nbytes(self) -> int:
        return (self.mins.numel() + self.maxs.numel()) * self.mins.element_size()


class QuestScorer(GroupedScorer):
    """Quest's min / max representations per layer, scored on the backend's device.

    `group_reduce` ("max" or "mean") combines a GQA group's per-head bounds. Every written block
    is scored, the partial last one included (from its keys so far; it is always kept anyway).
    """

    batch_safe = True  # one op per layer, static shapes, no host read
    kv_heads_additive = True  # a sum over KV heads of bounds that are 0 for a zero query
    batch_largest = True  # larger bound = more important
    batch_full_blocks = False  # partial blocks have their (partial) statistics

    def __init__(
        self,
        shapes: ModelShapes,
        ops: SparseOps,
        group_reduce: GroupReduce = "max",
        repr_device: torch.device | None = None,
        merge: int | None = None,
    ) -> None:
        super().__init__(shapes, ops)
        if group_reduce not in ("mean", "max"):
            raise ValueError(f"unknown group reduce {group_reduce!r}; valid: mean, max")
        self.group_reduce: GroupReduce = group_reduce
        self.repr_device = torch.device(repr_device or shapes.device)
        self.stats = [BlockMinMax(shapes, self.repr_device, ops, merge) for _ in range(shapes.num_layers)]
        self.groups = shapes.block_size // (merge or shapes.block_size)

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.stats[layer].update(key, slot_mapping)

    @property
    def writes_from_caches(self) -> bool:
        return self.repr_device == self.shapes.device

    def write_from_caches(self, layers, k_caches, slot_mapping) -> None:
        stats = [self.stats[i] for i in layers]
        bs, merge = self.shapes.block_size, self.stats[0].merge
        self.ops.reps_write_layers(
            "minmax", [s.mins for s in stats], [s.maxs for s in stats], k_caches, slot_mapping, bs, merge
        )

    def group_reps(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Each written group's min and max [NB, R, Hkv, D]: the partial last block is scored
        from its keys so far (its groups past the row's end are -inf)."""
        st = self.stats[layer]
        return tuple(t.view(-1, self.groups, *t.shape[1:]) for t in (st.mins, st.maxs))

    def score_reps(self, q, reps, block_table, seq_lens, block_size) -> torch.Tensor:
        return self.ops.block_scores_minmax(q, *reps, block_table, seq_lens, block_size, self.group_reduce)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for st in self.stats:
            st.copy(src, dst)

    def memory_bytes(self) -> int:
        return sum(st.nbytes() for st in self.stats)


def bound_guard_scorer(
    config: Any, shapes: ModelShapes, ops: SparseOps, repr_device: torch.device | None = None
) -> QuestScorer | None:
    """The scorer a windowed method's `bound_guard_top` keeps its top blocks by (Quest's bound,
    max over the GQA group), or None when the config leaves the guard off."""
    return QuestScorer(shapes, ops, "max", repr_device=repr_device) if config.bound_guard_top else None
