"""The one selection engine: from per-unit scores to the blocks a decode step reads.

All four methods share it; they differ only in how they score units. A *unit* is the
selection granularity: one KV block for ESA/GSA/KVStar, `chunk_size // block_size` blocks for
GSA on device. The engine owns windows, must-select units, budgets (ratio or token budget,
min units), per-layer ratios, index reuse and dense layers/rows, and rewrites the block table.

Plan once per step (`plan`), then select per layer (`select`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ucm.ops.contract import SparseOps


def kept_seq_lens(seq_lens: torch.Tensor, kept: torch.Tensor, block_size: int) -> torch.Tensor:
    """The length attention sees when a row reads `kept` of its blocks: `kept - 1` full blocks
    plus its last, partial block (always kept); 0 for a row that reads none."""
    n_blocks = (seq_lens + block_size - 1) // block_size
    last_len = seq_lens - (n_blocks - 1).clamp(min=0) * block_size
    return torch.where(kept > 0, (kept - 1) * block_size + last_len, 0)


def _max_or_zero(x: torch.Tensor) -> int:
    return int(x.max()) if x.numel() else 0


@dataclass(frozen=True)
class LayerPolicy:
    """How one layer selects. `ratio >= 1` makes the layer dense."""

    ratio: float = 1.0
    min_units: int = 0
    init_units: int = 0
    local_units: int = 0
    must_select: tuple[int, ...] = ()  # unit indices, negative from the end
    reuse_from: int = -1  # take the selection of this earlier layer in the same step

    @property
    def dense(self) -> bool:
        return self.ratio >= 1.0 and self.reuse_from < 0


@dataclass
class Selection:
    """What one layer reads this step.

    unit_ids [B, U] ascending logical unit ids padded with -1, unit_counts [B];
    block_table [B, M] physical ids of the kept blocks, compacted to the front, and
    seq_lens [B] the matching shortened lengths: feed both to the stock attention kernel.
    blocks_kept [B] / blocks_total [B] are for stats.
    """

    unit_ids: torch.Tensor
    unit_counts: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    blocks_kept: torch.Tensor
    blocks_total: torch.Tensor
    dense: bool = False

    def logical_blocks(self, row: int) -> list[int]:
        """Kept logical block ids of one row (debugging / tests)."""
        n = int(self.blocks_kept[row])
        return self._logical[row, :n].tolist()

    _logical: torch.Tensor = field(default=None, repr=False)  # [B, M] kept logical block ids


@dataclass
class StepPlan:
    """Per-step facts shared by every layer: lengths, sparse rows, budgets, reused selections."""

    seq_lens: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, M]
    n_blocks: torch.Tensor  # [B]
    n_units: torch.Tensor  # [B]
    sparse_rows: torch.Tensor  # [B] bool: rows that may be sparsified this step
    req_ids: list[str] = field(default_factory=list)
    selections: dict[int, Selection] = field(default_factory=dict)
    dense: Selection | None = None
    _budget_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _sparse_list: list[bool] | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def sparse_list(self) -> list[bool]:
        """`sparse_rows` as a Python list, computed once per step (read by every layer)."""
        if self._sparse_list is None:
            self._sparse_list = self.sparse_rows.tolist()
        return self._sparse_list


class BlockSelector:
    """Budgets, forced units and block-table rewriting for every layer of a model."""

    def __init__(
        self,
        policies: Sequence[LayerPolicy],
        block_size: int,
        ops: SparseOps,
        unit_blocks: int = 1,
        token_budget: int | None = None,
    ) -> None:
        if block_size <= 0 or unit_blocks <= 0:
            raise ValueError(f"block_size ({block_size}) and unit_blocks ({unit_blocks}) must be positive")
        for i, p in enumerate(policies):
            if not 0.0 < p.ratio:
                raise ValueError(f"layer {i}: ratio must be > 0, got {p.ratio}")
            if p.reuse_from >= i:
                raise ValueError(f"layer {i}: can only reuse an earlier layer, not {p.reuse_from}")
            if p.reuse_from >= 0 and policies[p.reuse_from].dense:
                raise ValueError(f"layer {i}: reuses layer {p.reuse_from}, which is dense")
        if token_budget is not None and token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        self.policies = list(policies)
        self.block_size = block_size
        self.unit_blocks = unit_blocks
        self.unit_tokens = block_size * unit_blocks
        self.token_budget = token_budget
        self.ops = ops

    @property
    def num_layers(self) -> int:
        return len(self.policies)

    def needs_scores(self, layer: int) -> bool:
        """False for dense layers and layers that reuse another layer's selection."""
        p = self.policies[layer]
        return p.reuse_from < 0 and not (p.dense and self.token_budget is None)

    # ------------------------------------------------------------------ plan
    def plan(
        self, seq_lens: torch.Tensor, block_table: torch.Tensor, sparse_rows: torch.Tensor | None = None
    ) -> StepPlan:
        """Once per step: lengths in blocks and units, and which rows may go sparse."""
        seq_lens = seq_lens.to(torch.int64)
        n_blocks = (seq_lens + self.block_size - 1) // self.block_size
        n_units = (seq_lens + self.unit_tokens - 1) // self.unit_tokens
        if sparse_rows is None:
            sparse_rows = torch.ones_like(seq_lens, dtype=torch.bool)
        if block_table.shape[1] < _max_or_zero(n_blocks):
            raise ValueError(f"block_table has {block_table.shape[1]} columns but a row needs {_max_or_zero(n_blocks)}")
        return StepPlan(seq_lens, block_table, n_blocks, n_units, sparse_rows.to(torch.bool))

    def budgets(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [B], must_keep [B, U]) for a layer; dense rows get k = n_units."""
        p = self.policies[layer]
        key = (p.ratio, p.min_units, p.init_units, p.local_units, p.must_select)
        if key in plan._budget_cache:
            return plan._budget_cache[key]
        k, must, _ = self.window_budgets(
            p, plan.seq_lens, plan.sparse_rows, _max_or_zero(plan.n_units), per_block=False
        )
        plan._budget_cache[key] = (k, must)
        return k, must

    def window_budgets(
        self, p: LayerPolicy, seq_lens: torch.Tensor, eligible: torch.Tensor, width: int, per_block: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The contract's `window_budgets` of policy p: (k, must_keep, lens) per block over a table
        `width` blocks wide (`per_block`, the batch path's), or per unit over `width` units."""
        bs, ub = (self.block_size, self.unit_blocks) if per_block else (self.unit_tokens, 1)
        return self.ops.window_budgets(
            seq_lens,
            eligible,
            width,
            bs,
            ub,
            ratio=p.ratio,
            fixed_units=None if self.token_budget is None else math.ceil(self.token_budget / self.unit_tokens),
            min_units=p.min_units,
            init_units=p.init_units,
            local_units=p.local_units,
            must_select=p.must_select,
        )

    def unit_scores(self, block_scores: torch.Tensor, reduce: str = "max") -> torch.Tensor:
        """Per-block scores [B, M] -> per-unit scores [B, ceil(M / unit_blocks)] (larger = better).

        Padding blocks carry -inf and never win a max; a unit's mean counts its valid blocks.
        """
        ub = self.unit_blocks
        if ub == 1:
            return block_scores
        b, m = block_scores.shape
        u = -(-m // ub)
        x = torch.nn.functional.pad(block_scores, (0, u * ub - m), value=-math.inf).view(b, u, ub)
        if reduce == "max":
            return x.amax(-1)
        valid = torch.isfinite(x)
        if reduce == "min":
            return torch.where(valid, x, math.inf).amin(-1).nan_to_num(posinf=-math.inf)
        if reduce == "mean":
            s = torch.where(valid, x, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
            return torch.where(valid.any(-1), s, -math.inf)
        raise ValueError(f"unknown unit reduce {reduce!r}; valid: max, min, mean")

    # ---------------------------------------------------------------- select
    def dense_selection(self, plan: StepPlan) -> Selection:
        """Every block of every row (a dense layer)."""
        if plan.dense is None:
            b = plan.batch
            m = plan.block_table.shape[1]
            ids = torch.arange(m, device=plan.seq_lens.device).expand(b, m)
            ids = torch.where(ids < plan.n_blocks[:, None], ids, -1).to(torch.int32)
            sel = Selection(
                unit_ids=ids,
                unit_counts=plan.n_blocks.to(torch.int32),
                block_table=plan.block_table,
                seq_lens=plan.seq_lens,
                blocks_kept=plan.n_blocks,
                blocks_total=plan.n_blocks,
                dense=True,
                _logical=ids.to(torch.int64),
            )
            plan.dense = sel
        return plan.dense

    def select(self, layer: int, plan: StepPlan, unit_scores: torch.Tensor | None) -> Selection:
        """Top units of `unit_scores` [B, U] (larger = better) within the layer's budget."""
        p = self.policies[layer]
        if p.reuse_from >= 0:
            if p.reuse_from not in plan.selections:
                raise RuntimeError(f"layer {layer} reuses layer {p.reuse_from}, which has not selected this step")
            sel = plan.selections[p.reuse_from]
        elif not self.needs_scores(layer):
            sel = self.dense_selection(plan)
        else:
            if unit_scores is None:
                raise ValueError(f"layer {layer} is sparse and needs unit scores")
            k, must = self._padded_budgets(layer, plan, unit_scores.shape[1])
            fused = self._fused(unit_scores, k, must, plan)
            if fused is not None:
                sel = fused
            else:
                ids, counts = self.ops.block_topk(unit_scores, k, must, plan.n_units)
                sel = self.rewrite(plan, ids, counts)
        plan.selections[layer] = sel
        return sel

    def _padded_budgets(self, layer: int, plan: StepPlan, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`budgets` with must_keep padded to `u` columns, cached per plan (every sparse layer of
        a step usually shares one policy, so this is computed once per step, not per layer)."""
        p = self.policies[layer]
        key = ("padded", u, p.ratio, p.min_units, p.init_units, p.local_units, p.must_select)
        hit = plan._budget_cache.get(key)
        if hit is not None:
            return hit
        k, must = self.budgets(layer, plan)
        if u < must.shape[1]:
            raise ValueError(f"unit_scores has {u} columns, rows need {must.shape[1]}")
        must = torch.nn.functional.pad(must, (0, u - must.shape[1]), value=False)
        plan._budget_cache[key] = (k, must)
        return k, must

    def _fused(
        self, unit_scores: torch.Tensor, k: torch.Tensor, must: torch.Tensor, plan: StepPlan
    ) -> Selection | None:
        """top-k + rewrite in one backend call where the backend has one (same result as
        `block_topk` then `rewrite`); None to take the two-step path."""
        fn = getattr(self.ops, "select_rewrite", None)
        if fn is None:
            return None
        out = fn(
            unit_scores,
            k,
            must,
            plan.n_units,
            plan.block_table,
            plan.seq_lens,
            plan.n_blocks,
            self.unit_blocks,
            self.block_size,
        )
        if out is None:
            return None
        ids, counts, table, lens, kept, logical = out
        return Selection(
            unit_ids=ids,
            unit_counts=counts,
            block_table=table,
            seq_lens=lens.to(plan.seq_lens.dtype),
            blocks_kept=kept,
            blocks_total=plan.n_blocks,
            dense=False,
            _logical=logical,
        )

    def rewrite(self, plan: StepPlan, unit_ids: torch.Tensor, unit_counts: torch.Tensor) -> Selection:
        """Expand units to blocks and compact the kept blocks into a new block table."""
        b, m = plan.block_table.shape
        dev = plan.block_table.device
        ub = self.unit_blocks
        uid = unit_ids.to(torch.int64)
        if ub == 1:
            logical = uid
        else:
            logical = (uid[:, :, None] * ub + torch.arange(ub, device=dev)).reshape(b, -1)
            logical = torch.where(uid.repeat_interleave(ub, dim=1) >= 0, logical, -1)
        logical = torch.where(logical < plan.n_blocks[:, None], logical, -1)
        # ascending unit ids expand to ascending block ids; push padding (-1) to the back
        key = torch.where(logical >= 0, logical, m + 1)
        logical = torch.sort(key, dim=1).values
        logical = torch.where(logical <= m, logical, -1)
        if logical.shape[1] < m:
            logical = torch.nn.functional.pad(logical, (0, m - logical.shape[1]), value=-1)
        logical = logical[:, :m]
        kept = (logical >= 0).sum(1)
        table = plan.block_table.gather(1, logical.clamp(min=0).to(plan.block_table.device))
        table = torch.where(logical >= 0, table, 0).to(plan.block_table.dtype)
        new_lens = kept_seq_lens(plan.seq_lens, kept, self.block_size)
        return Selection(
            unit_ids=unit_ids,
            unit_counts=unit_counts,
            block_table=table,
            seq_lens=new_lens.to(plan.seq_lens.dtype),
            blocks_kept=kept,
            blocks_total=plan.n_blocks,
            dense=False,
            _logical=logical,
        )
