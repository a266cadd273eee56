"""Pure-torch implementation of the op contract: the oracle every backend is tested against.

Written for clarity, not speed: it materialises intermediate tensors freely and runs on any
device torch supports, which also makes it the fallback when no faster backend is available.
"""

from __future__ import annotations

import math

import torch

from ucm.ops.contract import BlockReduce, GroupReduce, SparseOps, rows_into
from ucm.ops.subblocks import grouped_block_scores

_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)


def blocks_per_row(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """n_b = ceil(seq_len / block_size) for every row (int64)."""
    return (seq_lens.to(torch.int64) + block_size - 1) // block_size


def valid_block_mask(seq_lens: torch.Tensor, block_size: int, width: int) -> torch.Tensor:
    """[B, width] bool: True where block j < n_b of that row."""
    n = blocks_per_row(seq_lens, block_size)
    return torch.arange(width, device=seq_lens.device)[None, :] < n[:, None]


def token_positions_mask(seq_lens: torch.Tensor, block_size: int, width: int) -> torch.Tensor:
    """[B, width, bs] bool: True where token (block j, offset o) is < seq_len."""
    pos = torch.arange(width * block_size, device=seq_lens.device).view(width, block_size)
    return pos[None] < seq_lens.to(torch.int64)[:, None, None]


def _safe_ids(block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Block ids usable for indexing: entries past a row's end may hold anything (even -1 or
    stale ids), and are masked by the caller, so they are clamped into range here."""
    return block_table.to(torch.int64).clamp(0, max(num_blocks - 1, 0))


def _popcount_u8(x: torch.Tensor) -> torch.Tensor:
    """Popcount of every uint8 element, as int32 (bit tricks on int32)."""
    v = x.to(torch.int32)
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


class TorchReferenceOps(SparseOps):
    """Reference semantics of every op, in plain torch."""

    name = "reference"

    # ---------------------------------------------------------------- hashing
    def sign_bits_pack(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        nbytes = (n + 7) // 8
        bits = (x >= 0).to(torch.int32)
        pad = nbytes * 8 - n
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad), value=0)
        bits = bits.view(*x.shape[:-1], nbytes, 8)
        packed = (bits * _BIT_WEIGHTS.to(x.device)).sum(-1)
        return packed.to(torch.uint8)

    def hash_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        proj = torch.matmul(x.to(torch.float32), weight.to(device=x.device, dtype=torch.float32))
        return self.sign_bits_pack(proj)

    # ------------------------------------------------------------ paged cache
    def paged_write(self, cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(torch.int64)
        flat = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
        flat.index_copy_(0, slots, values[keep].to(cache.dtype))

    # ---------------------------------------------------------------- scoring
    def hamming_block_scores(
        self,
        q_codes: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        b, hq, c = q_codes.shape
        _, bs, hkv, _ = k_codes.shape
        m = block_table.shape[1]
        g = hq // hkv
        keys = k_codes[_safe_ids(block_table, k_codes.shape[0])]  # [B, M, bs, Hkv, C]
        q = q_codes.view(b, hkv, g, c)[:, None, None]  # [B, 1, 1, Hkv, G, C]
        dist = _popcount_u8(keys[:, :, :, :, None, :] ^ q).to(torch.int64).sum(dim=(-1, -2, -3))  # [B, M, bs]
        valid = token_positions_mask(seq_lens, bs, m)
        big = torch.iinfo(torch.int64).max
        if reduce == "min":
            out = torch.where(valid, dist, big).amin(-1).to(torch.float32)
        elif reduce == "max":
            out = torch.where(valid, dist, -1).amax(-1).to(torch.float32)
        elif reduce == "mean":  # exact integer sum, one rounding: float32(sum / count)
            total = torch.where(valid, dist, 0).sum(-1).to(torch.float64)
            out = (total / valid.sum(-1).clamp(min=1).to(torch.float64)).to(torch.float32)
        else:
            raise ValueError(f"unknown block reduce {reduce!r}; valid: mean, max, min")
        return torch.where(valid_block_mask(seq_lens, bs, m), out, math.inf)

    def block_scores_dot(
        self,
        q: torch.Tensor,
        repr_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "mean",
        out: torch.Tensor | None = None,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:
            fresh = self.block_scores_dot(q, repr_cache, block_table, seq_lens, block_size, group_reduce)
            return rows_into(out, keep_rows, fresh)
        if repr_cache.dim() == 4:
            return grouped_block_scores(
                lambda reps, table, bs: self.block_scores_dot(q, *reps, table, seq_lens, bs, group_reduce),
                (repr_cache,),
                block_table,
                block_size,
            )
        b, hq, d = q.shape
        hkv = repr_cache.shape[1]
        g = hq // hkv
        reps = repr_cache[_safe_ids(block_table, repr_cache.shape[0])].to(torch.float32)  # [B, M, Hkv, D]
        qg = q.to(torch.float32).view(b, hkv, g, d)
        if group_reduce == "mean":
            s = torch.einsum("bhd,bmhd->bm", qg.mean(2), reps)
        elif group_reduce == "max":
            s = torch.einsum("bhgd,bmhd->bmhg", qg, reps).amax(-1).sum(-1)
        else:
            raise ValueError(f"unknown group reduce {group_reduce!r}; valid: mean, max")
        return torch.where(valid_block_mask(seq_lens, block_size, block_table.shape[1]), s, -math.inf)

    # ----------------------------------------------------------------- KVStar
    def kvstar_reps_add(
        self,
        reps: torch.Tensor,
        abs_sums: torch.Tensor,
        key: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        merge: int,
    ) -> None:
        nb, h, d, r = reps.shape
        if merge < 1 or block_size % merge or block_size // merge != r:
            raise ValueError(
                f"kvstar_reps_add: reps hold {r} representations per block, not "
                f"block_size {block_size} // merge {merge}"
            )
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(reps.device, torch.int64)
        key = key[keep.to(key.device)].to(reps.device, torch.float32)
        if slots.device.type == "cpu" and slots.numel() and int(slots.max()) >= nb * block_size:
            raise ValueError(f"kvstar_reps_add: slot {int(slots.max())} is past {nb} blocks of {block_size}")
        blocks = slots // block_size
        fresh = blocks[slots % block_size == 0]
        if fresh.numel():
            reps.index_fill_(0, fresh, 0.0)
            abs_sums.index_fill_(0, fresh, 0.0)
        if not slots.numel():
            return
        groups, inv = torch.unique(slots // merge, return_inverse=True)  # group id = block * R + r
        total = torch.zeros(groups.numel(), h, d, device=reps.device).index_add_(0, inv, key)
        gb, gr = groups // r, groups % r
        reps[gb, :, :, gr] = (reps[gb, :, :, gr].to(torch.float32) + total).to(reps.dtype)  # [U, Hkv, D]
        abs_sums.index_add_(0, blocks, key.abs())

    def kvstar_block_mass(
        self,
        q: torch.Tensor,
        reps: torch.Tensor,
        abs_sums: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        kept_dims: int,
        scale: float,
    ) -> torch.Tensor:
        b, w, hq, d = q.shape
        nb, hkv, _, r = reps.shape
        g = hq // hkv
        m = block_table.shape[1]
        dev = reps.device
        if not 1 <= kept_dims <= d:
            raise ValueError(f"kvstar_block_mass: kept_dims must be in [1, {d}], got {kept_dims}")
        n_full = (seq_lens.to(dev, torch.int64) // block_size).clamp(max=m)
        valid = torch.arange(m, device=dev)[None] < n_full[:, None]  # [B, M]
        blocks = torch.where(valid, _safe_ids(block_table.to(dev), nb), 0)
        importance = (abs_sums[blocks].to(torch.float32) * valid[:, :, None, None]).sum(1)  # [B, Hkv, D]
        dims = importance.topk(kept_dims, dim=-1).indices
        keep = torch.zeros(b, hkv, d, device=dev).scatter_(2, dims, 1.0)
        qm = q.to(dev, torch.float32).view(b, w, hkv, g, d) * keep[:, None, :, None]  # pruned queries
        logits = torch.einsum("bwhgd,bmhdr->bhwgmr", qm, reps[blocks].to(torch.float32)) * scale
        logits = logits.masked_fill(~valid[:, None, None, None, :, None], -math.inf)
        probs = torch.softmax(logits.reshape(b, hkv, w, g, m * r), dim=-1).nan_to_num(0.0)
        mass = probs.view(b, hkv * w * g, m, r).sum(dim=(1, 3))
        return torch.where(valid, mass, -math.inf)

    # -------------------------------------------------------------- selection
    def block_topk(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        n_blocks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, m = scores.shape
        dev = scores.device
        idx = torch.arange(m, device=dev)
        n_eff = n_blocks.to(dev, torch.int64).clamp(max=m)
        valid = idx[None, :] < n_eff[:, None]
        forced = must_keep & valid
        n_forced = forced.sum(1)
        counts = torch.minimum(n_eff, torch.maximum(k.to(dev, torch.int64), n_forced))
        # rank: forced first, then score descending (NaN and padding last), then index ascending
        s = torch.where(valid, scores.to(torch.float64), -math.inf)
        s = torch.where(torch.isnan(s), -math.inf, s)
        by_score = torch.sort(s, dim=1, descending=True, stable=True).indices  # ties keep index order
        forced_sorted = forced.gather(1, by_score).to(torch.int8)
        ranked = by_score.gather(1, torch.sort(forced_sorted, dim=1, descending=True, stable=True).indices)
        take = idx[None, :] < counts[:, None]
        chosen = torch.where(take, ranked, m)  # m sorts after every real id
        ids = torch.sort(chosen, dim=1).values
        ids = torch.where(ids == m, -1, ids).to(torch.int32)
        return ids, counts.to(torch.int32)

    # -------------------------------------------------------------- attention
    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hq, d = q.shape
        _, bs, hkv, _ = k_cache.shape
        dv = v_cache.shape[-1]
        m = block_table.shape[1]
        g = hq // hkv
        tbl = _safe_ids(block_table, k_cache.shape[0])
        k = k_cache[tbl].to(torch.float32).reshape(b, m * bs, hkv, d)
        v = v_cache[tbl].to(torch.float32).reshape(b, m * bs, hkv, dv)
        qg = q.to(torch.float32).view(b, hkv, g, d)
        logits = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
        valid = torch.arange(m * bs, device=q.device)[None] < seq_lens.to(torch.int64)[:, None]
        logits = torch.where(valid[:, None, None], logits, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
        p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
        out = torch.einsum("bhgt,bthd->bhgd", p, v)
        return out.reshape(b, hq, dv).to(q.dtype), lse.reshape(b, hq)
