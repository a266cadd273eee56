"""ESA: a block is the mean of its keys per KV head; its score is the dot product with the
GQA-group-averaged query, summed over KV heads. With `blk_repre_inner_token_merge` below the
block size, a block keeps one mean per group of that many tokens and scores as its best group
(`ucm.ops.subblocks`)."""

from __future__ import annotations

import torch

from ucm.config.sparse import ESAConfig, MeanReprConfig
from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockAccumulator, GroupedScorer, ModelShapes, SparseMethod
from ucm.sparse.factory import BuildContext, windowed_method


class MeanReprScorer(GroupedScorer):
    """Mean-of-K representations, kept per physical block and refreshed when a block fills.

    `group_reduce` picks how a GQA group's queries meet the representation ("mean": ESA,
    "max": GSA). `repr_device` is where representations and scoring live. `merge` (default: the
    block size) is the tokens per representation: below the block size a block keeps
    block_size // merge means and scores as the best of them. `dtype` (`blk_repre_dtype`): the
    sums' dtype, "auto" the backend's `group_sums_dtype`.
    """

    group_reduce = "mean"
    batch_safe = True
    kv_heads_additive = True

    def __init__(
        self,
        shapes: ModelShapes,
        ops: SparseOps,
        repr_device: torch.device | None = None,
        score_ops: SparseOps | None = None,
        merge: int | None = None,
        dtype: str = "auto",
        layer_merge: dict[int, int] | None = None,
    ) -> None:
        super().__init__(shapes, ops)
        self.merge = merge or shapes.block_size
        self.repr_device = torch.device(repr_device or shapes.device)
        self.score_ops = score_ops or ops
        # one running sum of K per block and head; for the full blocks that are scored, the sum
        # ranks exactly as the mean (a common factor of 1 / block_size)
        sums_dtype = None if dtype == "auto" else getattr(torch, dtype)  # None: the backend's choice
        merges = [(layer_merge or {}).get(layer, self.merge) for layer in range(shapes.num_layers)]
        self.acc = [BlockAccumulator(shapes, m, self.repr_device, ops=self.score_ops, dtype=sums_dtype) for m in merges]
        self.groups = shapes.block_size // self.merge  # the layers' default (`groups_of`: each layer's)

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.acc[layer].add(key, slot_mapping)

    @property
    def writes_from_caches(self) -> bool:
        return self.repr_device == self.shapes.device

    def write_from_caches(self, layers, k_caches, slot_mapping) -> None:
        """One write per group size (every layer's unless `layer_merge` sets some apart)."""
        by_merge: dict[int, list[int]] = {}
        for j, layer in enumerate(layers):
            by_merge.setdefault(self.acc[layer].merge, []).append(j)
        for merge, idx in by_merge.items():
            accs = [self.acc[layers[j]] for j in idx]
            self.score_ops.reps_write_layers(
                "sums",
                [a.sums for a in accs],
                [a.abs_sums for a in accs],
                [k_caches[j] for j in idx],
                slot_mapping,
                self.shapes.block_size,
                merge,
            )

    batch_full_blocks = True  # the partial last block has no representation yet

    def group_reps(self, layer: int) -> tuple[torch.Tensor, ...]:
        return (self.acc[layer].sums,)  # [NB, R, Hkv, D]

    def score_reps(self, q, reps, block_table, seq_lens, block_size) -> torch.Tensor:
        return self.score_ops.block_scores_dot(q, *reps, block_table, seq_lens, block_size, self.group_reduce)

    def batch_scores_into(self, layer, q, block_table, seq_lens, out, keep_rows) -> torch.Tensor:
        """One op that writes the due rows' scores into `out` and reads nothing for the others."""
        (sums,) = self.batch_reps(layer)
        bs = self.shapes.block_size
        return self.score_ops.block_scores_dot(
            q, sums, block_table, seq_lens, bs, self.group_reduce, out=out, keep_rows=keep_rows
        )

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for acc in self.acc:
            acc.copy(src, dst)

    def memory_bytes(self) -> int:
        return sum(a.nbytes() for a in self.acc)


def repr_settings(config: MeanReprConfig) -> dict:
    """A `MeanReprScorer`'s representation arguments from ESA's / GSA's config."""
    return {
        "merge": config.blk_repre_inner_token_merge,
        "dtype": config.blk_repre_dtype,
        "layer_merge": config.layer_repre_inner_token_merge,
    }


class ESAScorer(MeanReprScorer):
    group_reduce = "mean"


def build(config: ESAConfig, shapes: ModelShapes, ctx: BuildContext) -> SparseMethod:
    """ESA's builder (registered in `ucm.config.sparse`)."""
    return windowed_method(
        config,
        shapes,
        ctx.ops,
        lambda: ESAScorer(shapes, ctx.ops, **repr_settings(config)),
    )
