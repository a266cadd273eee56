"""The norm-weighted SimHash estimate of q . k, in plain torch (the contract's definition of
`hamming_cosine_block_scores`; backends may run it as one kernel).

A sign hash of `bits` random-hyperplane projections keeps the angle between two vectors: the
expected fraction of differing bits is angle / pi, so cos(pi * d / bits), d the Hamming
distance, estimates cos(q, k). Times |q| |k| it estimates the dot product attention ranks keys
by. Summed over the query heads of a KV group it weights each head by its query norm instead of
counting every head's bits alike, and a key far from the layer's mean key (one that stands out)
counts by its distance from that mean: keys are hashed and measured as k - mean, which leaves
q . k's ranking per head unchanged (q . mean is one constant per head) but lets the hash spend
its bits on what tells keys apart instead of on the direction all keys share.
"""

from __future__ import annotations

import math

import torch

#: norm cache dtypes the contract accepts (bfloat16: 2 bytes a token and KV head, float32's range)
NORM_DTYPES = (torch.bfloat16, torch.float32)


def popcount_u8(x: torch.Tensor) -> torch.Tensor:
    """Popcount of every uint8 element, as int32."""
    v = x.to(torch.int32)
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


def centred(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """x [T, Hkv, D] as float32, minus `center` [Hkv, D] where one is given."""
    x = x.to(torch.float32)
    return x if center is None else x - center.to(device=x.device, dtype=torch.float32)


def cosine_block_distances(
    q_codes: torch.Tensor,
    q_norms: torch.Tensor,
    k_codes: torch.Tensor,
    k_norms: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    reduce: str,
) -> torch.Tensor:
    """float32 [B, M]: minus the estimate of each token's summed q . k, reduced over a block's
    valid tokens (min of the distance = the best token), +inf past a row's blocks. Shapes and
    meaning as `SparseOps.hamming_cosine_block_scores`."""
    b, hq, c = q_codes.shape
    nb, bs, hkv, _ = k_codes.shape
    m = block_table.shape[1]
    g = hq // hkv
    ids = block_table.to(torch.int64).clamp(0, max(nb - 1, 0))
    keys = k_codes[ids]  # [B, M, bs, Hkv, C]
    q = q_codes.view(b, 1, 1, hkv, g, c)
    dist = popcount_u8(keys[:, :, :, :, None, :] ^ q).sum(-1)  # [B, M, bs, Hkv, G]
    cos = torch.cos(dist.to(torch.float32) * (math.pi / (8 * c)))
    per_kv = (cos * q_norms.to(torch.float32).view(b, 1, 1, hkv, g)).sum(-1)  # [B, M, bs, Hkv]
    est = (per_kv * k_norms[ids].to(torch.float32)).sum(-1)  # [B, M, bs]
    pos = torch.arange(m * bs, device=seq_lens.device).view(m, bs)
    valid = pos[None] < seq_lens.to(torch.int64)[:, None, None]
    distance = -est
    if reduce == "min":
        out = torch.where(valid, distance, math.inf).amin(-1)
    elif reduce == "max":
        out = torch.where(valid, distance, -math.inf).amax(-1)
    elif reduce == "mean":
        count = valid.sum(-1).clamp(min=1).to(torch.float32)
        out = torch.where(valid, distance, 0.0).sum(-1) / count
    else:
        raise ValueError(f"unknown block reduce {reduce!r}; valid: mean, max, min")
    owned = torch.arange(m, device=seq_lens.device)[None, :] < (seq_lens.to(torch.int64)[:, None] + bs - 1) // bs
    return torch.where(owned, out, math.inf)
