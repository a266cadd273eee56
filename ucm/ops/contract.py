"""The op contract: the few primitives every sparse algorithm is built from.

Every backend (cpu, cuda, ascend) implements this class; `ucm.ops.reference.TorchReferenceOps`
is the oracle they are tested against. Algorithms only ever call these methods, so a new
device is one subclass away.

Shapes (one letter per dimension, used in every docstring below):
    B   decode rows in the step            Hq  query heads      Hkv  KV heads (G = Hq // Hkv)
    D   head dim (MLA: kv_lora + rope)      NB  physical blocks  bs   tokens per block
    M   block-table width                   C   code bytes per token and KV head (= ceil(bits/8))
    R   representations per block (KVStar merges tokens; ESA/GSA/Quest: groups of bs // R tokens)
    W   queries per row (KVStar's window of recent decode queries)

Paged layouts (device-neutral; integrations adapt their engine's layout to these):
    k_cache / v_cache   [NB, bs, Hkv, D]  (MLA: Hkv = 1, D = kv_lora_rank + qk_rope_head_dim)
    code cache          [NB, bs, Hkv, C]  uint8
    representation      [NB, Hkv, D] float32 (or running sums [NB, R, Hkv, D] in the backend's
                        `group_sums_dtype`, `block_sums_add`, which the scoring ops take whole),
                        indexed by physical block
                        (Quest keeps two [NB, (R,) Hkv, D]: the element-wise min and max of K;
                        KVStar's channel-major reps are [NB, Hkv, D, R], see `kvstar_reps_add`)
    block_table         [B, M] int32/int64 physical block ids (entries past a row's end ignored)
    seq_lens            [B] int; row b owns n_b = ceil(seq_lens[b] / bs) blocks

Conventions shared by every backend (bit-exactness depends on them):
    * hash bit = 1 iff value >= 0; 8 bits per byte, bit i of a byte is element 8*j+i
      (little-endian inside the byte, `torch_npu.npu_sign_bits_pack` semantics), padded with 0.
      NaN packs as 0 (NaN >= 0 is false; torch_npu's own op would give 1, the Ascend backend
      forces 0).
    * hamming "mean" is float32(exact integer sum / count), rounded once.
    * block scores: larger = more important. Hamming distances are returned as-is (smaller =
      closer); callers negate them before `block_topk`.
    * `block_topk` breaks ties towards the lower block index and returns ids sorted ascending.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from enum import IntEnum
from typing import Literal

import torch

from ucm.ops.hash_cosine import centred, cosine_block_distances
from ucm.ops.subblocks import grouped_block_scores


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as raw bytes where it is a float8 tensor (torch's index_fill / index_copy do not take
    float8 dtypes; +0.0 is the zero byte in each), else `t` itself."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def keys_at(cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The keys a paged cache [NB, bs, Hkv, D] holds at slot_mapping [T] (padding slots < 0 read
    slot 0; the writes that use them skip those rows) -> [T, Hkv, D]."""
    at = slot_mapping.to(device=cache.device, dtype=torch.int64).clamp(min=0)
    bs = cache.shape[1]
    return cache[at // bs, at % bs]


BlockReduce = Literal["mean", "max", "min"]
GroupReduce = Literal["mean", "max"]
#: which per-layer representation update `reps_write_layers` applies: `block_sums_add`,
#: `block_minmax_update` or `kvstar_reps_add`
RepsKind = Literal["sums", "minmax", "kvstar"]


class ReduceCode(IntEnum):
    """A `BlockReduce` name as the integer the kernels receive: the one numbering of it (the C++
    `Reduce` enum echoes it through `reduce_codes()`, the Triton scorer takes it as `REDUCE`)."""

    MIN = 0
    MEAN = 1
    MAX = 2


class GroupReduceCode(IntEnum):
    """A `GroupReduce` name as the integer the kernels receive (C++ `GroupReduce`, echoed by
    `group_reduce_codes()`; the Triton scorers' `MODE`)."""

    MEAN = 0
    MAX = 1


def reduce_code(name: str) -> ReduceCode:
    """The kernels' code of a `BlockReduce` name; ValueError naming the valid ones otherwise."""
    for code in ReduceCode:
        if code.name.lower() == name:
            return code
    raise ValueError(f"unknown block reduce {name!r}; valid: mean, max, min")


def group_reduce_code(name: str) -> GroupReduceCode:
    """The kernels' code of a `GroupReduce` name; ValueError naming the valid ones otherwise."""
    for code in GroupReduceCode:
        if code.name.lower() == name:
            return code
    raise ValueError(f"unknown group reduce {name!r}; valid: mean, max")


class SparseOps(ABC):
    """Abstract op contract. Subclasses override what they accelerate and inherit the rest."""

    #: registry name of the backend ("reference", "cpu", "cuda", "ascend")
    name: str = "abstract"

    # ---------------------------------------------------------------- hashing
    @abstractmethod
    def sign_bits_pack(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] float -> [..., ceil(n/8)] uint8; bit = x >= 0, little-endian in a byte."""

    @abstractmethod
    def hash_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Hash codes of x: [..., d] @ weight [d, nbits] -> sign_bits_pack -> [..., nbits/8]."""

    # ------------------------------------------------------------ paged cache
    @abstractmethod
    def paged_write(self, cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write token rows into a paged cache in place.

        cache [NB, bs, ...], values [T, ...], slot_mapping [T] (slot = block * bs + offset;
        negative slots are padding and skipped, as in vLLM).
        """

    # ---------------------------------------------------------------- scoring
    @abstractmethod
    def hamming_block_scores(
        self,
        q_codes: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """Hamming distance of every block to the query, never materialising [B, Hq, tokens].

        q_codes [B, Hq, C], k_codes [NB, bs, Hkv, C] -> float32 [B, M].
        token distance(b, t) = sum over q heads h of popcount(q[b, h] ^ k[t, h // G]);
        block distance = reduce (min/mean/max) over the block's valid tokens; +inf past n_b.
        """

    @abstractmethod
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
        """Dot-product block scores against per-block representations.

        q [B, Hq, D], repr_cache [NB, Hkv, D] -> float32 [B, M]; -inf past n_b.
            "mean": the GQA group's queries are averaged, dotted with the head's repr,
                    summed over KV heads (ESA).
            "max":  each query head is dotted, the max over the group is taken, summed over
                    KV heads (GSA).
        repr_cache [NB, R, Hkv, D] (R groups of block_size // R tokens per block,
        `ucm.ops.subblocks`): each group scores as above and a block as its best group whose
        first token is before the row's end (`grouped_block_scores`).
        `out` float32 [B, M] (optional) is written and returned; with it, `keep_rows` [B] bool
        leaves those rows as they are in `out`, their representations unread (`rows_into`).
        """

    def block_scores_minmax(
        self,
        q: torch.Tensor,
        mins: torch.Tensor,
        maxs: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "max",
    ) -> torch.Tensor:
        """Quest block scores: an upper bound of q . k over the keys of each block, from the
        block's element-wise min / max of K (`block_minmax_update`).

        q [B, Hq, D], mins / maxs [NB, Hkv, D] -> float32 [B, M]; -inf past n_b. For row b,
        block column j < n_b (physical block p = block_table[b, j]) and query head h * G + g:
            bound(h, g) = sum over channels c of max(q[b, h*G+g, c] * mins[p, h, c],
                                                     q[b, h*G+g, c] * maxs[p, h, c])
            "mean": bound averaged over the GQA group (sum / G), summed over KV heads;
            "max":  the max of bound over the group, summed over KV heads.
        A partial (last) block is scored from the keys written so far. Entries past a row's end
        may hold any id (they are clamped, then masked). mins / maxs [NB, R, Hkv, D]: per group,
        as `block_scores_dot`.
        """
        if mins.dim() == 4:
            return grouped_block_scores(
                lambda reps, table, bs: self.block_scores_minmax(q, *reps, table, seq_lens, bs, group_reduce),
                (mins, maxs),
                block_table,
                block_size,
            )
        b, hq, d = q.shape
        hkv = mins.shape[1]
        m = block_table.shape[1]
        g = hq // hkv
        ids = block_table.to(device=mins.device, dtype=torch.int64).clamp(0, max(mins.shape[0] - 1, 0))
        lo = mins[ids].to(torch.float32)  # [B, M, Hkv, D]
        hi = maxs[ids].to(torch.float32)
        qg = q.to(device=mins.device, dtype=torch.float32).view(b, 1, hkv, g, d)
        bound = torch.maximum(qg * lo[:, :, :, None], qg * hi[:, :, :, None]).sum(-1)  # [B, M, Hkv, G]
        if group_reduce == "mean":
            s = bound.mean(-1).sum(-1)
        elif group_reduce == "max":
            s = bound.amax(-1).sum(-1)
        else:
            raise ValueError(f"unknown group reduce {group_reduce!r}; valid: mean, max")
        n_b = (seq_lens.to(device=mins.device, dtype=torch.int64) + block_size - 1) // block_size
        valid = torch.arange(m, device=mins.device)[None, :] < n_b[:, None]
        return torch.where(valid, s, -math.inf)

    # -------------------------------------------------------------- selection
    @abstractmethod
    def block_topk(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        n_blocks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row top-k block selection with forced blocks.

        scores [B, M] float (larger = better), k [B] int budgets, must_keep [B, M] bool,
        n_blocks [B] int -> (ids [B, M] int32 ascending, padded with -1; counts [B] int32).
        Row b keeps every valid must_keep block, then fills up to k[b] blocks with the best
        remaining valid blocks (ties -> lower index; NaN ranks last); forced blocks always win,
        even against +inf scores. counts[b] = min(n_b, M, max(k_b, forced)).
        """

    def select_and_rewrite(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        largest: bool = True,
        out: torch.Tensor | None = None,
        keep_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`block_topk` and the block table attention reads, in one op with static shapes (the
        decode path under CUDA graphs calls this once per sparse layer).

        scores [B, M] (largest=False ranks smaller first: raw Hamming distances), k [B],
        must_keep [B, M] bool, block_table [B, M], seq_lens [B]; n_b = ceil(seq_lens / bs).
        -> (table [B, M]: physical ids of the kept blocks in ascending logical order, 0 past
        them, in block_table's dtype; lens [B]: the tokens attention reads, i.e. kept blocks * bs
        less the unwritten tail of the row's last block when it is kept). A row with k >= n_b
        comes back unchanged (its own table and length).

        `out` [B, M] (optional, block_table's dtype) is written and returned as the table; with
        it, `keep_rows` [B] bool leaves those rows' tables as they are in `out` (a previous call's
        selection for the same request, budget and block count: nothing is ranked for them) and
        gives them the length of min(n_b, max(k, forced)) blocks with the last one among them,
        which the caller forces (`must_keep` holds it).
        """
        n_b = (seq_lens.to(torch.int64) + block_size - 1) // block_size
        ranked = scores if largest else -scores
        ids, counts = self.block_topk(ranked, k, must_keep, n_b)
        table = block_table.gather(1, ids.clamp(min=0).to(torch.int64).to(block_table.device))
        table = torch.where(ids.to(table.device) >= 0, table, 0).to(block_table.dtype)
        counts = counts.to(torch.int64).to(seq_lens.device)
        last = ids.to(torch.int64).gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0].to(seq_lens.device)
        tail = (n_b * block_size - seq_lens.to(torch.int64)) * ((last == n_b - 1) & (counts > 0))
        lens = (counts * block_size - tail).to(seq_lens.dtype)
        if keep_rows is not None:
            lens = torch.where(keep_rows.to(lens.device), lens_of_kept_rows(k, must_keep, seq_lens, block_size), lens)
        return rows_into(out, keep_rows, table), lens

    # ---------------------------------------------------------------- a step's plan
    def window_budgets(
        self,
        seq_lens: torch.Tensor,
        eligible: torch.Tensor,
        width: int,
        block_size: int,
        unit_blocks: int = 1,
        ratio: float = 1.0,
        fixed_units: int | None = None,
        min_units: int = 0,
        init_units: int = 0,
        local_units: int = 0,
        must_select: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The budgets `select_and_rewrite` takes for a batch (the static-shape decode path plans
        them once per step and layer policy; a backend with kernels does it in one launch).

        seq_lens [B] int, eligible [B] bool (rows that select); selection units of `unit_blocks`
        blocks, n = ceil(seq_lens / (block_size * unit_blocks)) of them per row. A selecting row
        keeps k_u = min(n, max(min_units, fixed_units if given else ceil(n * ratio))) units, the
        product n * ratio taken in float64; any other row keeps k_u = n. Unit u (of
        ceil(width / unit_blocks)) is forced when u < n and it is among the first `init_units`,
        the last `local_units`, the last one (n - 1), or in `must_select` (a negative entry counts
        from the row's end: n + entry).
        -> (k [B] int64: k_u * unit_blocks blocks; must_keep [B, width] bool: each block the flag
        of its unit; lens [B] in seq_lens' dtype: `lens_of_kept_rows(k, must_keep, seq_lens,
        block_size)`, the tokens the row reads whichever blocks win).
        """
        ub = unit_blocks
        n = (seq_lens.to(torch.int64) + block_size * ub - 1) // (block_size * ub)
        if fixed_units is not None:
            k = torch.full_like(n, fixed_units)
        else:
            k = torch.ceil(n.to(torch.float64) * ratio).to(torch.int64)
        k = torch.minimum(torch.where(eligible.to(n.device), k.clamp(min=min_units), n), n)
        u = torch.arange(-(-width // ub), device=n.device)[None, :]
        nn = n[:, None]
        must = (u < init_units) | (u >= nn - local_units) | (u == nn - 1)
        for s in must_select:
            must |= u == (s if s >= 0 else nn + s)
        must &= u < nn
        if ub > 1:
            k = k * ub
            must = must.repeat_interleave(ub, dim=1)[:, :width]
        return k, must, lens_of_kept_rows(k, must, seq_lens, block_size)

    def add_kept_counts(
        self,
        blocks: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        layer_lens: torch.Tensor,
        n_blocks: torch.Tensor,
        eligible: torch.Tensor,
        block_size: int,
    ) -> None:
        """A step's block counters, added on the device (nothing read back).

        blocks [L, 2] int64 (per layer: blocks read, blocks held), rows [2] int64 (steps with a
        selecting row, selecting rows) are added to in place; lens [P, B] int: the tokens each
        row read under each of the step's P distinct lengths; layer_lens [L] int64: per layer the
        row of `lens` it read, -1 for a layer that read every block it holds, -2 for one that did
        not run; n_blocks [B] int, eligible [B] bool. Only eligible rows count: a layer adds
        sum(ceil(lens[p] / block_size)) (p >= 0), the blocks held (-1) or 0 (-2) as read, and the
        blocks held, sum(n_blocks), as held; rows adds (any eligible, number eligible).
        """
        elig = eligible.to(torch.int64)
        held = (n_blocks.to(torch.int64) * elig).sum()
        kept = (((lens.to(torch.int64) + block_size - 1) // block_size) * elig).sum(1)  # [P]
        which = layer_lens.to(torch.int64)
        read = torch.where(which >= 0, kept[which.clamp(min=0)] if kept.numel() else 0, 0)
        blocks[:, 0] += torch.where(which == -1, held, read)
        blocks[:, 1] += held
        rows += torch.stack([elig.amax() if elig.numel() else elig.sum(), elig.sum()])

    # ---------------------------------------------------------------- hashing, fused
    def hash_write(
        self, code_cache: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Hash keys and write their codes into a paged code cache: code_cache [NB, bs, Hkv, C]
        uint8 (or a view of its last dim), x [T, Hkv, D], weight [D, 8C], slot_mapping [T]
        (negative = padding). Same codes as `paged_write(hash_encode(x, weight))`."""
        self.paged_write(code_cache, self.hash_encode(x, weight), slot_mapping)

    def hash_write_layers(
        self,
        code_caches: Sequence[torch.Tensor],
        k_caches: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
    ) -> None:
        """`hash_write(code_caches[l], keys_l, weights[l], slot_mapping)` for every layer l at
        once, keys_l read from layer l's paged key cache k_caches[l] [NB, bs, Hkv, D] (any
        strides), which already holds the step's keys at slot_mapping (as `reps_write_layers`).
        A call with no tokens changes nothing (a backend may prepare for these tensors)."""
        for codes, cache, weight in zip(code_caches, k_caches, weights, strict=True):
            self.hash_write(codes, keys_at(cache, slot_mapping), weight, slot_mapping)

    def hash_hamming_block_scores(
        self,
        q: torch.Tensor,
        weight: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """`hamming_block_scores(hash_encode(q, weight), ...)`: q [B, Hq, D] -> float32 [B, M]
        block distances (smaller = closer). A backend may fuse the query hash into the scorer;
        its projection may then round differently, flipping a query bit within rounding of 0."""
        return self.hamming_block_scores(self.hash_encode(q, weight), k_codes, block_table, seq_lens, reduce)

    # ------------------------------------------------ hashing, norm-weighted (`ucm.ops.hash_cosine`)
    def hash_norm_write(
        self,
        code_cache: torch.Tensor,
        norm_cache: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        center: torch.Tensor | None,
        slot_mapping: torch.Tensor,
    ) -> None:
        """`hash_write` of the keys minus `center` [Hkv, D] (None: as they are), and their L2
        norms |x - center| (over D, in float32) into norm_cache [NB, bs, Hkv] (bfloat16 or
        float32, rounded once) at the same slots (negative = padding)."""
        xc = centred(x, center)
        self.hash_write(code_cache, xc, weight, slot_mapping)
        self.paged_write(norm_cache, torch.linalg.vector_norm(xc, dim=-1).to(norm_cache.dtype), slot_mapping)

    def hash_norm_write_layers(
        self,
        code_caches: Sequence[torch.Tensor],
        norm_caches: Sequence[torch.Tensor],
        k_caches: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor],
        centers: Sequence[torch.Tensor | None],
        slot_mapping: torch.Tensor,
    ) -> None:
        """`hash_norm_write` for every layer l at once, keys read from layer l's paged key
        cache k_caches[l] [NB, bs, Hkv, D] at slot_mapping (as `hash_write_layers`)."""
        for codes, norms, cache, weight, center in zip(
            code_caches, norm_caches, k_caches, weights, centers, strict=True
        ):
            self.hash_norm_write(codes, norms, keys_at(cache, slot_mapping), weight, center, slot_mapping)

    def hamming_cosine_block_scores(
        self,
        q_codes: torch.Tensor,
        q_norms: torch.Tensor,
        k_codes: torch.Tensor,
        k_norms: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """Block distances from the norm-weighted SimHash estimate of q . k.

        q_codes [B, Hq, C], q_norms [B, Hq] float32 (|q_h|), k_codes [NB, bs, Hkv, C], k_norms
        [NB, bs, Hkv] (bfloat16 or float32, `hash_norm_write`) -> float32 [B, M].
        token distance(b, t) = -sum over q heads h of q_norms[b, h] * k_norms[t, h // G]
        * cos(pi * popcount(q[b, h] ^ k[t, h // G]) / (8 C)); block distance = reduce (min /
        mean / max) over the block's valid tokens; +inf past n_b. Floats: backends may sum in
        another order (within float32 rounding of this definition).
        """
        reduce_code(reduce)
        return cosine_block_distances(q_codes, q_norms, k_codes, k_norms, block_table, seq_lens, reduce)

    def hash_cosine_block_scores(
        self,
        q: torch.Tensor,
        weight: torch.Tensor,
        k_codes: torch.Tensor,
        k_norms: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        """`hamming_cosine_block_scores(hash_encode(q, weight), |q|, ...)`: q [B, Hq, D] ->
        float32 [B, M] block distances. A backend may fuse the query hash and norms into the
        scorer (its projection may then flip a query bit within rounding of 0)."""
        q_norms = torch.linalg.vector_norm(q.to(torch.float32), dim=-1)
        return self.hamming_cosine_block_scores(
            self.hash_encode(q, weight), q_norms, k_codes, k_norms, block_table, seq_lens, reduce
        )

    # -------------------------------------------------------------- threads
    def prepare_background_thread(self) -> None:  # noqa: B027  (an optional hook: most backends need nothing)
        """Called once on each background retrieval thread before it runs any op.

        Backends whose kernels start their own thread teams (OpenMP on CPUs) limit them here,
        so asynchronous scoring does not oversubscribe the cores the engine's threads hold.
        """

    # ------------------------------------------------------- representations
    def block_sums_add(
        self,
        sums: torch.Tensor,
        abs_sums: torch.Tensor | None,
        key: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        merge: int,
    ) -> None:
        """Accumulate written keys into per-block running sums, in place (every decode step, every
        layer: ESA/GSA/KVStar representations).

        sums [NB, R, Hkv, D] with R = block_size // merge (group r of block b sums the keys at
        offsets [r * merge, (r + 1) * merge)), float32 or the dtype `group_sums_dtype` names or a
        method asks for (bfloat16, float16, float8_e4m3fn: a group takes the call's keys summed in
        float32 and is rounded once to nearest even; float8 saturates at +-448, as torch's cast);
        abs_sums [NB, Hkv, D] float32 or None (sums of |K| per block); key [T, Hkv, D];
        slot_mapping [T] (slot = block * block_size + offset, negative = not written). A block
        whose offset 0 is written restarts from zero (blocks are recycled) before any key of the
        call is added.
        """
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(sums.device, torch.int64)
        key = key[keep.to(key.device)].to(sums.device, torch.float32)
        # checked on the host only: on an accelerator the check would sync every layer and step
        if slots.device.type == "cpu" and slots.numel() and int(slots.max()) >= sums.shape[0] * block_size:
            raise ValueError(f"block_sums_add: slot {int(slots.max())} is past {sums.shape[0]} blocks of {block_size}")
        blocks, offsets = slots // block_size, slots % block_size
        fresh = blocks[offsets == 0]
        if fresh.numel():
            byte_view(sums).index_fill_(0, fresh, 0)
            if abs_sums is not None:
                abs_sums.index_fill_(0, fresh, 0.0)
        n, r, h, d = sums.shape
        rows, flat = blocks * r + offsets // merge, sums.view(n * r, h, d)
        if sums.dtype == torch.float32:
            flat.index_add_(0, rows, key)
        else:  # each touched group: the call's keys summed in float32, added, rounded once (float8: saturated)
            touched, at = torch.unique(rows, return_inverse=True)
            call = key.new_zeros(touched.shape[0], h, d).index_add_(0, at, key)
            new = flat.index_select(0, touched).float() + call
            if sums.element_size() == 1:  # saturate: torch before 2.12 casts float8 overflow to NaN
                fmax = torch.finfo(sums.dtype).max
                new = new.clamp(-fmax, fmax)
            new = new.to(sums.dtype)
            byte_view(flat).index_copy_(0, touched, byte_view(new))
        if abs_sums is not None:
            abs_sums.index_add_(0, blocks, key.abs())

    def block_minmax_update(
        self, mins: torch.Tensor, maxs: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
    ) -> None:
        """Fold written keys into per-block running element-wise minima and maxima of K, in place
        (every decode step, every layer: Quest's representation).

        mins, maxs [NB, Hkv, D] float32 or the dtype `group_bounds_dtype` names (both the same);
        a key the bounds' dtype cannot hold is rounded outward first (a min down, a max up), so
        they stay bounds of the keys; key [T, Hkv, D]; slot_mapping [T] (slot = block *
        block_size + offset, negative = not written). As in `block_sums_add`, a block whose offset
        0 is written restarts (blocks are recycled) before any key of the call is folded in: its
        mins become +inf and its maxs -inf, then every key of the call written to it is taken in,
        so after the call it holds exactly the min / max of the keys written since its offset 0.
        A block never restarted keeps whatever it held (a scorer allocates zeros). NaN keys
        propagate here and on the CPU backend; keys are expected finite.
        """
        if maxs.dtype != mins.dtype:
            raise ValueError(f"block_minmax_update: mins are {mins.dtype}, maxs {maxs.dtype}: one dtype")
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(mins.device, torch.int64)
        key = key[keep.to(key.device)].to(mins.device, torch.float32)
        if slots.device.type == "cpu" and slots.numel() and int(slots.max()) >= mins.shape[0] * block_size:
            raise ValueError(
                f"block_minmax_update: slot {int(slots.max())} is past {mins.shape[0]} blocks of {block_size}"
            )
        blocks, offsets = slots // block_size, slots % block_size
        fresh = blocks[offsets == 0]
        if fresh.numel():
            mins.index_fill_(0, fresh, math.inf)
            maxs.index_fill_(0, fresh, -math.inf)
        if not slots.numel():
            return
        n = mins.shape[0]
        flat = key.reshape(key.shape[0], -1)
        idx = blocks[:, None].expand(-1, flat.shape[1])
        # rounding is monotone, so the min of keys rounded down is the min rounded down
        mins.view(n, -1).scatter_reduce_(0, idx, round_outward(flat, mins.dtype, down=True), "amin", include_self=True)
        maxs.view(n, -1).scatter_reduce_(0, idx, round_outward(flat, maxs.dtype, down=False), "amax", include_self=True)

    def reps_write_layers(
        self,
        kind: RepsKind,
        a: Sequence[torch.Tensor],
        b: Sequence[torch.Tensor | None],
        k_caches: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
        block_size: int,
        merge: int,
    ) -> None:
        """One step's keys folded into every layer's representations at once, read from where
        the step wrote them (a decode step's representation writes: one launch on a backend with
        a kernel, not one per layer).

        k_caches[l] [NB, bs, Hkv, D] (any strides) is layer l's paged key cache, already holding
        the step's keys at slot_mapping [T] (negative = not written). The result is, for every
        l, that of `block_sums_add(a[l], b[l], keys, slot_mapping, block_size, merge)` ("sums"),
        `block_minmax_update(a[l], b[l], keys, slot_mapping, merge)` ("minmax": per group of `merge`
        tokens, a[l] and b[l] [NB * bs / merge, Hkv, D]; merge = bs: per block) or
        `kvstar_reps_add(a[l], b[l], keys, slot_mapping, block_size, merge)` ("kvstar"), where
        keys [T, Hkv, D] are the cache's values at the slots. A call with no tokens changes
        nothing (a backend may prepare what calls with these tensors need: the CUDA backend's
        table of their addresses, made before a CUDA graph captures a call).
        """
        if kind not in ("sums", "minmax", "kvstar"):
            raise ValueError(f"reps_write_layers: unknown kind {kind!r}; valid: sums, minmax, kvstar")
        slots = slot_mapping.to(torch.int64).clamp(min=0)
        for a_l, b_l, cache in zip(a, b, k_caches, strict=True):
            at = slots.to(cache.device)
            key = cache[at // block_size, at % block_size]  # [T, Hkv, D]; padding slots read block 0, ignored
            if kind == "sums":
                self.block_sums_add(a_l, b_l, key, slot_mapping, block_size, merge)
            elif kind == "minmax":
                self.block_minmax_update(a_l, b_l, key, slot_mapping, merge)
            else:
                self.kvstar_reps_add(a_l, b_l, key, slot_mapping, block_size, merge)

    def group_sums_dtype(self, device: torch.device, merge: int) -> torch.dtype:
        """The dtype of `block_sums_add`'s sums of `merge` keys on `device` (ESA's and GSA's
        representations). float32 (the default) keeps any group exact to float32; a backend may
        keep small groups in half precision to halve what scoring reads every step (the CUDA
        backend: bfloat16 for groups of at most 16 keys, where the representations would
        otherwise be 1/8 or more of the KV cache's bytes; float8 e4m3 for groups of up to 4). A
        group is rounded once per call that writes it, so at most `merge` times."""
        return torch.float32

    def group_bounds_dtype(self, device: torch.device, key_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype of Quest's bounds (`block_minmax_update`) of keys of `key_dtype` (None: not
        known) on `device`. The min or max of keys is one of the keys, so bounds kept in the keys'
        own dtype are exact: the scores are those of float32 bounds, from half the bytes when the
        keys are half precision. float32 (the default) holds any key; a backend whose ops take
        half-precision bounds returns `key_dtype` for half-precision keys (the CUDA backend)."""
        return torch.float32

    # ------------------------------------------------------------------ KVStar
    def kvstar_reps_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype this backend keeps KVStar's representations in on `device`, in the
        channel-major layout of `kvstar_reps_add` / `kvstar_block_mass`; None (the default): KVStar
        keeps float32 row-major sums (`block_sums_add`, [NB, R, Hkv, D]) and scores them in torch
        (or a backend's own native path). A backend whose scorer reads only the kept channels
        returns a dtype here (the CUDA backend: bfloat16, half the bytes of float32 sums)."""
        return None

    @abstractmethod
    def kvstar_reps_add(
        self,
        reps: torch.Tensor,
        abs_sums: torch.Tensor,
        key: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        merge: int,
    ) -> None:
        """`block_sums_add` into KVStar's channel-major representations, in place (every layer, as
        K is written; no host read on an accelerator).

        reps [NB, Hkv, D, R] (any float dtype; R = block_size // merge; reps[p, h, c, r] is the sum
        of channel c of head h over the keys at offsets [r * merge, (r + 1) * merge) of block p, so
        one channel's R values are contiguous); abs_sums [NB, Hkv, D] float32 (sums of |K| per
        block); key [T, Hkv, D]; slot_mapping [T] (negative = not written). A block whose offset 0
        is written restarts from zero before any key of the call is added. Each representation
        the call touches becomes dtype(float32(old) + float32 sum of the call's keys of its group),
        rounded once per call.
        """

    @abstractmethod
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
        """KVStar's block scores from channel-major representations (`kvstar_reps_add`).

        q [B, W, Hq, D] (a window of W queries per row), reps [NB, Hkv, D, R], abs_sums [NB, Hkv, D]
        -> float32 [B, M]. Only full blocks are scored: n_b = min(seq_lens[b] // block_size, M).
        For row b and KV head h, the kept channels are the kept_dims (1..D) channels with the
        largest sum of abs_sums[p, h, :] over the row's full blocks p. Every query (w, h * G + g),
        zeroed outside its head's kept channels, takes a softmax over the logits
        scale * <q, reps[p, h, :, r]> of all n_b * R representations of the row; a block's score
        is the probability mass its R representations receive, summed over the W * Hq queries.
        -inf for columns j >= n_b (every column of a row without a full block). Entries past a
        row's end may hold any id. Channels tied in importance may be kept either way.
        """

    # -------------------------------------------------------------- attention
    @abstractmethod
    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query token per row over its paged KV (GQA-aware).

        q [B, Hq, D], k_cache [NB, bs, Hkv, D], v_cache [NB, bs, Hkv, Dv]
        -> (out [B, Hq, Dv] in q's dtype, lse [B, Hq] float32, natural log).
        A sparse step passes the rewritten block table and seq_lens of its selection.
        """


def rows_into(out: torch.Tensor | None, keep_rows: torch.Tensor | None, fresh: torch.Tensor) -> torch.Tensor:
    """`fresh` [B, ...] written into `out` (and `out` returned), except the rows `keep_rows` [B]
    marks, which keep what `out` holds; without `out`, `fresh` itself."""
    if out is None:
        return fresh
    if keep_rows is None:
        return out.copy_(fresh)
    keep = keep_rows.to(out.device).view(-1, *([1] * (out.dim() - 1)))
    return torch.where(keep, out, fresh.to(out.dtype), out=out)


def lens_of_kept_rows(
    k: torch.Tensor, must_keep: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The tokens a row reads when it keeps min(n_b, max(k, forced)) of its blocks, the last
    (partly written) one among them (`select_and_rewrite`'s `keep_rows`)."""
    lens = seq_lens.to(torch.int64)
    m = must_keep.shape[1]
    n_b = ((lens + block_size - 1) // block_size).clamp(max=m)
    forced = (must_keep.to(torch.bool) & (torch.arange(m, device=must_keep.device)[None, :] < n_b[:, None])).sum(1)
    kept = torch.minimum(n_b, torch.maximum(k.to(torch.int64), forced))
    return (kept * block_size - (n_b * block_size - lens) * (n_b > 0)).to(seq_lens.dtype)


def round_outward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """float32 values x in `dtype`, each rounded down (`down`) or up to the nearest value of
    `dtype` (a lower or upper bound that stays one; beyond the dtype's range: its largest finite
    value or infinity, whichever bounds). NaN stays NaN. float32 and wider: x itself."""
    if dtype.itemsize >= 4:
        return x.to(dtype)
    y = x.to(dtype)
    back = y.float()
    wrong = back > x if down else back < x
    toward = torch.full_like(y, -math.inf if down else math.inf)
    return torch.where(wrong, torch.nextafter(y, toward), y)
