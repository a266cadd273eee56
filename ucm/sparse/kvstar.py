"""KVStar: channel-pruned, token-merged block representations scored by a window of recent
queries (multi-step retrieval).

Each block keeps one representation per `merge` consecutive tokens (their mean K) and the
mean |K| per channel. At retrieval, a request keeps the `prune_ratio` fraction of channels
with the largest mean |K| per KV head; the last `window` decode queries, restricted to those
channels, attend to the representations (softmax over all of the request's representations)
and a block's score is the probability mass it receives.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch

from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockAccumulator, BlockScorer, ModelShapes


class KVStarScorer(BlockScorer):
    def __init__(self, shapes: ModelShapes, ops: SparseOps, prune_ratio: float, merge: int, window: int) -> None:
        super().__init__(shapes, ops)
        bs = shapes.block_size
        if merge < 1 or bs % merge:
            raise ValueError(f"blk_repre_inner_token_merge={merge} must divide the block size {bs}")
        if not 0.0 < prune_ratio <= 1.0:
            raise ValueError(f"blk_repre_dim_prune_ratio must be in (0, 1], got {prune_ratio}")
        if window < 1:
            raise ValueError(f"query window must be >= 1, got {window}")
        self.merge = merge
        self.window = window
        self.kept_dims = max(1, math.ceil(prune_ratio * shapes.head_dim))
        self.scale = 1.0 / math.sqrt(shapes.head_dim)
        self.acc = [BlockAccumulator(shapes, merge, shapes.device, absolute=True) for _ in range(shapes.num_layers)]
        self._queries: dict[tuple[str, int], deque] = {}

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.acc[layer].add(key, slot_mapping)

    def prepare_query(self, layer: int, q: torch.Tensor, req_ids: Sequence[str]) -> torch.Tensor:
        """[B, Hq, D] -> [B, window, Hq, D]: the recent queries, zero-padded at the front.

        A zero query spreads its softmax evenly, adding the same mass to every full block, so
        padding never changes the ranking.
        """
        out = torch.zeros(q.shape[0], self.window, *q.shape[1:], dtype=torch.float32, device=q.device)
        for r, rid in enumerate(req_ids):
            win = self._queries.setdefault((rid, layer), deque(maxlen=self.window))
            win.append(q[r].to(torch.float32))
            out[r, self.window - len(win):] = torch.stack(tuple(win))
        return out

    def score(self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              req_ids: Sequence[str]) -> torch.Tensor:
        bs = self.shapes.block_size
        g = self.shapes.num_q_heads // self.shapes.num_kv_heads
        out = torch.full(block_table.shape, -math.inf, device=q.device)
        for r in range(block_table.shape[0]):
            n_full = int(seq_lens[r]) // bs  # the partial last block has no representation (always kept)
            if n_full == 0:
                continue
            blocks = block_table[r, :n_full].to(torch.int64)
            acc = self.acc[layer]
            importance = acc.abs_sums.index_select(0, blocks).sum(0)  # [Hkv, D]: mean |K| up to a factor
            dims = importance.topk(self.kept_dims, dim=-1).indices  # [Hkv, D']
            reps = acc.sums.index_select(0, blocks).permute(0, 2, 1, 3) / self.merge  # [n, Hkv, R, D] means
            reps = reps.gather(3, dims[None, :, None, :].expand(n_full, -1, reps.shape[2], -1))
            q_dims = dims.repeat_interleave(g, dim=0)  # [Hq, D']
            qr = q[r].gather(2, q_dims[None].expand(q.shape[1], -1, -1))  # [W, Hq, D']
            local_table = torch.arange(n_full, device=q.device)[None]
            mass = self.ops.block_softmax_mass(qr[None], reps, local_table,
                                               torch.tensor([n_full * bs], device=q.device), bs, self.scale)
            out[r, :n_full] = mass[0]
        return out

    def finish(self, req_id: str) -> None:
        for key in [k for k in self._queries if k[0] == req_id]:
            del self._queries[key]

    def memory_bytes(self) -> int:
        return sum(a.nbytes() for a in self.acc)
