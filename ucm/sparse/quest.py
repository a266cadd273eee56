"""Quest: a block is the element-wise min and max of its keys per KV head; its score for a
query head is sum over channels of max(q * min, q * max), an upper bound of q . k over every
key of the block, combined over the GQA group (max or mean) and summed over KV heads.

The bound is exact for the block's best key in every channel at once, so a block holding one
key that points along the query ranks high even when its other keys are noise: the mean of K
(ESA, GSA) dilutes such a key by the block size, the box keeps it.

Both statistics run as keys are written (`block_minmax_update`: a block restarts when its
offset 0 is written), like the sums of the mean-of-K methods, and a partial last block is
scored from the keys written so far. Scoring is one op per layer on the device
(`block_scores_minmax`) with static shapes and no host read, so Quest runs on the CUDA graph
batch path as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ucm.config.quest import QuestConfig
from ucm.ops.contract import GroupReduce, SparseOps
from ucm.sparse.base import BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.subblocks import block_max, sub_block_ids, sub_block_table

__all__ = ["BlockMinMax", "QuestConfig", "QuestScorer", "bound_guard_scorer", "build", "build_quest"]


class BlockMinMax:
    """Running element-wise min and max of the keys written to each physical block of one layer,
    per group of `merge` tokens (default: the block size, one group): mins, maxs [NB * R, Hkv, D]
    float32 on `device` (sub-block b * R + r, `ucm.sparse.subblocks`), folded in by
    `ops.block_minmax_update` with `merge` as its block size.

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
        self.mins = torch.zeros(n, h, d, device=device)
        self.maxs = torch.zeros(n, h, d, device=device)

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


class QuestScorer(BlockScorer):
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
        return self.repr_device == self.shapes.device and self.groups == 1

    def write_from_caches(self, layers, k_caches, slot_mapping) -> None:
        stats = [self.stats[i] for i in layers]
        bs = self.shapes.block_size
        self.ops.reps_write_layers(
            "minmax", [s.mins for s in stats], [s.maxs for s in stats], k_caches, slot_mapping, bs, bs
        )

    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        dev = self.repr_device
        return self._bound(layer, q.to(dev), block_table.to(dev), seq_lens.to(dev)).to(q.device)

    def batch_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """`score` of every row's written blocks, partial last block included (no per-request
        state: the CUDA graph decode path)."""
        return self._bound(layer, q, block_table, seq_lens)

    def _bound(self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Block scores [B, M]: each block's best group's bound (groups past a row's end are -inf)."""
        st = self.stats[layer]
        table = sub_block_table(block_table, self.groups)
        s = self.ops.block_scores_minmax(q, st.mins, st.maxs, table, seq_lens, st.merge, self.group_reduce)
        return block_max(s, self.groups)

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


def _ops_of(ctx: Any) -> SparseOps | None:
    """The backend a build context carries: the context itself when it is a `SparseOps`, else its
    `ops` attribute (the registry's build context), else None."""
    if ctx is None or isinstance(ctx, SparseOps):
        return ctx
    return getattr(ctx, "ops", None)


def build_quest(
    config: QuestConfig | dict, shapes: ModelShapes, ctx: Any = None, *, ops: SparseOps | None = None
) -> SparseMethod:
    """A ready-to-run Quest `SparseMethod`, assembled as `build_sparse_method` assembles ESA's:
    the config's windows, ratio and minimum as every layer's policy (`dense_layers` dense), the
    shared `BlockSelector`, a `QuestScorer` and the config's retrieval stride and concurrency
    threshold.

    config: a `QuestConfig` or the dict of its keys (`{"Quest": {...}}` or the inner dict).
    ctx: the registry's build context (its `.ops` is used) or a `SparseOps`; `ops` overrides
    both; neither given: the probed backend (`ucm.ops.get_ops()`).
    """
    if not isinstance(config, QuestConfig):
        body = config.get(QuestConfig.method, config) if isinstance(config, dict) else config
        config = QuestConfig.model_validate(body)
    ops = ops or _ops_of(ctx)
    if ops is None:
        from ucm.ops.registry import get_ops

        ops = get_ops()
    from ucm.sparse.factory import windowed_method

    return windowed_method(
        config,
        shapes,
        ops,
        lambda: QuestScorer(shapes, ops, config.group_reduce, merge=config.blk_repre_inner_token_merge),
    )


#: the name the registry's builder paths use for a method module's builder ("ucm.sparse.quest:build")
build = build_quest
