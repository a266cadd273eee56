"""Sub-block representations: a block scored by its best group of `merge` consecutive tokens.

A mean of K (ESA, GSA) or a min / max box (Quest) over a whole block of 32 tokens dilutes the
one key a copying head looks for by its 31 neighbours; kept per group of a few tokens, the
representation still shows it. Every per-block representation op of the contract works on
sub-blocks unchanged: a table of sub-block ids (block * R + r, R = block_size // merge) with
`merge` as the block size addresses them, and a block's score is the max over its R groups.
"""

from __future__ import annotations

import torch


def sub_block_table(block_table: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, M] physical block ids -> [B, M * groups] sub-block ids (block * groups + r)."""
    if groups == 1:
        return block_table
    r = torch.arange(groups, device=block_table.device, dtype=block_table.dtype)
    return (block_table[..., None] * groups + r).flatten(-2)


def sub_block_ids(blocks: torch.Tensor, groups: int) -> torch.Tensor:
    """Physical block ids [N] -> the ids [N * groups] of their sub-blocks (block order kept)."""
    return sub_block_table(blocks.to(torch.int64), groups)


def block_max(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Sub-block scores [B, M * groups] -> block scores [B, M]: each block's best group
    (-inf when every group is: a column past the row's end)."""
    if groups == 1:
        return scores
    b, n = scores.shape
    return scores.view(b, n // groups, groups).amax(-1)
