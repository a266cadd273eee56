"""GSA: per-head mean representations; score = sum over KV heads of the max over the group's
queries of <q, repr>; top-k runs on the host from a copy of the query, asynchronously."""

from __future__ import annotations

import torch

from ucm.ops.contract import SparseOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.esa import MeanReprScorer


class GSAScorer(MeanReprScorer):
    """Representations live in host memory; scoring uses the host's op backend.

    `host_ops` is the CPU implementation of the contract (passed in, never imported here).
    """

    group_reduce = "max"
    host_scoring = True

    def __init__(self, shapes: ModelShapes, ops: SparseOps, host_ops: SparseOps) -> None:
        super().__init__(shapes, ops, repr_device=torch.device("cpu"), score_ops=host_ops)
