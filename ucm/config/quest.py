"""Config of Quest, the fifth sparse method (no torch here: the config layer parses it).

    {"ucm_sparse_config": {"Quest": {"sparse_ratio": 0.3, "group_reduce": "max", ...}}}

The shared window / ratio / offload keys are `WindowedMethodConfig`'s; Quest adds how a GQA
group's query heads combine their per-head bounds. The algorithm is `ucm.sparse.quest`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from ucm.config.sparse import _DEMO_WINDOWS, Stride, WindowedMethodConfig
from ucm.methods import MethodSpec, register_method


class QuestConfig(WindowedMethodConfig):
    """Quest: each block keeps the element-wise min and max of its keys per KV head; a query
    head's score of a block is sum over channels of max(q * min, q * max), the most q . k can
    reach on any key of the block.

    group_reduce: how a GQA group's query heads combine their bounds before the sum over KV
    heads: "max" (a block counts as much as the head that wants it most) or "mean".
    """

    method: ClassVar[str] = "Quest"
    retrieval_stride: Stride = 1
    group_reduce: Literal["mean", "max"] = "max"


register_method(
    MethodSpec(
        QuestConfig,
        "ucm.sparse.quest:build",
        strided=True,
        demo=_DEMO_WINDOWS,
        description=(
            "Quest: element-wise min/max of K per group of 4 tokens; score = sum_c max(q*min, q*max), best group"
        ),
    )
)
