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

from ucm.config.sparse import KVStarConfig
from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockAccumulator, BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.factory import BuildContext, windowed_method


class ChannelMajorReps:
    """KVStar's per-block state in the op contract's channel-major layout (`kvstar_reps_add`,
    `kvstar_block_mass`), for backends that score from it (`SparseOps.kvstar_reps_dtype`):

    reps [NB, Hkv, D, R] in the backend's dtype (sums of `merge` consecutive keys, one channel's R
    values contiguous, so a scorer reads only the kept channels) and abs_sums [NB, Hkv, D] float32
    (sums of |K|, the channels' importance). The same interface as `BlockAccumulator`.
    """

    def __init__(self, shapes: ModelShapes, merge: int, dtype: torch.dtype, ops: SparseOps) -> None:
        bs = shapes.block_size
        self.block_size, self.merge, self.groups = bs, merge, bs // merge
        self.device = shapes.device
        self.ops = ops
        n, h, d = shapes.num_blocks, shapes.num_kv_heads, shapes.head_dim
        self.reps = torch.zeros(n, h, d, self.groups, dtype=dtype, device=self.device)
        self.abs_sums = torch.zeros(n, h, d, device=self.device)

    def add(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.ops.kvstar_reps_add(self.reps, self.abs_sums, key, slot_mapping, self.block_size, self.merge)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        src, dst = src.to(self.device, torch.int64), dst.to(self.device, torch.int64)
        self.reps.index_copy_(0, dst, self.reps.index_select(0, src))
        self.abs_sums.index_copy_(0, dst, self.abs_sums.index_select(0, src))

    def nbytes(self) -> int:
        return self.reps.numel() * self.reps.element_size() + self.abs_sums.numel() * 4


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
        # the backend's channel-major layout when it scores from one (only the kept channels are
        # read, in its dtype), else float32 row-major sums scored by `_mass` / a native op
        dtype = ops.kvstar_reps_dtype(shapes.device)
        self.channel_major = dtype is not None
        self.acc: list[ChannelMajorReps] | list[BlockAccumulator] = [
            ChannelMajorReps(shapes, merge, dtype, ops)
            if self.channel_major
            else BlockAccumulator(shapes, merge, shapes.device, absolute=True, ops=ops)
            for _ in range(shapes.num_layers)
        ]
        self._queries: dict[tuple[str, int], deque] = {}

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.acc[layer].add(key, slot_mapping)

    writes_from_caches = True  # representations on the model's device

    def write_from_caches(self, layers, k_caches, slot_mapping) -> None:
        accs = [self.acc[i] for i in layers]
        if self.channel_major:
            a, kind = [x.reps for x in accs], "kvstar"
        else:
            a, kind = [x.sums for x in accs], "sums"
        self.ops.reps_write_layers(
            kind, a, [x.abs_sums for x in accs], k_caches, slot_mapping, self.shapes.block_size, self.merge
        )

    def prepare_query(self, layer: int, q: torch.Tensor, req_ids: Sequence[str]) -> torch.Tensor:
        """[B, Hq, D] -> [B, window, Hq, D]: the recent queries, zero-padded at the front.

        A zero query spreads its softmax evenly, adding the same mass to every full block, so
        padding never changes the ranking.
        """
        qf = q.to(torch.float32)
        wins = []
        for r, rid in enumerate(req_ids):
            win = self._queries.get((rid, layer))
            if win is None:
                win = self._queries[(rid, layer)] = deque(maxlen=self.window)
            win.append(qf[r])
            wins.append(win)
        if all(len(w) == self.window for w in wins):  # steady state: one stack for the batch
            flat = [t for w in wins for t in w]
            return (
                torch.stack(flat).view(q.shape[0], self.window, *q.shape[1:])
                if flat
                else torch.zeros(0, self.window, *q.shape[1:], dtype=torch.float32, device=q.device)
            )
        out = torch.zeros(q.shape[0], self.window, *q.shape[1:], dtype=torch.float32, device=q.device)
        for r, win in enumerate(wins):
            out[r, self.window - len(win) :] = torch.stack(tuple(win))
        return out

    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        """The attention mass of the recent queries on each full block, computed for all rows
        at once (padded to the longest row): one gather, one top-k and one batched matmul per
        layer instead of a dozen small ops and a materialised channel gather per row. Same
        quantity as `kvstar_block_mass` over the pruned representations."""
        bs = self.shapes.block_size
        acc = self.acc[layer]
        if self.channel_major:
            return self.ops.kvstar_block_mass(
                q,
                acc.reps,
                acc.abs_sums,
                block_table.to(q.device),
                seq_lens.to(q.device),
                bs,
                self.kept_dims,
                self.scale / self.merge,
            )
        b, m = block_table.shape
        out = torch.full((b, m), -math.inf, device=q.device)
        # the partial last block has no representation (it is always kept)
        n_full = (seq_lens.to(device=q.device, dtype=torch.int64) // bs).clamp(max=m)
        n = int(n_full.max()) if b else 0
        if n == 0:
            return out
        native = getattr(self.ops, "kvstar_scores", None)
        if native is not None:
            got = native(q, acc.sums, acc.abs_sums, block_table, n_full, self.kept_dims, self.scale / self.merge)
            if got is not None:
                return got
        out[:, :n] = self._mass(layer, q, block_table, n_full, n)
        return out

    batch_safe = True
    batch_full_blocks = True
    #: the per-request path scores a window of `retrieval_stride` queries; the batch path scores
    #: the current one every step instead of keeping one query's scores for a stride
    batch_reuses_scores = False

    def batch_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """The current query alone (a window of one) over every column of the table: static
        shapes, no host read. `seq_lens` counts full blocks' tokens (`batch_full_blocks`)."""
        if self.channel_major:  # the backend's fused op: reads only the kept channels
            acc = self.acc[layer]
            return self.ops.kvstar_block_mass(
                q[:, None],
                acc.reps,
                acc.abs_sums,
                block_table,
                seq_lens,
                self.shapes.block_size,
                self.kept_dims,
                self.scale / self.merge,
            )
        m = block_table.shape[1]
        n_full = (seq_lens.to(device=q.device, dtype=torch.int64) // self.shapes.block_size).clamp(max=m)
        return self._mass(layer, q[:, None], block_table, n_full, m)

    def _mass(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, n_full: torch.Tensor, n: int
    ) -> torch.Tensor:
        """[B, n] attention mass of the queries q [B, W, Hq, D] on the first n columns' full
        blocks (-inf past a row's n_full), from row-major sums (the op contract's
        `kvstar_block_mass` is the same quantity over channel-major representations)."""
        hkv = self.shapes.num_kv_heads
        g = self.shapes.num_q_heads // hkv
        b = block_table.shape[0]
        acc = self.acc[layer]
        valid = torch.arange(n, device=q.device)[None] < n_full[:, None]  # [B, n]
        blocks = torch.where(valid, block_table[:, :n].to(device=q.device, dtype=torch.int64), 0)
        importance = (acc.abs_sums[blocks] * valid[:, :, None, None]).sum(1)  # [B, Hkv, D]: mean |K| up to a factor
        dims = importance.topk(self.kept_dims, dim=-1).indices  # [B, Hkv, D']
        # Pruning channels = zeroing the query outside the kept ones (a dot product over the
        # kept channels equals one over all channels with the others zeroed), so the
        # representations are read in place, never gathered per channel.
        keep = torch.zeros(b, hkv, self.shapes.head_dim, device=q.device).scatter_(2, dims, 1.0)
        qm = q.to(torch.float32) * keep.repeat_interleave(g, dim=1)[:, None]  # [B, W, Hq, D]
        w = q.shape[1]
        r = acc.groups
        reps = acc.sums[blocks]  # [B, n, R, Hkv, D] sums of `merge` keys
        # logits[b, h, (w, g), (n, r)] = <q, sum> * scale / merge (the mean of the merged keys)
        qh = qm.view(b, w, hkv, g, -1).permute(0, 2, 1, 3, 4).reshape(b * hkv, w * g, -1)
        kh = reps.permute(0, 3, 4, 1, 2).reshape(b * hkv, -1, n * r)
        logits = torch.bmm(qh, kh).view(b, hkv, w * g, n, r) * (self.scale / self.merge)
        logits = logits.masked_fill(~valid[:, None, None, :, None], -math.inf)
        probs = torch.softmax(logits.view(b, hkv, w * g, n * r), dim=-1).nan_to_num(0.0)
        mass = probs.view(b, hkv * w * g, n, r).sum(dim=(1, 3))  # [B, n]
        return torch.where(valid, mass, -math.inf)

    def finish(self, req_id: str) -> None:
        for key in [k for k in self._queries if k[0] == req_id]:
            del self._queries[key]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for acc in self.acc:
            acc.copy(src, dst)

    def memory_bytes(self) -> int:
        return sum(a.nbytes() for a in self.acc)

    def read_bytes_per_block(self) -> float:
        """The fused op reads a block's float32 |K| sums (channel importance) and only the kept
        channels of its channel-major representations."""
        if not self.channel_major:
            return super().read_bytes_per_block()
        acc = self.acc[0]
        hkv, d = self.shapes.num_kv_heads, self.shapes.head_dim
        return hkv * (d * acc.abs_sums.element_size() + self.kept_dims * acc.groups * acc.reps.element_size())


def build(config: KVStarConfig, shapes: ModelShapes, ctx: BuildContext) -> SparseMethod:
    """KVStar's builder (registered in `ucm.config.sparse`): the query window is the retrieval stride."""
    return windowed_method(
        config,
        shapes,
        ctx.ops,
        lambda: KVStarScorer(
            shapes,
            ctx.ops,
            config.blk_repre_dim_prune_ratio,
            config.blk_repre_inner_token_merge,
            config.retrieval_stride,
        ),
    )
