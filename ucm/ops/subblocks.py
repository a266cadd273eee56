"""Sub-block representations: a block scored by its best group of `merge` consecutive tokens.

A mean of K (ESA, GSA) or a min / max box (Quest) over a whole block of 32 tokens dilutes the
one key a copying head looks for by its 31 neighbours; kept per group of a few tokens, the
representation still shows it. Every per-block representation op of the contract works on
sub-blocks unchanged: a table of sub-block ids (block * R + r, R = block_size // merge) with
`merge` as the block size addresses them, and a block's score is the max over its R groups.
The scoring ops also take the representations whole, [NB, R, Hkv, D], and give that max
directly (`grouped_block_scores` is what they compute; a backend may fuse it into one kernel).
"""

from __future__ import annotations

from collections.abc import Callable

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


def grouped_block_scores(
    score_sub_blocks: Callable[[tuple[torch.Tensor, ...], torch.Tensor, int], torch.Tensor],
    reps: tuple[torch.Tensor, ...],
    block_table: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Block scores [B, M] from per-group representations `reps` (each [NB, R, ...]): the
    sub-block scores `score_sub_blocks(flat reps [NB * R, ...], sub-block table, block_size // R)`
    (a group past a row's end is -inf there) and each block's best group."""
    groups = reps[0].shape[1]
    if block_size % groups:
        raise ValueError(f"{groups} representations per block do not divide the block size {block_size}")
    flat = tuple(r.reshape(-1, *r.shape[2:]) for r in reps)
    return block_max(score_sub_blocks(flat, sub_block_table(block_table, groups), block_size // groups), groups)
