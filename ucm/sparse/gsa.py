"""GSA: per-head mean representations; score = sum over KV heads of the max over the group's
queries of <q, repr>; top-k runs on the host from a copy of the query, asynchronously."""

from __future__ import annotations

import torch

from ucm.config.sparse import GSAConfig
from ucm.ops.contract import SparseOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.esa import MeanReprScorer, repr_settings
from ucm.sparse.factory import BuildContext, windowed_method


class GSAScorer(MeanReprScorer):
    """With `host_ops` (UCM's GSA) representations live in host memory and are scored there,
    asynchronously; without, they live on the device and score like ESA's (the CUDA graph
    decode path, where nothing may wait on the host).

    `host_ops` is the CPU implementation of the contract (passed in, never imported here).
    """

    group_reduce = "max"

    def __init__(
        self,
        shapes: ModelShapes,
        ops: SparseOps,
        host_ops: SparseOps | None = None,
        merge: int | None = None,
        dtype: str = "auto",
        layer_merge: dict[int, int] | None = None,
    ) -> None:
        reps = dict(merge=merge, dtype=dtype, layer_merge=layer_merge)
        if host_ops is None:
            super().__init__(shapes, ops, **reps)
        else:
            super().__init__(shapes, ops, repr_device=torch.device("cpu"), score_ops=host_ops, **reps)
        self.host_scoring = host_ops is not None
        self.batch_safe = host_ops is None


def build(config: GSAConfig, shapes: ModelShapes, ctx: BuildContext) -> SparseMethod:
    """GSA's builder (registered in `ucm.config.sparse`): host scoring unless `ctx.host_scoring`
    is off (the CUDA graph path)."""
    host = ctx.host() if ctx.host_scoring else None
    return windowed_method(
        config,
        shapes,
        ctx.ops,
        lambda: GSAScorer(shapes, ctx.ops, host, **repr_settings(config)),
    )
