"""Selection-quality metrics: how good a block selection is, judged against dense attention.

A sparse step attends only to the blocks it selected, so its quality is bounded by how much of
the dense softmax attention mass those blocks hold. These functions measure that directly
(recall of attention mass, and how close it is to the best selection of the same size), compare
two selections (overlap), and compare outputs (relative error). They are plain torch, run on any
device, and are meant for evaluation and tests, not for the decode hot path: they materialise
the dense [B, Hq, M * bs] attention.

Shapes follow `ucm.ops.contract`: q [B, Hq, D] (one decode query per row), k_cache
[NB, bs, Hkv, D], block_table [B, M], seq_lens [B]. A selection is (selected_ids [B, S] int,
logical block indices ascending and padded with -1; counts [B] int), as `block_topk` returns.
Every metric returns a float32 tensor [B], one value per row.
"""

from __future__ import annotations

import torch

__all__ = [
    "attention_mass_recall",
    "head_mass_recall",
    "dense_block_mass",
    "oracle_normalised_recall",
    "oracle_recall",
    "relative_output_error",
    "selection_mask",
    "topk_overlap",
    "worst_head_normalised_recall",
]


def dense_block_mass(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense softmax attention mass each logical block receives, per query head.

    q [B, Hq, D], k_cache [NB, bs, Hkv, D] -> float32 [B, Hq, M]. For every (row, head) the
    softmax runs over the row's seq_len tokens (scaled logits, GQA: head h reads KV head
    h // (Hq // Hkv)); a block's mass is the sum over its tokens, so each (row, head) sums to 1
    (0 for an empty row). Blocks past the row's end get 0.
    """
    b, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    m = block_table.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    g = hq // hkv
    tbl = block_table.clamp(min=0).to(device=k_cache.device, dtype=torch.int64)
    k = k_cache[tbl].to(torch.float32).reshape(b, m * bs, hkv, d)
    qg = q.to(device=k_cache.device, dtype=torch.float32).reshape(b, hkv, g, d)
    logits = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    pos = torch.arange(m * bs, device=k.device)
    valid = pos[None, :] < seq_lens.to(device=k.device, dtype=torch.int64)[:, None]  # [B, T]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an empty row has no mass at all
    return probs.reshape(b, hq, m, bs).sum(-1)


def selection_mask(selected_ids: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: True at the logical blocks a selection keeps.

    Only the first counts[b] entries of a row count, and -1 padding is ignored; any other id
    outside [0, width) is an error, since it means the selection and the table disagree.
    """
    b, s = selected_ids.shape
    ids = selected_ids.to(torch.int64)
    live = torch.arange(s, device=ids.device)[None, :] < counts.to(device=ids.device, dtype=torch.int64)[:, None]
    live = live & (ids >= 0)
    if bool((live & (ids >= width)).any()):
        raise ValueError(f"selected block ids must be < {width} (the block-table width)")
    mask = torch.zeros(b, width + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(live, ids, width), True)  # dead entries land in a spare column
    return mask[:, :width]


def attention_mass_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected_ids: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Fraction of the dense attention mass that falls on the selected blocks -> [B] float32.

    Per query head, the softmax mass on the selected blocks' tokens; averaged over heads. 1.0
    means the sparse step sees everything dense attention would weigh; an empty row gives 0.
    """
    return head_mass_recall(q, k_cache, block_table, seq_lens, selected_ids, counts, scale).mean(-1)


def head_mass_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected_ids: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`attention_mass_recall` per query head, before the head mean -> [B, Hq] float32."""
    return _selected_mass(dense_block_mass(q, k_cache, block_table, seq_lens, scale), selected_ids, counts)


def _selected_mass(mass: torch.Tensor, selected_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """mass [B, Hq, M] summed over the selected blocks of each row -> [B, Hq]."""
    mask = selection_mask(selected_ids.to(mass.device), counts.to(mass.device), mass.shape[-1])
    return (mass * mask[:, None, :]).sum(-1)


def _best_mass(mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """mass [B, ..., M]: the largest sum of counts[b] blocks' mass -> [B, ...] (the oracle)."""
    m = mass.shape[-1]
    k = counts.to(device=mass.device, dtype=torch.int64).clamp(0, m)
    take = torch.arange(m, device=mass.device) < k.view(-1, *([1] * (mass.dim() - 1)))
    return (torch.sort(mass, dim=-1, descending=True).values * take).sum(-1)


def worst_head_normalised_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected_ids: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Min over query heads of (the head's recall / the best recall a selection of the same size
    could give that head alone) -> [B] float32 in [0, 1].

    Why: one selection serves every head of a layer, and the head mean hides a retrieval head.
    SmolLM2's layer 18 has one head (of nine) that puts half its mass on the needle's block
    while the others look at the first and last tokens; a selection that misses the needle still
    reaches 0.9 mean recall, and the answer is wrong. A diffuse head scores near 1 here (no
    selection of that size does much better for it), a concentrated head that lost its block
    scores low. Rows where a head's own optimum is 0 count as 1 for that head.
    """
    mass = dense_block_mass(q, k_cache, block_table, seq_lens, scale)  # [B, Hq, M]
    got, best = _selected_mass(mass, selected_ids, counts), _best_mass(mass, counts)
    ratio = (got / best.clamp(min=torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return torch.where(best > 0, ratio, torch.ones_like(ratio)).amin(-1)


def oracle_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Best mass recall any selection of counts[b] blocks could reach in row b -> [B] float32.

    One selection serves all heads of a row, and recall is the head-mean, so the optimum takes
    the counts[b] blocks with the largest head-averaged dense mass. The ceiling to judge a
    selector against: a selector cannot beat it with the same budget.
    """
    return _best_mass(dense_block_mass(q, k_cache, block_table, seq_lens, scale).mean(1), counts)


def oracle_normalised_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected_ids: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """attention_mass_recall / oracle_recall for the same budget -> [B] float32 in [0, 1].

    Separates the selector's quality from the budget's: a small budget caps raw recall, but a
    perfect selector still scores 1.0 here. Rows where the oracle is 0 (nothing selected, or
    no tokens) score 1.0: no selection of that size could do better.
    """
    recall = attention_mass_recall(q, k_cache, block_table, seq_lens, selected_ids, counts, scale)
    oracle = oracle_recall(q, k_cache, block_table, seq_lens, counts, scale)
    ratio = recall / oracle.clamp(min=torch.finfo(torch.float32).tiny)
    # float rounding can put the ratio a hair above 1 when the selection is the optimum
    return torch.where(oracle > 0, ratio.clamp(max=1.0), torch.ones_like(ratio))


def topk_overlap(
    selected_ids: torch.Tensor,
    counts: torch.Tensor,
    reference_ids: torch.Tensor,
    reference_counts: torch.Tensor,
) -> torch.Tensor:
    """|A ∩ B| / |B| per row -> [B] float32, A the selection and B the reference selection.

    How many of the reference's blocks (e.g. an exact top-k, or another backend's choice) the
    selection also kept. Both are (ids [B, *] padded with -1, counts [B]); duplicate ids count
    once. A row with an empty reference scores 1.0 (nothing to miss).
    """
    dev = reference_ids.device
    a_ids, b_ids = selected_ids.to(dev), reference_ids.to(dev)
    width = int(max(int(a_ids.max()) if a_ids.numel() else -1, int(b_ids.max()) if b_ids.numel() else -1)) + 1
    width = max(width, 1)
    a = selection_mask(a_ids, counts.to(dev), width)
    b = selection_mask(b_ids, reference_counts.to(dev), width)
    inter = (a & b).sum(-1).to(torch.float32)
    size = b.sum(-1).to(torch.float32)
    return torch.where(size > 0, inter / size.clamp(min=1.0), torch.ones_like(size))


def relative_output_error(out_sparse: torch.Tensor, out_dense: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| per row (Frobenius over all dims after the first) -> [B] float32.

    The end effect of a selection on the attention output: out [B, ...] of the sparse and the
    dense step. Computed in float32. A zero dense row gives 0 if the sparse one is zero too,
    else inf.
    """
    if out_sparse.shape != out_dense.shape:
        raise ValueError(f"shape mismatch: {tuple(out_sparse.shape)} vs {tuple(out_dense.shape)}")
    a = out_sparse.to(device=out_dense.device, dtype=torch.float32).reshape(out_dense.shape[0], -1)
    b = out_dense.to(torch.float32).reshape(out_dense.shape[0], -1)
    num = torch.linalg.vector_norm(a - b, dim=-1)
    den = torch.linalg.vector_norm(b, dim=-1)
    zero_den = torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, float("inf")))
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), zero_den)
