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

from typing import Any

from ucm.config.quest import QuestConfig
from ucm.ops.contract import SparseOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.factory import windowed_method
from ucm.sparse.quest_bound import BlockMinMax, QuestScorer, bound_guard_scorer

__all__ = ["BlockMinMax", "QuestConfig", "QuestScorer", "bound_guard_scorer", "build", "build_quest"]


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
    return windowed_method(
        config,
        shapes,
        ops,
        lambda: QuestScorer(shapes, ops, config.group_reduce, merge=config.blk_repre_inner_token_merge),
    )


#: the name the registry's builder paths use for a method module's builder ("ucm.sparse.quest:build")
build = build_quest
