"""Block selection for a whole attention batch with static shapes: the decode path that runs
inside CUDA graphs.

`SparseMethod` drives a selection per request (request ids, retrieval strides, asynchronous
scoring, host reads of lengths). A captured CUDA graph replays kernels only: no Python runs per
step, so nothing may depend on host values that change between steps. `BatchSelector` therefore
derives everything from the attention batch's own device tensors (query_start_loc, seq_lens,
block_table), whose addresses vLLM keeps fixed between capture and replay:

    plan = batch.plan(query_start_loc, seq_lens, block_table)   # once per step
    table, lens = batch.select(layer, query, plan)             # per sparse layer: score, top-k, rewrite
    # after the step's last sparse layer the plan's kept-block counts go into device counters

A row selects when it decodes (one query token) and its length reaches the method's
`seq_len_threshold`; every other row (prefill, chunked prefill, speculative rows, padding) gets
k = all of its blocks, so the kernel hands its own table and length back. A batch with fewer rows
than the method's `concurrency_threshold` (default `BATCH_MIN_ROWS`) stays dense as a whole: a
host decision on the batch's shape, which is fixed for a captured graph.

**Retrieval stride.** With `max_rows` (the engine's most rows a step) and a method whose
`retrieval_stride` s is above 1 and whose batch scores depend on the current query alone
(`BlockScorer.batch_reuses_scores`), a row is scored on one step in s and keeps those scores
for the s - 1 steps after it, its budget and windows recomputed at its current length each step
(as the per-request path does, there one step late). The state is per batch row, on the device:
the length at the row's last scoring and the physical block holding that length's last token.
A row re-scores when that block is no longer where its table says (another request moved into
the row, the request was preempted and rescheduled), when it did not grow by 1 to s - 1 tokens
since, or when it did not select then. The scorer writes the due rows' scores into a per-layer
buffer that holds the others' (`BlockScorer.batch_scores_into`: it reads nothing for those), so
its work follows the rows that are due; a row that keeps its scores and its block count also
keeps the last step's table (the same budget, forced blocks and scores: the same selection), and
the top-k ranks nothing for it. `sticky_steps`, `bound_guard_top` and `kv_head_combine` apply to
the per-request path only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ucm.sparse.base import SparseMethod
from ucm.sparse.selection import LayerPolicy

#: rows a decode step needs before it selects, unless the method sets `concurrency_threshold`:
#: on an H200 (Qwen3-4B shape, 32K tokens) one row decoded slower sparse than dense, eight rows
#: faster (benchmarks/results/vllm_gpu_decode.json)
BATCH_MIN_ROWS = 2


@dataclass
class BatchPlan:
    """Per-step facts every layer shares; all tensors have the batch's static shapes."""

    seq_lens: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, M]
    q_index: torch.Tensor | None  # [B] int64: each row's last query token (None: row b's is token b)
    eligible: torch.Tensor  # [B] bool: rows that select this step
    n_blocks: torch.Tensor  # [B] int64
    full_lens: torch.Tensor  # [B] int64: tokens in full blocks (what representation scorers score)
    # policy -> (k [B], must [B, M], lens [B]: the tokens each row reads under that policy)
    budgets: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    score_lens: torch.Tensor | None = None  # [B]: the tokens the scorer scores (full blocks' where it needs them)
    reuse: torch.Tensor | None = None  # [B] bool: rows that keep their last scores (None: every row is scored)
    same_table: torch.Tensor | None = None  # [B] bool: rows that also keep their last step's tables
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (table, lens)


class BatchSelector:
    """Runs a `SparseMethod`'s scorer and layer policies over whole batches (see module doc)."""

    def __init__(self, method: SparseMethod, max_rows: int | None = None) -> None:
        """`max_rows`: the most rows a step can have (vLLM's `max_num_seqs`); without it every
        row is scored every step (see the module doc's retrieval stride)."""
        scorer, selector = method.scorer, method.selector
        if not scorer.batch_safe:
            raise ValueError(
                f"{method.name}: its scorer ({type(scorer).__name__}) cannot score a batch without "
                "host reads, so it cannot run inside CUDA graphs"
            )
        variants = (getattr(method, "sticky_steps", 0), getattr(method, "bound_guard_top", 0))
        if getattr(method, "kv_head_combine", "sum") != "sum" or any(variants):
            raise ValueError(
                f"{method.name}: kv_head_combine / sticky_steps / bound_guard_top run on the per-request path "
                "only, not in the batch (CUDA graph) selection"
            )
        self.method = method
        self.scorer = scorer
        self.ops = scorer.ops
        self.policies: list[LayerPolicy] = selector.policies
        self.block_size = selector.block_size
        self.unit_blocks = selector.unit_blocks
        self.unit_tokens = selector.unit_tokens
        self.token_budget = selector.token_budget
        self.seq_len_threshold = method.seq_len_threshold
        ct = method.concurrency_threshold
        self.min_rows = max(BATCH_MIN_ROWS if ct is None else ct, 1)
        self.sparse_layers = [i for i, p in enumerate(self.policies) if not p.dense or self.token_budget is not None]
        self.last_layer = max(self.sparse_layers) if self.sparse_layers else -1
        dev = scorer.shapes.device
        # per layer: the row of the step's lengths it read (-1 dense, -2 did not run) -> on the device
        self._layer_lens: dict[tuple[int, ...], torch.Tensor] = {}
        # [layer, (blocks kept, blocks held)] over selecting rows, then [steps with a selecting row,
        # selecting rows]; only ever added to on the device (read with `counters_to_host`)
        self.blocks = torch.zeros(len(self.policies), 2, dtype=torch.int64, device=dev)
        self.rows = torch.zeros(2, dtype=torch.int64, device=dev)
        stride = method.retrieval_stride if scorer.batch_reuses_scores else 1
        self.stride = stride if max_rows and self.sparse_layers else 1
        # per row: (tokens at its last scoring, physical block of that length's last token); 0: none
        self._anchor = torch.zeros(2, max_rows, dtype=torch.int64, device=dev) if self.stride > 1 else None
        self._kept_rows: dict[tuple, torch.Tensor] = {}  # ("scores" | "table", layer, M) -> [max_rows, M]
        # per row: its block count at the last step that selected for it (-1: none)
        self._last_blocks = torch.full((max_rows,), -1, dtype=torch.int64, device=dev) if self.stride > 1 else None

    def layer_selects(self, layer: int) -> bool:
        p = self.policies[layer]
        return not p.dense or self.token_budget is not None

    def batch_selects(self, num_rows: int) -> bool:
        """Host decision on the batch's shape: fewer rows than the concurrency threshold stay dense."""
        return bool(self.sparse_layers) and num_rows >= self.min_rows

    # ------------------------------------------------------------------ plan
    def plan(
        self,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        max_query_len: int | None = None,
    ) -> BatchPlan:
        """`max_query_len == 1` (the host knows it: a uniform decode batch) lets row b's query be
        token b of the batch, read in place."""
        b = seq_lens.shape[0]
        lens = seq_lens.to(torch.int64)
        if max_query_len == 1:
            eligible, q_index = lens >= max(self.seq_len_threshold, 1), None
        else:
            starts = query_start_loc[: b + 1].to(torch.int64)
            eligible = ((starts[1:] - starts[:-1]) == 1) & (lens >= max(self.seq_len_threshold, 1))
            q_index = (starts[1:] - 1).clamp(min=0)
        bs = self.block_size
        plan = BatchPlan(seq_lens, block_table, q_index, eligible, (lens + bs - 1) // bs, (lens // bs) * bs)
        # the scorer sees full blocks only where it scores only those
        plan.score_lens = plan.full_lens if self.scorer.batch_full_blocks else plan.seq_lens
        if self._anchor is not None and b <= self._anchor.shape[1]:  # a host fact of the batch's shape
            plan.reuse = self._reuse_rows(lens, block_table, eligible)
            # same scores, same block count: the same budget, forced blocks and top-k as the last step
            last = self._last_blocks[:b]
            plan.same_table = plan.reuse & (plan.n_blocks == last)
            last.copy_(torch.where(eligible, plan.n_blocks, -1))
        return plan

    def _reuse_rows(self, lens: torch.Tensor, block_table: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        """Rows that keep their last scores this step; the others' anchors move to this step."""
        b, m = block_table.shape
        anchor = self._anchor[:, :b]

        def block_of(n: torch.Tensor) -> torch.Tensor:  # physical block holding token n - 1 of each row
            at = ((n - 1).clamp(min=0) // self.block_size).clamp(max=max(m - 1, 0))
            return block_table.gather(1, at[:, None])[:, 0].to(torch.int64)

        age = lens - anchor[0]
        same = (anchor[0] > 0) & (block_of(anchor[0]) == anchor[1])
        reuse = eligible & same & (age > 0) & (age < self.stride)
        scored = eligible & ~reuse
        anchor.copy_(torch.where(scored, torch.stack([lens, block_of(lens)]), anchor))
        return reuse

    def _budgets(self, policy: LayerPolicy, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [B] in blocks, must_keep [B, M], lens [B]) for a policy: `BlockSelector.budgets`
        with static shapes (the table's width instead of the longest row), in one op
        (`SparseOps.window_budgets`: one launch where the backend has a kernel).

        The tokens a row reads depend on its budget alone, not on which blocks win: it keeps
        max(k, forced) of its blocks, the last one (partly written) always among them. So every
        layer of a policy shares one `lens` tensor, and the attention kernel can plan its work
        for it once per step (FA3's scheduler metadata) instead of once per layer."""
        key = (policy.ratio, policy.min_units, policy.init_units, policy.local_units, policy.must_select)
        hit = plan.budgets.get(key)
        if hit is not None:
            return hit
        plan.budgets[key] = self.method.selector.window_budgets(
            policy, plan.seq_lens, plan.eligible, plan.block_table.shape[1], per_block=True
        )
        return plan.budgets[key]

    def max_len(self, layer: int, max_seq_len: int, max_query_len: int | None) -> int:
        """A host upper bound of every length `select` gives for `layer` in a step whose rows are
        at most `max_seq_len` tokens long, from the policy alone (no device read). Attention
        kernels size their work by it (FA3's split and scheduling heuristics): the batch's
        `max_seq_len` would plan for reading every block. Only uniform decode steps
        (`max_query_len == 1`) get a tighter bound: elsewhere non-decode rows keep their length."""
        if max_query_len != 1 or max_seq_len <= 0:
            return max_seq_len
        p = self.policies[layer]
        if p.reuse_from >= 0:
            p = self.policies[p.reuse_from]
        ut = self.unit_tokens
        n = -(-max_seq_len // ut)  # units of the longest row; every row's budget grows with its units
        if self.token_budget is not None:
            k = math.ceil(self.token_budget / ut)
        else:
            k = math.ceil(n * p.ratio)
        k = min(max(k, p.min_units), n)
        forced = min(n, p.init_units + p.local_units + 1 + len(p.must_select))
        bound = max(k, forced) * ut
        short = max(self.seq_len_threshold - 1, 0)  # rows under the threshold keep their own length
        return min(max_seq_len, max(bound, short))

    # ---------------------------------------------------------------- select
    def select(self, layer: int, query: torch.Tensor, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table [B, M], seq_lens [B]) the layer's attention reads: selecting rows keep
        their chosen blocks, every other row its own. Device kernels only."""
        p = self.policies[layer]
        if p.reuse_from >= 0:
            out = plan.results[p.reuse_from]
        else:
            q = query[: plan.seq_lens.shape[0]] if plan.q_index is None else query.index_select(0, plan.q_index)
            if plan.reuse is None:
                scores = self.scorer.batch_scores(layer, q, plan.block_table, plan.score_lens)
            else:  # due rows' scores into the kept ones; the other rows read nothing
                kept = self._kept(("scores", layer), plan.block_table.shape, torch.float32)
                scores = self.scorer.batch_scores_into(layer, q, plan.block_table, plan.score_lens, kept, plan.reuse)
            largest = self.scorer.batch_largest
            if self.unit_blocks > 1:  # rank whole units: every block of a unit carries the unit's score
                if not largest:
                    scores, largest = -scores, True
                m = plan.block_table.shape[1]
                unit = self.method.selector.unit_scores(scores, self.scorer.unit_reduce)
                scores = unit.repeat_interleave(self.unit_blocks, dim=1)[:, :m]
            k, must, lens = self._budgets(p, plan)
            if plan.same_table is None:
                table, _ = self.ops.select_and_rewrite(
                    scores, k, must, plan.block_table, plan.seq_lens, self.block_size, largest=largest
                )
            else:  # rows whose selection cannot have changed since the last step keep its table
                kept = self._kept(("table", layer), plan.block_table.shape, plan.block_table.dtype)
                table, _ = self.ops.select_and_rewrite(
                    scores,
                    k,
                    must,
                    plan.block_table,
                    plan.seq_lens,
                    self.block_size,
                    largest=largest,
                    out=kept,
                    keep_rows=plan.same_table,
                )
            out = (table, lens)  # the op's lens equal the policy's (see `_budgets`): one tensor per policy
        plan.results[layer] = out
        if layer == self.last_layer:
            self._count(plan)
        return out

    def _kept(self, key: tuple, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A per-layer buffer [B, M] that outlives the step (rows' last scores or tables): a view
        of one [max_rows, M] tensor per key and width, never freed (a captured graph keeps its
        address), never filled (a row reads it only after a step that wrote that row)."""
        b, m = shape
        full = self._kept_rows.get((*key, m))
        if full is None:
            full = self._kept_rows[(*key, m)] = torch.empty(
                self._anchor.shape[1], m, dtype=dtype, device=self._anchor.device
            )
        return full[:b]

    def _count(self, plan: BatchPlan) -> None:
        """Add this step's kept / held blocks per layer and its selecting rows to the device
        counters (`add_kept_counts`: one launch where the backend has a kernel; nothing is read
        back here). Layers of one policy share one lengths tensor (see `_budgets`)."""
        distinct: list[torch.Tensor] = []
        which = []
        for i in range(len(self.policies)):
            if not self.layer_selects(i):
                which.append(-1)  # a dense layer reads what it holds
            elif i not in plan.results:
                which.append(-2)  # a layer an engine kept stock never ran
            else:
                lens = plan.results[i][1]
                at = next((j for j, t in enumerate(distinct) if t is lens), None)
                if at is None:
                    at = len(distinct)
                    distinct.append(lens)
                which.append(at)
        key = tuple(which)
        layer_lens = self._layer_lens.get(key)
        if layer_lens is None:
            layer_lens = self._layer_lens[key] = torch.tensor(key, dtype=torch.int64, device=self.blocks.device)
        lens = distinct[0][None] if len(distinct) == 1 else torch.stack(distinct)
        self.ops.add_kept_counts(
            self.blocks, self.rows, lens, layer_lens, plan.n_blocks, plan.eligible, self.block_size
        )

    def counters_to_host(self) -> dict:
        """The device counters as Python numbers (one host read: call it between steps)."""
        return counters_dict(self.blocks.tolist(), self.rows.tolist())


def counters_dict(blocks: list, rows: list) -> dict:
    """`BatchSelector.blocks` / `.rows` as read on the host -> kept, total, sparse_steps, sparse_rows."""
    return {
        "kept": [k for k, _ in blocks],
        "total": [t for _, t in blocks],
        "sparse_steps": rows[0],
        "sparse_rows": rows[1],
    }
