"""Test helpers: random paged KV caches with scattered physical blocks, and their dense view."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    k_cache: torch.Tensor  # [NB, bs, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, M] int32, physical ids (a random permutation)
    seq_lens: torch.Tensor  # [B] int32
    block_size: int

    def slots(self, row: int) -> torch.Tensor:
        """Slot of every token of a row, in order."""
        bs = self.block_size
        n = int(self.seq_lens[row])
        t = torch.arange(n)
        return self.block_table[row, t // bs].to(torch.int64) * bs + t % bs

    def keys(self, row: int) -> torch.Tensor:
        """Contiguous K of a row: [n, Hkv, D]."""
        return self.k_cache.view(-1, *self.k_cache.shape[2:])[self.slots(row)]

    def values(self, row: int) -> torch.Tensor:
        return self.v_cache.view(-1, *self.v_cache.shape[2:])[self.slots(row)]


def make_paged(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    gen: torch.Generator,
    extra_blocks: int = 3,
    dtype: torch.dtype = torch.float32,
) -> PagedBatch:
    """Rows of the given lengths, their blocks scattered over a shuffled physical pool."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    width = max(max(need), 1)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    pos = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[pos : pos + n].to(torch.int32)
        pos += n
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(k, v, table, torch.tensor(seq_lens, dtype=torch.int32), block_size)


def rand_codes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random uint8 hash codes."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def paged_case(g: torch.Generator, seq_lens: list[int], bs: int, extra_width: int = 0, nb_pool: int | None = None):
    """A block table with random physical blocks per row (repeats allowed) and -1 past each row's end:
    (table [B, M], seq_lens [B], blocks in the pool)."""
    b = len(seq_lens)
    n = [max(0, math.ceil(s / bs)) for s in seq_lens]
    m = max(n + [1]) + extra_width
    nb = nb_pool or max(8, sum(n) + 3)
    table = torch.full((b, m), -1, dtype=torch.int64)
    for r, nr in enumerate(n):
        table[r, :nr] = torch.randint(0, nb, (min(nr, m),), generator=g)
    return table, torch.tensor(seq_lens, dtype=torch.int64), nb
